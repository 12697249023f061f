"""The seed's demo: iterative block refinement on a prompt or a file of prompts.

``python -m decodekit.demo --prompt "What is 2+2?" --use_chat_template`` (or ``decodekit
refine ...``). Flags are the seed's: ``--model_path``, ``--prompt`` | ``--prompts_file``
(.txt one prompt a line, .json list, .jsonl ``{"prompt": ...}``), ``--add_eos_length 127``,
``--refine_iter 2`` (or ``converge``: Jacobi decoding, equal to greedy), ``--max_new_tokens
1024``, ``--max_length 8192``, ``--batch_size 1``, ``--output_file inference_results.jsonl``
(.jsonl, or .json), ``--max_display 5``, ``--use_chat_template``, ``--device``,
``--trust_remote_code``; plus ``--debug`` to watch each block converge pass by pass, and
``--resume`` / ``--overwrite`` for an output file that already holds results (without
either, such a file is never touched and the run stops with an error).

Prompt loading, batching, tqdm progress and result writing are ``decodekit generate``'s
(``decodekit.io`` and ``decodekit.batch_runner``). Bad input prints one line and
exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from decodekit.strategies.options import parse_int_or
from decodekit.validation import DecodeKitError, check_int

__all__ = ["add_arguments", "run", "main"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed's flags (``decodekit refine`` mounts them too)."""
    from decodekit.cli import add_results_flags
    from decodekit.flags import add_flag

    add_flag(parser, "model_path", default=None,
             help="HF model dir, .gguf file or bundled model name (default: smollm2-135m-instruct)")
    add_flag(parser, "prompt", default=None, help="one prompt (or --prompts_file)")
    add_flag(parser, "prompts_file", default=None, help=".txt (one a line), .json (list) or .jsonl")
    add_flag(parser, "add_eos_length", type=int, default=127,
             help="EOS placeholders per block; each block yields add_eos_length + 1 tokens")
    add_flag(parser, "refine_iter", type=parse_int_or("converge"), default=2,
             help="refine passes per block (>= 1), or 'converge' (Jacobi decoding = greedy)")
    add_flag(parser, "max_new_tokens", type=int, default=1024)
    add_flag(parser, "max_length", type=int, default=8192, help="most tokens per row, prompt included")
    add_flag(parser, "batch_size", type=int, default=1)
    add_flag(parser, "output_file", default="inference_results.jsonl", help=".jsonl or .json")
    add_results_flags(parser)
    add_flag(parser, "max_display", type=int, default=5, help="results printed at the end")
    add_flag(parser, "use_chat_template", action="store_true", help="apply the tokenizer's chat template")
    add_flag(parser, "device", default="auto", help="cuda | cpu | auto")
    add_flag(parser, "trust_remote_code", action="store_true",
             help="allow custom model code from the model directory")
    add_flag(parser, "debug", action="store_true", help="print, per refine pass, the block positions that changed")
    parser.set_defaults(no_stream=True)


def _validate(args) -> None:
    """Everything that can be checked before the model is loaded."""
    from decodekit.strategies.refine import RefineOptions

    RefineOptions(args.add_eos_length, args.refine_iter, args.max_length)
    check_int("max_new_tokens", args.max_new_tokens, min_value=1)
    check_int("batch_size", args.batch_size, min_value=1)
    check_int("max_display", args.max_display, min_value=0)


def _check_prompt_lengths(tokenizer, prompts: list[str], use_chat_template: bool, max_length: int) -> None:
    """A prompt at or over max_length is refused before any generation starts."""
    from decodekit.io import encode_prompts

    for n, ids in enumerate(encode_prompts(tokenizer, prompts, use_chat_template)):
        if len(ids) >= max_length:
            raise DecodeKitError(
                f"prompt {n} is {len(ids)} tokens, at or over max_length={max_length}: raise "
                "--max_length or shorten the prompt"
            )


def run(args) -> int:
    from decodekit.batch_runner import generate_prompts, open_results, print_records
    from decodekit.io import load_prompts
    from decodekit.models import default_dtype_note, load_model

    _validate(args)
    prompts = load_prompts(args.prompt, args.prompts_file)
    kwargs = dict(strategy="refine", max_new_tokens=args.max_new_tokens, add_eos_length=args.add_eos_length,
                  refine_iter=args.refine_iter, max_length=args.max_length, debug=args.debug)
    writer = open_results(args, prompts, kwargs)
    if writer is not None and not writer.pending():
        print(f"all {len(prompts)} prompts already have results in {args.output_file}", file=sys.stderr)
        return 0
    model, tokenizer = load_model(args.model_path, device=args.device, trust_remote_code=args.trust_remote_code)
    _check_prompt_lengths(tokenizer, prompts, args.use_chat_template, args.max_length)
    print(f"decodekit: {default_dtype_note(args.device)}", file=sys.stderr)  # after the checks: errors stay one line
    records = generate_prompts(model, tokenizer, prompts, args, kwargs, args.debug, writer)
    print_records(records, args.max_display)
    tokens = sum(r["response_length"] for r in records)
    forwards = sum(r["stats"]["forward_passes"] for r in records)
    print(f"{len(records)} prompt(s), {tokens} new tokens, {forwards} forward passes; "
          f"results written to {args.output_file}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from decodekit.cli import OneLineErrorParser

    parser = OneLineErrorParser(prog="python -m decodekit.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error (one line, code 2) or --help (code 0)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except DecodeKitError as exc:
        print(f"decodekit refine: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
