"""Shared fixtures: tiny random models (fast, any architecture) and the real bundled model."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

# ------------------------------------------------------------------ optional parts
# What `make test` cannot install (a source build, a Debian package): a test that needs one
# is marked ``@pytest.mark.needs("llamacpp")`` and skips with the command that installs it.
# CI (``.ci/run``) installs them all and sets DECODEKIT_REQUIRE_OPTIONAL=1: a missing part
# is then a failure, never a silent skip.
CHROMIUM = "/usr/bin/chromium"


def _llama_cpp_available() -> bool:
    from decodekit.llamacpp import llama_cpp_available

    return llama_cpp_available()


def _int8_kernel_available() -> bool:
    from decodekit.int8_kernel import int8_kernel_problem

    return int8_kernel_problem() is None


OPTIONAL_PARTS = {  # name -> (is it here?, what it is, the command that installs it)
    "llamacpp": (_llama_cpp_available, "llama-cpp-python built from source", "make install-llamacpp"),
    "chromium": (lambda: os.path.exists(CHROMIUM) and shutil.which("chromium") is not None,
                 "Debian's chromium", "apt-get install -y chromium"),
    "int8kernel": (_int8_kernel_available, "decodekit's int8 kernel built (an x86-64 CPU with AVX2, a C++ "
                   "compiler)", "apt-get install -y g++"),
}
REQUIRE_OPTIONAL = os.environ.get("DECODEKIT_REQUIRE_OPTIONAL") == "1"


def need(part: str) -> None:
    """Skip (or, under DECODEKIT_REQUIRE_OPTIONAL=1, fail) unless optional ``part`` is here."""
    available, what, command = OPTIONAL_PARTS[part]
    if available():
        return
    message = f"needs {what}: {command}"
    if REQUIRE_OPTIONAL:
        pytest.fail(f"{message} (DECODEKIT_REQUIRE_OPTIONAL=1: CI installs every optional part)")
    pytest.skip(message)


def pytest_configure(config):
    config.addinivalue_line("markers", "measured_costs: the test times real forwards (no recorded cost curve)")
    config.addinivalue_line("markers", "needs(part): the test needs an optional part "
                            f"that make test does not install ({', '.join(OPTIONAL_PARTS)})")


def pytest_addoption(parser):
    parser.addoption("--without-part", action="append", default=[], metavar="PART",
                     help="deselect the tests that need optional PART (CI runs them after building it)")
    parser.addoption("--only-part", action="append", default=[], metavar="PART",
                     help="select only the tests that need optional PART")


def _parts(item) -> set[str]:
    return {part for mark in item.iter_markers(name="needs") for part in mark.args}


def pytest_collection_modifyitems(config, items):
    without, only = set(config.getoption("--without-part")), set(config.getoption("--only-part"))
    if not (without or only):
        return
    keep = [i for i in items if not (_parts(i) & without) and (not only or _parts(i) & only)]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


def pytest_runtest_setup(item):
    for mark in item.iter_markers(name="needs"):
        for part in mark.args:
            need(part)


def pytest_terminal_summary(terminalreporter):
    """Under DECODEKIT_REQUIRE_OPTIONAL=1 a skip of any kind is reported as an error."""
    if REQUIRE_OPTIONAL and terminalreporter.stats.get("skipped"):
        terminalreporter.write_line("DECODEKIT_REQUIRE_OPTIONAL=1: tests were skipped", red=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session, exitstatus):
    yield
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if REQUIRE_OPTIONAL and reporter is not None and reporter.stats.get("skipped") and session.exitstatus == 0:
        session.exitstatus = 1


def recorded_cost(tokens: int) -> float:
    """A recorded forward-cost shape (seconds for ``tokens`` = rows x new tokens): a nearly
    flat start, then linear, like the measured CPU curves, so the cost policies draft."""
    return 0.05 * (1 + 0.12 * (tokens - 1))


def recorded_feeds(batch: int):
    """The EAGLE head's feed times by width, in the recorded shape (a head costs 0.07 of a target)."""
    from decodekit.costs import CostCurve

    curve = CostCurve()
    curve.points.update({n: 0.07 * recorded_cost(n * batch) for n in (1, 2, 4, 8, 16, 32)})
    return curve


def _real_timers():
    from decodekit import costs
    from decodekit.strategies.eagle import EagleDrafter

    return costs.measure_forwards, EagleDrafter.step_cost, EagleDrafter.feed_costs


REAL_MEASURE, REAL_STEP_COST, REAL_FEED_COSTS = _real_timers()


