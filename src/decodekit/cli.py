"""``decodekit`` command line: ``generate`` (every strategy), ``refine`` (the seed's demo)
and ``bench``.

Strategy flags are made from the registry's ``Options`` fields (``decodekit.strategies``):
one flag per option name, help and defaults included. ``generate`` validates the flags of the
chosen strategy by building its ``Options`` before any model loads, and refuses a flag the
strategy does not take. Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys

from decodekit.flags import add_flag
from decodekit.validation import (
    DecodeKitError,
    check_choice,
    check_int,
)

log = logging.getLogger("decodekit")

def add_model_flags(parser) -> None:
    add_flag(parser, "model_path", default=None,
             help="bundled model name (smollm2-135m-instruct, gemma-3-270m), HF model dir or .gguf "
                  "file (default: smollm2-135m-instruct)")
    add_flag(parser, "device", default="auto", help="cpu | cuda | auto (default auto)")
    from decodekit.models import DEFAULT_DTYPES, DTYPES

    add_flag(parser, "dtype", default=None, help=f"{' | '.join(DTYPES)} (default {DEFAULT_DTYPES['cpu']} on the "
             f"CPU, {DEFAULT_DTYPES['cuda']} on CUDA); with "
             "--backend llama.cpp: q4_0 | q8_0 (the GGUF requantized by llama.cpp, cached; default: as it is)")
    add_flag(parser, "trust_remote_code", action="store_true")


def add_backend_flag(parser) -> None:
    add_flag(parser, "backend", default="torch",
             help="torch | llama.cpp: run a GGUF model's own quantized weights in llama.cpp "
                  "(pip install 'decodekit[llamacpp]', see README) (default torch)")


def _validate_backend(args) -> None:
    """``--backend llama.cpp``: a GGUF model, --dtype q4_0 | q8_0 or none, this process, no layers:N drafter
    (llama.cpp runs the whole model), llama-cpp-python installed. Nothing is loaded."""
    from decodekit.models import check_backend

    check_backend(args.backend, args.model_path, args.dtype, args.device)
    if args.backend != "llama.cpp":
        return
    drafter = getattr(args, "drafter", None)
    if drafter is not None and drafter.strip().startswith("layers"):
        raise DecodeKitError(f"drafter {drafter!r} (the target's first layers) is not available on backend "
                             "'llama.cpp'; give a GGUF drafter (a bundled name or a .gguf file)")
    if drafter is not None:
        check_backend("llama.cpp", drafter, param="drafter")
    if getattr(args, "engine", "local") != "local":
        raise DecodeKitError("--backend llama.cpp runs in this process only; leave out --engine")


def add_prompt_flags(parser) -> None:
    add_flag(parser, "prompt", default=None, help="one prompt")
    add_flag(parser, "prompts_file", default=None,
             help=".txt (one prompt a line), .json (list) or .jsonl ({\"prompt\": ...} a line)")
    add_flag(parser, "batch_size", type=int, default=1)
    add_flag(parser, "output_file", default=None, help=".jsonl (or .json) file for the results")
    add_results_flags(parser)
    add_flag(parser, "max_display", type=int, default=5, help="results printed at the end")


def add_results_flags(parser) -> None:
    """--resume / --overwrite: what to do with an --output_file that already holds results."""
    add_flag(parser, "resume", action="store_true",
             help="continue --output_file: keep its results, run only the prompts missing from it")
    add_flag(parser, "overwrite", action="store_true",
             help="replace a non-empty --output_file (once the first new batch is done)")


def _flag_kwargs(default, spec) -> dict:
    """argparse settings for one strategy option (its ``Spec``); default None = not given."""
    from decodekit.strategies.options import parse_bool

    allowed = spec.describe()
    help_text = f"{spec.help} ({allowed + '; ' if allowed else ''}default {default})"
    if spec.kind is bool:
        return dict(type=parse_bool, nargs="?", const=True, default=None, metavar="BOOL", help=help_text)
    parse = spec.parse or (spec.kind if spec.kind in (int, float, str) else str)
    return dict(type=parse, default=None, help=help_text, metavar=spec.kind.__name__.upper()
                if isinstance(spec.kind, type) else "VALUE")


def _default_of(strategy: str, name: str):
    from decodekit.strategies import STRATEGIES

    return next(d for n, d, _ in STRATEGIES[strategy].options.specs() if n == name)


def add_strategy_flags(parser, taken: set[str]) -> None:
    """One flag per strategy option, from the registry's ``Options`` fields, grouped by the
    first strategy that takes it (``taken``: flags the parser already has)."""
    from decodekit.strategies import STRATEGIES, option_names

    users = option_names()
    for strategy in STRATEGIES.values():
        group = None
        for name, default, spec in strategy.options.specs():
            if not spec.cli or name in taken:
                continue
            if group is None:
                group = parser.add_argument_group(f"strategy {strategy.name}")
            defaults = {_default_of(s, name) for s in users[name]}
            kwargs = _flag_kwargs(default if len(defaults) == 1 else "per strategy", spec)
            if len(users[name]) > 1:
                kwargs["help"] += f" [{', '.join(users[name])}]"
            add_flag(group, name, **kwargs)
            taken.add(name)


def add_processor_flags(parser) -> None:
    """One flag per processor knob (``processors.KNOBS``, transformers' names; exact under every
    speculative strategy); temperature, top_k and top_p have their own flags."""
    from decodekit.processors import KNOBS

    group = parser.add_argument_group("logits processors (exact under speculation)")
    for name, knob in KNOBS.items():
        if knob.cli:
            add_flag(group, name, **knob.flag_kwargs())


def _processor_options(args) -> dict:
    """The processor flags the user set, as ``generate`` keyword options (``_generate_kwargs``
    checks them; token ids against the vocabulary once it is known)."""
    from decodekit.processors import KNOBS

    options = {}
    for name, knob in KNOBS.items():
        value = getattr(args, name, None) if knob.cli else None
        if value is not None:
            options[name] = knob.from_cli(value) if knob.from_cli else value
    return options


def build_generate_parser(sub) -> argparse.ArgumentParser:
    from decodekit.strategies import STRATEGIES

    p = sub.add_parser("generate", help="generate text with one decoding strategy",
                       description="Generate text with any decoding strategy.")
    add_model_flags(p)
    add_backend_flag(p)
    add_prompt_flags(p)
    add_flag(p, "strategy", default="greedy", help=f"one of: {', '.join(STRATEGIES)}")
    add_flag(p, "max_new_tokens", type=int, default=128)
    add_flag(p, "temperature", type=float, default=None, help="0 = greedy")
    add_flag(p, "top_k", type=int, default=None)
    add_flag(p, "top_p", type=float, default=None)
    add_processor_flags(p)
    add_flag(p, "seed", type=int, default=None)
    add_flag(p, "logprobs", type=int, default=None,
             help="record each token's log-probability and this many alternatives (0..20) in "
                  "the results' \"logprobs\" field")
    add_flag(p, "stop_strings", action="append", default=None, help="stop when this text appears")
    from decodekit.constraints import add_constraint_flags

    add_constraint_flags(p)
    chat = p.add_mutually_exclusive_group()
    add_flag(chat, "use_chat_template", action="store_const", const=True, default=None,
             help="apply the chat template (default when the tokenizer has one)")
    add_flag(chat, "no_chat_template", dest="use_chat_template", action="store_const", const=False)
    add_flag(p, "debug", action="store_true", help="print the strategy's step-by-step trace")
    add_flag(p, "no_stream", action="store_true", help="do not stream a single prompt's tokens")
    add_flag(p, "allow_special_tokens", action="store_true",
             help="let special-token text in a prompt (e.g. <|im_end|>) become special tokens "
                  "(default: tokenized as plain text, so a prompt cannot forge chat turns)")
    from decodekit.ray import add_engine_flags

    add_engine_flags(p)
    add_strategy_flags(p, {a.dest for a in p._actions})
    p.set_defaults(func=run_generate)
    return p


def _constraint_options(args) -> dict:
    """The constraint flags given, checked (bad ones name the flag) before any model loads."""
    from decodekit.constraints import constraint_args

    return constraint_args(args, _strategy(args))


def _strategy_options(args) -> dict:
    """The strategy flags the user set, validated by the strategy's ``Options`` (before any
    model loads); a flag the chosen strategy does not take is refused."""
    from decodekit.strategies import build_options, option_names

    takes = {name for name, _, spec in _strategy(args).options.specs() if spec.cli}
    options, refused = {}, []
    for name in option_names():
        value = getattr(args, name, None)
        if value is None or name in ("temperature", "top_k", "top_p"):
            continue
        if name in takes:
            options[name] = value
        else:
            refused.append("--" + name)
    if refused:
        raise DecodeKitError(f"{', '.join(refused)} do(es) not apply to strategy {args.strategy!r}")
    build_options(args.strategy, options, dict(temperature=args.temperature, top_k=args.top_k,
                                               top_p=args.top_p))
    return options


def _generate_kwargs(args) -> tuple[dict, dict]:
    """The strategy options and every ``generate`` keyword of the flags, checked once by
    ``GenerateParams.from_kwargs`` (what ``generate`` checks without a model)."""
    from decodekit.params import GenerateParams

    options = _strategy_options(args)
    kwargs = dict(strategy=args.strategy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_strings=args.stop_strings,
                  logprobs=args.logprobs, debug=args.debug, **_processor_options(args),
                  **_constraint_options(args), **options)
    GenerateParams.from_kwargs(**kwargs)
    return options, kwargs


def _strategy(args):
    from decodekit.strategies import get_strategy

    return get_strategy(args.strategy)


def _validate_generate_args(args) -> None:
    """Everything that can be checked before the model is loaded."""
    _strategy(args)  # a known name
    check_int("batch_size", args.batch_size, min_value=1)
    check_int("max_display", args.max_display, min_value=0)
    for dest, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise DecodeKitError(f"{dest} must be a finite number, got {value}")
    if args.resume and not args.output_file:
        raise DecodeKitError("--resume needs --output_file")
    if args.overwrite and not args.output_file:
        raise DecodeKitError("--overwrite needs --output_file")
    _validate_model_args(args)
    _validate_backend(args)


def _validate_model_args(args) -> None:
    """Model flags, checked without loading or converting anything."""
    from decodekit.models import DTYPES, check_model_spec, resolve_device

    if args.dtype is not None and getattr(args, "backend", "torch") != "llama.cpp":  # llama.cpp: check_backend
        check_choice("dtype", args.dtype, DTYPES)
    resolve_device(args.device)
    check_model_spec(args.model_path, param="model_path")
    drafter = getattr(args, "drafter", None)
    from decodekit.strategies.drafters import is_eagle_spec
    from decodekit.strategies.hybrid import split_hybrid

    drafter = split_hybrid(drafter)[0]  # X+prompt_lookup: X is checked

    if is_eagle_spec(drafter):
        _check_eagle_dir(drafter.strip())
    elif drafter is not None and not drafter.strip().startswith("layers"):  # layers:N: checked by the strategy
        check_model_spec(drafter, param="drafter")


def _check_eagle_dir(spec: str) -> None:
    """``eagle:DIR`` must hold a trained head (``eagle``: checked against the model once loaded)."""
    from pathlib import Path

    from decodekit.strategies.eagle import CARD_FILE, HEAD_FILE

    if spec == "eagle":
        return
    folder = Path(spec[len("eagle:"):]).expanduser()
    if not (folder / HEAD_FILE).is_file() or not (folder / CARD_FILE).is_file():
        raise DecodeKitError(f"drafter {spec!r}: {str(folder)!r} holds no trained head ({HEAD_FILE} + "
                             f"{CARD_FILE}; make one with `decodekit train-drafter`)")


def run_generate(args) -> int:
    from decodekit.batch_runner import generate_prompts, open_results, print_records
    from decodekit.io import load_prompts
    from decodekit.models import default_dtype_note, load_model
    from decodekit.ray import engine_from_args, run_ray

    _validate_generate_args(args)
    options, kwargs = _generate_kwargs(args)  # checked as generate checks them, before any file or model
    prompts = load_prompts(args.prompt, args.prompts_file)
    engine = engine_from_args(args)  # None: this process; Ray checked before anything starts
    writer = open_results(args, prompts, kwargs)
    if writer is not None and not writer.pending():
        print(f"all {len(prompts)} prompts already have results in {args.output_file}", file=sys.stderr)
        return 0
    if engine is not None:
        print_records(run_ray(args, prompts, kwargs, writer, engine), args.max_display)
        if args.output_file:
            print(f"results written to {args.output_file} (in completion order; 'index' is each "
                  "prompt's place)", file=sys.stderr)
        return 0
    if args.dtype is None and args.backend != "llama.cpp":
        print(f"decodekit: {default_dtype_note(args.device)}", file=sys.stderr)
    model, tokenizer = load_model(args.model_path, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code, backend=args.backend)
    show_debug = bool(args.debug or options.get("show_drafts"))
    records = generate_prompts(model, tokenizer, prompts, args, kwargs, show_debug, writer)
    streamed = len(records) == 1 and not args.no_stream and not show_debug
    if streamed:
        stats = records[0].get("stats", {})
        print(f"[{stats.get('new_tokens')} tokens, {stats.get('tokens_per_s')} tokens/s]", file=sys.stderr)
    else:
        print_records(records, args.max_display)
    if args.output_file:
        print(f"results written to {args.output_file}", file=sys.stderr)
    return 0


def build_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible server with continuous batching and a playground",
                       description="Serve a model over the OpenAI API (/v1/chat/completions, "
                                   "/v1/completions); every request may pick its decoding strategy.")
    p.add_argument("--model", dest="model_path", default=None, help="the same as --model_path")
    add_model_flags(p)
    add_flag(p, "host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    add_flag(p, "port", type=int, default=8000)
    add_flag(p, "max_batch_size", type=int, default=8, help="rows decoded together (default 8)")
    add_flag(p, "max_queue", type=int, default=64, help="requests waiting before 429 (default 64)")
    add_flag(p, "api_key", default=None, help="require Authorization: Bearer API_KEY on /v1 and /metrics")
    add_flag(p, "max_tokens_limit", type=int, default=None,
             help="the largest max_tokens a request may ask for (400 above; default: the model's context)")
    add_flag(p, "max_body_bytes", type=int, default=1 << 20, help="largest request body (413 above; default 1 MiB)")
    add_flag(p, "timeout", type=float, default=None,
             help="seconds a request may take, queueing included (408 / an error event after; a request's "
                  "own \"timeout\" field may ask for less; default: none)")
    add_flag(p, "shutdown_grace", type=float, default=30.0,
             help="on SIGTERM, seconds running requests get to finish before they are cancelled (default 30)")
    p.set_defaults(func=run_serve)
    return p


def _validate_serve_args(args) -> None:
    """Everything ``serve`` can check before the model loads: the numbers, the model spec,
    the serve extra, and that the port can be bound."""
    import importlib.util
    import socket

    check_int("port", args.port, min_value=0, max_value=65535)
    check_int("max_batch_size", args.max_batch_size, min_value=1)
    check_int("max_queue", args.max_queue, min_value=1)
    if args.max_tokens_limit is not None:
        check_int("max_tokens_limit", args.max_tokens_limit, min_value=1)
    check_int("max_body_bytes", args.max_body_bytes, min_value=1024)
    for name in ("timeout", "shutdown_grace"):
        value = getattr(args, name)
        if value is not None and not (value >= 0 and value < float("inf")):
            raise DecodeKitError(f"--{name} must be a number of seconds >= 0, got {value}")
    if args.timeout == 0:
        raise DecodeKitError("--timeout must be > 0 seconds")
    if not args.host:
        raise DecodeKitError("--host must be an address such as 127.0.0.1")
    if args.api_key is not None and not args.api_key.strip():
        raise DecodeKitError("--api_key must not be empty")
    _validate_model_args(args)
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise DecodeKitError(f"serve needs {', '.join(missing)}: pip install 'decodekit[serve]'")
    try:
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as exc:
        raise DecodeKitError(f"--host/--port: cannot listen on {args.host}:{args.port} ({exc.strerror})") from None


def run_serve(args) -> int:
    _validate_serve_args(args)
    from decodekit.serve.app import run

    return run(args)


def _mount(sub, name: str, module: str, help_text: str) -> None:
    """Subcommands living in their own module: ``add_arguments(parser)`` + ``run(args)``."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    p = sub.add_parser(name, help=help_text, description=help_text)
    mod.add_arguments(p)
    p.set_defaults(func=mod.run)


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors print one line, ``decodekit generate: error: <msg> (see --help)``, and
    exit with code 2 (argparse's default prints the whole usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the subcommand that was given them
            self._command_parser(namespace).error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def _command_parser(self, namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices.get(getattr(namespace, action.dest, None), self)
        return self


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="decodekit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    build_generate_parser(sub)
    _mount(sub, "train-drafter", "decodekit.train_cli",
           "train an EAGLE-style draft head on the model's own answers (--drafter eagle:DIR)")
    _mount(sub, "refine", "decodekit.demo", "iterative block refinement demo (the seed's CLI)")
    _mount(sub, "bench", "decodekit.bench", "benchmark every strategy side by side")
    build_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except DecodeKitError as exc:
        print(f"decodekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("decodekit: interrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
