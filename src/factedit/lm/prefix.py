"""Running a model from a layer on: the frozen blocks below it run once per record and their output is reused.

Editors that train against a frozen model whose edits all sit at or above layer L (MEND's and MALMEN's
meta-training edits the last MLPs) recompute the same blocks 0..L-1 for the same prompts at every step. Here
``block_inputs(lm, batch, L)`` returns each row's hidden state entering block L (its real tokens only), and
``start_at(lm, L, hidden)`` makes the forwards inside the block skip the blocks below L (each returns its
input unchanged) and feed ``hidden`` (B, T, d) to block L instead. Everything above (the attention mask, the
position embeddings, hooks on modules by path, the head) is the model's own: the result equals the full
forward up to float rounding (tested), for every family (the skipped blocks are found through the
architecture record), as long as nothing below L is edited or hooked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..errors import FactEditError
from .batch import TargetBatch
from .hooks import Trace, installed
from .load import LM


def _blocks(lm: LM):
    return lm.model.get_submodule(lm.arch.blocks)


def _returns_tuple(lm: LM) -> bool:
    """Whether this family's blocks return a tuple (h, ...) rather than the hidden state (probed once)."""
    cached = getattr(lm, "_block_returns_tuple", None)
    if cached is None:
        seen = {}

        def note(out, _args):
            seen["tuple"] = isinstance(out, tuple)
            return out

        with torch.no_grad(), Trace(_blocks(lm)[0], retain_output=False, edit_output=note, stop=True):
            lm.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=lm.device), use_cache=False)
        cached = seen["tuple"]
        lm._block_returns_tuple = cached
    return cached


def block_inputs(lm: LM, batch: TargetBatch, layer: int) -> list[torch.Tensor]:
    """Per row of ``batch``, the hidden state entering block ``layer`` at its real tokens: [(T_i, d)] float32 CPU."""
    lm.check_layers([layer])
    with torch.no_grad(), Trace(_blocks(lm)[layer], retain_input=True, retain_output=False, stop=True) as tr:
        lm.model(input_ids=batch.input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device),
                 use_cache=False)
    h = tr.input.float().cpu()
    lens = batch.attention_mask.sum(1).tolist()
    return [h[i, : int(n)].clone() for i, n in enumerate(lens)]


def pad_hidden(rows: Sequence[torch.Tensor], batch: TargetBatch) -> torch.Tensor:
    """Stack per-row hidden states (T_i, d) into the batch's (B, T, d) layout (right padding with zeros)."""
    B, T = batch.input_ids.shape
    if len(rows) != B:
        raise FactEditError(f"cached hidden states for {len(rows)} rows, batch has {B}")
    out = torch.zeros((B, T, rows[0].shape[-1]), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        if r.shape[0] != int(batch.attention_mask[i].sum()):
            raise FactEditError(f"cached hidden state of row {i} has {r.shape[0]} tokens, the batch row "
                                f"{int(batch.attention_mask[i].sum())}: the cache is stale")
        out[i, : r.shape[0]] = r
    return out


@contextlib.contextmanager
def start_at(lm: LM, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block, forwards skip blocks 0..layer-1 and block ``layer`` receives ``hidden`` (B, T, d)."""
    lm.check_layers([layer])
    blocks = _blocks(lm)
    as_tuple = _returns_tuple(lm)
    h = hidden.to(lm.device)

    def skip(hidden_states=None, *args, **kwargs):
        return (hidden_states,) if as_tuple else hidden_states

    def feed(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if x.shape[:2] != h.shape[:2]:
            raise FactEditError(f"start_at: the forward has shape {tuple(x.shape[:2])}, the cached hidden states "
                                f"{tuple(h.shape[:2])}")
        new = h.to(x.dtype)
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    skipped = list(blocks)[:layer]
    with lm.lock, installed([blocks[layer].register_forward_pre_hook(feed, with_kwargs=True)]):
        for b in skipped:
            b.forward = skip
        try:
            yield
        finally:
            for b in skipped:
                del b.forward