@pytest.fixture(autouse=True, scope="session")
def recorded_forward_costs():
    """Tests run on a recorded cost curve, not on timings: the ``cost`` and ``adaptive`` draft
    policies then choose the same widths every run, so exact-equality tests that keep the
    default policy are deterministic (session-wide, so module fixtures such as a started
    server engine see it too). A test of the measurement itself is marked
    ``@pytest.mark.measured_costs``; subprocesses measure (and keep no file)."""
    from decodekit import costs
    from decodekit.strategies.eagle import EagleDrafter

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(costs, "measure_forwards",
                   lambda model, todo, batch, repeats: {n: recorded_cost(n * batch) for n in todo})
        mp.setattr(EagleDrafter, "step_cost", lambda self, batch: 0.07 * recorded_cost(batch))
        mp.setattr(EagleDrafter, "feed_costs", lambda self, batch: recorded_feeds(batch))
        mp.setenv("DECODEKIT_COST_CACHE", "0")  # nothing recorded or measured in tests reaches a file
        yield


@pytest.fixture(autouse=True)
def measured_costs(request, monkeypatch, tmp_path):
    """``@pytest.mark.measured_costs``: the real timing, an empty in-memory cache and a
    calibration folder of the test's own."""
    if not request.node.get_closest_marker("measured_costs"):
        return
    from decodekit import costs
    from decodekit.strategies.eagle import EagleDrafter

    monkeypatch.setattr(costs, "measure_forwards", REAL_MEASURE)
    monkeypatch.setattr(EagleDrafter, "step_cost", REAL_STEP_COST)
    monkeypatch.setattr(EagleDrafter, "feed_costs", REAL_FEED_COSTS)
    monkeypatch.setattr(costs, "CURVES", {})
    monkeypatch.setenv("DECODEKIT_COST_CACHE", str(tmp_path / "cost_curves"))


VOCAB = 97  # tiny vocabulary: distributions can be checked exhaustively
EOS = 3
PAD = 0


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = VOCAB):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1, tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model


def tiny_gemma3(seed: int = 0, layers: int = 2, vocab: int = VOCAB):
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"][:layers] + ["full_attention"] * max(0, layers - 2),
        eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model


# ------------------------------------------------------------------ threads
# `make test` runs the suite in pytest-xdist workers (one per core): each worker and every
# process it starts (CLI, docs examples, servers) gets its share of the cores, so the workers
# never fight over them (OpenMP threads spin: oversubscribed cores slow torch 10x and more).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = int(os.environ.get("DECODEKIT_TEST_THREADS", max(1, (os.cpu_count() or 1) // WORKERS)))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models on a shared 2-core machine suffer badly
    from OpenMP contention (20-40x measured). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def real_model_threads(request):
    """Tests on the real model use this worker's share of the cores (``THREADS``: all of them
    without xdist workers), tiny models keep their module's one thread: a 135M model's matmuls
    gain from a second core, a tiny model's only wait on it."""
    if "real_model" not in request.fixturenames:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def gemma():
    return tiny_gemma3()


@pytest.fixture(params=["llama", "gemma3"], scope="session")
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_gemma3()


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct, the bundled default (converted once, then cached), in
    float32 so that "identical to greedy" is checked without bf16 rounding near-ties."""
    import decodekit

    return decodekit.load_model(dtype="float32")


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "hi",
    "Explain what a KV cache is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Name a famous painting by Leonardo da Vinci.",
    "Give me a tip for learning Python.",
    "Why is the sky blue?",
    "Write a short greeting for a birthday card.",
    "What does HTML stand for?",
]


def chat_batch(tokenizer, prompts):
    """Left-padded chat-template batch: (input_ids, attention_mask)."""
    enc = tokenizer.apply_chat_template(
        [[{"role": "user", "content": p}] for p in prompts],
        add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True,
    )
    return enc["input_ids"], enc["attention_mask"]


def hf_new_tokens(model, ids, mask, **kw):
    """transformers generate(), new tokens per row cut after the first EOS."""
    out = model.generate(ids, attention_mask=mask, **kw)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


@pytest.fixture(scope="session")
def bundled_tokenizer():
    """The bundled model's tokenizer, read from its GGUF file (no converted cache needed)."""
    from transformers import AutoTokenizer

    from decodekit.models import BUNDLED_MODELS

    gguf = BUNDLED_MODELS["smollm2-135m-instruct"].gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_tokenizer):
    """A saved tiny random Llama with the bundled tokenizer: ``--model_path`` for CLI tests."""
    tokenizer = bundled_tokenizer
    model = tiny_llama(seed=3, vocab=len(tokenizer))
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
