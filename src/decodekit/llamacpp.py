"""The llama.cpp backend: a GGUF model run by llama.cpp (llama-cpp-python's C API) behind
the ``KVState`` interface (``decodekit.kvstate``), so every strategy runs unchanged at llama.cpp's
speed. It imports no transformers code.

``load_model(spec, backend="llama.cpp")`` returns a ``LlamaCppModel``: one llama.cpp
context with up to ``n_seq_max`` sequences, each with its own KV stream of ``n_ctx`` cells.
The module registers ``LlamaCppModel``'s backend (``register_backend``), so ``ModelState.empty`` /
``prefill`` on such a model return a ``LlamaCppState``, which maps
each row of the batch to one llama.cpp sequence id:

* ``extend`` feeds every row's real tokens in ONE ``llama_decode`` batch (each token with
  its row's sequence id and per-sequence position; masked tokens are not fed at all) and
  asks for logits only at the kept positions,

llama.cpp's logits depend on how many tokens one call holds (its matmul kernels for one
token and for several round differently: up to ~1 logit on SmolLM2's Q4_1 GGUF), so a
verify forward of ``k`` drafts is not bitwise the ``k`` one-token forwards of greedy:
"lossless" holds up to near-ties, as for llama.cpp's own speculative decoding.
* ``crop`` / ``rollback`` remove each row's tail with ``llama_memory_seq_rm`` (positions
  are per sequence, so ragged rollback needs no holes in the cache; the ``ids``/``mask``
  columns keep KVState's bookkeeping, holes included, for the strategies),
* ``select_rows`` drops sequences that leave and copies the ones picked twice (beams)
  with ``llama_memory_seq_cp`` (a copy of the sequence's KV stream),
* ``fork`` copies rows into new sequences (EIS rollouts, shared prompts).

llama-cpp-python is an optional extra built from source (README "llama.cpp backend").
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor, nn

from decodekit.kvstate import Backend, KVState, register_backend
from decodekit.validation import DecodeKitError

__all__ = ["LlamaCppModel", "LlamaCppState", "check_llama_cpp", "llama_cpp_available", "requantized",
           "GGUF_TYPES", "LLAMA_CPP_DTYPES"]

INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_FMA=ON -DGGML_F16C=ON" '
           "pip install 'decodekit[llamacpp]' --no-binary llama-cpp-python")
DEFAULT_N_CTX = 1024  # KV cells of each sequence (prompt + new tokens of one row)
DEFAULT_N_SEQ_MAX = 16  # rows alive at once: prompts x beams, EIS rollouts (KV: 16 x 1024 x 23 kB for SmolLM2)


# GGUF weight types the backend can requantize a model to (load_model(backend="llama.cpp", dtype=...)):
# llama.cpp's CPU build has batched kernels for these (a k-token forward costs far less than k
# one-token forwards), not for Q4_1 (measured, README "llama.cpp backend").
LLAMA_CPP_DTYPES = ("q4_0", "q8_0")
GGUF_TYPES = LLAMA_CPP_DTYPES


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def check_llama_cpp() -> None:
    """One-line error when llama-cpp-python is not installed (checked before any load)."""
    if not llama_cpp_available():
        raise DecodeKitError(f"backend 'llama.cpp' needs llama-cpp-python: run `{INSTALL}`")


def requantized(src: str | Path, gguf_type: str) -> Path:
    """``src`` (a GGUF file) requantized to ``gguf_type`` (one of ``GGUF_TYPES``) by llama.cpp's
    ``llama_model_quantize``, once: kept in decodekit's cache under a name holding the source's
    name, size and modification time, written to a temporary file and renamed into place."""
    import llama_cpp
    from llama_cpp import _logger

    from decodekit.paths import cache_dir

    src = Path(src)
    stat = src.stat()
    out = cache_dir() / "gguf" / "requantized" / f"{src.stem}-{stat.st_size}-{int(stat.st_mtime)}-{gguf_type}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.allow_requantize = True
    params.nthread = torch.get_num_threads()
    _logger.set_verbose(False)
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        tmp.unlink(missing_ok=True)
        raise DecodeKitError(f"llama.cpp could not requantize {src.name} to {gguf_type}")
    os.replace(tmp, out)
    return out


class LlamaCppModel(nn.Module):
    """A GGUF file loaded by llama.cpp, decoded through ``LlamaCppState``.

    Has the attributes decodekit reads from a model: ``device`` (cpu), ``config``
    (``vocab_size``, ``max_position_embeddings``), ``generation_config`` (EOS/pad ids),
    ``training`` / ``eval()``. Calling it (``forward``) runs one batch through
    ``llama_decode``, so forward hooks (the benchmark's forward counter) see every call.
    """

    def __init__(self, path: str | Path, *, n_ctx: int = DEFAULT_N_CTX, n_seq_max: int = DEFAULT_N_SEQ_MAX,
                 n_threads: int | None = None):
        super().__init__()
        check_llama_cpp()
        import llama_cpp

        self._lib = llama_cpp
        self.path = Path(path)
        from llama_cpp import _logger

        _logger.set_verbose(False)  # llama.cpp prints every load to stderr otherwise (as Llama(verbose=False))
        llama_cpp.llama_backend_init()
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(),
                                                           llama_cpp.llama_model_default_params())
        if not self._model:
            raise DecodeKitError(f"model_path {str(path)!r}: llama.cpp could not load this GGUF file")
        self._ctx = self._new_context(n_ctx, n_seq_max, n_threads or torch.get_num_threads())
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self._ctx)  # per sequence
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)
        self.n_seq_max = n_seq_max
        self._free = list(range(n_seq_max - 1, -1, -1))  # sequence ids not used by any state
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._views = self._batch_views()
        context = min(self.n_ctx, llama_cpp.llama_model_n_ctx_train(self._model))
        self.config = SimpleNamespace(vocab_size=self.n_vocab, max_position_embeddings=context,
                                      _name_or_path=str(self.path), model_type="gguf")
        self.weight_bytes = int(llama_cpp.llama_model_size(self._model))
        self.dtype_name = f"llama.cpp:{self._describe().split()[-1]}"  # records' stats.dtype, e.g. llama.cpp:Q4_1
        eos = llama_cpp.llama_vocab_eos(vocab)
        self.generation_config = SimpleNamespace(eos_token_id=eos if eos >= 0 else None, pad_token_id=None)
        self.eval()

    def _describe(self) -> str:
        """llama.cpp's description of the model, e.g. ``"llama 135M Q4_1"``."""
        buf = ctypes.create_string_buffer(128)
        self._lib.llama_model_desc(self._model, buf, len(buf))
        return buf.value.decode(errors="replace") or "gguf"

    def _new_context(self, n_ctx: int, n_seq_max: int, n_threads: int):
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq_max
        params.n_batch = 2048
        params.n_ubatch = 512
        params.n_seq_max = n_seq_max
        # One KV stream per sequence: a row's cells then sit where they would if it were alone. In
        # llama.cpp 0.3.36 the unified cache gave rows of a multi-sequence batch logits up to ~1 off
        # their single-row values; per-sequence streams give exactly the single-row logits.
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        # as llama-cpp-python's Llama(flash_attn=False): the same numerics as llama.cpp's own greedy
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            raise DecodeKitError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_seq_max={n_seq_max})")
        return ctx

    def _batch_views(self) -> SimpleNamespace:
        """numpy views of the reusable ``llama_batch``'s arrays (filled without Python loops)."""
        b, n = self._batch, self.n_batch
        views = SimpleNamespace(token=np.ctypeslib.as_array(b.token, shape=(n,)),
                                pos=np.ctypeslib.as_array(b.pos, shape=(n,)),
                                n_seq_id=np.ctypeslib.as_array(b.n_seq_id, shape=(n,)),
                                logits=np.ctypeslib.as_array(b.logits, shape=(n,)),
                                seq=[b.seq_id[i] for i in range(n)])
        views.n_seq_id[:] = 1
        return views

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __repr__(self) -> str:
        return f"LlamaCppModel({str(self.path)!r}, n_ctx={self.n_ctx}, n_seq_max={self.n_seq_max})"

    # ------------------------------------------------------------------ sequences
    def new_seqs(self, n: int) -> list[int]:
        if n > len(self._free):
            raise DecodeKitError(f"the llama.cpp backend holds at most n_seq_max={self.n_seq_max} rows at once "
                                 f"(prompts x beams, rollouts); load_model(..., n_seq_max=...) raises it")
        return [self._free.pop() for _ in range(n)]

    def free_seq(self, seq: int) -> None:
        self._lib.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._free.append(seq)

    def copy_seq(self, src: int, dst: int) -> None:
        self._lib.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def drop_tail(self, seq: int, keep: int) -> None:
        """Sequence ``seq`` keeps its first ``keep`` positions."""
        if not self._lib.llama_memory_seq_rm(self._mem, seq, keep, -1):
            raise RuntimeError(f"llama.cpp could not remove positions >= {keep} of sequence {seq}")

    # ------------------------------------------------------------------ decoding
    def forward(self, tokens: np.ndarray, pos: np.ndarray, seqs: np.ndarray, outputs: np.ndarray) -> Tensor:
        """Decode ``n`` tokens (``tokens/pos/seqs/outputs [n]``, outputs 0/1); returns the
        float32 logits ``[n_out, V]`` of the tokens flagged in ``outputs``, in order."""
        rows = []
        for start in range(0, len(tokens), self.n_batch):
            end = min(start + self.n_batch, len(tokens))
            rows.append(self._decode_chunk(tokens[start:end], pos[start:end], seqs[start:end], outputs[start:end]))
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def _decode_chunk(self, tokens, pos, seqs, outputs) -> Tensor:
        n, views = len(tokens), self._views
        views.token[:n] = tokens
        views.pos[:n] = pos
        views.logits[:n] = outputs
        for i, s in enumerate(seqs.tolist()):
            views.seq[i][0] = s
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc == 1:
            raise DecodeKitError(f"a row outgrew llama.cpp's KV cache (n_ctx={self.n_ctx} tokens per row): "
                                 "load_model(..., n_ctx=...) raises it")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        n_out = int(outputs.sum())
        if n_out == 0:
            return torch.zeros(0, self.n_vocab)
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab))
        return torch.from_numpy(logits.copy())

    def close(self) -> None:
        """Free llama.cpp's context and model (also done when the object is collected)."""
        lib = getattr(self, "_lib", None)
        if lib is None or not getattr(self, "_ctx", None):
            return
        lib.llama_batch_free(self._batch)
        lib.llama_free(self._ctx)
        lib.llama_model_free(self._model)
        self._ctx = self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class LlamaCppState(KVState):
    """The llama.cpp backend's ``KVState`` (see the module docstring). ``ids``/``mask``
    keep KVState's column bookkeeping (holes and compaction included); the KV cache lives
    in llama.cpp, row ``b`` in sequence ``seqs[b]`` holding ``pos[b]`` tokens."""

    def __init__(self, model: LlamaCppModel, ids: Tensor, mask: Tensor, seqs: list[int], pos: list[int]):
        super().__init__(model, ids, mask)
        self.seqs = seqs  # row -> llama.cpp sequence id
        self.pos = pos  # row -> tokens of the row in the KV cache (its next position)

    @classmethod
    def empty(cls, model, batch: int, *, use_cache: bool = True) -> LlamaCppState:
        if not use_cache:
            raise DecodeKitError("use_cache=False is not available on the llama.cpp backend (its KV cache is "
                                 "always on); use the torch backend")
        ids = torch.zeros((batch, 0), dtype=torch.long)
        return cls(model, ids, ids.clone(), model.new_seqs(batch), [0] * batch)

    def extend(self, tokens: Tensor, *, token_mask: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """Feed ``tokens [B, k]`` (masked ones are skipped) in one ``llama_decode``; logits
        ``[B, keep, V]`` float32 of the last ``keep = logits_to_keep or k`` columns (zeros
        where a kept column is masked)."""
        tokens = tokens.cpu()
        batch, k = tokens.shape
        if token_mask is None:
            token_mask = torch.ones_like(tokens)
        else:
            token_mask = token_mask.cpu().long()
            self.dense = self.dense and bool(token_mask.all())
        keep = min(logits_to_keep or k, k)
        real = token_mask.bool()  # [B, k]
        rows = torch.arange(batch)[:, None].expand(batch, k)[real]  # [n] row of each fed token
        pos = torch.tensor(self.pos)[:, None] + token_mask.cumsum(-1) - 1  # [B, k]
        kept = (torch.arange(k) >= k - keep)[None, :].expand(batch, k)[real]  # [n]
        seqs = torch.tensor(self.seqs)[rows]
        logits = self._decode(tokens[real], pos[real], seqs, kept)  # [n_out, V]
        self.pos = (torch.tensor(self.pos) + token_mask.sum(-1)).tolist()
        self.append_columns(tokens, token_mask)
        if logits.shape[0] == batch * keep:  # every kept position is real (the usual case)
            return logits.view(batch, keep, -1)
        out = torch.zeros(batch * keep, self.model.n_vocab)
        slot = (rows * keep + torch.arange(k)[None, :].expand(batch, k)[real] - (k - keep))[kept]
        out[slot] = logits
        return out.view(batch, keep, -1)

    def _decode(self, tokens: Tensor, pos: Tensor, seqs: Tensor, kept: Tensor) -> Tensor:
        """``[n]`` tokens of every row (row-major) in ONE ``llama_decode`` -> logits ``[n_kept, V]``."""
        if tokens.numel() == 0:
            return torch.zeros(0, self.model.n_vocab)
        as_np = lambda t: t.numpy().astype(np.int32)  # noqa: E731
        return self.model(as_np(tokens), as_np(pos), as_np(seqs), kept.numpy().astype(np.int8))

    # ------------------------------------------------------------------ rolling back
    def _keep_tokens(self, keep_real: list[int]) -> None:
        """Row ``b`` keeps its first ``keep_real[b]`` tokens in the KV cache."""
        for b, (seq, held, keep) in enumerate(zip(self.seqs, self.pos, keep_real)):
            if keep < held:
                self.model.drop_tail(seq, keep)
                self.pos[b] = keep

    def crop(self, num_tokens_to_discard: int) -> None:
        if num_tokens_to_discard <= 0:
            return
        self._keep_tokens(self.mask[:, : self.length - num_tokens_to_discard].sum(-1).tolist())
        super().crop(num_tokens_to_discard)

    def rollback(self, per_row: Tensor) -> None:
        per_row = per_row.cpu()
        col = torch.arange(self.length)
        kept = col[None, :] < (self.length - per_row)[:, None]  # [B, T]
        self._keep_tokens((self.mask * kept).sum(-1).tolist())
        super().rollback(per_row)

    # ------------------------------------------------------------------ rows
    def select_rows(self, index: Tensor) -> None:
        """Keep/reorder rows; a row picked twice (beams) gets a copy of its sequence."""
        idx = index.cpu().tolist()
        kept = {self.seqs[i] for i in idx}
        for seq in self.seqs:  # dropped rows first: beams x prompts may fill n_seq_max exactly
            if seq not in kept:
                self.model.free_seq(seq)
        seqs, taken = [], set()
        for i in idx:
            seq = self.seqs[i]
            if seq in taken:
                copy = self.model.new_seqs(1)[0]
                self.model.copy_seq(seq, copy)
                seq = copy
            taken.add(seq)
            seqs.append(seq)
        self.seqs, self.pos = seqs, [self.pos[i] for i in idx]
        super().select_rows(index.cpu())

    def fork(self, index: Tensor | None = None) -> LlamaCppState:
        idx = list(range(self.batch_size)) if index is None else index.cpu().tolist()
        seqs = self.model.new_seqs(len(idx))
        for i, seq in zip(idx, seqs):
            self.model.copy_seq(self.seqs[i], seq)
        rows = torch.tensor(idx, dtype=torch.long)
        fork = LlamaCppState(self.model, self.ids.index_select(0, rows), self.mask.index_select(0, rows), seqs,
                             [self.pos[i] for i in idx])
        fork.forwards = self.take_forwards()
        return fork

    def add_rows(self, other: LlamaCppState) -> None:
        """Append ``other``'s rows (continuous batching): its sequences move to this state."""
        if not isinstance(other, LlamaCppState) or other.model is not self.model:
            raise ValueError("add_rows needs a state of the same model")
        seqs, pos = other.seqs, other.pos
        other.seqs = []  # owned by this state now: ``other`` gives nothing back when collected
        super().add_rows(other)  # ids/mask bookkeeping
        self.seqs, self.pos = self.seqs + seqs, self.pos + pos

    def release(self) -> None:
        """Give this state's sequences back to the model (done when the state is collected)."""
        seqs, self.seqs = getattr(self, "seqs", []), []
        if getattr(self.model, "_ctx", None):
            for seq in seqs:
                self.model.free_seq(seq)

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ModelState.empty / prefill on a LlamaCppModel give a LlamaCppState; records name the GGUF weight type
register_backend(LlamaCppModel, Backend("llama.cpp", LlamaCppState, dtype_name=lambda model: model.dtype_name,
                                        in_torch=False))
