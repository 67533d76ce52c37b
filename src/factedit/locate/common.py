"""Machinery shared by ROME, MEMIT, AlphaEdit and NSE (specs/locate.md §0).

- context templates sampled once from the model (recorded seed, cached per model fingerprint);
- keys: the MLP out-projection input at the subject's last token, averaged over templates;
- target values z*: a free vector δ per request added at one site (a block output, MEMIT; or an MLP
  output, ROME) at the subject's last token of every prompt, optimised for the target NLL with a KL
  and a norm term. All requests of a batch are optimised together in one forward/backward per step;
  each request's δ only touches its own rows, so the result equals the one-at-a-time loop.

Speed (the result is unchanged): the hidden states entering the first block above the site are
computed once and reused every step (only the blocks from the site up run per step), and the LM head
runs only on the (row, position) pairs the loss reads.

z* store (``compute_z(..., cache=True)``): each request's z* is saved under
``<cache>/zstar/<digest of the current weights>/<request key>.safetensors``, the key covering the site,
the z* settings, the templates and the request. A later call on the same weights (a resumed round,
NSE's rounds, which always rewind to the original weights, a re-run with another λ) reads it instead
of optimising again; weights that differ in any byte give another digest, so nothing stale is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import FactEditError
from ..fsutil import atomic_file, write_json
from ..lm.hooks import Trace, TraceDict, first, installed, replace_first
from ..lm.load import LM, cache_root, fingerprint_model
from ..lm.tokens import encode, encode_target, pad_batch, subject_last_index
from ..types import EditRequest

log = logging.getLogger(__name__)
TEMPLATE_SEEDS = ("The", "Therefore", "Because", "I", "You")


# ---- context templates --------------------------------------------------------------------------------
def context_templates(lm: LM, lengths: Sequence[int], per_length: int, seed: int = 0) -> list[str]:
    """["{}"] + ``per_length`` sampled prefixes of each length (top-k 5), each followed by ". {}".

    Sampled from the unedited model once and cached by fingerprint; the seed is part of the key."""
    from ..eval.scoring import sample

    lengths = [int(x) for x in lengths]
    if per_length <= 0 or not lengths:
        return ["{}"]
    key = f"l{'-'.join(map(str, lengths))}-n{per_length}-s{seed}"
    path = cache_root() / "templates" / lm.fingerprint[:16] / f"{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())["templates"]
        except (ValueError, KeyError):
            log.warning("ignoring unreadable template cache %s", path)
    out = ["{}"]
    k = 0
    for length in lengths:
        for i in range(per_length):
            start = TEMPLATE_SEEDS[i % len(TEMPLATE_SEEDS)]
            n0 = len(encode(lm.tokenizer, start))
            text = start + sample(lm, start, max_length=n0 + length, top_k=5, seed=seed + k)
            k += 1
            out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    write_json(path, {"templates": out, "seed": seed, "lengths": lengths, "per_length": per_length,
                      "fingerprint": lm.fingerprint})
    return out


def fill(template: str, prompt: str) -> tuple[str, int]:
    """The templated text and the character offset where ``prompt`` starts inside it."""
    i = template.index("{}")
    return template[:i] + prompt + template[i + 2 :], i


# ---- forward helpers ---------------------------------------------------------------------------------
@dataclass
class Rows:
    """A right-padded batch of texts with one marked position per row (the subject's last token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pos: torch.Tensor  # (B,)


def _rows(lm: LM, texts: list[str], subjects: list[str], starts: list[int]) -> Rows:
    seqs, pos = [], []
    for t, s, st in zip(texts, subjects, starts):
        seqs.append(encode(lm.tokenizer, t))
        pos.append(subject_last_index(lm.tokenizer, t, s, start=st))
    ids, mask = pad_batch(seqs, lm.tokenizer.pad_token_id)
    return Rows(ids, mask, torch.tensor(pos))


@torch.no_grad()
def capture_at(lm: LM, texts: list[str], subjects: list[str], starts: list[int], modules: dict,
               kind: str = "input", batch_size: int = 64) -> dict:
    """The input (or output) of each named module at each row's subject-last token: {key: (N, d)}."""
    res: dict = {k: [] for k in modules}
    deepest = max(_block_index(lm, p) for p in modules.values())
    for s in range(0, len(texts), batch_size):
        rows = _rows(lm, texts[s : s + batch_size], subjects[s : s + batch_size], starts[s : s + batch_size])
        stop = lm.arch.block_path(deepest)
        kw = {"retain_input": True, "retain_output": False} if kind == "input" else {}
        with TraceDict(lm.model, set(modules.values()), stop_after=stop, detach=True, **kw) as td:
            lm.model(input_ids=rows.input_ids.to(lm.device), attention_mask=rows.attention_mask.to(lm.device),
                     use_cache=False)
        b = torch.arange(len(rows.pos))
        for k, path in modules.items():
            got = td[path].input if kind == "input" else td[path].output
            res[k].append(got[b, rows.pos.to(got.device)].float().cpu())
    return {k: torch.cat(v) for k, v in res.items()}


def _block_index(lm: LM, path: str) -> int:
    prefix = lm.arch.blocks + "."
    if not path.startswith(prefix):
        raise FactEditError(f"module '{path}' is not inside a transformer block")
    return int(path[len(prefix) :].split(".")[0])


def _templated(requests: Sequence[EditRequest], templates: list[str]) -> tuple[list[str], list[str], list[int]]:
    """Texts (request-major, each template filled with the prompt), subjects, and each subject's
    character offset in its text."""
    texts, subjects, starts = [], [], []
    for r in requests:
        for t in templates:
            text, off = fill(t, r.prompt)
            texts.append(text)
            subjects.append(r.subject)
            starts.append(off + r.prompt.index(r.subject))
    return texts, subjects, starts


@contextmanager
def _only_blocks(lm: LM, start: int, end: int | None = None) -> Iterator[None]:
    """The model's block list cut to blocks ``start..end-1`` for the duration (the forward then takes
    the inputs of block ``start`` as ``inputs_embeds``)."""
    parent_path, _, attr = lm.arch.blocks.rpartition(".")
    parent = lm.model.get_submodule(parent_path) if parent_path else lm.model
    full = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(full)[start:end]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


def template_keys(lm: LM, requests: Sequence[EditRequest], templates: list[str],
                  layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Keys per layer and template (u, n_templates, d0): the MLP out-projection input at the subject's
    last token of each templated prompt."""
    mods = {l: lm.arch.mlp_out_path(l) for l in layers}
    got = capture_at(lm, *_templated(requests, templates), mods, "input")
    return {l: got[l].view(len(requests), len(templates), -1) for l in layers}


def average_keys(k: torch.Tensor, average: str = "group") -> torch.Tensor:
    """(u, n_templates, d0) -> (u, d0). "group" (MEMIT): mean of the "{}" group (template 0) and of the
    prefix group; "flat" (ROME): mean over all templates."""
    if average == "flat" or k.shape[1] == 1:
        return k.mean(1)
    return (k[:, 0] + k[:, 1:].mean(1)) / 2


def compute_keys(lm: LM, requests: Sequence[EditRequest], templates: list[str], layers: Sequence[int],
                 average: str = "group") -> dict[int, torch.Tensor]:
    """Template-averaged keys (u, d0) per layer (see ``average_keys``)."""
    return {l: average_keys(k, average) for l, k in template_keys(lm, requests, templates, layers).items()}


class KeyWalker:
    """Template-averaged keys of one batch of requests at ascending layers, while the spread edits the
    layers in between (MEMIT §0.4).

    A layer's keys depend only on the blocks below it, and an edit of layer l's out-projection does not
    change the input of block l. So the input of the block last read is kept, and the next layer's keys
    run only the blocks from there up (instead of the whole stack below each edited layer). The first
    use per model is checked against the plain forward; families that cannot start mid-stack (GPT-2
    adds position embeddings to ``inputs_embeds``) use the plain forward."""

    _ok: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    def __init__(self, lm: LM, requests: Sequence[EditRequest], templates: list[str], average: str = "group",
                 batch_size: int = 64) -> None:
        self.lm, self.requests, self.templates, self.average = lm, list(requests), templates, average
        texts, subjects, starts = _templated(requests, templates)
        self.rows = [_rows(lm, texts[s : s + batch_size], subjects[s : s + batch_size], starts[s : s + batch_size])
                     for s in range(0, len(texts), batch_size)]
        self.at: int | None = None  # the block whose inputs ``self.h`` holds
        self.h: list[torch.Tensor] = []

    def _pass(self, layer: int, start: int | None) -> torch.Tensor:
        """Keys (N, d0) at ``layer``; keeps the inputs of block ``layer``. ``start``: run from the kept
        inputs of that block (None: from the embeddings)."""
        lm = self.lm
        dev = lm.device
        blk = lm.model.get_submodule(lm.arch.block_path(layer))
        mlp = lm.model.get_submodule(lm.arch.mlp_out_path(layer))
        keys, hs = [], []
        for i, rows in enumerate(self.rows):
            ids, mask = rows.input_ids.to(dev), rows.attention_mask.to(dev)
            # the block's input is kept; the forward stops at the out-projection, whose input is the key
            with Trace(blk, retain_input=True, retain_output=False, detach=True) as tb, \
                    Trace(mlp, retain_input=True, retain_output=False, stop=True) as tk:
                if start is None:
                    lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
                else:
                    with _only_blocks(lm, start, layer + 1):
                        lm.model.base_model(inputs_embeds=self.h[i], attention_mask=mask, use_cache=False)
            got = {"h": tb.input, "k": tk.input}
            b = torch.arange(len(rows.pos))
            keys.append(got["k"][b, rows.pos.to(dev)].float().cpu())
            hs.append(got["h"])
        self.h, self.at = hs, layer
        return torch.cat(keys)

    @torch.no_grad()
    def keys(self, layer: int) -> torch.Tensor:
        """Template-averaged keys (u, d0) at ``layer`` on the model as it is now (layers ascending)."""
        if self.at is not None and layer < self.at:
            raise FactEditError(f"keys requested at layer {layer} after layer {self.at}: layers must ascend")
        ok = KeyWalker._ok.get(self.lm.model)
        if self.at is None or ok is False:
            k = self._pass(layer, None)
        else:
            start = self.at
            k = self._pass(layer, start)
            if ok is None:  # first use on this model: compare with the plain forward
                ref = self._pass(layer, None)
                err = float((k - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
                KeyWalker._ok[self.lm.model] = err < 1e-4
                if err >= 1e-4:
                    log.info("keys: %s cannot start its forward mid-stack (rel. error %.1e); using the full forward",
                             self.lm.model.config.model_type, err)
                k = ref
        return average_keys(k.view(len(self.requests), len(self.templates), -1), self.average)


def site_values(lm: LM, requests: Sequence[EditRequest], site_path: str) -> torch.Tensor:
    """The output of ``site_path`` at the subject's last token of each bare prompt: (u, d)."""
    return capture_at(lm, [r.prompt for r in requests], [r.subject for r in requests],
                      [r.prompt.index(r.subject) for r in requests], {0: site_path}, "output")[0]


def rms_gain(norm: nn.Module, d: int, like: torch.Tensor) -> torch.Tensor:
    """The gain g of an RMS norm n(x) = g ⊙ x / sqrt(mean(x²) + eps), read by probing it (Gemma's
    (1 + weight), OLMo 2's weight alike); refused for a norm that is not of that form."""
    with torch.no_grad():
        ones = torch.ones(1, d, dtype=like.dtype, device=like.device)
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        g = norm(ones)[0].double() * (1.0 + eps) ** 0.5
        x = torch.linspace(-2.0, 3.0, d, dtype=like.dtype, device=like.device)[None]
        want = g * x[0].double() / (x[0].double().pow(2).mean() + eps).sqrt()
        got = norm(x)[0].double()
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())):
            raise FactEditError(f"the norm after the MLP ({type(norm).__name__}) is not an RMS norm with a gain; "
                                "the residual cannot be mapped through it")
    return g


