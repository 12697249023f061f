"""Training an EAGLE-style draft head (``decodekit train-drafter``).

1. **Data** (self-distillation): the target answers a held-in prompt set (``training_prompts``:
   topics x tasks written here, never the benchmark suites, which stay held out), half the
   batches greedily, half sampled (temperature 0.8). While it generates, hooks record its last
   hidden states (the input of its final norm) and its greedy next token at every generated
   position: one generation pass, nothing re-run.
2. **Draft vocabulary** (optional, ``draft_vocab=N``): the N most frequent generated tokens.
3. **Training**: pair ``(f_t, x_{t+1})`` -> predicted ``f_{t+1}``; loss = smooth L1 on the
   features (each dimension scaled by its std) + cross-entropy of the head's token against the
   target's greedy token at ``t+2``, as EAGLE. AdamW, warm-up + cosine, seeded, checkpoints
   every ``CHECKPOINT_EVERY`` steps (``resume=True`` continues).
4. **Evaluation**: greedy speculative decoding with the head on held-out prompts (the chat
   suite, which training never sees): acceptance by draft depth, mean accepted length.

The head is ``head.py``, its files ``storage.py``, the drafter ``drafter.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from decodekit.cache import left_pad
from decodekit.strategies.eagle.drafter import EagleDrafter
from decodekit.strategies.eagle.head import EagleHead, decoder_of, target_fingerprint
from decodekit.strategies.eagle.prompts import passage_prompts, training_prompts
from decodekit.strategies.eagle.recipe import Recipe, acceptance, expected_accepted, make_batch
from decodekit.strategies.eagle.recipe import loss as recipe_loss
from decodekit.strategies.eagle.storage import CARD_FILE, HEAD_FILE, save_head
from decodekit.validation import DecodeKitError, check_int

__all__ = ["TrainConfig", "train_drafter", "training_prompts", "collect", "acceptance_by_depth",
           "check_out_dir", "weights_hash"]

CHECKPOINT = "checkpoint.pt"
DATA = "data.pt"
CHECKPOINT_EVERY = 50
SAMPLE_TEMPERATURE = 0.8
EVAL_RESERVE = 120  # seconds a time budget keeps for the card's evaluation
TOP_K = 8  # the target's most likely next tokens kept per position (distillation)

@dataclass
class TrainConfig:
    """Options of ``train_drafter`` (the CLI's flags)."""

    draft_vocab: int | None = None
    num_prompts: int = 6000  # at most (with minutes: as many as the data's share of the time allows)
    passages: float = 0.15  # share of the answers that are passage prompts (prompts.passage_prompts)
    max_new_tokens: int = 96
    gen_batch_size: int = 48
    minutes: float | None = None  # wall-time budget of the whole command (data, training, card)
    data_share: float = 0.6  # of ``minutes``: generating data; the rest trains
    epochs: int = 3
    steps: int | None = None  # overrides epochs
    batch_size: int = 8  # sequences per optimizer step
    lr: float = 3e-3  # learning curves: 3e-3 and 6e-3 beat 1e-3 (benchmarks/eagle_curves.py)
    weight_decay: float = 0.0
    depth: int = 3  # unrolled draft steps per training position (Recipe.depth)
    distill: float = 0.5  # weight of the target's top-k distribution in the token loss
    feature_weight: float = 1.0  # weight of the feature regression (Recipe.feature_weight)
    val_fraction: float = 0.05  # greedy answers held out for early stopping
    eval_every: int = 100  # steps between validation measurements
    seed: int = 0
    eval_prompts: int = 8
    eval_new_tokens: int = 96
    gamma: int = 5

    def recipe(self) -> Recipe:
        return Recipe(depth=self.depth, distill=self.distill, feature_weight=self.feature_weight)

    def validate(self) -> None:
        if self.draft_vocab is not None:
            check_int("draft_vocab", self.draft_vocab, min_value=2)
        check_int("num_prompts", self.num_prompts, min_value=1, max_value=len(training_prompts(None, 0)))
        check_int("max_new_tokens", self.max_new_tokens, min_value=2)
        check_int("epochs", self.epochs, min_value=1)
        if self.steps is not None:
            check_int("steps", self.steps, min_value=1)
        check_int("batch_size", self.batch_size, min_value=1)
        check_int("seed", self.seed, min_value=0)
        check_int("eval_prompts", self.eval_prompts, min_value=0)
        check_int("gamma", self.gamma, min_value=1, max_value=16)
        check_int("depth", self.depth, min_value=1, max_value=8)
        check_int("eval_every", self.eval_every, min_value=1)
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and self.minutes >= 1):
            raise DecodeKitError(f"minutes must be a number >= 1, got {self.minutes!r}")
        for name, low, high in (("distill", 0.0, 1.0), ("val_fraction", 0.0, 0.5), ("weight_decay", 0.0, 1.0),
                                ("passages", 0.0, 0.9), ("data_share", 0.05, 0.95),
                                ("feature_weight", 0.0, 10.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and low <= value <= high):
                raise DecodeKitError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if not (isinstance(self.lr, float) and 0 < self.lr < 1):
            raise DecodeKitError(f"lr must be a float in (0, 1), got {self.lr!r}")


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` without ``resume``/``overwrite`` (before anything loads)."""
    if resume and overwrite:
        raise DecodeKitError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise DecodeKitError(f"out {str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise DecodeKitError(f"out {str(out)!r} is not empty: pass --resume to continue its training or "
                             "--overwrite to replace it")


def weights_hash(spec: str | None) -> str:
    """sha256 of the target's weight files (the GGUF file of a bundled model)."""
    from decodekit.models import BUNDLED_MODELS, DEFAULT_MODEL

    name = spec or DEFAULT_MODEL
    if name in BUNDLED_MODELS:
        files = [BUNDLED_MODELS[name].gguf_path()]
    else:
        path = Path(name).expanduser()
        files = [path] if path.is_file() else sorted(
            f for pattern in ("*.safetensors", "*.bin", "*.gguf") for f in path.glob(pattern))
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------- 1. data
class _Recorder:
    """Hooks on the target: its final norm's input (hidden states) and its LM head's ``TOP_K``
    most likely next tokens with their probabilities (the first is its greedy token)."""

    def __init__(self, model):
        self.hidden: list[Tensor] = []
        self.top: list[tuple[Tensor, Tensor]] = []
        self.handles = [
            decoder_of(model).norm.register_forward_pre_hook(lambda m, a: self.hidden.append(a[0].float().cpu())),
            model.get_output_embeddings().register_forward_hook(lambda m, a, out: self.top.append(_top(out[:, -1]))),
        ]

    def take(self) -> tuple[Tensor, Tensor, Tensor]:
        """``hidden [B, T + n - 1, H]``, ``top_ids [B, n, TOP_K]`` and ``top_p [B, n, TOP_K]``
        of the last generation."""
        hidden = torch.cat(self.hidden, 1)
        ids, probs = torch.stack([t[0] for t in self.top], 1), torch.stack([t[1] for t in self.top], 1)
        self.hidden, self.top = [], []
        return hidden, ids, probs

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _top(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``logits [B, V]`` -> the ``TOP_K`` most likely ids ``[B, K]`` and their probabilities."""
    probs, ids = logits.float().softmax(-1).topk(TOP_K, dim=-1)
    return ids.cpu(), probs.cpu()


def _rows(ids: Tensor, mask: Tensor, out: Tensor, recorded: tuple, eos: set[int], sampled: bool) -> list[dict]:
    """One generated batch -> per row ``tokens [L]``, ``features [L-1, H]``, ``greedy [L-1]``
    (the target's greedy next token; -1 at prompt positions) and ``top_ids`` / ``top_p``
    ``[L-1, TOP_K]`` (its most likely next tokens; zeros at prompt positions), prompt padding and
    text after the first EOS removed; ``greedy_answer``: not ``sampled``."""
    hidden, top_ids, top_p = recorded
    width = ids.shape[1]
    samples = []
    for b in range(ids.shape[0]):
        pad = int((mask[b] == 0).sum())
        new = out[b, width:].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        tokens = out[b, pad: width + cut]
        length = tokens.shape[0]
        prompt = width - pad
        labels = torch.full((length - 1,), -1, dtype=torch.long)
        labels[prompt - 1:] = top_ids[b, : length - prompt, 0]
        ids_k, p_k = torch.zeros(length - 1, TOP_K, dtype=torch.long), torch.zeros(length - 1, TOP_K)
        ids_k[prompt - 1:], p_k[prompt - 1:] = top_ids[b, : length - prompt], top_p[b, : length - prompt]
        samples.append(dict(tokens=tokens.clone(), features=hidden[b, pad: pad + length - 1].clone(),
                            greedy=labels, top_ids=ids_k, top_p=p_k.to(torch.float16), prompt=prompt,
                            greedy_answer=not sampled))
    return samples


@torch.inference_mode()
def collect(model, tokenizer, prompts: list[str], cfg: TrainConfig, progress=None, sampled: bool | None = None,
            deadline: float | None = None) -> list[dict]:
    """The target's own answers to ``prompts`` with its hidden states (see the module doc):
    ``sampled`` None alternates greedy and sampled batches; stops at ``deadline``
    (``time.perf_counter()``), if given, after the batch that passes it."""
    from decodekit.io import encode_prompts
    from decodekit.model_info import default_eos_pad

    eos, pad = default_eos_pad(model)
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    recorder = _Recorder(model)
    samples = []
    try:
        for start in range(0, len(prompts), cfg.gen_batch_size):
            batch = encode_prompts(tokenizer, prompts[start: start + cfg.gen_batch_size], True)
            ids, mask = left_pad(batch, pad or 0)
            sample = (start // cfg.gen_batch_size) % 2 == 1 if sampled is None else sampled
            torch.manual_seed(cfg.seed + start)
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                                 temperature=SAMPLE_TEMPERATURE if sample else None, top_p=None, top_k=None,
                                 pad_token_id=pad, eos_token_id=list(eos_ids) or None).cpu()
            samples.extend(_rows(ids, mask, out, recorder.take(), eos_ids, sample))
            if progress is not None:
                progress.update(len(batch))
            if deadline is not None and time.perf_counter() > deadline:
                break
    finally:
        recorder.close()
    return samples


def draft_vocabulary(samples: list[dict], size: int | None, vocab: int) -> Tensor | None:
    """The ``size`` most frequent generated tokens (None: the full vocabulary)."""
    if size is None or size >= vocab:
        return None
    counts = torch.zeros(vocab, dtype=torch.long)
    for s in samples:
        counts += torch.bincount(s["tokens"][s["prompt"]:], minlength=vocab)[:vocab]
    return counts.topk(size).indices.sort().values


# ---------------------------------------------------------------------------- 3. training
def vocab_index(head: EagleHead) -> Tensor | None:
    """Full id -> draft-vocabulary index (-2 outside it); None for a full-vocabulary head."""
    if head.vocab_ids is None:
        return None
    vocab_map = torch.full((head.shared.vocab,), -2, dtype=torch.long)
    vocab_map[head.vocab_ids.cpu()] = torch.arange(head.vocab_ids.numel())
    return vocab_map


def split_validation(samples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, validation)``: a ``fraction`` of the greedy answers held out for early stopping."""
    greedy = [i for i, s in enumerate(samples) if s.get("greedy_answer", True)]
    count = int(len(greedy) * fraction)
    chosen = set(random.Random(seed).sample(greedy, count)) if count else set()
    return [s for i, s in enumerate(samples) if i not in chosen], [samples[i] for i in sorted(chosen)]


def _lr(step: int, total: int, base: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _save_checkpoint(out: Path, head: EagleHead, opt, step: int, log: dict) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(dict(head=head.state_dict(), opt=opt.state_dict(), step=step, log=log,
                    rng=torch.get_rng_state()), tmp)
    tmp.replace(out / CHECKPOINT)


def _measure(head: EagleHead, sets: dict[str, list[dict]], vocab_map, gamma: int) -> dict:
    """Acceptance by depth and mean accepted drafts at ``gamma`` on each held-out set."""
    result = {}
    for name, samples in sets.items():
        rates = acceptance(head, samples, gamma, vocab_map)
        result[name] = dict(acceptance_by_depth=rates, mean_accepted=expected_accepted(rates, gamma))
    return result


def train(head: EagleHead, samples: list[dict], cfg: TrainConfig, out: Path, *, deadline: float | None = None,
          monitors: dict[str, list[dict]] | None = None) -> dict:
    """The training loop (resumes from ``out/checkpoint.pt``); returns its summary. Every
    ``cfg.eval_every`` steps the validation split (and ``monitors``: named held-out sets) are
    measured; the head keeps the state with the best validation mean accepted length. With
    ``deadline``, the step count is fitted to the time left after the first steps."""
    from tqdm.auto import tqdm

    vocab_map = vocab_index(head)
    samples, validation = split_validation(samples, cfg.val_fraction, cfg.seed)
    feats = torch.cat([s["features"] for s in samples])
    scale = feats.std(0).clamp_min(1e-3).to(head.device)  # [H]
    per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    head.train().requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, log = 0, dict(train=[], evals=[])
    if (out / CHECKPOINT).is_file():
        ckpt = torch.load(out / CHECKPOINT, weights_only=False)
        head.load_state_dict(ckpt["head"])
        opt.load_state_dict(ckpt["opt"])
        step, log = ckpt["step"], ckpt["log"]
    best, t0 = None, time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train-drafter: training", unit="step")
    while step < total:
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed + step // per_epoch))
        i = step % per_epoch
        chosen = [samples[j] for j in order[i * cfg.batch_size: (i + 1) * cfg.batch_size].tolist()]
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, cfg.lr)
        loss, info = recipe_loss(head, make_batch(chosen, vocab_map), scale, cfg.recipe())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        log["train"].append(info)
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{info['acc']:.2f}")
        if deadline is not None and step == 10:  # fit the schedule to the time left
            per_step = (time.perf_counter() - t0) / 10
            total = bar.total = max(11, min(total, 10 + int((deadline - time.perf_counter()) / per_step)))
        if validation and (step % cfg.eval_every == 0 or step == total):
            best = _evaluate_step(head, step, validation, monitors, vocab_map, cfg, log, best)
        if step % CHECKPOINT_EVERY == 0 or step == total:
            _save_checkpoint(out, head, opt, step, log)
    bar.close()
    if best is not None:
        head.load_state_dict(best["state"])
    head.eval().requires_grad_(False)
    recent = log["train"][-max(1, per_epoch):]
    return dict(steps=total, epochs=round(total / per_epoch, 2), batch_size=cfg.batch_size, lr=cfg.lr,
                recipe=asdict(cfg.recipe()), best_step=None if best is None else best["step"],
                validation=None if best is None else best["result"],
                seconds_this_run=round(time.perf_counter() - t0, 1),
                final_token_accuracy=round(sum(r["acc"] for r in recent) / len(recent), 4),
                final_ce=round(sum(r["ce"] for r in recent) / len(recent), 4), evals=log["evals"])


def _evaluate_step(head, step, validation, monitors, vocab_map, cfg, log, best) -> dict | None:
    """Measure the validation split (and monitors) now; keep the head's state if it is the best."""
    result = _measure(head, {"validation": validation, **(monitors or {})}, vocab_map, cfg.gamma)
    log["evals"].append(dict(step=step, **result))
    score = result["validation"]["mean_accepted"]
    if best is None or score > best["score"]:
        state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        return dict(score=score, step=step, state=state, result=result["validation"])
    return best


# ---------------------------------------------------------------------------- 4. evaluation
def acceptance_by_depth(draft_lengths: list[int], accept_lengths: list[int], depth: int) -> list[float]:
    """P(draft d accepted | drafts 1..d-1 accepted and d drafted), d = 1..depth."""
    rates = []
    for d in range(1, depth + 1):
        reached = [a for k, a in zip(draft_lengths, accept_lengths) if k >= d and a >= d - 1]
        rates.append(round(sum(a >= d for a in reached) / len(reached), 4) if reached else 0.0)
    return rates


def evaluate(model, tokenizer, head: EagleHead, cfg: TrainConfig) -> dict:
    """Greedy speculative decoding with the head on the held-out chat suite."""
    from decodekit.api import generate
    from decodekit.io import encode_prompts
    from decodekit.suites import load_suite

    prompts = [r["prompt"] for r in load_suite("chat")][: cfg.eval_prompts]
    if not prompts:
        return {}
    ids = encode_prompts(tokenizer, prompts, True)
    drafter = EagleDrafter(model, head)
    out = generate(model, ids, strategy="speculative", drafter=drafter, gamma=cfg.gamma, draft_policy="fixed",
                   max_new_tokens=cfg.eval_new_tokens)
    drafted = [k for s in out.stats for k in s.draft_lengths]
    accepted = [a for s in out.stats for a in s.accept_lengths]
    steps = [a for k, a in zip(drafted, accepted) if k > 0]
    return dict(prompts=f"chat suite (held out of training), first {len(prompts)}", gamma=cfg.gamma,
                max_new_tokens=cfg.eval_new_tokens, decoding="greedy",
                acceptance_by_depth=acceptance_by_depth(drafted, accepted, cfg.gamma),
                mean_accepted_length=round(sum(steps) / max(1, len(steps)), 4),
                tokens_per_verify=round(sum(s.new_tokens for s in out.stats) / max(1, len(accepted)), 4))


# ---------------------------------------------------------------------------- the command
def _deadlines(cfg: TrainConfig, t0: float) -> tuple[float | None, float | None]:
    """``(data, training)`` deadlines of a ``minutes`` budget (the card's evaluation takes the
    last ``EVAL_RESERVE`` seconds)."""
    if cfg.minutes is None:
        return None, None
    budget = cfg.minutes * 60
    return t0 + cfg.data_share * budget, t0 + budget - EVAL_RESERVE


def _data(model, tokenizer, cfg: TrainConfig, out: Path, deadline: float | None) -> tuple[list[dict], dict]:
    """Collect (or reload, on resume) the self-distillation data: answers to ``training_prompts``,
    then to ``passage_prompts`` built from the greedy ones (``cfg.passages`` of the answers)."""
    from tqdm.auto import tqdm

    if (out / DATA).is_file():
        saved = torch.load(out / DATA, weights_only=False)
        return saved["samples"], saved["info"]
    prompts = training_prompts(cfg.num_prompts, cfg.seed)
    t0 = time.perf_counter()
    first = None if deadline is None else t0 + (deadline - t0) * (1 - cfg.passages)
    with tqdm(total=len(prompts), desc="train-drafter: generating data", unit="prompt") as bar:
        samples = collect(model, tokenizer, prompts, cfg, bar, deadline=first)
    answered, greedy = len(samples), [s for s in samples if s["greedy_answer"]]
    texts = [tokenizer.decode(s["tokens"][s["prompt"]:], skip_special_tokens=True) for s in greedy]
    count = round(len(samples) * cfg.passages / max(1e-9, 1 - cfg.passages))
    passages = passage_prompts(texts, cfg.seed)[:count]
    with tqdm(total=len(passages), desc="train-drafter: passage prompts", unit="prompt") as bar:
        samples += collect(model, tokenizer, passages, cfg, bar, deadline=deadline)
    info = dict(source="self-distillation: the target's own answers (chat template) to held-in prompts of 12 "
                       "kinds (decodekit.strategies.eagle.prompts; benchmark suites and the chat suite's subjects "
                       "excluded), then to passage prompts built from its greedy answers",
                prompts=answered, passage_prompts=len(samples) - answered,
                greedy_batches="even", sampled_batches=f"odd (temperature {SAMPLE_TEMPERATURE})",
                max_new_tokens=cfg.max_new_tokens, generated_tokens=sum(int((s["greedy"] >= 0).sum()) for s in samples),
                total_tokens=sum(int(s["tokens"].shape[0]) for s in samples),
                seconds=round(time.perf_counter() - t0, 1))
    tmp = out / (DATA + ".tmp")
    torch.save(dict(samples=samples, info=info), tmp)
    tmp.replace(out / DATA)
    return samples, info


def train_drafter(model, tokenizer, out, cfg: TrainConfig, *, target: str, resume: bool = False) -> dict:
    """Train a head for ``model`` into ``out`` (``model.safetensors`` + ``card.json``); returns the card.

    ``out`` must be checked by ``check_out_dir`` first. With ``resume`` a finished ``out`` is
    left as it is; an unfinished one continues from its data and checkpoint.
    """
    cfg.validate()
    out = Path(out)
    if resume and (out / CARD_FILE).is_file() and (out / HEAD_FILE).is_file():
        return json.loads((out / CARD_FILE).read_text())
    if not resume:  # --overwrite: only this command's own files go
        for name in (HEAD_FILE, CARD_FILE, CHECKPOINT, DATA):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data_deadline, train_deadline = _deadlines(cfg, t0)
    samples, data_info = _data(model, tokenizer, cfg, out, data_deadline)
    vocab_ids = draft_vocabulary(samples, cfg.draft_vocab, model.get_output_embeddings().weight.shape[0])
    head = EagleHead(model, vocab_ids).cast(torch.float32)
    summary = train(head, samples, cfg, out, deadline=train_deadline, monitors=_monitors(model, tokenizer, cfg))
    head.cast(model.dtype)
    evaluation = evaluate(model, tokenizer, head, cfg) if cfg.eval_prompts else {}
    card = _card(model, target, cfg, data_info, summary, evaluation, vocab_ids, time.perf_counter() - t0)
    save_head(head, out, card)
    card["head_sha256"] = "sha256:" + hashlib.sha256((out / HEAD_FILE).read_bytes()).hexdigest()
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    for leftover in (CHECKPOINT, DATA):
        (out / leftover).unlink(missing_ok=True)
    return card


def _monitors(model, tokenizer, cfg: TrainConfig) -> dict[str, list[dict]]:
    """The chat suite's greedy answers (held out), measured with the validation split."""
    from decodekit.suites import load_suite

    if not cfg.eval_prompts:
        return {}
    prompts = [r["prompt"] for r in load_suite("chat")]
    return {"chat": collect(model, tokenizer, prompts, cfg, sampled=False)}


def _card(model, target, cfg, data_info, summary, evaluation, vocab_ids, seconds) -> dict:
    return dict(
        format="decodekit-eagle-1", target=target, target_hash=weights_hash(target),
        target_fingerprint=target_fingerprint(model),
        head=dict(layer=type(model.model.layers[0]).__name__, hidden_size=model.config.hidden_size,
                  draft_vocab=None if vocab_ids is None else int(vocab_ids.numel()), dtype="bfloat16",
                  features="input of the target's final norm"),
        data=data_info, training=dict(summary, seed=cfg.seed, device=str(model.device),
                                      torch_threads=torch.get_num_threads()),
        config=asdict(cfg), evaluation=evaluation, wall_seconds=round(seconds, 1),
    )
