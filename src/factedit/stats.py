"""Key statistics: the second moment E[k kᵀ] of the MLP out-projection input, for many layers at once.

One pass over a text corpus serves every requested layer (the reference code makes one pass per
layer); the forward stops after the deepest requested block. Sequences are packed windows of at most
``max_len`` tokens (never the model's context length: the reference code tries to allocate hundreds
of GiB for long-context models). Each batch's k kᵀ is formed in float32 and added to a float64 sum.

Results are cached as safetensors under ``<cache>/stats/<fingerprint>/``, one file per module, keyed
by module, corpus hash, token count, length cap and dtype. An interrupted pass leaves a checkpoint
(written atomically every ``checkpoint_s`` seconds) that the next call resumes from. Derived
artifacts (AlphaEdit's null-space projector) are cached beside the statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .errors import FactEditError
from .fsutil import atomic_file
from .lm.hooks import TraceDict
from .lm.load import LM, cache_root

log = logging.getLogger(__name__)
STATS_VERSION = 1


@dataclass
class KeyStats:
    """Σ k kᵀ (float64) over ``count`` key vectors of one module."""

    layer: int
    module: str
    mom2_sum: torch.Tensor
    count: int
    meta: dict

    def moment(self) -> torch.Tensor:
        """The normalised, non-centred second moment E[k kᵀ] (float64)."""
        return self.mom2_sum / self.count


# ---- corpus -----------------------------------------------------------------------------------------
def default_corpus() -> Path | None:
    """The default statistics corpus: WikiText-2 validation text in the shared data folder (None if absent)."""
    from .data.paths import default_data_dir

    root = default_data_dir()
    path = root / "wikitext-2" / "valid.txt.gz" if root else None
    return path if path is not None and path.exists() else None


def corpus_text(corpus: str | os.PathLike | Iterable[str] | None) -> tuple[str, str]:
    """(text, description). ``None``: WikiText-2 validation text from the shared data folder."""
    from .data.io import read_text

    if corpus is None:
        corpus = default_corpus()
        if corpus is None:
            raise FactEditError("no statistics corpus: pass --corpus FILE (default is wikitext-2/valid.txt.gz "
                                "in the shared data folder, which was not found)")
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus)
        if not path.exists():
            raise FactEditError(f"corpus file '{path}' does not exist")
        try:
            text = read_text(path)
        except (OSError, UnicodeDecodeError) as e:
            raise FactEditError(f"corpus file '{path}' could not be read: {e}") from None
        desc = str(path)
    else:
        parts = list(corpus)
        bad = [i for i, p in enumerate(parts) if not isinstance(p, str)]
        if bad:
            raise FactEditError(f"corpus item #{bad[0]} is not a string")
        text, desc = "\n\n".join(parts), f"{len(parts)} strings"
    if not text.strip():
        raise FactEditError(f"corpus {desc} is empty")
    return text, desc


def token_windows(lm: LM, text: str, tokens: int, max_len: int) -> list[list[int]]:
    """Consecutive windows of ``max_len`` token ids covering the first ``tokens`` tokens of ``text``."""
    tok = lm.tokenizer
    ids: list[int] = []
    # Tokenise paragraph blocks so that a large corpus is not tokenised beyond what is needed.
    paras = text.split("\n\n") if "\n\n" in text else text.split("\n")
    block: list[str] = []
    size = 0
    for p in paras:
        block.append(p)
        size += len(p)
        if size >= 200_000:
            ids.extend(tok("\n\n".join(block) + "\n\n", add_special_tokens=False)["input_ids"])
            block, size = [], 0
            if len(ids) >= tokens:
                break
    if block and len(ids) < tokens:
        ids.extend(tok("\n\n".join(block), add_special_tokens=False)["input_ids"])
    ids = ids[:tokens]
    if not ids:
        raise FactEditError("the corpus encodes to no tokens")
    return [ids[i : i + max_len] for i in range(0, len(ids), max_len)]


# ---- cache ------------------------------------------------------------------------------------------
def _stats_dir(lm: LM) -> Path:
    return cache_root() / "stats" / lm.fingerprint[:16]


def _stem(module: str, corpus_hash: str, tokens: int, max_len: int, dtype: torch.dtype) -> str:
    return f"{module}--c{corpus_hash[:12]}-t{tokens}-l{max_len}-{str(dtype).removeprefix('torch.')}"


def _save_atomic(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"factedit": json.dumps(meta)})


def _read_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("factedit", "{}"))


def _check_finite(t: torch.Tensor, what: str, path: Path | None = None) -> None:
    if not torch.isfinite(t).all():
        where = f" (file {path})" if path else ""
        raise FactEditError(f"{what} contain NaN or infinite values{where}; delete the file and recompute, "
                            "or compute the statistics in float32")


def key_stats(lm: LM, layers: list[int], corpus=None, tokens: int = 200_000, max_len: int = 512,
              batch_size: int = 8, checkpoint_s: float = 60.0, progress: bool = True) -> dict[int, KeyStats]:
    """E[k kᵀ] statistics of ``lm``'s MLP out-projection input at ``layers`` (cached, resumable)."""
    layers = sorted({int(x) for x in layers})
    if not layers:
        raise FactEditError("no layers given for key statistics")
    lm.check_layers(layers)
    if tokens < 1 or max_len < 2:
        raise FactEditError("statistics need tokens >= 1 and max_len >= 2")
    text, desc = corpus_text(corpus)
    chash = hashlib.sha256(text.encode()).hexdigest()
    dtype = next(lm.model.parameters()).dtype
    d = _stats_dir(lm)
    files = {l: d / (_stem(lm.arch.mlp_out_path(l), chash, tokens, max_len, dtype) + ".safetensors") for l in layers}
    out: dict[int, KeyStats] = {}
    for l, f in files.items():
        if f.exists():
            t = load_file(str(f))
            meta = _read_meta(f)
            _check_finite(t["mom2_sum"], f"key statistics of layer {l}", f)
            out[l] = KeyStats(l, lm.arch.mlp_out_path(l), t["mom2_sum"], int(meta["count"]), meta)
    todo = [l for l in layers if l not in out]
    if todo:
        out.update(_compute(lm, todo, text, desc, chash, tokens, max_len, batch_size, dtype, files, checkpoint_s,
                            progress))
    for l, s in out.items():  # read from the cache or just computed: derived files (projectors) sit beside it
        s.meta["_path"] = str(files[l])
    return out