def _ellipsoid_point(g: torch.Tensor, t: torch.Tensor, target: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Per row: the v minimising ‖g ⊙ v − t‖ subject to ‖v‖² = target (g: (d,), t: (u, d), target:
    (u, 1)). Stationary points are v = g t / (g² + μ); ‖v(μ)‖² falls as μ rises on (−min g², ∞), so μ is
    found by bisection there (the global minimiser lies on that branch)."""
    g2 = g.pow(2)[None]
    gt = g[None] * t

    def size(mu):
        return (gt / (g2 + mu)).pow(2).sum(-1, keepdim=True)

    lo = torch.full_like(target, -float(g2.min())) * (1 - 1e-9)
    hi = torch.ones_like(target)
    for _ in range(200):  # grow the upper end until the size drops below the target
        over = size(hi) > target
        if not bool(over.any()):
            break
        hi = torch.where(over, hi * 4, hi)
    lo = torch.where(size(torch.zeros_like(target)) > target, torch.zeros_like(target), lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        big = size(mid) > target
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    return gt / (g2 + (lo + hi) / 2)


def through_post_norm(norm: nn.Module, m: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """For blocks that normalise the MLP output before adding it to the residual stream (Gemma 2/3,
    OLMo 2): the change of the out-projection's output m (u × d) that moves the block output by R.

    The block adds n(m) = g ⊙ m / rms(m), so it can only output g ⊙ v with ‖v‖² fixed by the scale (d
    when every gain is non-zero). Coordinates with a zero gain cannot be moved and keep m's values (their
    sum of squares a). For the wanted t = n(m) + R: where some scale r within a factor 4 of rms(m) reaches
    t exactly (r² (d − ‖t/g‖²) = a), m* = r·t/g. Otherwise m* = rms(m)·v with v the point of the
    reachable ellipsoid {g ⊙ v : ‖v‖² = ‖m_live‖²/rms(m)²} closest to t: components along the large-gain
    coordinates (Gemma's massive activations) stay where they are unless R asks to move them. MEMIT's
    spreading recomputes the remaining residual at every layer, so what one layer cannot reach passes to
    the next.
    """
    g = rms_gain(norm, m.shape[-1], m)
    md = m.double()
    d = m.shape[-1]
    with torch.no_grad():
        t = norm(m).double() + R.double()
    live = g.abs() > 1e-6 * float(g.abs().max())
    gl = torch.where(live, g, torch.ones_like(g))
    tl = torch.where(live, t, torch.zeros_like(t))
    u = tl / gl
    a = torch.where(live, torch.zeros_like(md), md).pow(2).sum(-1, keepdim=True)
    r0 = md.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-12)
    room = d - u.pow(2).sum(-1, keepdim=True)
    r_exact = (a / room.clamp(min=1e-24)).sqrt()
    exact = (room > 0) & (r_exact > r0 / 4) & (r_exact < 4 * r0)
    # the closest reachable output at m's own scale: ‖v_live‖² = (d r0² − a) / r0²
    size = ((d * r0.pow(2) - a).clamp(min=0) / r0.pow(2))
    v = _ellipsoid_point(torch.where(live, g, torch.zeros_like(g)), tl, size)
    target = torch.where(live, torch.where(exact, u * r_exact, v * r0), md)
    return target - md


@contextmanager
def bf16_mlps(lm: LM) -> Iterator[None]:
    """bf16 autocast inside every block's MLP and the LM head, for the duration.

    Attention, the norms and the residual stream stay in fp32 (an MLP's bf16 output is promoted when
    it is added back). On a CPU, the MLPs are most of the FLOPs, while whole-forward autocast runs the
    flash-attention backward in bf16, about 10x slower than in fp32, and casts the attention
    projections' weights on every call (docs/results.md, session 11)."""
    blocks = lm.model.get_submodule(lm.arch.blocks)
    sub = lm.arch.mlp_out.rpartition(".")[0]  # the MLP: the out-projection's parent ("mlp")
    mods = [blk.get_submodule(sub) if sub else blk.get_submodule(lm.arch.mlp_out) for blk in blocks]
    mods.append(lm.model.get_output_embeddings())
    dev = lm.device.type
    entered: list = []

    def pre(_m, _a):
        c = torch.autocast(dev, dtype=torch.bfloat16)
        c.__enter__()
        entered.append(c)

    def post(_m, _a, _o):
        if entered:
            entered.pop().__exit__(None, None, None)

    try:
        with installed([h for m in mods for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]):
            yield
    finally:
        while entered:  # an exception inside a module skipped its forward hook
            entered.pop().__exit__(None, None, None)


def head_logits(lm: LM, x: torch.Tensor) -> torch.Tensor:
    """The model's LM head on final-norm outputs x (N, d), with the family's soft-capping if any."""
    logits = lm.model.get_output_embeddings()(x)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# ---- z* -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZSettings:
    steps: int = 25
    lr: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    kl_direction: str = "current_initial"  # KL(P_current ‖ P_initial), as the reference code computes it
    weight_decay: float = 0.5
    early_stop_loss: float = 0.05
    batch: int = 16  # requests optimised together
    fast: bool = True  # reuse hidden states below the site; LM head only where the loss reads
    autocast: str = "none"  # "none" or "bf16"


def _group_by_length(lengths: list[int], overhead: int = 200) -> list[list[int]]:
    """Partition rows into batches: sorted by length, cut into contiguous groups minimising
    Σ rows·(longest in group) + ``overhead`` per group (padding against the cost of one more, smaller
    forward). The overhead is in token-columns; 200 was the best of 48 / 200 / 800 measured on
    SmolLM2-135M with the earlier per-group split (0.240 / 0.223 / 0.235 s per request-step)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j, 0, -1):  # the group order[i-1 : j]
            c = best[i - 1] + (j - i + 1) * longest + overhead
            if c < best[j]:
                best[j], back[j] = c, i - 1
    groups, j = [], n
    while j > 0:
        groups.append(order[back[j] : j])
        j = back[j]
    return groups[::-1]


@dataclass
class _Group:
    """Rows run together. Row i recomputes its columns P_i.. (P_i: its subject's last token); the
    keys/values of its columns < P_i are cached, right-aligned in a prefix of max P_i slots (the
    empty slots masked out)."""

    rows: torch.Tensor  # global row indices (B,)
    P: torch.Tensor  # (B,) first recomputed column of each row
    h: torch.Tensor  # (B, S, d) start-block inputs at columns P_i.., right-padded
    kv: list  # per layer (keys, values) (B, heads, max P, head dim); empty when max P is 0
    mask: torch.Tensor  # (B, max P + S): cached slots then recomputed columns
    pos_ids: torch.Tensor  # (B, S) position ids P_i + j


class _Upper:
    """Runs the blocks from ``start`` upwards on the columns from each row's subject onwards.

    Below the site block nothing depends on δ, and neither does any column before the subject's last
    token (the model is causal). So the start block's inputs and the keys/values of the earlier columns
    are computed once; each step runs only blocks ``start..`` on each row's columns from its subject
    on (rows batched by that length, ``_group_by_length``; the cached keys/values right-aligned, the
    empty slots masked, position ids per row). The first use per model and start block is checked against the full
    forward; families whose forward cannot start mid-stack (GPT-2 adds position embeddings to
    ``inputs_embeds``) fall back to the full forward."""

    # model -> {start block: usable}; weak keys, so a later model reusing a freed model's id() can
    # never inherit its verdict
    _ok: weakref.WeakKeyDictionary[nn.Module, dict[int, bool]] = weakref.WeakKeyDictionary()
    CHECK_ROWS = 8  # rows per group compared with the full forward on the first use

    def __init__(self, lm: LM, start: int) -> None:
        self.lm, self.start = lm, start
        self.base = lm.model.base_model  # the decoder without the LM head; ends with the final norm

    def full(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final-norm output (B, T, d) of the whole model (the LM head does not run)."""
        return self.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    @torch.no_grad()
    def prepare(self, rows: Rows, lens: list[int], groups: list[list[int]]) -> list[_Group]:
        dev = self.lm.device
        blk = self.lm.model.get_submodule(self.lm.arch.block_path(self.start))
        out = []
        for g in groups:
            idx = torch.tensor(g)
            T = max(lens[i] for i in g)
            ids, mask = rows.input_ids[idx, :T].to(dev), rows.attention_mask[idx, :T].to(dev)
            P = rows.pos[idx].to(dev)
            S = torch.tensor([lens[i] for i in g], device=dev) - P
            pm, sm = int(P.max()), int(S.max())
            with Trace(blk, retain_input=True, retain_output=False, detach=True) as tb:
                res = self.base(input_ids=ids, attention_mask=mask, use_cache=pm > 0)
            x = tb.input
            j = torch.arange(sm, device=dev)[None]
            col = (P[:, None] + j).clamp(max=T - 1)  # (B, S)
            hs = x.gather(1, col[..., None].expand(-1, -1, x.shape[-1]))
            smask = j < S[:, None]
            kv = []
            pmask = torch.zeros(len(g), 0, dtype=torch.bool, device=dev)
            if pm > 0:
                src = torch.arange(pm, device=dev)[None] - (pm - P[:, None])  # (B, max P): source column
                pmask = src >= 0
                src = src.clamp(min=0)
                for layer in res.past_key_values.layers:
                    k, v = layer.keys.detach(), layer.values.detach()
                    ix = src[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
                    keep = pmask[:, None, :, None].to(k.dtype)
                    kv.append((k.gather(2, ix) * keep, v.gather(2, ix) * keep))
            out.append(_Group(idx.to(dev), P, hs, kv, torch.cat([pmask, smask], 1).long(), P[:, None] + j))
        return out

    def run(self, g: _Group, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm output (B, S, d) at each row's columns P_i.. (``keep``: a subset of the rows)."""
        from transformers import DynamicCache

        h, mask, kv, pos_ids = g.h, g.mask, g.kv, g.pos_ids
        if keep is not None:
            h, mask, pos_ids = h[keep], mask[keep], pos_ids[keep]
            kv = [(k[keep], v[keep]) for k, v in kv]
        cache = DynamicCache(ddp_cache_data=kv, config=self.lm.model.config) if kv else None
        with _only_blocks(self.lm, self.start):
            return self.base(inputs_embeds=h, attention_mask=mask, position_ids=pos_ids, past_key_values=cache,
                             use_cache=cache is not None).last_hidden_state

    @torch.no_grad()
    def split(self, rows: Rows, lens: list[int]) -> list[_Group] | None:
        """The prepared groups of rows, or None where this model cannot start mid-stack (checked
        against the full forward on the first use per model and start block)."""
        known = _Upper._ok.setdefault(self.lm.model, {})
        if known.get(self.start) is False:
            return None
        sizes = [n - int(p) for n, p in zip(lens, rows.pos.tolist())]
        try:
            groups = self.prepare(rows, lens, _group_by_length(sizes))
            if self.start not in known:
                # Checked on a few rows of every group (each group has its own prefix and suffix
                # lengths): the full forward of all rows cost ~40 s on SmolLM2 with 100 requests.
                dev = self.lm.device
                err = 0.0
                for g in groups:
                    keep = torch.arange(min(self.CHECK_ROWS, len(g.rows)), device=dev)
                    sel = g.rows[keep].cpu()
                    ref = self.full(rows.input_ids[sel].to(dev), rows.attention_mask[sel].to(dev))
                    alt = self.run(g, keep)
                    m = g.mask[keep][:, -alt.shape[1]:].bool()
                    col = g.pos_ids[keep].clamp(max=ref.shape[1] - 1)
                    r = ref.gather(1, col[..., None].expand(-1, -1, ref.shape[-1]))
                    err = max(err, float((r - alt)[m].abs().max() / r[m].abs().max().clamp(min=1e-6)))
                known[self.start] = err < 1e-4
        except Exception as e:  # noqa: BLE001 - any failure means "use the full forward"
            if self.start in known:
                raise  # the check passed on this model before: a failure now is a real error
            err, known[self.start] = str(e), False
        if not known[self.start]:
            log.info("z*: %s cannot start its forward at block %d (%s); using the full forward",
                     self.lm.model.config.model_type, self.start, err)
            return None
        return groups


Z_STORE_VERSION = 1  # bump when the z* computation changes its result


class ZStore:
    """z* per request on disk, for one set of weights (see the module docstring)."""

    def __init__(self, lm: LM, templates: list[str], site_path: str, s: ZSettings) -> None:
        root = Path(os.environ["FACTEDIT_ZSTAR_CACHE"]) if os.environ.get("FACTEDIT_ZSTAR_CACHE") \
            else cache_root() / "zstar"
        self.dir = root / fingerprint_model(lm.model)  # the weights z* is computed on, byte for byte
        tok = lm.tokenizer
        settings = {k: v for k, v in vars(s).items() if k != "batch"}  # the batch size does not change z*
        if settings.get("autocast") == "bf16":
            settings["autocast"] = "bf16_mlps"  # bf16 in the MLPs and head only (session 11): not the older whole-forward z*
        self.base = json.dumps({"v": Z_STORE_VERSION, "site": site_path, "z": settings, "templates": templates,
                                "tokenizer": [type(tok).__name__, len(tok)], "device": lm.device.type},
                               sort_keys=True)

    def path(self, r: EditRequest) -> Path:
        k = json.dumps([self.base, r.prompt, r.subject, r.target_new])
        return self.dir / (hashlib.sha256(k.encode()).hexdigest()[:32] + ".safetensors")

    def get(self, r: EditRequest) -> tuple[torch.Tensor, dict] | None:
        p = self.path(r)
        if not p.exists():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                z, info = f.get_tensor("z"), json.loads(f.metadata()["info"])
        except Exception as e:  # noqa: BLE001 - an unreadable entry is recomputed (and overwritten)
            log.warning("z* store: ignoring unreadable %s (%s)", p, e)
            return None
        return z, {**info, "case": r.label, "stored": True}

    def put(self, r: EditRequest, z: torch.Tensor, info: dict) -> None:
        p = self.path(r)
        with atomic_file(p) as tmp:
            save_file({"z": z.detach().float().contiguous()}, str(tmp), metadata={"info": json.dumps(info)})


def compute_z(lm: LM, requests: Sequence[EditRequest], templates: list[str], site_path: str,
              s: ZSettings, progress: bool = True, cache: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """Target values z* = h_init + δ* (u, d) at ``site_path`` (a block or an MLP out-projection).

    Loss per request (mean over its templated prompts):
      NLL(target_new | template(prompt)) + kl_factor·KL(…"{subject} is a") + weight_decay·‖δ‖/‖h_init‖²
    Adam on δ; after each step δ is projected into ‖δ‖ ≤ clamp_norm_factor·‖h_init‖; a request stops
    once its loss is below ``early_stop_loss`` (checked before the step, as the reference does), and
    its rows leave the batch."""
    if s.kl_direction not in ("current_initial", "initial_current"):
        raise FactEditError(f"unknown kl_direction '{s.kl_direction}' (current_initial or initial_current)")
    if s.autocast not in ("none", "bf16"):
        raise FactEditError(f"unknown autocast '{s.autocast}' (none or bf16)")
    store = ZStore(lm, templates, site_path, s) if cache else None
    found = {}
    if store is not None:
        for i, r in enumerate(requests):
            got = store.get(r)
            if got is not None:
                found[i] = got
        if found:
            log.info("z*: %d of %d requests read from %s", len(found), len(requests), store.dir)
    todo = [i for i in range(len(requests)) if i not in found]
    chunks = [todo[i : i + s.batch] for i in range(0, len(todo), max(1, s.batch))]
    bar = tqdm(total=len(requests), initial=len(found), desc="z*", leave=False, disable=None if progress else True)
    for ch in chunks:
        z, info = _compute_z_batch(lm, [requests[i] for i in ch], templates, site_path, s)
        for k, i in enumerate(ch):
            found[i] = (z[k], info[k])
            if store is not None:
                store.put(requests[i], z[k], info[k])
        bar.update(len(ch))
    bar.close()
    if not requests:
        return torch.zeros(0, lm.hidden_size), []
    return torch.stack([found[i][0] for i in range(len(requests))]), [found[i][1] for i in range(len(requests))]


@torch.enable_grad()
def _compute_z_batch(lm, requests, templates, site_path, s: ZSettings):
    tok = lm.tokenizer
    dev = lm.device
    u, n_t = len(requests), len(templates)
    # Rows: each template filled with the prompt, followed by the target; then one KL row per request.
    # The fast path drops the tokens no read depends on (the model is causal): a rewriting row's last
    # target token (nothing is predicted from it) and the " is a" after the subject of a KL row (the
    # reference code reads the KL distribution at the subject's last token).
    seqs, subj_pos, owner, t_lens, p_lens, labels = [], [], [], [], [], []
    for j, r in enumerate(requests):
        for t in templates:
            text, off = fill(t, r.prompt)
            p_ids, t_ids = encode_target(tok, text, r.target_new)
            seqs.append(p_ids + (t_ids[:-1] if s.fast else t_ids))
            labels.append(t_ids)
            subj_pos.append(subject_last_index(tok, text, r.subject, start=off + r.prompt.index(r.subject)))
            owner.append(j)
            p_lens.append(len(p_ids))
            t_lens.append(len(t_ids))
    n_rw = len(seqs)
    for j, r in enumerate(requests):  # KL rows: "{subject} is a"
        kl = f"{r.subject} is a"
        subj_pos.append(subject_last_index(tok, kl, r.subject))
        seqs.append(encode(tok, kl)[: subj_pos[-1] + 1] if s.fast else encode(tok, kl))
        owner.append(j)
    lens = [len(x) for x in seqs]
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    rows = Rows(ids, mask, torch.tensor(subj_pos))
    n_rows = len(seqs)
    owner_t = torch.tensor(owner, device=dev)
    pos_t = rows.pos.to(dev)
    # The (row, column) pairs the loss reads: the target-predicting columns of the rewriting rows
    # (reads 0..n_nll-1), then the subject column of each KL row (reads n_nll.., one per request).
    rd_row, rd_col, rd_lab = [], [], []
    for i in range(n_rw):
        for k in range(t_lens[i]):
            rd_row.append(i)
            rd_col.append(p_lens[i] - 1 + k)
            rd_lab.append(labels[i][k])
    n_nll = len(rd_row)
    for i in range(n_rw, n_rows):
        rd_row.append(i)
        rd_col.append(subj_pos[i])
        rd_lab.append(-1)
    rd_row_t = torch.tensor(rd_row, device=dev)
    rd_lab_t = torch.tensor(rd_lab, device=dev)
    row_ntok = torch.tensor(t_lens + [1] * (n_rows - n_rw), device=dev, dtype=torch.float32)
    reads_of_row: list[list[int]] = [[] for _ in range(n_rows)]
    for r_i, row in enumerate(rd_row):
        reads_of_row[row].append(r_i)

    # One "call" per forward: the rows it runs, their δ-column inside its output, the reads it serves.
    t0 = time.perf_counter()
    upper = _Upper(lm, _block_index(lm, site_path))
    straight = not s.fast  # the straightforward path: full forward, logits everywhere, then pick
    groups = (None if straight else upper.split(rows, lens)) or [None]  # [None]: one full-forward call
    t_prep = time.perf_counter() - t0

    def call_meta(g, act_req: torch.Tensor):
        """(keep, rows, δ columns, read ids, read (row-in-call, col-in-call)) for the active rows."""
        g_rows = torch.arange(n_rows, device=dev) if g is None else g.rows
        off = torch.zeros(n_rows, dtype=torch.long, device=dev) if g is None else g.P
        keep = act_req[owner_t[g_rows]]
        rws, offs = g_rows[keep], off[keep]
        rid, rr, rc = [], [], []
        for k, (row, o) in enumerate(zip(rws.tolist(), offs.tolist())):
            for r_i in reads_of_row[row]:
                rid.append(r_i)
                rr.append(k)
                rc.append(rd_col[r_i] - o)
        return (None if bool(keep.all()) else keep.nonzero()[:, 0], rws, pos_t[rws] - offs,
                torch.tensor(rid, device=dev, dtype=torch.long), torch.tensor(rr, device=dev, dtype=torch.long),
                torch.tensor(rc, device=dev, dtype=torch.long))

    site = lm.model.get_submodule(site_path)
    d = lm.hidden_size
    delta = torch.zeros(u, d, device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=s.lr)
    site_init = torch.zeros(n_rows, d, device=dev)
    bare_rows = torch.arange(0, n_rw, n_t, device=dev)  # template 0 is "{}"
    state: dict = {"first": True}

    def hook(out, _args):
        o = first(out)
        b = torch.arange(o.shape[0], device=o.device)
        if state["first"]:
            site_init[state["rows"]] = o[b, state["cols"]].detach().float()
        add = torch.zeros(o.shape, dtype=delta.dtype, device=o.device)
        add = add.index_put((b, state["cols"]), delta[owner_t[state["rows"]]])
        return replace_first(out, o + add.to(o.dtype))

    kl_init = None
    h_init = known = None
    done = torch.zeros(u, dtype=torch.bool, device=dev)
    last_loss = torch.zeros(u)
    n_steps = torch.zeros(u, dtype=torch.long)
    metas = None

    # bf16 only inside the MLPs and the LM head, and only for the steps: the split's check and the
    # cached prefix above ran in fp32 (see bf16_mlps)
    with Trace(site, retain_output=False, edit_output=hook), (bf16_mlps(lm) if s.autocast == "bf16" else nullcontext()):
        for it in range(s.steps):
            opt.zero_grad(set_to_none=True)
            if metas is None:  # (re)built at the start and whenever a request finishes
                metas = [(g, call_meta(g, ~done)) for g in groups]
                metas = [(g, m) for g, m in metas if len(m[1])]
            xs, rids = [], []
            for g, (keep, rws, cols, rid, rr, rc) in metas:
                state["rows"], state["cols"] = rws, cols
                if straight:
                    full = lm.model(input_ids=rows.input_ids[rws.cpu()].to(dev),
                                    attention_mask=rows.attention_mask[rws.cpu()].to(dev), use_cache=False).logits
                    xs.append(full[rr, rc])
                else:
                    hfin = upper.full(rows.input_ids[rws.cpu()].to(dev), rows.attention_mask[rws.cpu()].to(dev)) \
                        if g is None else upper.run(g, keep)
                    xs.append(hfin[rr, rc])
                rids.append(rid)
            x = torch.cat(xs)
            logits = x.float() if straight else head_logits(lm, x).float()
            rid = torch.cat(rids)
            logp = torch.log_softmax(logits, -1)
            is_nll = rid < n_nll
            nll_lp = logp[is_nll].gather(1, rd_lab_t[rid[is_nll]][:, None])[:, 0]
            nll_rows = rd_row_t[rid[is_nll]]
            if state["first"]:
                h_init = site_init[bare_rows].clone()
                state["first"] = False
                # δ = 0: is the target already the greedy continuation of the bare prompt (row "{}")?
                miss = (logits[is_nll].argmax(-1) != rd_lab_t[rid[is_nll]]).float()
                known = torch.zeros(n_rows, device=dev).index_add(0, nll_rows, miss)[bare_rows] == 0
            row_nll = torch.zeros(n_rows, device=dev).index_add(0, nll_rows, -nll_lp) / row_ntok
            req_nll = torch.zeros(u, device=dev).index_add(0, owner_t[:n_rw], row_nll[:n_rw]) / n_t
            kl_lp = logp[~is_nll]
            kl_idx = rid[~is_nll] - n_nll  # = request index (one KL row per request, in order)
            if kl_init is None:
                kl_init = torch.zeros(u, kl_lp.shape[1], device=dev)
                kl_init[kl_idx] = kl_lp.detach()
            ki = kl_init[kl_idx]
            if s.kl_direction == "current_initial":
                kl_r = (kl_lp.exp() * (kl_lp - ki)).sum(-1)
            else:
                kl_r = (ki.exp() * (ki - kl_lp)).sum(-1)
            kl = torch.zeros(u, device=dev).index_add(0, kl_idx, kl_r)
            decay = s.weight_decay * delta.norm(dim=1) / h_init.norm(dim=1).clamp(min=1e-8) ** 2
            loss = req_nll + s.kl_factor * kl + decay
            lv = loss.detach()
            active = ~done
            last_loss[active.cpu()] = lv[active].cpu()
            n_steps[active.cpu()] = it
            newly = active & (lv < s.early_stop_loss)
            done |= newly
            if bool(done.all()) or it == s.steps - 1:
                break
            keep_d = delta.detach()[done].clone()
            (loss * active).sum().backward()
            opt.step()
            with torch.no_grad():
                if done.any():
                    delta[done] = keep_d
                max_norm = s.clamp_norm_factor * h_init.norm(dim=1)
                nrm = delta.norm(dim=1)
                scale = torch.where(nrm > max_norm, max_norm / nrm.clamp(min=1e-12), torch.ones_like(nrm))
                delta.mul_(scale[:, None])
            if bool(newly.any()):
                metas = None
    z = (h_init + delta.detach()).float().cpu()
    log.info("z*: %d requests, %d rows in %d groups: prepare %.1f s, %d steps %.1f s (%d request-steps)", u, n_rows,
             len(groups), t_prep, it + 1, time.perf_counter() - t0 - t_prep, int(n_steps.sum()) + u)
    infos = []
    for j, r in enumerate(requests):
        infos.append({"case": r.label, "known": bool(known[j]), "loss": round(float(last_loss[j]), 4), "steps": int(n_steps[j]),
                      "init_norm": round(float(h_init[j].norm()), 3),
                      "delta_norm": round(float(delta.detach()[j].norm()), 3)})
    return z, infos


@contextmanager
def restored(lm: LM, names) -> Iterator[None]:
    """Put the named parameters back to their current values on exit (bit-exact copies)."""
    params = dict(lm.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


@contextmanager
def swapped_weights(lm: LM, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace named parameters' values (used by NSE to rewind to the original weights)."""
    params = dict(lm.model.named_parameters())
    with restored(lm, weights):
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        yield
