"""Bad input on the command line: one line on stderr, exit code 2, and no model loaded."""

from __future__ import annotations

import re

import pytest

import decodekit.models as models
from decodekit.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load or GGUF conversion fails the test: checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "_convert_gguf", refuse)


@pytest.fixture
def bad_models(tmp_path):
    """A text file named .gguf, and model directories with broken config.json files."""
    (tmp_path / "x.gguf").write_text("not a gguf file\n")
    for name, text in [("badjson", "{not json"), ("notype", '{"hidden_size": 32}')]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
    return tmp_path


def _one_error_line(capsys, prefix: str = "decodekit: error:") -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(prefix), err
    return err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model_path", "{tmp}/x.gguf"], "model_path .*not a GGUF file"),
        (["--model_path", "{tmp}/badjson"], "model_path .*config.json is not readable JSON"),
        (["--model_path", "{tmp}/notype"], "model_path .*model_type"),
        (["--temperature", "inf"], "temperature must be a finite number"),
        (["--temperature", "nan"], "temperature"),
        (["--strategy", "beam", "--length_penalty", "inf"], "length_penalty must be a finite number"),
        (["--strategy", "speculative", "--egag_ema_beta", "nan"], "egag_ema_beta"),
        (["--stop_strings", ""], "stop_strings must be non-empty"),
        (["--strategy", "speculative", "--drafter", "nonsense"], "^decodekit: error: drafter 'nonsense'"),
        (["--strategy", "speculative", "--drafter", "{tmp}/x.gguf"], "drafter .*not a GGUF file"),
        (["--dtype", "int2"], "dtype must be one of .*'int8', 'int4'; got 'int2'"),
    ],
)
def test_bad_input_is_one_line_before_any_load(capsys, no_model_load, bad_models, argv, match):
    argv = [a.replace("{tmp}", str(bad_models)) for a in argv]
    assert main(["generate", "--prompt", "hi", *argv]) == 2
    err = _one_error_line(capsys)
    assert re.search(match, err), err


def test_drafter_error_does_not_blame_model_path(capsys, no_model_load):
    assert main(["generate", "--prompt", "hi", "--strategy", "speculative", "--drafter", "nonsense"]) == 2
    assert "model_path" not in _one_error_line(capsys)


@pytest.mark.parametrize(
    "argv,prefix,needle",
    [
        (["generate", "--prompt", "hi", "--max_new_tokens", "x"], "decodekit generate: error:", "max_new_tokens"),
        (["generate", "--prompt", "hi", "--bogus"], "decodekit generate: error:", "--bogus"),
        (["generate", "--prompt"], "decodekit generate: error:", "--prompt"),
        (["nope"], "decodekit: error:", "nope"),
        ([], "decodekit: error:", "command"),
    ],
)
def test_usage_errors_are_one_line(capsys, no_model_load, argv, prefix, needle):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = _one_error_line(capsys, prefix)
    assert needle in err and err.endswith("(see --help)"), err


def test_dtype_help_names_the_real_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    cpu, cuda = models.DEFAULT_DTYPES["cpu"], models.DEFAULT_DTYPES["cuda"]
    assert f"(default {cpu} on the CPU, {cuda} on CUDA)" in text


def test_layers_drafter_is_left_to_the_strategy(no_model_load):
    """``layers:N`` is no model path: the pre-load check does not refuse it."""
    from argparse import Namespace

    from decodekit.cli import _validate_model_args

    _validate_model_args(Namespace(dtype=None, device="cpu", model_path=None, drafter="layers:4"))