@torch.no_grad()
def _compute(lm, layers, text, desc, chash, tokens, max_len, batch_size, dtype, files, checkpoint_s, progress):
    windows = token_windows(lm, text, tokens, max_len)
    n_tok = sum(len(w) for w in windows)
    ckpt = _stats_dir(lm) / (f"partial-{hashlib.sha256(json.dumps([layers, chash, tokens, max_len, str(dtype)]).encode()).hexdigest()[:16]}.safetensors")
    mlp_out = {l: lm.model.get_submodule(lm.arch.mlp_out_path(l)) for l in layers}
    d0 = int(next(iter(mlp_out.values())).weight.shape[1 if lm.arch.layout == "linear" else 0])
    sums = {l: torch.zeros(d0, d0, dtype=torch.float64) for l in layers}
    count, start = 0, 0
    if ckpt.exists():
        try:
            t = load_file(str(ckpt))
            meta = _read_meta(ckpt)
            sums = {l: t[f"layer{l}"] for l in layers}
            count, start = int(meta["count"]), int(meta["windows_done"])
            log.info("statistics: resuming at window %d/%d from %s", start, len(windows), ckpt)
        except Exception as e:  # a damaged checkpoint is discarded, never trusted
            log.warning("statistics: ignoring unreadable checkpoint %s (%s)", ckpt, e)
            sums = {l: torch.zeros(d0, d0, dtype=torch.float64) for l in layers}
            count, start = 0, 0

    # the keys: each edited out-projection's input; the forward stops after the deepest edited block
    paths = [lm.arch.mlp_out_path(l) for l in layers]
    deepest = lm.arch.block_path(max(layers))
    dev = lm.device
    was_training = lm.model.training
    lm.model.eval()
    t_last = time.monotonic()
    bar = tqdm(total=len(windows), initial=start, desc="key statistics", unit="win", disable=not progress or None)
    try:
        i = start
        while i < len(windows):
            L = len(windows[i])  # a batch holds windows of one length (only the last can be shorter): no padding
            j = i
            while j < len(windows) and j - i < batch_size and len(windows[j]) == L:
                j += 1
            ids = torch.tensor(windows[i:j], dtype=torch.long, device=dev)
            with TraceDict(lm.model, paths, retain_input=True, retain_output=False, detach=True,
                           stop_after=deepest) as traces:
                lm.model(input_ids=ids, use_cache=False)
            for l, path in zip(layers, paths):
                k = traces[path].input.reshape(-1, d0).float()
                sums[l] += (k.T @ k).double().to(sums[l].device)
            count += ids.numel()
            bar.update(j - i)
            i = j
            if time.monotonic() - t_last > checkpoint_s and i < len(windows):
                _save_atomic({f"layer{l}": s for l, s in sums.items()},
                             {"count": count, "windows_done": i}, ckpt)
                t_last = time.monotonic()
    finally:
        bar.close()
        lm.model.train(was_training)
    out = {}
    for l in layers:
        _check_finite(sums[l], f"key statistics of layer {l}")
        meta = {"version": STATS_VERSION, "count": count, "tokens": n_tok, "max_len": max_len, "corpus": desc,
                "corpus_sha256": chash, "dtype": str(dtype), "module": lm.arch.mlp_out_path(l),
                "fingerprint": lm.fingerprint}
        _save_atomic({"mom2_sum": sums[l]}, meta, files[l])
        out[l] = KeyStats(l, lm.arch.mlp_out_path(l), sums[l], count, meta)
    ckpt.unlink(missing_ok=True)
    log.info("statistics: %d tokens, layers %s (%s)", count, layers, desc)
    return out


