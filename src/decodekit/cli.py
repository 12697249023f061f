"""``decodekit`` command line: ``generate`` (every strategy), ``refine`` (the seed's demo)
and ``bench``.

Strategy flags have ``dest`` names equal to the strategy's option names; ``generate``
passes a strategy exactly the flags its ``decode`` function accepts, and refuses a flag
that the chosen strategy does not take. Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import math
import sys

from decodekit.validation import (
    DecodeKitError,
    check_choice,
    check_float,
    check_int,
    check_stop_strings,
    check_top_p,
)

log = logging.getLogger("decodekit")

# Flags that are not strategy options (everything else with a value goes to the strategy).
COMMON_DESTS = {
    "command", "model_path", "prompt", "prompts_file", "strategy", "max_new_tokens", "temperature",
    "top_k", "top_p", "seed", "batch_size", "use_chat_template", "output_file", "max_display",
    "device", "dtype", "trust_remote_code", "resume", "overwrite", "stop_strings", "debug", "verbose", "func",
    "no_stream", "allow_special_tokens",
}

# Strategy name -> "module:function" that formats GenerationOutput.debug for --debug/--show_drafts.
DEBUG_FORMATTERS = {
    "beam": "decodekit.strategies.beam:format_beam_trace",
    "eis": "decodekit.strategies.eis:format_eis_trace",
    "refine": "decodekit.strategies.refine:format_refine_trace",
    "jacobi": "decodekit.strategies.refine:format_refine_trace",
    "speculative": "decodekit.visual:render_drafts",
    "ngram": "decodekit.visual:render_drafts",
    "prompt_lookup": "decodekit.visual:render_drafts",
}


def add_flag(parser, name: str, **kwargs):
    """Add ``--name`` and its dashed spelling ``--na-me`` for the same option."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    kwargs.setdefault("dest", name)
    return parser.add_argument(*spellings, **kwargs)


def _bool_or_never(value: str):
    low = value.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    if low == "never":
        return "never"
    raise argparse.ArgumentTypeError("must be true, false or never")


def _int_or_converge(value: str):
    if value == "converge":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an integer >= 1 or converge") from None


def add_model_flags(parser) -> None:
    add_flag(parser, "model_path", default=None,
             help="bundled model name (smollm2-135m-instruct, gemma-3-270m), HF model dir or .gguf "
                  "file (default: smollm2-135m-instruct)")
    add_flag(parser, "device", default="auto", help="cpu | cuda | auto (default auto)")
    from decodekit.models import DEFAULT_DTYPE, DTYPES

    add_flag(parser, "dtype", default=None, help=f"{' | '.join(DTYPES)} (default {DEFAULT_DTYPE})")
    add_flag(parser, "trust_remote_code", action="store_true")


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


