"""The batch runner every command shares (``decodekit generate``, ``decodekit refine`` and the
seed's demo): prompts in batches with tqdm, streaming for a single prompt, each finished batch
written at once through ``io.ResultWriter`` (resume honoured), trace printing.
"""

from __future__ import annotations

import logging
import sys

from decodekit.kvstate import backend_of
from decodekit.strategies import get_strategy

__all__ = ["TerminalStream", "open_results", "batch_records", "decode_batch", "chat_template_on",
           "model_dtype", "generate_prompts", "print_records", "format_debug", "split_by_schema"]

log = logging.getLogger("decodekit")


class TerminalStream:
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


def format_debug(strategy: str, output, tokenizer) -> str | None:
    """The strategy's trace (``--debug`` / ``--show_drafts``) as text, if it has one."""
    formatter = get_strategy(strategy).format_trace
    if formatter is None or not output.debug:
        return None
    return formatter(output.debug, tokenizer)


def open_results(args, prompts: list[str], generate_kwargs: dict):
    """The ``--output_file`` writer (None without one), checked before the model loads:
    nothing is written until the first batch is done."""
    from decodekit.io import ResultWriter

    if not args.output_file:
        return None
    per_prompt = generate_kwargs.get("num_return_sequences") or 1
    return ResultWriter(args.output_file, prompts, per_prompt=per_prompt, resume=args.resume,
                        overwrite=getattr(args, "overwrite", False))


def batch_records(indices, texts, rows, out, tokenizer, dtype: str) -> list[dict]:
    """The results of one batch: ``per_prompt`` records a prompt (beam num_return_sequences)."""
    from decodekit.io import make_record

    per_prompt = len(out.sequences) // len(texts)
    records = []
    for i, (index, text) in enumerate(zip(indices, texts)):
        for j in range(per_prompt):
            stat = out.stats[i * per_prompt + j] if len(out.stats) == len(out.sequences) else out.stats[i]
            stats = {**stat.to_dict(), "dtype": dtype}
            record = make_record(text, rows[i], out.sequences[i * per_prompt + j], tokenizer, stats=stats,
                                 index=index, sample_index=j if per_prompt > 1 else None)
            if out.scores is not None:
                record["score"] = out.scores[i * per_prompt + j]
            if out.logprobs is not None:
                record["logprobs"] = out.logprobs[i * per_prompt + j]
            records.append(record)
    return records


def chat_template_on(tokenizer, use_chat_template: bool | None) -> bool:
    """``--use_chat_template`` / ``--no_chat_template``, else whether the tokenizer has one."""
    if use_chat_template is None:
        return bool(getattr(tokenizer, "chat_template", None))
    return use_chat_template


def model_dtype(model) -> str:
    """``"float32"``, ``"bfloat16"``, ``"int8"``...: the ``stats.dtype`` of every record."""
    from decodekit.quant import quant_scheme

    own = backend_of(model).dtype_name  # the llama.cpp backend: the GGUF's weight type
    return own(model) if own else quant_scheme(model) or str(next(model.parameters()).dtype).removeprefix("torch.")


def decode_batch(model, tokenizer, indices, texts, generate_kwargs, encoding: tuple[bool, bool],
                 streamer=None):
    """One batch of prompts through ``decodekit.generate``: ``(records, output)``.

    ``encoding``: (use the chat template, allow special tokens). The single-process loop and
    the Ray workers (``decodekit.ray``) both decode with this, so their records are the same."""
    from decodekit.api import generate
    from decodekit.io import encode_prompts

    use_chat, allow_special = encoding
    rows = encode_prompts(tokenizer, texts, use_chat, allow_special_tokens=allow_special)
    out = generate(model, rows, tokenizer=tokenizer, streamer=streamer, **generate_kwargs)
    return batch_records(indices, texts, rows, out, tokenizer, model_dtype(model)), out


def split_by_schema(batch: list[int], schemas: list | None, generate_kwargs: dict) -> list[tuple[list[int], dict]]:
    """A batch -> ``(indices, generate kwargs)`` per per-prompt ``json_schema`` of a prompts
    file (it replaces the command line's constraint for its prompt); one group without any."""
    if schemas is None:
        return [(batch, generate_kwargs)]
    import json

    from decodekit.constraints import CONSTRAINT_OPTIONS

    groups: dict[str, list[int]] = {}
    for i in batch:
        groups.setdefault(json.dumps(schemas[i], sort_keys=True), []).append(i)
    out = []
    for key, indices in groups.items():
        kwargs = generate_kwargs
        if schemas[indices[0]] is not None:
            kwargs = {k: v for k, v in generate_kwargs.items() if k not in CONSTRAINT_OPTIONS}
            kwargs["json_schema"] = json.loads(key)
        out.append((indices, kwargs))
    return out


def generate_prompts(model, tokenizer, prompts, args, generate_kwargs, show_debug: bool, writer=None):
    """Shared batch loop: tqdm over batches, results written per batch, resume honoured.

    ``generate_kwargs`` are passed to ``decodekit.generate``; ``writer`` (``open_results``)
    gives the prompts still to run and takes each batch. Returns the records of this run.
    """
    from tqdm import tqdm

    from decodekit.constraints import load_prompt_schemas
    from decodekit.io import iter_batches

    todo = writer.pending() if writer is not None else list(range(len(prompts)))
    if len(todo) < len(prompts):
        log.warning("resume: %d of %d prompts already in %s", len(prompts) - len(todo), len(prompts), args.output_file)
    encoding = (chat_template_on(tokenizer, getattr(args, "use_chat_template", None)),
                getattr(args, "allow_special_tokens", False))
    stream = len(todo) == 1 and not getattr(args, "no_stream", False) and not show_debug
    records = []
    schemas = load_prompt_schemas(getattr(args, "prompts_file", None))
    batches = list(iter_batches(todo, args.batch_size))
    for batch in tqdm(batches, desc="batches", unit="batch", disable=len(batches) <= 1, file=sys.stderr):
        for indices, kwargs in split_by_schema(batch, schemas, generate_kwargs):
            texts = [prompts[i] for i in indices]
            streamer = TerminalStream(tokenizer) if stream else None
            done, out = decode_batch(model, tokenizer, indices, texts, kwargs, encoding, streamer)
            if show_debug:
                shown = format_debug(generate_kwargs["strategy"], out, tokenizer)
                if shown:
                    print(shown)
            if writer is not None:
                writer.write(done)
            records.extend(done)
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