def cached_statistics(lm: LM, layers: list[int]) -> list[dict]:
    """The statistics settings for which the cache holds a file for every one of ``layers`` of ``lm`` (in the
    model's dtype): [{"corpus": description, "tokens": requested tokens, "max_len": window}], sorted."""
    d, dtype = _stats_dir(lm), next(lm.model.parameters()).dtype
    per_layer = []
    for l in sorted({int(x) for x in layers}):
        module = lm.arch.mlp_out_path(l)
        got = set()
        for f in d.glob(f"{module}--c*-t*.safetensors") if d.is_dir() else []:
            m = re.search(r"-t(\d+)-l\d+-", f.stem[len(module):])  # the requested token count, named only in the stem
            if m is None or "--null-" in f.stem:
                continue  # a projector
            meta = _read_meta(f)
            tokens = int(m.group(1))
            # the file is one of key_stats' own (same naming, this dtype, this version)
            if meta.get("version") != STATS_VERSION or "corpus_sha256" not in meta or \
                    f.stem != _stem(module, meta["corpus_sha256"], tokens, int(meta["max_len"]), dtype):
                continue
            got.add((str(meta.get("corpus")), tokens, int(meta["max_len"])))
        per_layer.append(got)
    common = set.intersection(*per_layer) if per_layer else set()
    return [{"corpus": c, "tokens": t, "max_len": n} for c, t, n in sorted(common)]


# ---- derived: null-space projector ---------------------------------------------------------------------
def null_projector(stats: KeyStats, threshold: float, mode: str = "relative",
                   cache: bool = True) -> tuple[torch.Tensor, dict]:
    """AlphaEdit's projector P = Û Ûᵀ onto the eigenvectors of E[k kᵀ] with small eigenvalues.

    mode "absolute": eigenvalue < threshold (the published rule, 2e-2 on the normalised moment).
    mode "relative": eigenvalue < threshold × the largest eigenvalue (spectrum-scale free).
    Returns (P float32, info) where info reports the kept dimension and the fraction of preserved-key
    energy (trace of C restricted to the kept directions) that the projection lets through.
    """
    if mode not in ("absolute", "relative"):
        raise FactEditError(f"unknown null-space mode '{mode}' (absolute or relative)")
    path = None
    src = stats.meta.get("_path")
    if cache and src:
        path = Path(src).with_name(Path(src).stem + f"--null-{mode}-{threshold:g}.safetensors")
        if path.exists():
            log.debug("null space of layer %d read from %s", stats.layer, path)
            return load_file(str(path))["P"], _read_meta(path)
    C = stats.moment()
    evals, evecs = torch.linalg.eigh(C)
    if not torch.isfinite(evals).all():
        raise FactEditError(f"key statistics of layer {stats.layer} have no finite eigen-decomposition")
    cut = threshold if mode == "absolute" else threshold * float(evals.max())
    keep = evals < cut
    U = evecs[:, keep]
    P = (U @ U.T).float()
    info = {"layer": stats.layer, "mode": mode, "threshold": threshold, "kept": int(keep.sum()), "dim": int(C.shape[0]),
            "kept_fraction": round(float(keep.float().mean()), 4),
            "energy_through": round(float(evals[keep].clamp(min=0).sum() / evals.clamp(min=0).sum()), 6)
            if keep.any() else 0.0}
    if path is not None:
        _save_atomic({"P": P}, info, path)
    return P, info


def describe(stats: dict[int, KeyStats]) -> list[dict]:
    rows = []
    for l, s in sorted(stats.items()):
        C = s.moment()
        ev = torch.linalg.eigvalsh(C)
        rows.append({"layer": l, "count": s.count, "dim": int(C.shape[0]), "trace": round(float(C.trace()), 4),
                     "eig_min": float(ev.min()), "eig_max": float(ev.max()),
                     "cond": float(ev.max() / ev.min()) if ev.min() > 0 else math.inf})
    return rows
