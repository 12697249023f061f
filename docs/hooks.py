"""MkDocs hook: the repository files the docs link to become part of the site.

The pages link to the committed benchmark reports (``../benchmarks/results/<run>/report.md``),
the changelog and the shipped drafter's card with paths that work when the Markdown is read in
the repository. This hook adds those files to the site (the reports render as pages, with their
plots) and rewrites such links to the copies, so the built site has no dead links either.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

ROOT = Path(__file__).resolve().parents[1]
SHARED = ["CHANGELOG.md", "CONTRIBUTING.md", "LICENSE", "benchmarks/README.md", "benchmarks/results",
          "src/decodekit/drafters"]
PREFIX = "repo"  # where the copies live in the site
LINK = re.compile(r"\]\((?![a-z]+:|#)([^)#\s]+)(#[^)\s]*)?\)")


def _repo_files() -> list[str]:
    out = []
    for entry in SHARED:
        path = ROOT / entry
        paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out += [p.relative_to(ROOT).as_posix() for p in paths if p.suffix != ".safetensors"]
    return out


def on_files(files, config):
    for rel in _repo_files():
        # under repo/ in the site, apart from the pages of docs/
        files.append(File.generated(config, f"{PREFIX}/{rel}", abs_src_path=str(ROOT / rel),
                                    inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown, page, config, files):
    """Links are written for the repository (``docs/x.md`` -> ``../benchmarks/...``,
    ``CHANGELOG.md`` -> ``docs/performance.md``); point them at the site's copies."""
    src = page.file.src_uri
    repo_path = src[len(PREFIX) + 1:] if src.startswith(f"{PREFIX}/") else f"docs/{src}"

    def rewrite(match):
        target = posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), match.group(1)))
        if target.startswith("docs/"):
            site = target[len("docs/"):]
        elif files.get_file_from_path(f"{PREFIX}/{target}") is not None:
            site = f"{PREFIX}/{target}"
        else:
            return match.group(0)
        new = posixpath.relpath(site, posixpath.dirname(src) or ".")
        return f"]({new}{match.group(2) or ''})"

    return LINK.sub(rewrite, markdown)
