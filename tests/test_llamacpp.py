"""The llama.cpp backend (``decodekit.llamacpp``, ``load_model(backend="llama.cpp")``) and
llama.cpp as a peer in ``decodekit bench``.

Tests that run llama.cpp need llama-cpp-python (the ``[llamacpp]`` extra, built from source)
and read the bundled GGUF (SmolLM2-135M, Q4_1); the bad-combination tests need neither."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

import decodekit
from decodekit.cache import ModelState, left_pad
from decodekit.validation import DecodeKitError

from conftest import CHAT_PROMPTS, need

pytestmark = pytest.mark.usefixtures("one_thread")

needs_llama_cpp = pytest.mark.needs("llamacpp")

FIXED = {"gamma": 3, "draft_policy": "fixed"}  # always draft, so verification and rollback run
LOSSLESS = [
    ("prompt_lookup", FIXED),
    ("ngram", FIXED),
    ("jacobi", {"block_size": 4}),
    ("speculative", {"drafter": "smollm2-135m-instruct", **FIXED}),  # the GGUF drafting for itself
    ("beam", {"num_beams": 1}),
]


@pytest.fixture(scope="module")
def gguf():
    """The bundled model on the llama.cpp backend, and its tokenizer."""
    need("llamacpp")
    return decodekit.load_model(backend="llama.cpp")


@pytest.fixture(scope="module")
def reference():
    """llama-cpp-python's own high-level API on the same GGUF: its greedy decoding."""
    need("llamacpp")
    from llama_cpp import Llama

    from decodekit.models import gguf_path

    return Llama(str(gguf_path(None)), n_ctx=2048, n_threads=1, n_threads_batch=1, verbose=False)


def llama_greedy(llm, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == max_new_tokens or token in eos:
            break
    return out


def encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for p in prompts]


# ---------------------------------------------------------------------------- greedy = llama.cpp's own
@pytest.mark.slow
@needs_llama_cpp
def test_greedy_equals_llama_cpps_own_greedy(gguf, reference):
    model, tokenizer = gguf
    rows = encode(tokenizer, CHAT_PROMPTS[:3])
    eos = {model.generation_config.eos_token_id}
    expected = [llama_greedy(reference, row, 24, eos) for row in rows]
    assert all(len(e) > 3 for e in expected)
    for row, want in zip(rows, expected):  # batch 1
        assert decodekit.generate(model, [row], max_new_tokens=24).sequences == [want]
    batched = decodekit.generate(model, rows, max_new_tokens=24)  # one batch, ragged prompts
    assert batched.sequences == expected
    assert batched.stats[0].forward_passes <= 24


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("strategy,options", LOSSLESS, ids=[s for s, _ in LOSSLESS])
def test_lossless_strategies_equal_greedy(gguf, strategy, options, batch):
    model, tokenizer = gguf
    texts = ["Repeat exactly: the cat sat on the mat, the cat sat on the mat.", "List 1, 2, 3, 4, 5, 6.",
             "hi", "Copy this: alpha beta gamma delta alpha beta gamma delta"][:batch]
    rows = encode(tokenizer, texts)
    greedy = decodekit.generate(model, rows, max_new_tokens=24, eos_token_id=[])
    out = decodekit.generate(model, rows, strategy=strategy, max_new_tokens=24, eos_token_id=[], **options)
    for prompt, got, want in zip(rows, out.sequences, greedy.sequences):
        assert_greedy_up_to_near_ties(model, prompt, got, want)
    if strategy in ("prompt_lookup", "speculative"):
        assert sum(s.accepted for s in out.stats) > 0  # drafts were verified and kept


NEAR_TIE = 1.5  # logits: llama.cpp's one-token and several-token kernels differ by up to ~1.1 here


def assert_greedy_up_to_near_ties(model, prompt: list[int], got: list[int], want: list[int]) -> None:
    """``got`` equals greedy ``want``, or first differs where greedy's two candidates were
    within ``NEAR_TIE`` logits of each other (llama.cpp is not bitwise batch-invariant: a
    verify forward of k tokens rounds differently from k one-token forwards)."""
    d = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if d is None:
        assert len(got) == len(want)
        return
    logits = fresh_logits(model, [prompt + want[:d]])[0]
    gap = float(logits[want[d]] - logits[got[d]])
    assert gap < NEAR_TIE, f"differs from greedy at token {d} where greedy led by {gap:.2f} logits"