def add_strategy_flags(parser) -> None:
    """Options of the individual strategies (default None: the strategy's own default)."""
    g = parser.add_argument_group("beam search")
    add_flag(g, "num_beams", type=int, default=None)
    add_flag(g, "length_penalty", type=float, default=None)
    add_flag(g, "early_stopping", type=_bool_or_never, default=None, help="true | false | never")
    add_flag(g, "num_return_sequences", type=int, default=None)
    add_flag(g, "length_style", default=None, help="hf | gnmt")
    add_flag(g, "gnmt_min_length", type=float, default=None)

    g = parser.add_argument_group("speculative / n-gram / prompt lookup")
    add_flag(g, "drafter", default=None, help="draft model (name, dir, .gguf) or layers:N (self-speculative)")
    add_flag(g, "gamma", type=int, default=None, help="draft tokens per verify step")
    add_flag(g, "draft_policy", default=None, help="fixed | egag | cost (| adaptive for prompt lookup)")
    add_flag(g, "gamma_min", type=int, default=None)
    add_flag(g, "gamma_max", type=int, default=None)
    add_flag(g, "egag_ema_beta", type=float, default=None)
    add_flag(g, "skip_sample_adjustment", action="store_const", const=True, default=None,
             help="resample from p on rejection (LOSSY)")
    add_flag(g, "show_drafts", action="store_const", const=True, default=None,
             help="print the text with accepted drafts and target tokens distinguished")
    add_flag(g, "ngram_n", type=int, default=None)
    add_flag(g, "filler_top_k", type=int, default=None)
    add_flag(g, "stop_if_unknown", action="store_const", const=True, default=None)

    g = parser.add_argument_group("extended inference sampler (EIS)")
    add_flag(g, "lookahead_steps", type=int, default=None)
    add_flag(g, "discount_factor", type=float, default=None)
    add_flag(g, "rollout_mode", default=None, help="greedy | sample")

    g = parser.add_argument_group("block refinement / Jacobi")
    add_flag(g, "add_eos_length", type=int, default=None)
    add_flag(g, "refine_iter", type=_int_or_converge, default=None,
             help="refine passes per block (>= 1), or converge (Jacobi decoding = greedy)")
    add_flag(g, "max_length", type=int, default=None)
    add_flag(g, "block_size", type=int, default=None, help="Jacobi: tokens guessed per block")
    add_flag(g, "max_iterations", type=int, default=None,
             help="Jacobi: most passes per block (then the block is kept as is: LOSSY)")


def build_generate_parser(sub) -> argparse.ArgumentParser:
    from decodekit.strategies import STRATEGIES

    p = sub.add_parser("generate", help="generate text with one decoding strategy",
                       description="Generate text with any decoding strategy.")
    add_model_flags(p)
    add_prompt_flags(p)
    add_flag(p, "strategy", default="greedy", help=f"one of: {', '.join(STRATEGIES)}")
    add_flag(p, "max_new_tokens", type=int, default=128)
    add_flag(p, "temperature", type=float, default=None, help="0 = greedy")
    add_flag(p, "top_k", type=int, default=None)
    add_flag(p, "top_p", type=float, default=None)
    add_flag(p, "seed", type=int, default=None)
    add_flag(p, "stop_strings", action="append", default=None, help="stop when this text appears")
    chat = p.add_mutually_exclusive_group()
    add_flag(chat, "use_chat_template", action="store_const", const=True, default=None,
             help="apply the chat template (default when the tokenizer has one)")
    add_flag(chat, "no_chat_template", dest="use_chat_template", action="store_const", const=False)
    add_flag(p, "debug", action="store_true", help="print the strategy's step-by-step trace")
    add_flag(p, "no_stream", action="store_true", help="do not stream a single prompt's tokens")
    add_flag(p, "allow_special_tokens", action="store_true",
             help="let special-token text in a prompt (e.g. <|im_end|>) become special tokens "
                  "(default: tokenized as plain text, so a prompt cannot forge chat turns)")
    add_strategy_flags(p)
    p.set_defaults(func=run_generate)
    return p


def _strategy_options(args, strategy: str) -> dict:
    """The strategy flags the user set, checked against what the strategy accepts."""
    from decodekit.strategies import get_strategy

    params = inspect.signature(get_strategy(strategy)).parameters
    options, refused = {}, []
    for dest, value in vars(args).items():
        if dest in COMMON_DESTS or value is None:
            continue
        if dest in params:
            options[dest] = value
        else:
            refused.append("--" + dest)
    if refused:
        raise DecodeKitError(f"{', '.join(refused)} do(es) not apply to strategy {strategy!r}")
    return options


