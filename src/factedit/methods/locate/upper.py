"""Running only the blocks from the z* site upwards (the speed path of z*; the result is unchanged).

Below the site block nothing depends on δ, and neither does any column before the subject's last token
(the model is causal), so those are computed once; each step runs only the upper blocks on each row's
columns from its subject on, rows batched by length."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ...lm.hooks import Trace
from ...lm.load import LM
from .keys import Rows, only_blocks

log = logging.getLogger(__name__)


def group_by_length(lengths: list[int], overhead: int = 200) -> list[list[int]]:
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
class ZGroup:
    """Rows run together. Row i recomputes its columns P_i.. (P_i: its subject's last token); the
    keys/values of its columns < P_i are cached, right-aligned in a prefix of max P_i slots (the
    empty slots masked out)."""

    rows: torch.Tensor  # global row indices (B,)
    P: torch.Tensor  # (B,) first recomputed column of each row
    h: torch.Tensor  # (B, S, d) start-block inputs at columns P_i.., right-padded
    kv: list  # per layer (keys, values) (B, heads, max P, head dim); empty when max P is 0
    mask: torch.Tensor  # (B, max P + S): cached slots then recomputed columns
    pos_ids: torch.Tensor  # (B, S) position ids P_i + j


class UpperStack:
    """Runs the blocks from ``start`` upwards on the columns from each row's subject onwards.

    Below the site block nothing depends on δ, and neither does any column before the subject's last
    token (the model is causal). So the start block's inputs and the keys/values of the earlier columns
    are computed once; each step runs only blocks ``start..`` on each row's columns from its subject
    on (rows batched by that length, ``group_by_length``; the cached keys/values right-aligned, the
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
    def prepare(self, rows: Rows, lens: list[int], groups: list[list[int]]) -> list[ZGroup]:
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
            out.append(ZGroup(idx.to(dev), P, hs, kv, torch.cat([pmask, smask], 1).long(), P[:, None] + j))
        return out

    def run(self, g: ZGroup, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm output (B, S, d) at each row's columns P_i.. (``keep``: a subset of the rows)."""
        from transformers import DynamicCache

        h, mask, kv, pos_ids = g.h, g.mask, g.kv, g.pos_ids
        if keep is not None:
            h, mask, pos_ids = h[keep], mask[keep], pos_ids[keep]
            kv = [(k[keep], v[keep]) for k, v in kv]
        cache = DynamicCache(ddp_cache_data=kv, config=self.lm.model.config) if kv else None
        with only_blocks(self.lm, self.start):
            return self.base(inputs_embeds=h, attention_mask=mask, position_ids=pos_ids, past_key_values=cache,
                             use_cache=cache is not None).last_hidden_state

    @torch.no_grad()
    def split(self, rows: Rows, lens: list[int]) -> list[ZGroup] | None:
        """The prepared groups of rows, or None where this model cannot start mid-stack (checked
        against the full forward on the first use per model and start block)."""
        known = UpperStack._ok.setdefault(self.lm.model, {})
        if known.get(self.start) is False:
            return None
        sizes = [n - int(p) for n, p in zip(lens, rows.pos.tolist())]
        try:
            groups = self.prepare(rows, lens, group_by_length(sizes))
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