# ---------------------------------------------------------------------------- the state's operations
def fresh_logits(model, rows: list[list[int]]) -> torch.Tensor:
    """Last-position logits ``[B, V]`` of ``rows``, each decoded alone from scratch."""
    return torch.cat([ModelState.prefill(model, torch.tensor([row]))[1][:, -1] for row in rows])


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same logits up to llama.cpp's kernel rounding (calls of other sizes round differently)."""
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    torch.testing.assert_close(a, b, atol=NEAR_TIE, rtol=0)


@pytest.mark.slow
@needs_llama_cpp
def test_rollback_crop_select_rows_and_fork_equal_decoding_from_scratch(gguf):
    model, tokenizer = gguf
    rows = encode(tokenizer, ["What is 2 + 2?", "hi"])
    ids, mask = left_pad(rows, 0)
    state, _ = ModelState.prefill(model, ids, mask)
    assert type(state).__name__ == "LlamaCppState"
    tail = torch.tensor([[11, 12, 13], [21, 22, 23]])
    state.extend(tail, token_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))  # row 1's last column masked
    state.rollback(torch.tensor([2, 0]))  # row 0 keeps 11; row 1 keeps 21, 22
    kept = [rows[0] + [11], rows[1] + [21, 22]]
    nxt = torch.tensor([[5], [6]])
    got = state.extend(nxt)[:, -1]
    assert_same(got, fresh_logits(model, [k + [n] for k, n in zip(kept, [5, 6])]))
    wrong = fresh_logits(model, [rows[0] + [11, 12, 13, 5]])  # what row 0 would be without the rollback
    assert (got[0] - wrong[0]).abs().max() > NEAR_TIE  # the tolerance does tell a wrong cache apart
    kept = [k + [n] for k, n in zip(kept, [5, 6])]

    state.crop(1)  # forget 5 and 6 again
    kept = [k[:-1] for k in kept]
    fork = state.fork(torch.tensor([1, 0]))  # independent copies, swapped
    assert_same(fork.extend(torch.tensor([[7], [8]]))[:, -1],
                fresh_logits(model, [kept[1] + [7], kept[0] + [8]]))
    state.select_rows(torch.tensor([1, 1, 0]))  # row 1 twice (beams), row 0 after
    got = state.extend(torch.tensor([[9], [10], [4]]))[:, -1]
    assert_same(got, fresh_logits(model, [kept[1] + [9], kept[1] + [10], kept[0] + [4]]))
    assert fork.forwards == 4 and state.forwards == 4  # the fork took the state's first 3 forwards
    assert state.take_forwards() == 1


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("strategy,options", [
    ("beam", {"num_beams": 3}), ("eis", {"top_k": 3, "lookahead_steps": 2}), ("sample", {"seed": 0}),
    ("refine", {"add_eos_length": 4, "refine_iter": 1}),
])
def test_every_strategy_runs_and_gives_its_sequences_back(gguf, strategy, options):
    model, tokenizer = gguf
    free = len(model._free)
    out = decodekit.generate(model, encode(tokenizer, ["hi", "Why is the sky blue?"]), strategy=strategy,
                             max_new_tokens=6, **options)
    assert len(out.sequences) == 2 and all(out.sequences)
    assert len(model._free) == free  # beams, rollouts and forks released their llama.cpp sequences


@pytest.mark.slow
@needs_llama_cpp
def test_beams_may_fill_every_sequence(gguf):
    """4 prompts x 4 beams use all 16 sequences: a beam step frees the dropped beams' sequences
    before it copies the kept ones (it asked for a 17th and failed before)."""
    model, tokenizer = gguf
    assert model.n_seq_max == 16
    free = len(model._free)
    prompts = encode(tokenizer, ["hi", "Why is the sky blue?", "Name three colors.", "What is 2+2?"])
    out = decodekit.generate(model, prompts, strategy="beam", num_beams=4, max_new_tokens=6)
    assert len(out.sequences) == 4 and all(out.sequences)
    assert len(model._free) == free


@pytest.mark.slow
@needs_llama_cpp
def test_what_llama_cpp_cannot_do_is_a_one_line_error(gguf):
    model, tokenizer = gguf
    rows = encode(tokenizer, ["hi"])
    with pytest.raises(DecodeKitError, match="use_cache=False is not available on the llama.cpp backend"):
        decodekit.generate(model, rows, max_new_tokens=4, use_cache=False)
    with pytest.raises(DecodeKitError, match=r"drafter 'layers:N' needs a decoder with \.model\.layers"):
        decodekit.generate(model, rows, strategy="speculative", drafter="layers:4", max_new_tokens=4)


