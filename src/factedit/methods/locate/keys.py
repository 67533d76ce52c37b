"""Keys (specs/locate.md §0.3): the MLP out-projection input at the subject's last token of each templated
prompt, averaged over templates; and the hooks that read them (``capture_at``, ``KeyWalker``)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import FactEditError
from ...lm.hooks import Trace, TraceDict
from ...lm.load import LM
from ...lm.tokens import encode, pad_batch, subject_last_index
from ...types import EditRequest
from .templates import templated

log = logging.getLogger(__name__)


@dataclass
class Rows:
    """A right-padded batch of texts with one marked position per row (the subject's last token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pos: torch.Tensor  # (B,)


def rows_for(lm: LM, texts: list[str], subjects: list[str], starts: list[int]) -> Rows:
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
    deepest = max(block_index(lm, p) for p in modules.values())
    for s in range(0, len(texts), batch_size):
        rows = rows_for(lm, texts[s : s + batch_size], subjects[s : s + batch_size], starts[s : s + batch_size])
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


def block_index(lm: LM, path: str) -> int:
    prefix = lm.arch.blocks + "."
    if not path.startswith(prefix):
        raise FactEditError(f"module '{path}' is not inside a transformer block")
    return int(path[len(prefix) :].split(".")[0])


@contextmanager
def only_blocks(lm: LM, start: int, end: int | None = None) -> Iterator[None]:
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
    got = capture_at(lm, *templated(requests, templates), mods, "input")
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
        texts, subjects, starts = templated(requests, templates)
        self.rows = [rows_for(lm, texts[s : s + batch_size], subjects[s : s + batch_size], starts[s : s + batch_size])
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
                    with only_blocks(lm, start, layer + 1):
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
