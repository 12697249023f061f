"""The machine card: versions, weight bytes, measured memory bandwidth and the floor it implies.

``machine_card`` measures and returns plain data (saved in results.json); ``card_items`` is
its one renderer, used by the terminal (``format_card``) and by report.md alike.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from decodekit.costs import cpu_model

__all__ = ["machine_card", "card_items", "format_card", "memory_bandwidth", "weight_bytes", "sync"]


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def weight_bytes(model) -> int:
    """Bytes of the parameters (tied weights counted once); a llama.cpp model's own count."""
    if hasattr(model, "weight_bytes"):
        return model.weight_bytes
    return sum(p.numel() * p.element_size() for p in model.parameters())


def memory_bandwidth(device: str, mib: int = 256, repeats: int = 5) -> float:
    """Best-of-``repeats`` large-tensor copy, in GB/s (bytes read + bytes written)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def machine_card(models: dict, device: str, model_name: str) -> dict:
    """``models``: dtype -> loaded model. Measures the bandwidth once; per dtype the weight
    bytes and the floor (ms per token at batch 1 if the weights are read once per token)."""
    import transformers

    import decodekit

    bandwidth = memory_bandwidth(device)
    first = next(iter(models.values()))
    card = {
        "cpu": cpu_model() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "decodekit": decodekit.__version__,
        "model": model_name,
        "model_class": type(first).__name__,
        "parameters": sum(p.numel() for p in first.parameters()),
        "bandwidth_gb_s": round(bandwidth, 2),
        "weights": {},
    }
    for dtype, model in models.items():
        nbytes = weight_bytes(model)
        card["weights"][dtype] = {
            "bytes": nbytes,
            "floor_ms_per_token": round(nbytes / (bandwidth * 1e9) * 1000, 2),
        }
    return card


def card_items(card: dict) -> list[tuple[str, str]]:
    """The machine card as (label, text) pairs: one source for the terminal and report.md."""
    items = [
        ("machine", f"{card['cpu']}, {card['cpu_cores']} cores, torch threads {card['torch_threads']}"
         + (f", GPU {card['gpu']}" if card.get("gpu") else "")),
        ("software", f"python {card['python']}, torch {card['torch']}, transformers "
         f"{card['transformers']}, decodekit {card['decodekit']}"),
        ("model", f"{card['model']} ({card['model_class']}, {card['parameters'] / 1e6:.1f} M parameters)"),
        ("bandwidth", f"{card['bandwidth_gb_s']} GB/s (large-tensor copy on {card['device']})"),
    ]
    for dtype, w in card["weights"].items():
        items.append(("weights", f"{dtype}: {w['bytes'] / 2**20:.0f} MiB -> bandwidth floor "
                      f"{w['floor_ms_per_token']} ms/token at batch 1 (weights read once per token)"))
    return items


def format_card(card: dict) -> str:
    """The card for the terminal (printed before any run)."""
    return "\n".join(f"{label:<12} {text}" for label, text in card_items(card))
