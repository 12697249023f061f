"""The playground page in a real headless Chromium (Debian's ``chromium``, driven by
Playwright; never a downloaded browser): two strategies stream side by side from the real
server and bundled model, their tokens coloured by kind. Saves a screenshot into the test's
temporary folder (its path is printed; tests never write into tracked files)."""

import pytest

from conftest import CHROMIUM

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(real_model):
    from decodekit.model_info import context_length
    from decodekit.serve.app import BackgroundServer, create_app
    from decodekit.serve.engine import Engine

    model, tokenizer = real_model
    engine = Engine(model, tokenizer, max_batch_size=4)
    engine.start()
    running = BackgroundServer(create_app(engine, tokenizer, "smollm2-135m-instruct",
                                          context=context_length(model))).start()
    yield running
    running.stop()
    engine.stop()


@pytest.mark.needs("chromium")
def test_two_strategies_stream_side_by_side(server, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        columns = page.locator(".col")
        assert columns.count() == 2
        assert columns.nth(0).locator("header select").input_value() == "greedy"
        assert columns.nth(1).locator("header select").input_value() == "prompt_lookup"
        page.fill("#prompt", "Repeat exactly: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat.")
        page.fill("#max_tokens", "24")
        page.click("#run")
        for i in range(2):  # both finish: forwards/token is known once the final stats arrive
            page.wait_for_function(
                "i => /\\d\\.\\d\\d forwards\\/token/.test(document.querySelectorAll('.col')[i]"
                ".querySelector('.stats').textContent)", arg=i, timeout=240_000)
        screenshot = tmp_path / "playground.png"
        page.screenshot(path=str(screenshot), full_page=True)
        print(f"playground screenshot: {screenshot}")
        greedy, lookup = columns.nth(0).locator(".tok"), columns.nth(1).locator(".tok")
        assert greedy.count() > 5 and lookup.count() > 5
        assert set(greedy.evaluate_all("els => els.map(e => e.className)")) == {"tok plain"}
        drafted = set(lookup.evaluate_all("els => els.map(e => e.className)")) - {"tok plain"}
        assert drafted  # prompt lookup's accepted / corrected / bonus tokens are marked
        kind = sorted(drafted)[0].split()[1]
        colours = {greedy.nth(0).evaluate("e => getComputedStyle(e).backgroundColor"),
                   columns.nth(1).locator(".tok." + kind).first.evaluate("e => getComputedStyle(e).backgroundColor")}
        assert len(colours) == 2  # coloured apart from plain tokens
        assert "logprob" in lookup.first.get_attribute("data-info")
        assert "prompt_lookup" in columns.nth(1).locator(".stats").text_content()
        assert greedy.all_text_contents() == lookup.all_text_contents()  # lossless, token for token
        browser.close()
    assert not errors, errors


@pytest.mark.needs("chromium")
def test_every_strategy_has_a_form_from_the_served_schema(server, tmp_path):
    """Each strategy's options are form fields built from ``GET /v1/decoding/options`` (bounds,
    choices, defaults); a field changed in the form goes into the request's ``decoding``."""
    import json
    import urllib.request

    with urllib.request.urlopen(server.url + "/v1/decoding/options") as response:
        schema = json.load(response)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors, sent = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
        page.goto(server.url + "/")
        page.wait_for_function("document.body.dataset.schema === 'loaded'", timeout=30_000)
        column = page.locator(".col").nth(1)
        select = column.locator("header select")
        assert select.evaluate("s => [...s.options].map(o => o.value)") == list(schema["strategies"])
        for name, record in schema["strategies"].items():
            select.select_option(name)
            fields = column.locator(".opts [name]")
            assert fields.evaluate_all("els => els.map(e => e.name)") == list(record["properties"]), name
            for option, prop in record["properties"].items():
                element = column.locator(f".opts [name='{option}']")
                if prop.get("type") in ("integer", "number") and prop.get("minimum") is not None:
                    assert float(element.get_attribute("min")) == prop["minimum"], (name, option)
                if "enum" in prop:
                    assert element.evaluate("e => e.tagName") == "SELECT", (name, option)
        select.select_option("prompt_lookup")
        column.locator(".opts [name='gamma']").fill("3")
        screenshot = tmp_path / "playground-forms.png"
        page.screenshot(path=str(screenshot), full_page=True)
        print(f"playground screenshot: {screenshot}")
        page.fill("#max_tokens", "4")
        page.click("#run")
        page.wait_for_function("document.querySelectorAll('.col')[1].querySelector('.stats').textContent"
                               ".includes('forwards/token') && !document.querySelectorAll('.col')[1]"
                               ".querySelector('.stats').textContent.includes('…')", timeout=120_000)
        browser.close()
    assert not errors, errors
    decodings = [body["decoding"] for body in sent]
    assert {"strategy": "prompt_lookup", "gamma": 3} in decodings
