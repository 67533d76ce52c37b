"""Capture (specs/hypernetwork.md §6, step 1): for each edited linear module, the keys U (its inputs) and the
value gradients G (the gradient of the fine-tuning loss at its outputs) at the selected token positions, from one
forward and one backward of the unedited model on the edit tuples (prompt + target, teacher-forced).

Token sets: ``ans`` (MALMEN), the positions that *predict* a target token (the last prompt token and every target
token but the last; labels are shifted); ``all`` (MEND's baseline), every non-padding position of prompt and
target.

The loss is each fact's mean target NLL, summed over facts: every fact weighs the same whatever its batch, so U
and G do not depend on the LM mini-batch size, and memory does not grow with the number of facts (each mini-batch
is captured and released). For ``all`` positions, Σ_rows g uᵀ is exactly the gradient of that loss with respect to
the module's weight (tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ...errors import FactEditError
from ...lm.batch import make_batch, target_nll
from ...lm.hooks import TraceDict
from ...lm.load import LM
from ...lm.prefix import pad_hidden, start_at
from ...types import EditRequest
from ..base import frozen

TokenSet = Literal["ans", "all"]


@dataclass
class Captured:
    """Per edited module (by dotted path): U (n, d_in) keys and G (n, d_out) value gradients, float32 on the
    CPU; ``fact`` (n,) the request each row belongs to."""

    U: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    fact: torch.Tensor

    @property
    def n_rows(self) -> int:
        return int(self.fact.shape[0])


def _require_grad(out, _args):
    """Make a frozen module's output a leaf that requires grad (the first edited module's output otherwise
    carries no graph: every parameter is frozen), so that its gradient can be read."""
    return out if out.requires_grad else out.detach().requires_grad_(True)


def capture(lm: LM, requests: Sequence[EditRequest], modules: Sequence[str], tokens: TokenSet = "ans",
            batch_size: int = 32, hidden: Sequence[torch.Tensor] | None = None, layer: int | None = None) -> Captured:
    """U and G of ``modules`` (paths of linear modules, e.g. MLP out-projections) for ``requests``.

    hidden, layer: each request's cached hidden state entering block ``layer`` (``lm.prefix.block_inputs``), at
    or below the first captured module; the blocks below it are then skipped."""
    if tokens not in ("ans", "all"):
        raise FactEditError(f"unknown token set '{tokens}' (ans or all)")
    if not requests:
        raise FactEditError("no edit requests to capture")
    modules = list(modules)
    U: dict[str, list] = {m: [] for m in modules}
    G: dict[str, list] = {m: [] for m in modules}
    facts = []
    dev = lm.device
    with lm.lock, frozen(lm), torch.enable_grad():  # no parameter gathers a gradient
        for s in range(0, len(requests), batch_size):
            chunk = requests[s : s + batch_size]
            b = make_batch(lm, [r.prompt for r in chunk], [r.target_new for r in chunk])
            start = (start_at(lm, layer, pad_hidden(hidden[s : s + batch_size], b)) if hidden is not None
                     else contextlib.nullcontext())
            with start, TraceDict(lm.model, modules, retain_input=True, retain_grad=True,
                                  edit_output=_require_grad) as td:
                target_nll(lm, b).sum().backward()  # Σ_facts mean target NLL
            # (B, T): the positions that predict a target token (labels are -100 elsewhere), or every real one
            sel = (b.labels >= 0).to(dev) if tokens == "ans" else b.attention_mask.to(dev).bool()
            for m in modules:
                U[m].append(td[m].input.detach()[sel].float().cpu())  # (rows, d_in)
                G[m].append(td[m].output.grad[sel].float().cpu())  # (rows, d_out)
            facts.append((torch.arange(len(chunk), device=dev)[:, None].expand_as(sel)[sel] + s).cpu())
    return Captured({m: torch.cat(v) for m, v in U.items()}, {m: torch.cat(v) for m, v in G.items()}, torch.cat(facts))
