"""The strategy registry: one table drives generate, the CLI flags and validation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import decodekit
from decodekit import DecodeKitError, generate, strategies
from decodekit.cli import build_parser, main
from decodekit.strategies import STRATEGIES, Options, Strategy, autoregressive, option_names
from decodekit.strategies.options import option

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

STRATEGY_DIR = Path(strategies.__file__).parent


def _generate_flags() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest for a in sub.choices["generate"]._actions}


def test_every_registered_strategy_is_complete():
    flags = _generate_flags()
    for name, strategy in STRATEGIES.items():
        assert strategy.name == name and callable(strategy.decode) and strategy.summary
        assert issubclass(strategy.options, Options)
        strategy.options(**({"drafter": "layers:1"} if name == "speculative" else {}))  # defaults valid
        for option_name, _, spec in strategy.options.specs():
            assert spec.help, (name, option_name)
            if spec.cli:
                assert option_name in flags, f"--{option_name} of {name} has no CLI flag"


def test_strategies_never_import_the_front_door():
    for path in STRATEGY_DIR.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        front = r"^\s*(from|import) decodekit(\.(api|cli|bench|seed|batch_runner)\b| import)"
        assert not re.search(front, text, flags=re.M), path


def test_a_new_strategy_is_one_registry_line(monkeypatch):
    """A toy strategy (greedy that records how it was called) registered by one line gets
    generate, option validation and a CLI flag."""

    @dataclass(frozen=True)
    class EchoOptions(Options):
        echo_times: int = option(1, "a toy option", int, min=1)

    seen = []

    def decode(req, opts):
        seen.append(opts.echo_times)
        return autoregressive.decode(req)

    toy = Strategy("toy", decode, EchoOptions, "greedy, for the registry test")
    monkeypatch.setitem(STRATEGIES, "toy", toy)
    model = tiny_llama()
    out = generate(model, [[5, 6, 7]], strategy="toy", echo_times=3, max_new_tokens=4)
    ref = generate(model, [[5, 6, 7]], max_new_tokens=4)
    assert out.sequences == ref.sequences and seen == [3]
    with pytest.raises(DecodeKitError, match="echo_times must be >= 1"):
        generate(model, [[5, 6, 7]], strategy="toy", echo_times=0)
    with pytest.raises(DecodeKitError, match="unknown option"):
        generate(model, [[5, 6, 7]], strategy="toy", gamma=2)
    assert option_names()["echo_times"] == ["toy"] and "echo_times" in _generate_flags()


def test_shared_options_are_one_flag_with_their_strategies():
    users = option_names()
    assert users["gamma"] == ["speculative", "ngram", "prompt_lookup"]
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "[speculative, ngram, prompt_lookup]" in help_text


def test_cli_validates_strategy_options_before_loading(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("decodekit.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["generate", "--prompt", "hi", "--strategy", "ngram", "--gamma", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "decodekit: error: gamma must be >= 1 and <= 128, got 0"
    assert not (tmp_path / "empty-cache").exists()  # nothing converted or cached
    with pytest.raises(SystemExit) as exc:  # argparse: one line, exit 2
        main(["generate", "--prompt", "hi", "--strategy", "beam", "--early_stopping", "maybe"])
    assert exc.value.code == 2 and "true, false or never" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--strategy", "greedy", "--gamma", "3"]) == 2
    assert "do(es) not apply to strategy 'greedy'" in capsys.readouterr().err


def test_bool_flags_take_an_optional_value():
    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "x", "--show_drafts", "--first_target", "false"])
    assert args.show_drafts is True and args.first_target is False


def test_public_names_importable():
    for name in decodekit.__all__:
        assert getattr(decodekit, name) is not None, name
    assert torch.is_tensor(torch.zeros(1))


def test_bench_entries_are_valid_strategy_options():
    from decodekit.bench.config import DRAFTER, ENTRIES
    from decodekit.strategies import build_options

    knob_names = ("temperature", "top_k", "top_p")
    for entry in ENTRIES:
        values = {k: ("layers:1" if v == DRAFTER else v) for k, v in entry.options.items() if k != "seed"}
        knobs = {k: values.pop(k) for k in knob_names if k in values}
        build_options(entry.name, values, knobs)
        assert entry.lossless == STRATEGIES[entry.name].lossless
    drafting = {e.name for e in ENTRIES if e.drafts}
    assert drafting == {"speculative", "ngram", "prompt_lookup"}


def test_refine_iter_converge_is_accepted_by_generate_flags():
    from decodekit.cli import _strategy_options

    args = build_parser().parse_args(["generate", "--prompt", "x", "--strategy", "refine", "--refine_iter",
                                      "converge"])
    assert _strategy_options(args) == {"refine_iter": "converge"}
