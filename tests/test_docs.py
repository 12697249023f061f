"""The README and docs/: every code block runs as written, the site builds with --strict,
internal links and anchors resolve, the generated pages match the code and the reports.

Code blocks: one test per ```python or ```bash block, in file order. Python blocks of one file
share a namespace. Bash blocks run their commands: ``decodekit ...`` and ``python -m
decodekit.demo ...`` in this process (no interpreter start-up per command), anything else
through bash from the repository root. ```text and ```mermaid blocks are diagrams, not code.
A marker comment on the line before a block says what it needs:

    <!-- needs: llamacpp -->   an optional part (tests/conftest.py OPTIONAL_PARTS): skipped with
                               its install command, a failure under DECODEKIT_REQUIRE_OPTIONAL=1
    <!-- needs: server -->     a decodekit server on 127.0.0.1:8000 (started here, in process)
    <!-- skip-test: why -->    not run: only where running it is impossible (installs, benchmarks)

The link check is offline: it checks relative links (files and #anchors), not web addresses.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import need

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
LINKED_FILES = [*DOC_FILES, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]
BLOCK = re.compile(r"(?:<!--\s*(needs|skip-test):\s*(.*?)\s*-->\n)?^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
RUNNABLE = {"python", "bash"}
DIAGRAMS = {"text", "mermaid"}
DOCS_PORT = 8000


@dataclass
class Block:
    path: Path
    index: int
    lang: str
    code: str
    marker: str | None
    reason: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.index}:{self.lang}"


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    return [Block(path, n, m.group(3), m.group(4), m.group(1), m.group(2) or "")
            for n, m in enumerate(BLOCK.finditer(text))]


ALL_BLOCKS = [b for path in DOC_FILES for b in blocks(path)]
# skip-test blocks are not collected at all (CI turns every skip into a failure); they are
# listed by test_every_block_has_a_known_language_and_marker's checks instead
RUN_BLOCKS = [b for b in ALL_BLOCKS if b.lang in RUNNABLE and b.marker != "skip-test"]
SKIPPED_BLOCKS = [b for b in ALL_BLOCKS if b.marker == "skip-test"]


# ------------------------------------------------------------------ static checks
def test_every_block_has_a_known_language_and_marker():
    for b in ALL_BLOCKS:
        assert b.lang in RUNNABLE | DIAGRAMS, f"{b.id}: unknown block language {b.lang!r}"
        if b.marker == "skip-test":
            assert b.reason, f"{b.id}: skip-test needs a reason"
        if b.marker == "needs":
            assert b.reason in {"server", "llamacpp", "chromium"}, f"{b.id}: unknown need {b.reason!r}"


def test_readme_is_short_and_has_no_journal():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250)"
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\btoday\b", text, re.I), f"{path.name}: 'today' has no date"


def test_docs_commands_never_write_into_committed_results():
    for path in DOC_FILES:  # code blocks and the commands quoted in generated tables alike
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"--output_dir\s+\S*benchmarks/results", text), f"{path.name} writes into benchmarks/results"


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (what MkDocs and the link check use)."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


@functools.cache
def anchors(path: Path) -> set[str]:
    text = BLOCK.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*$", text, re.M):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}_{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_relative_links_and_anchors_resolve():
    bad = []
    for path in LINKED_FILES:
        text = BLOCK.sub("", path.read_text(encoding="utf-8"))
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # web addresses: not checked (no network)
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                bad.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_generated_reference_pages_are_current():
    pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_reference
    finally:
        sys.path.pop(0)
    assert gen_reference.main(["--check"]) == 0, "run: python docs/gen_reference.py"


def test_performance_tables_match_the_committed_reports():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import docs_tables
    finally:
        sys.path.pop(0)
    assert docs_tables.main(["--check"]) == 0, "run: python benchmarks/docs_tables.py"
    for name in docs_tables.TABLES:  # every table is used somewhere
        assert any(f"<!-- table: {name} -->" in t.read_text(encoding="utf-8") for t in docs_tables.TARGETS), name


def test_mkdocs_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stdout + run.stderr


# ------------------------------------------------------------------ running the blocks
@pytest.fixture(scope="module")
def shared_models():
    """``load_model`` memoized for this module: the blocks load the same few models again and
    again; each load would cost seconds. The blocks still call it as written."""
    import decodekit
    import decodekit.models as models

    original = models.load_model

    @functools.lru_cache(maxsize=3)
    def cached(spec=None, **kwargs):
        return original(spec, **kwargs)

    def load_model(spec=None, **kwargs):
        try:
            return cached(spec, **kwargs)
        except TypeError:  # unhashable option: load as asked
            return original(spec, **kwargs)

    models.load_model = decodekit.load_model = load_model
    yield
    models.load_model = decodekit.load_model = original
    cached.cache_clear()


@pytest.fixture(scope="module")
def docs_server(shared_models):
    """The server the docs' ``needs: server`` blocks talk to: the bundled model in float32,
    started as ``decodekit serve`` starts it (port 8000, or a free one if that is taken)."""
    pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
    import decodekit
    from decodekit.model_info import context_length
    from decodekit.serve.app import BackgroundServer, create_app
    from decodekit.serve.engine import Engine

    model, tok = decodekit.load_model(dtype="float32")
    engine = Engine(model, tok, max_batch_size=2)
    engine.start()
    app = create_app(engine, tok, "smollm2-135m-instruct", context=context_length(model))
    try:
        server = BackgroundServer(app, port=DOCS_PORT).start()
    except (RuntimeError, OSError):
        server = BackgroundServer(app, port=0).start()
    yield f"127.0.0.1:{server.port}"
    server.stop()
    engine.stop()


NAMESPACES: dict[Path, dict] = {}


def _commands(code: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, quoted newlines kept."""
    out, buffer = [], ""
    for line in code.replace("\\\n", " ").splitlines():
        buffer = f"{buffer}\n{line}" if buffer else line
        try:
            words = shlex.split(buffer, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if words:
            out.append(buffer)
        buffer = ""
    assert not buffer, f"unterminated command: {buffer}"
    return out


def _run_command(command: str, env_url: str | None) -> None:
    words = shlex.split(command, comments=True)
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if words[0] == "decodekit" or words[:3] == ["python", "-m", "decodekit.demo"]:
        from decodekit import cli, demo

        main, args = (cli.main, words[1:]) if words[0] == "decodekit" else (demo.main, words[3:])
        rc = main(args)
        assert rc in (0, None), f"exit code {rc}: {command}"
        return
    if env_url:
        command = command.replace(f"127.0.0.1:{DOCS_PORT}", env_url)
    bin_dir = str(Path(sys.executable).parent)
    run = subprocess.run(["bash", "-c", "set -euo pipefail\n" + command], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, timeout=300)
    assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
    print(run.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("block", [
    pytest.param(b, marks=[pytest.mark.needs(b.reason)] if b.marker == "needs" and b.reason != "server" else [])
    for b in RUN_BLOCKS], ids=[b.id for b in RUN_BLOCKS])
def test_code_block_runs_as_written(block: Block, request, monkeypatch, shared_models):
    url = None
    if block.marker == "needs":
        if block.reason == "server":
            url = request.getfixturevalue("docs_server")
        else:
            need(block.reason)
    import torch

    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CI cores: one thread keeps these steady
    try:
        if block.lang == "python":
            namespace = NAMESPACES.setdefault(block.path, {"__name__": f"docs_{block.path.stem}"})
            code = block.code if url is None else block.code.replace(f"127.0.0.1:{DOCS_PORT}", url)
            exec(compile(code, block.id, "exec"), namespace)
        else:
            for command in _commands(block.code):
                _run_command(command, url)
    finally:
        torch.set_num_threads(threads)
