"""The playground's JSON Schema box in a real headless Chromium: every column's output follows
the schema and is shown as pretty JSON (skips without Debian's chromium, see conftest)."""

import json

import pytest

from conftest import CHROMIUM

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

import test_playground  # noqa: E402

pytestmark = pytest.mark.slow
server = test_playground.server  # the same module-scoped server fixture

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.needs("chromium")
def test_schema_box_constrains_every_column_and_pretty_prints(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=test_playground.ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.fill("#prompt", "Maria Lopez is 34. Give her as JSON.")
        page.fill("#schema", json.dumps(SCHEMA))
        page.fill("#max_tokens", "40")
        page.click("#run")
        page.wait_for_function("document.querySelectorAll('.col pre.json').length === 2", timeout=240_000)
        texts = page.locator(".col .out").all_text_contents()
        assert texts[0] == texts[1]  # greedy and prompt lookup: lossless under the schema too
        parsed = json.loads(texts[0])
        assert set(parsed) == {"name", "age"}
        assert json.loads(page.locator(".col pre.json").first.text_content()) == parsed
        page.fill("#schema", "{not json")
        page.click("#run")
        page.wait_for_function("document.querySelectorAll('.col .error').length === 2", timeout=60_000)
        assert "JSON Schema" in page.locator(".col .error").first.text_content()
        browser.close()
    assert not errors, errors
