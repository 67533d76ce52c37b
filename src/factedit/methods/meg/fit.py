"""MeG stage 3: one neuron per fact, fitted on the frozen model (batched: one neuron per batch row).

Every fact's neuron starts from the same fixed initial neuron and only it is optimised, with plain SGD (no
momentum, no weight decay), on the cross-entropy of " {target}." followed by end of sequence after the
template-wrapped question (answer tokens only). The loss of a batch is the *sum* of its rows' mean token losses,
so each row's gradient is that of its own fact alone and a batch of B facts takes the same steps as B separate
runs (tested). The frozen blocks below the neuron's layer run once per batch (``lm.prefix``); the head runs only
at the positions that predict answer tokens. A fit counts when greedy generation (up to 20 new tokens) with the
neuron mounted gives the target exactly (generation protocol: cut at a newline, one trailing "." removed, case
ignored).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...lm.batch import TargetBatch, target_logits
from ...lm.generate import greedy_answers, normalize_answer
from ...lm.hooks import installed
from ...lm.load import LM
from ...lm.prefix import block_inputs, pad_hidden, start_at
from ...lm.tokens import encode_target, pad_batch
from ...patch.modules import Placement, install
from ..base import frozen
from .neuron import NeuronShape, RowNeurons, neuron_site

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    weights: torch.Tensor  # (N, P) fitted neurons
    success: torch.Tensor  # (N,) bool: greedy generation gave the target
    answers: list[str]  # the greedy answers with the neuron mounted
    final_loss: torch.Tensor  # (N,) the last step's per-fact loss


def answer_batch(lm: LM, prompts: list[str], answers: list[str]) -> TargetBatch:
    """Teacher-forced rows of prompt + " {answer}." + end of sequence (the loss reads the answer tokens only)."""
    tok = lm.tokenizer
    seqs, p_lens, t_lens = [], [], []
    for p, a in zip(prompts, answers):
        p_ids, t_ids = encode_target(tok, p, a + ".")
        if tok.eos_token_id is not None:
            t_ids = [*t_ids, tok.eos_token_id]
        seqs.append(p_ids + t_ids)
        p_lens.append(len(p_ids))
        t_lens.append(len(t_ids))
    ids, mask = pad_batch(seqs, tok.pad_token_id if tok.pad_token_id is not None else 0)
    labels = torch.full_like(ids, -100)
    for i, (pl, tl) in enumerate(zip(p_lens, t_lens)):
        labels[i, pl - 1 : pl - 1 + tl] = ids[i, pl : pl + tl]
    return TargetBatch(ids, mask, torch.tensor(p_lens), torch.tensor(t_lens), labels)


@torch.enable_grad()
def fit_batch(lm: LM, shape: NeuronShape, layer: int, prompts: list[str], answers: list[str], init: torch.Tensor,
              lr: float, steps: int, cosine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one neuron per row from ``init`` (P,): SGD for ``steps`` steps at ``lr`` (optionally cosine-annealed
    to 0 over the steps). Returns the neurons (B, P) and each row's loss at the last step (B,)."""
    batch = answer_batch(lm, prompts, answers)
    hidden = pad_hidden(block_inputs(lm, batch, layer), batch)  # blocks 0..layer-1 once
    B = len(prompts)
    w = init.to(lm.device, torch.float32)[None].repeat(B, 1).requires_grad_(True)
    mod = RowNeurons(shape).to(lm.device)
    mod.weights = w
    opt = torch.optim.SGD([w], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cosine else None
    last = torch.zeros(B)
    with frozen(lm), installed([install(lm, Placement(neuron_site(layer), "every"), mod)]), start_at(lm, layer, hidden):
        for _ in range(steps):
            logits, labels, rows = target_logits(lm, batch)
            tok = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")  # (N,)
            per_row = torch.zeros(B, device=tok.device).index_add(0, rows, tok) / batch.target_lens.to(tok.device)
            opt.zero_grad(set_to_none=True)
            per_row.sum().backward()
            opt.step()
            if sched is not None:
                sched.step()
            last = per_row.detach().cpu()
    return w.detach().cpu(), last


@torch.no_grad()
def generate_with(lm: LM, shape: NeuronShape, layer: int, prompts: list[str], weights: torch.Tensor | None,
                  max_new_tokens: int = 20) -> list[str]:
    """Greedy answers with row i's neuron ``weights[i]`` mounted (``None``: the unedited model)."""
    if weights is None:
        return greedy_answers(lm, prompts, max_new_tokens=max_new_tokens, batch_size=max(1, len(prompts)))
    mod = RowNeurons(shape).to(lm.device)
    mod.weights = weights.to(lm.device)
    with installed([install(lm, Placement(neuron_site(layer), "every"), mod)]):
        return greedy_answers(lm, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))


def matches(answer: str, target: str) -> bool:
    return normalize_answer(answer) == normalize_answer(target)


def fit_neurons(lm: LM, shape: NeuronShape, layer: int, prompts: list[str], targets: list[str], init: torch.Tensor,
                lr: float, steps: int, batch_size: int = 16, cosine: bool = False, done: FitResult | None = None,
                on_batch=None) -> FitResult:
    """Fit and check every fact's neuron, ``batch_size`` facts per batch. ``done`` (a partial result: its first
    rows are kept) and ``on_batch(result)`` (called after each batch) make the stage resumable per batch."""
    n = len(prompts)
    res = done or FitResult(torch.zeros(0, shape.size), torch.zeros(0, dtype=torch.bool), [], torch.zeros(0))
    start = len(res.answers)
    with tqdm(total=n, initial=start, desc="meg neurons", disable=None) as bar:
        for s in range(start, n, batch_size):
            p, t = prompts[s : s + batch_size], targets[s : s + batch_size]
            w, loss = fit_batch(lm, shape, layer, p, t, init, lr, steps, cosine)
            ans = generate_with(lm, shape, layer, p, w)
            ok = torch.tensor([matches(a, b) for a, b in zip(ans, t)])
            res = FitResult(torch.cat([res.weights, w]), torch.cat([res.success, ok]), res.answers + ans,
                            torch.cat([res.final_loss, loss]))
            bar.update(len(p))
            bar.set_postfix(ok=f"{int(res.success.sum())}/{len(res.answers)}", loss=f"{float(loss.mean()):.3f}")
            if on_batch is not None:
                on_batch(res)
    log.info("meg: %d of %d neurons fitted (greedy answer = target)", int(res.success.sum()), n)
    return res