def _validate_generate_args(args) -> None:
    """Everything that can be checked before the model is loaded."""
    from decodekit.strategies import STRATEGIES

    if args.strategy not in STRATEGIES:
        raise DecodeKitError(f"strategy must be one of {', '.join(STRATEGIES)}; got {args.strategy!r}")
    check_int("max_new_tokens", args.max_new_tokens, min_value=1)
    check_int("batch_size", args.batch_size, min_value=1)
    check_int("max_display", args.max_display, min_value=0)
    if args.temperature is not None:
        check_float("temperature", args.temperature, min_value=0.0)
    if args.top_k is not None:
        check_int("top_k", args.top_k, min_value=1)
    if args.top_p is not None:
        check_top_p(args.top_p)
    for dest, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise DecodeKitError(f"{dest} must be a finite number, got {value}")
    if args.stop_strings is not None:
        check_stop_strings(args.stop_strings)
    if args.resume and not args.output_file:
        raise DecodeKitError("--resume needs --output_file")
    if args.overwrite and not args.output_file:
        raise DecodeKitError("--overwrite needs --output_file")
    _validate_model_args(args)


def _validate_model_args(args) -> None:
    """Model flags, checked without loading or converting anything."""
    from decodekit.models import DTYPES, check_model_spec, resolve_device

    if args.dtype is not None:
        check_choice("dtype", args.dtype, DTYPES)
    resolve_device(args.device)
    check_model_spec(args.model_path, param="model_path")
    drafter = getattr(args, "drafter", None)
    if drafter is not None and not drafter.strip().startswith("layers"):  # layers:N: checked by the strategy
        check_model_spec(drafter, param="drafter")


# Bounds of the strategy flags, checked before the model loads (the strategies check again).
FLAG_MIN_INT = {"num_beams": 1, "num_return_sequences": 1, "gamma": 1, "gamma_min": 1, "gamma_max": 1,
                "ngram_n": 2, "filler_top_k": 1, "lookahead_steps": 0, "add_eos_length": 1,
                "max_length": 2, "block_size": 1, "max_iterations": 1}


def _check_strategy_flags(options: dict) -> None:
    for name, value in options.items():
        if name in FLAG_MIN_INT:
            check_int(name, value, min_value=FLAG_MIN_INT[name])
    if "discount_factor" in options:
        check_float("discount_factor", options["discount_factor"], min_value=0.0, min_inclusive=False,
                    max_value=1.0)
    if "egag_ema_beta" in options:
        check_float("egag_ema_beta", options["egag_ema_beta"], min_value=0.0, max_value=1.0, max_inclusive=False)
    if "gnmt_min_length" in options:
        check_float("gnmt_min_length", options["gnmt_min_length"], min_value=0.0)
    if isinstance(options.get("refine_iter"), int):
        check_int("refine_iter", options["refine_iter"], min_value=1)
    beams, returned = options.get("num_beams"), options.get("num_return_sequences", 1)
    if beams is not None and returned > beams:
        raise DecodeKitError(f"num_return_sequences must be <= num_beams ({beams}), got {returned}")


class _TerminalStream:
    """Prints row 0's text as its tokens arrive; a character split over several tokens is
    printed once it is complete (``IncrementalDetokenizer``)."""

    def __init__(self, tokenizer):
        from decodekit.detok import IncrementalDetokenizer

        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)

    def _write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def __call__(self, row: int, tokens: list[int]) -> None:
        if row == 0:
            self._write(self.detok.push(tokens))

    def end(self) -> None:
        self._write(self.detok.flush() + "\n")


def _format_debug(strategy: str, output, tokenizer) -> str | None:
    target = DEBUG_FORMATTERS.get(strategy)
    if target is None or not output.debug:
        return None
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(module), func)(output.debug, tokenizer)
    except (ImportError, AttributeError):
        return None


def open_results(args, prompts: list[str], generate_kwargs: dict):
    """The ``--output_file`` writer (None without one), checked before the model loads:
    nothing is written until the first batch is done."""
    from decodekit.io import ResultWriter

    if not args.output_file:
        return None
    per_prompt = generate_kwargs.get("num_return_sequences") or 1
    return ResultWriter(args.output_file, prompts, per_prompt=per_prompt, resume=args.resume,
                        overwrite=getattr(args, "overwrite", False))