@pytest.mark.slow
@needs_llama_cpp
def test_requantized_gguf_is_made_once_and_equals_llama_cpps_own_greedy(gguf, tmp_path, monkeypatch):
    """dtype="q4_0": llama.cpp requantizes the GGUF once into decodekit's cache (a second load
    reuses the file); greedy on it is token-identical to llama.cpp's own greedy on that file."""
    from llama_cpp import Llama

    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path))
    model, tokenizer = decodekit.load_model(backend="llama.cpp", dtype="q4_0", n_seq_max=2)
    assert model.path.parent == tmp_path / "gguf" / "requantized" and model.path.name.endswith("-q4_0.gguf")
    made = model.path.stat().st_mtime_ns
    again, _ = decodekit.load_model(backend="llama.cpp", dtype="q4_0", n_seq_max=2)
    assert again.path == model.path and model.path.stat().st_mtime_ns == made
    assert model.path.stat().st_size < gguf[0].path.stat().st_size  # Q4_0 is smaller than Q4_1
    reference = Llama(str(model.path), n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False)
    rows = encode(tokenizer, CHAT_PROMPTS[:2])
    eos = {model.generation_config.eos_token_id}
    for row in rows:
        assert decodekit.generate(model, [row], max_new_tokens=16).sequences == [llama_greedy(reference, row, 16, eos)]


# ---------------------------------------------------------------------------- bad combinations# ---------------------------------------------------------------------------- bad combinations
@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="vllm"), "backend must be one of 'torch', 'llama.cpp'"),
    (dict(backend="llama.cpp", dtype="int8"), "dtype 'int8' does not apply to backend 'llama.cpp'.* give q4_0 or q8_0"),
    (dict(dtype="q4_0"), "dtype must be one of"),  # a requantized GGUF is for the llama.cpp backend
    (dict(backend="llama.cpp", device="cuda"), "backend 'llama.cpp' runs on the CPU"),
    (dict(n_ctx=4096), "n_ctx: options of backend 'llama.cpp' only"),
])
def test_bad_backend_combinations_fail_in_one_line_before_loading(monkeypatch, kwargs, match):
    monkeypatch.setattr("decodekit.models.local_model_dir", lambda *a: pytest.fail("touched the model"))
    with pytest.raises(DecodeKitError, match=match) as err:
        decodekit.load_model("smollm2-135m-instruct", **kwargs)
    assert "\n" not in str(err.value)


def test_llama_cpp_backend_needs_a_gguf_source(tiny_model_dir):
    with pytest.raises(DecodeKitError, match="needs a GGUF model .* is a Hugging Face directory"):
        decodekit.load_model(str(tiny_model_dir), backend="llama.cpp")


def test_llama_cpp_backend_without_llama_cpp_installed(monkeypatch):
    monkeypatch.setattr("decodekit.llamacpp.llama_cpp_available", lambda: False)
    with pytest.raises(DecodeKitError, match=r"needs llama-cpp-python: run `CMAKE_ARGS=.*GGML_NATIVE=OFF"):
        decodekit.load_model(backend="llama.cpp")


