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
from decodekit.strategies.eagle.storage import CARD_FILE, HEAD_FILE, save_head
from decodekit.validation import DecodeKitError, check_int

__all__ = ["TrainConfig", "train_drafter", "training_prompts", "collect", "acceptance_by_depth",
           "check_out_dir", "weights_hash"]

CHECKPOINT = "checkpoint.pt"
DATA = "data.pt"
CHECKPOINT_EVERY = 50
SAMPLE_TEMPERATURE = 0.8
FEATURE_NOISE = 0.1

TOPICS = [
    "volcanoes", "the Roman Empire", "machine learning", "coffee", "honeybees", "the moon landing",
    "electric cars", "chess", "the water cycle", "jazz music", "ancient Egypt", "climate change",
    "black holes", "the human heart", "recycling", "the internet", "dinosaurs", "gardening",
    "the stock market", "origami", "rainforests", "vaccines", "the printing press", "penguins",
    "solar panels", "the French Revolution", "yoga", "earthquakes", "video games", "chocolate",
    "the immune system", "trains", "Shakespeare", "friendship", "time management", "the ocean",
    "bread baking", "mountains", "smartphones", "public libraries", "sleep", "bridges",
    "the Olympic Games", "mushrooms", "kites", "the periodic table", "volunteering", "deserts",
]
TASKS = [
    "Tell me about {}.", "Write a short paragraph about {}.", "What are some interesting facts about {}?",
    "Explain {} to a beginner.", "Write a short poem about {}.", "Give me a few tips related to {}.",
    "What is the history of {}?", "Write a short story involving {}.", "Why do people care about {}?",
    "Summarize the most important things to know about {}.", "Write a blog post introduction about {}.",
    "What are the pros and cons of {}?", "Describe how {} works to a ten-year-old.", "List five facts about {}.",
    "Write a friendly email to a friend about {}.", "Give me three questions to ask about {}, with short answers.",
]


def training_prompts(num_prompts: int, seed: int) -> list[str]:
    """``num_prompts`` held-in prompts (topics x tasks, shuffled by ``seed``), none of them
    in the benchmark suites."""
    from decodekit.suites import SUITES, load_suite

    held_out = {r["prompt"] for name in SUITES for r in load_suite(name)}
    prompts = [t.format(topic) for t in TASKS for topic in TOPICS]
    random.Random(seed).shuffle(prompts)
    prompts = [p for p in prompts if p not in held_out]
    check_int("num_prompts", num_prompts, min_value=1, max_value=len(prompts))
    return prompts[:num_prompts]


@dataclass
class TrainConfig:
    """Options of ``train_drafter`` (the CLI's flags)."""

    draft_vocab: int | None = None
    num_prompts: int = 768  # every held-in prompt: 18 min end to end for the bundled model on 2 CPU cores
    max_new_tokens: int = 128
    gen_batch_size: int = 32
    epochs: int = 3
    steps: int | None = None  # overrides epochs
    batch_size: int = 8  # sequences per optimizer step
    lr: float = 1e-3
    seed: int = 0
    eval_prompts: int = 8
    eval_new_tokens: int = 96
    gamma: int = 5

    def validate(self) -> None:
        if self.draft_vocab is not None:
            check_int("draft_vocab", self.draft_vocab, min_value=2)
        check_int("num_prompts", self.num_prompts, min_value=1, max_value=len(TOPICS) * len(TASKS))
        check_int("max_new_tokens", self.max_new_tokens, min_value=2)
        check_int("epochs", self.epochs, min_value=1)
        if self.steps is not None:
            check_int("steps", self.steps, min_value=1)
        check_int("batch_size", self.batch_size, min_value=1)
        check_int("seed", self.seed, min_value=0)
        check_int("eval_prompts", self.eval_prompts, min_value=0)
        check_int("gamma", self.gamma, min_value=1, max_value=16)
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
    """Hooks on the target: its final norm's input (hidden states) and its LM head's greedy token."""

    def __init__(self, model):
        self.hidden: list[Tensor] = []
        self.greedy: list[Tensor] = []
        self.handles = [
            decoder_of(model).norm.register_forward_pre_hook(lambda m, a: self.hidden.append(a[0].float().cpu())),
            model.get_output_embeddings().register_forward_hook(
                lambda m, a, out: self.greedy.append(out[:, -1].argmax(-1).cpu())),
        ]

    def take(self) -> tuple[Tensor, Tensor]:
        """``hidden [B, T + n - 1, H]`` and ``greedy [B, n]`` of the last generation."""
        hidden, greedy = torch.cat(self.hidden, 1), torch.stack(self.greedy, 1)
        self.hidden, self.greedy = [], []
        return hidden, greedy

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _rows(ids: Tensor, mask: Tensor, out: Tensor, hidden: Tensor, greedy: Tensor, eos: set[int]) -> list[dict]:
    """One generated batch -> per row ``tokens [L]``, ``features [L-1, H]``, ``greedy [L-1]``
    (the target's greedy next token; -1 at prompt positions), prompt padding and text after
    the first EOS removed."""
    width = ids.shape[1]
    samples = []
    for b in range(ids.shape[0]):
        pad = int((mask[b] == 0).sum())
        new = out[b, width:].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        tokens = out[b, pad: width + cut]
        length = tokens.shape[0]
        labels = torch.full((length - 1,), -1, dtype=torch.long)
        prompt = width - pad
        labels[prompt - 1:] = greedy[b, : length - prompt]
        samples.append(dict(tokens=tokens.clone(), features=hidden[b, pad: pad + length - 1].clone(),
                            greedy=labels, prompt=prompt))
    return samples


