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
import sys

from decodekit.validation import DecodeKitError, check_float, check_int, check_top_p

log = logging.getLogger("decodekit")

# Flags that are not strategy options (everything else with a value goes to the strategy).
COMMON_DESTS = {
    "command", "model_path", "prompt", "prompts_file", "strategy", "max_new_tokens", "temperature",
    "top_k", "top_p", "seed", "batch_size", "use_chat_template", "output_file", "max_display",
    "device", "dtype", "trust_remote_code", "resume", "stop_strings", "debug", "verbose", "func",
    "no_stream",
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


def add_model_flags(parser) -> None:
    add_flag(parser, "model_path", default=None,
             help="bundled model name (smollm2-135m-instruct, gemma-3-270m), HF model dir or .gguf "
                  "file (default: smollm2-135m-instruct)")
    add_flag(parser, "device", default="auto", help="cpu | cuda | auto (default auto)")
    add_flag(parser, "dtype", default=None, help="float32 | bfloat16 (default float32)")
    add_flag(parser, "trust_remote_code", action="store_true")


def add_prompt_flags(parser) -> None:
    add_flag(parser, "prompt", default=None, help="one prompt")
    add_flag(parser, "prompts_file", default=None,
             help=".txt (one prompt a line), .json (list) or .jsonl ({\"prompt\": ...} a line)")
    add_flag(parser, "batch_size", type=int, default=1)
    add_flag(parser, "output_file", default=None, help=".jsonl (or .json) file for the results")
    add_flag(parser, "resume", action="store_true", help="skip prompts already in --output_file")
    add_flag(parser, "max_display", type=int, default=5, help="results printed at the end")


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
    add_flag(g, "refine_iter", type=int, default=None)
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
    if args.resume and not args.output_file:
        raise DecodeKitError("--resume needs --output_file")


class _TerminalStream:
    """Prints a single row's text as its tokens arrive."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.printed = tokenizer, [], ""

    def __call__(self, row: int, tokens: list[int]) -> None:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def end(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def _format_debug(strategy: str, output, tokenizer) -> str | None:
    target = DEBUG_FORMATTERS.get(strategy)
    if target is None or not output.debug:
        return None
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(module), func)(output.debug, tokenizer)
    except (ImportError, AttributeError):
        return None


def generate_prompts(model, tokenizer, prompts, args, generate_kwargs, show_debug: bool):
    """Shared batch loop: tqdm over batches, results written per batch, resume honoured.

    ``generate_kwargs`` are passed to ``decodekit.generate``; returns the records written
    in this run.
    """
    from tqdm import tqdm

    from decodekit.api import generate
    from decodekit.io import ResultWriter, encode_prompts, iter_batches, make_record

    writer = ResultWriter(args.output_file, resume=args.resume) if args.output_file else None
    todo = [p for p in prompts if writer is None or p not in writer.done]
    if writer is not None and len(todo) < len(prompts):
        log.warning("resume: %d of %d prompts already in %s", len(prompts) - len(todo), len(prompts), args.output_file)
    use_chat = getattr(args, "use_chat_template", None)
    if use_chat is None:
        use_chat = bool(getattr(tokenizer, "chat_template", None))
    stream = len(todo) == 1 and not getattr(args, "no_stream", False) and not show_debug
    records = []
    batches = list(iter_batches(todo, args.batch_size))
    for batch in tqdm(batches, desc="batches", unit="batch", disable=len(batches) <= 1, file=sys.stderr):
        rows = encode_prompts(tokenizer, batch, use_chat)
        streamer = _TerminalStream(tokenizer) if stream else None
        out = generate(model, rows, tokenizer=tokenizer, streamer=streamer, **generate_kwargs)
        per_prompt = len(out.sequences) // len(batch)
        batch_records = []
        for i, text in enumerate(batch):
            for j in range(per_prompt):
                seq = out.sequences[i * per_prompt + j]
                record = make_record(text, rows[i], seq, tokenizer, stats=out.stats[i].to_dict())
                if out.scores is not None:
                    record["score"] = out.scores[i * per_prompt + j]
                batch_records.append(record)
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
    model, tokenizer = load_model(args.model_path, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    kwargs = dict(strategy=args.strategy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_strings=args.stop_strings,
                  debug=args.debug, **options)
    show_debug = bool(args.debug or options.get("show_drafts"))
    records = generate_prompts(model, tokenizer, prompts, args, kwargs, show_debug)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decodekit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
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