@pytest.mark.parametrize("argv,match", [
    (["--backend", "llama.cpp", "--dtype", "int8"], "dtype 'int8' does not apply to backend 'llama.cpp'"),
    (["--backend", "llama.cpp", "--strategy", "speculative", "--drafter", "layers:4"],
     "drafter 'layers:4' .* not available on backend 'llama.cpp'"),
    (["--backend", "llama.cpp", "--engine", "ray"], "runs in this process only"),
    (["--backend", "torch2"], "backend must be one of"),
    (["--dtype", "q8_0"], "dtype must be one of"),
])
def test_cli_bad_backend_flags_exit_2_in_one_line(monkeypatch, capsys, argv, match):
    from decodekit.cli import main

    monkeypatch.setattr("decodekit.llamacpp.llama_cpp_available", lambda: True)  # reach the other rules
    monkeypatch.setattr("decodekit.models.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["generate", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("decodekit: error:") and "\n" not in err
    assert re.search(match, err)


def test_cli_llama_cpp_backend_without_llama_cpp(monkeypatch, capsys):
    from decodekit.cli import main

    monkeypatch.setattr("decodekit.llamacpp.llama_cpp_available", lambda: False)
    assert main(["generate", "--prompt", "hi", "--backend", "llama.cpp"]) == 2
    assert "needs llama-cpp-python" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the bench
def bench_args(**kw) -> argparse.Namespace:
    from decodekit.bench.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = [x for k, v in kw.items() for x in (f"--{k}", str(v))]
    return parser.parse_args(argv)


def test_bench_peers_and_backend_are_checked_before_loading(monkeypatch, tmp_path):
    from decodekit.bench.config import resolve_config

    monkeypatch.setattr("decodekit.llamacpp.llama_cpp_available", lambda: False)
    with pytest.raises(DecodeKitError, match="needs llama-cpp-python"):
        resolve_config(bench_args(peers="llama.cpp", output_dir=tmp_path))
    with pytest.raises(DecodeKitError, match="peers must be one of 'llama.cpp'"):
        resolve_config(bench_args(peers="vllm", output_dir=tmp_path))
    monkeypatch.setattr("decodekit.llamacpp.llama_cpp_available", lambda: True)
    with pytest.raises(DecodeKitError, match="give either it or --dtypes"):
        resolve_config(bench_args(backend="llama.cpp", dtypes="float32", output_dir=tmp_path))


def test_bench_plans_llama_cpp_peer_rows_beside_ours(monkeypatch, tmp_path):
    from decodekit.bench.config import resolve_config
    from decodekit.bench.runners import plan_runs

    monkeypatch.setattr("decodekit.llamacpp.llama_cpp_available", lambda: True)
    cfg = resolve_config(bench_args(peers="llama.cpp", backend="llama.cpp", strategies="greedy,prompt_lookup,beam",
                                    batch_sizes="1,4", gammas="", output_dir=tmp_path))
    keys = {(r.strategy, r.impl, r.dtype, r.batch_size) for r in plan_runs(cfg)}
    for bs in (1, 4):
        assert ("greedy", "llama.cpp", "llama.cpp", bs) in keys
        assert ("prompt_lookup", "llama.cpp", "llama.cpp", bs) in keys
        assert ("greedy", "decodekit", "llama.cpp", bs) in keys
    assert not any(impl in ("floor", "transformers") for _, impl, _, _ in keys)  # torch-only rows
    cfg = resolve_config(bench_args(peers="llama.cpp", dtypes="float32,llama.cpp:q4_0", strategies="greedy",
                                    batch_sizes="1", gammas="", output_dir=tmp_path))
    keys = {(r.strategy, r.impl, r.dtype) for r in plan_runs(cfg)}
    assert {("greedy", "llama.cpp", "llama.cpp:q4_0"), ("greedy", "decodekit", "llama.cpp:q4_0"),
            ("greedy", "transformers", "float32")} <= keys  # the peer runs beside our requantized model
    with pytest.raises(DecodeKitError, match="dtypes must be one of"):
        resolve_config(bench_args(dtypes="llama.cpp:q4_1", output_dir=tmp_path))


@pytest.mark.slow
@needs_llama_cpp
def test_bench_runs_the_llama_cpp_peer_and_checks_identity(gguf, tmp_path):
    from decodekit.bench.cli import run_bench
    from decodekit.bench.config import resolve_config

    model, tokenizer = gguf
    cfg = resolve_config(bench_args(peers="llama.cpp", backend="llama.cpp", strategies="greedy,prompt_lookup",
                                    batch_sizes="1", gammas="", trials=1, max_new_tokens=8, num_prompts=1,
                                    suite="chat", output_dir=tmp_path))
    results, completed = run_bench(cfg, {"llama.cpp": model}, tokenizer, "smollm2-135m-instruct")
    assert completed
    runs = {(r["strategy"], r["impl"]): r for r in results["runs"]}
    assert set(runs) == {("greedy", "decodekit"), ("prompt_lookup", "decodekit"), ("greedy", "llama.cpp"),
                         ("prompt_lookup", "llama.cpp")}
    assert all(r["error"] is None and r["trials"] for r in runs.values())
    assert runs[("greedy", "llama.cpp")]["identical_to_greedy"] == "1/1"  # ours = llama.cpp's own greedy
    assert runs[("prompt_lookup", "llama.cpp")]["identical_to_greedy"] == "1/1"