def _batch_records(indices, texts, rows, out, tokenizer, dtype: str) -> list[dict]:
    """The results of one batch: ``per_prompt`` records a prompt (beam num_return_sequences)."""
    from decodekit.io import make_record

    per_prompt = len(out.sequences) // len(texts)
    records = []
    for i, (index, text) in enumerate(zip(indices, texts)):
        for j in range(per_prompt):
            stats = {**out.stats[i].to_dict(), "dtype": dtype}
            record = make_record(text, rows[i], out.sequences[i * per_prompt + j], tokenizer, stats=stats,
                                 index=index, sample_index=j if per_prompt > 1 else None)
            if out.scores is not None:
                record["score"] = out.scores[i * per_prompt + j]
            records.append(record)
    return records


def generate_prompts(model, tokenizer, prompts, args, generate_kwargs, show_debug: bool, writer=None):
    """Shared batch loop: tqdm over batches, results written per batch, resume honoured.

    ``generate_kwargs`` are passed to ``decodekit.generate``; ``writer`` (``open_results``)
    gives the prompts still to run and takes each batch. Returns the records of this run.
    """
    from tqdm import tqdm

    from decodekit.api import generate
    from decodekit.io import encode_prompts, iter_batches

    todo = writer.pending() if writer is not None else list(range(len(prompts)))
    if len(todo) < len(prompts):
        log.warning("resume: %d of %d prompts already in %s", len(prompts) - len(todo), len(prompts), args.output_file)
    use_chat = getattr(args, "use_chat_template", None)
    if use_chat is None:
        use_chat = bool(getattr(tokenizer, "chat_template", None))
    stream = len(todo) == 1 and not getattr(args, "no_stream", False) and not show_debug
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    records = []
    batches = list(iter_batches(todo, args.batch_size))
    for batch in tqdm(batches, desc="batches", unit="batch", disable=len(batches) <= 1, file=sys.stderr):
        texts = [prompts[i] for i in batch]
        rows = encode_prompts(tokenizer, texts, use_chat,
                              allow_special_tokens=getattr(args, "allow_special_tokens", False))
        streamer = _TerminalStream(tokenizer) if stream else None
        out = generate(model, rows, tokenizer=tokenizer, streamer=streamer, **generate_kwargs)
        batch_records = _batch_records(batch, texts, rows, out, tokenizer, dtype)
        if show_debug:
            shown = _format_debug(generate_kwargs["strategy"], out, tokenizer)
            if shown:
                print(shown)
        if writer is not None:
            writer.write(batch_records)
        records.extend(batch_records)
    return records


def print_records(records, max_display: int) -> None:
    for record in records[:max_display]:
        print("=" * 72)
        print(f"PROMPT: {record['prompt']}")
        print(f"RESPONSE: {record['response']}")
        stats = record.get("stats")
        if stats:
            keys = ("new_tokens", "forward_passes", "tokens_per_s", "acceptance_rate", "mean_accepted_length")
            print("STATS: " + ", ".join(f"{k}={stats[k]}" for k in keys if k in stats))
    if len(records) > max_display:
        print(f"... {len(records) - max_display} more")


def run_generate(args) -> int:
    from decodekit.io import load_prompts
    from decodekit.models import load_model

    _validate_generate_args(args)
    prompts = load_prompts(args.prompt, args.prompts_file)
    options = _strategy_options(args, args.strategy)
    _check_strategy_flags(options)
    kwargs = dict(strategy=args.strategy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_strings=args.stop_strings,
                  debug=args.debug, **options)
    writer = open_results(args, prompts, kwargs)
    if writer is not None and not writer.pending():
        print(f"all {len(prompts)} prompts already have results in {args.output_file}", file=sys.stderr)
        return 0
    model, tokenizer = load_model(args.model_path, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
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
    _mount(sub, "refine", "decodekit.demo", "iterative block refinement demo (the seed's CLI)")
    _mount(sub, "bench", "decodekit.bench", "benchmark every strategy side by side")
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
