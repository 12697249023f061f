"""``decodekit train-drafter``: train an EAGLE-style draft head (``decodekit.strategies.eagle.train``)."""

from __future__ import annotations

import argparse
import sys

from decodekit.flags import add_flag
from decodekit.validation import check_choice

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from decodekit.strategies.eagle.train import TrainConfig

    d = TrainConfig()
    add_flag(p, "model", dest="model_path", default=None,
             help="bundled model name, HF model dir or .gguf file (default: smollm2-135m-instruct)")
    add_flag(p, "out", required=True, help="directory for model.safetensors + card.json")
    add_flag(p, "device", default="auto", help="cpu | cuda | auto (default auto)")
    add_flag(p, "dtype", default=None, help="float dtype of the target while collecting data (default float32 on the CPU, "
             "bfloat16 on CUDA)")
    add_flag(p, "draft_vocab", type=int, default=d.draft_vocab,
             help="draft from the N most frequent generated tokens only (default: the full vocabulary)")
    add_flag(p, "minutes", type=float, default=45.0,
             help="wall-time budget of the whole command: the first --data_share of it generates data, the rest "
                  "trains (default 45; 0: no budget, --num_prompts and --epochs/--steps decide)")
    add_flag(p, "data_share", type=float, default=d.data_share,
             help=f"share of --minutes spent generating data (default {d.data_share})")
    add_flag(p, "num_prompts", type=int, default=d.num_prompts,
             help=f"training prompts, at most (default {d.num_prompts})")
    add_flag(p, "max_new_tokens", type=int, default=d.max_new_tokens,
             help=f"tokens the model answers each prompt with (default {d.max_new_tokens})")
    add_flag(p, "epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    add_flag(p, "steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    add_flag(p, "batch_size", type=int, default=d.batch_size, help=f"sequences per step (default {d.batch_size})")
    add_flag(p, "lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    add_flag(p, "depth", type=int, default=d.depth,
             help=f"draft steps the head is unrolled on its own features in training (default {d.depth})")
    add_flag(p, "distill", type=float, default=d.distill,
             help=f"weight of the target's top-k distribution in the token loss, 0..1 (default {d.distill})")
    add_flag(p, "seed", type=int, default=d.seed)
    add_flag(p, "eval_prompts", type=int, default=d.eval_prompts,
             help=f"held-out chat-suite prompts the card's acceptance is measured on (default {d.eval_prompts})")
    add_flag(p, "resume", action="store_true", help="continue an unfinished --out (a finished one is kept)")
    add_flag(p, "overwrite", action="store_true", help="replace the head in a non-empty --out")


def run(args) -> int:
    from pathlib import Path

    from decodekit.models import DTYPES, check_model_spec, load_model, resolve_device
    from decodekit.strategies.eagle.train import TrainConfig, check_out_dir, train_drafter

    cfg = TrainConfig(draft_vocab=args.draft_vocab, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                      epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      eval_prompts=args.eval_prompts, minutes=args.minutes or None, data_share=args.data_share,
                      depth=args.depth, distill=args.distill)
    cfg.validate()
    if args.dtype is not None:
        check_choice("dtype", args.dtype, [d for d in DTYPES if not d.startswith("int")])
    resolve_device(args.device)
    check_model_spec(args.model_path, param="model")
    out = Path(args.out).expanduser()
    check_out_dir(out, args.resume, args.overwrite)
    model, tokenizer = load_model(args.model_path, dtype=args.dtype, device=args.device)
    card = train_drafter(model, tokenizer, out, cfg, target=args.model_path or "smollm2-135m-instruct",
                         resume=args.resume)
    ev = card.get("evaluation", {})
    print(f"draft head in {out} ({card['wall_seconds']} s); acceptance by depth "
          f"{ev.get('acceptance_by_depth')}, mean accepted length {ev.get('mean_accepted_length')}", file=sys.stderr)
    return 0