@torch.inference_mode()
def collect(model, tokenizer, prompts: list[str], cfg: TrainConfig, progress=None) -> list[dict]:
    """The target's own answers to ``prompts`` with its hidden states (see the module doc)."""
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
            sampled = (start // cfg.gen_batch_size) % 2 == 1
            torch.manual_seed(cfg.seed + start)
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=cfg.max_new_tokens, do_sample=sampled,
                                 temperature=SAMPLE_TEMPERATURE if sampled else None, top_p=None, top_k=None,
                                 pad_token_id=pad, eos_token_id=list(eos_ids) or None).cpu()
            hidden, greedy = recorder.take()
            samples.extend(_rows(ids, mask, out, hidden, greedy, eos_ids))
            if progress is not None:
                progress.update(len(batch))
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
def _batch(samples: list[dict], vocab_map: Tensor | None) -> dict:
    """Sequences -> right-padded tensors of training pairs (``t = 0 .. L-3``)."""
    length = max(s["tokens"].shape[0] - 2 for s in samples)
    hidden = samples[0]["features"].shape[1]
    n = len(samples)
    feats_in, feats_out = torch.zeros(n, length, hidden), torch.zeros(n, length, hidden)
    tokens = torch.zeros(n, length, dtype=torch.long)
    labels = torch.full((n, length), -1, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, s in enumerate(samples):
        m = s["tokens"].shape[0] - 2
        feats_in[i, :m], feats_out[i, :m] = s["features"][:m], s["features"][1: m + 1]
        tokens[i, :m], labels[i, :m], mask[i, :m] = s["tokens"][1: m + 1], s["greedy"][1: m + 1], 1
    if vocab_map is not None:  # full id -> draft-vocabulary index (-1 outside it)
        labels = torch.where(labels >= 0, vocab_map[labels.clamp_min(0)], labels)
    return dict(feats_in=feats_in, feats_out=feats_out, tokens=tokens, labels=labels, mask=mask)


def _loss(head: EagleHead, batch: dict, scale: Tensor) -> tuple[Tensor, dict]:
    """EAGLE's loss on one batch: smooth L1 on scaled features + token cross-entropy. While
    training, the input features get EAGLE's uniform noise (``FEATURE_NOISE`` x each
    dimension's std): the head drafts from its own, imperfect features."""
    from decodekit.strategies.eagle.head import additive_mask

    device = head.device
    b = {k: v.to(device) for k, v in batch.items()}
    mask = b["mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    feats = b["feats_in"]
    if head.training:
        feats = feats + FEATURE_NOISE * scale * (2 * torch.rand_like(feats) - 1)
    pred = head(feats, b["tokens"], positions, additive_mask(mask, mask.shape[1], torch.float32))
    trained = b["labels"] != -1  # generated positions
    reg = nn.functional.smooth_l1_loss((pred - b["feats_out"])[trained] / scale, torch.zeros_like(
        pred[trained]))
    logits = head.logits(pred[trained])
    labels = b["labels"][trained]
    ce = nn.functional.cross_entropy(logits, labels, ignore_index=-2)  # -2: outside the draft vocabulary
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    return reg + ce, dict(reg=float(reg.detach()), ce=float(ce.detach()), acc=accuracy)


def _lr(step: int, total: int, base: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _save_checkpoint(out: Path, head: EagleHead, opt, step: int, log: list) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(dict(head=head.state_dict(), opt=opt.state_dict(), step=step, log=log,
                    rng=torch.get_rng_state()), tmp)
    tmp.replace(out / CHECKPOINT)


def train(head: EagleHead, samples: list[dict], cfg: TrainConfig, out: Path) -> dict:
    """The training loop (resumes from ``out/checkpoint.pt``); returns its summary."""
    from tqdm.auto import tqdm

    vocab_map = None
    if head.vocab_ids is not None:
        vocab_map = torch.full((head.shared.vocab,), -2, dtype=torch.long)
        vocab_map[head.vocab_ids.cpu()] = torch.arange(head.vocab_ids.numel())
    feats = torch.cat([s["features"] for s in samples])
    scale = feats.std(0).clamp_min(1e-3).to(head.device)  # [H]
    per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    head.train().requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, log = 0, []
    if (out / CHECKPOINT).is_file():
        ckpt = torch.load(out / CHECKPOINT, weights_only=False)
        head.load_state_dict(ckpt["head"])
        opt.load_state_dict(ckpt["opt"])
        step, log = ckpt["step"], ckpt["log"]
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train-drafter: training", unit="step")
    while step < total:
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed + step // per_epoch))
        i = step % per_epoch
        chosen = [samples[j] for j in order[i * cfg.batch_size: (i + 1) * cfg.batch_size].tolist()]
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, cfg.lr)
        loss, info = _loss(head, _batch(chosen, vocab_map), scale)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        log.append(info)
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{info['acc']:.2f}")
        if step % CHECKPOINT_EVERY == 0 or step == total:
            _save_checkpoint(out, head, opt, step, log)
    bar.close()
    head.eval().requires_grad_(False)
    recent = log[-max(1, per_epoch):]
    return dict(steps=total, epochs=round(total / per_epoch, 2), batch_size=cfg.batch_size, lr=cfg.lr,
                seconds_this_run=round(time.perf_counter() - t0, 1),
                final_token_accuracy=round(sum(r["acc"] for r in recent) / len(recent), 4),
                final_ce=round(sum(r["ce"] for r in recent) / len(recent), 4))


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
def _data(model, tokenizer, cfg: TrainConfig, out: Path) -> tuple[list[dict], dict]:
    """Collect (or reload, on resume) the self-distillation data."""
    from tqdm.auto import tqdm

    if (out / DATA).is_file():
        saved = torch.load(out / DATA, weights_only=False)
        return saved["samples"], saved["info"]
    prompts = training_prompts(cfg.num_prompts, cfg.seed)
    t0 = time.perf_counter()
    with tqdm(total=len(prompts), desc="train-drafter: generating data", unit="prompt") as bar:
        samples = collect(model, tokenizer, prompts, cfg, bar)
    generated = sum(int((s["greedy"] >= 0).sum()) for s in samples)
    info = dict(source="self-distillation: the target's own answers (chat template) to held-in prompts "
                       "(decodekit.strategies.eagle.training_prompts: topics x tasks; benchmark suites excluded)",
                prompts=len(prompts), greedy_batches="even", sampled_batches=f"odd (temperature {SAMPLE_TEMPERATURE})",
                max_new_tokens=cfg.max_new_tokens, generated_tokens=generated,
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
    samples, data_info = _data(model, tokenizer, cfg, out)
    vocab_ids = draft_vocabulary(samples, cfg.draft_vocab, model.get_output_embeddings().weight.shape[0])
    head = EagleHead(model, vocab_ids).cast(torch.float32)
    summary = train(head, samples, cfg, out)
    head.cast(model.dtype)
    evaluation = evaluate(model, tokenizer, head, cfg) if cfg.eval_prompts else {}
    card = _card(model, target, cfg, data_info, summary, evaluation, vocab_ids, time.perf_counter() - t0)
    save_head(head, out, card)
    card["head_sha256"] = "sha256:" + hashlib.sha256((out / HEAD_FILE).read_bytes()).hexdigest()
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    for leftover in (CHECKPOINT, DATA):
        (out / leftover).unlink(missing_ok=True)
    return card


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
