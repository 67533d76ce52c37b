"""Teacher-forced (prompt, target) batches and their target log-probabilities.

Log-probabilities always come from the model's own forward pass and head (tied weights,
soft-capping and biases differ by family); we only ask it to keep the logits of the last positions
that any target needs, which saves most of the head's cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hooks import forward_context, installed
from .load import LM
from .tokens import encode_target, pad_batch


@dataclass
class TargetBatch:
    input_ids: torch.Tensor  # (B, T) right-padded prompt+target ids
    attention_mask: torch.Tensor  # (B, T)
    prompt_lens: torch.Tensor  # (B,) number of prompt tokens per row
    target_lens: torch.Tensor  # (B,)
    labels: torch.Tensor  # (B, T) next-token label at each position, -100 where no target token is predicted

    @property
    def keep(self) -> int:
        """How many final positions hold every target-predicting position."""
        first = int((self.prompt_lens - 1).min())
        return self.input_ids.shape[1] - first


def make_batch(lm: LM, prompts: list[str], targets: list[str]) -> TargetBatch:
    seqs, p_lens, t_lens = [], [], []
    for p, t in zip(prompts, targets):
        p_ids, t_ids = encode_target(lm.tokenizer, p, t)
        seqs.append(p_ids + t_ids)
        p_lens.append(len(p_ids))
        t_lens.append(len(t_ids))
    ids, mask = pad_batch(seqs, lm.tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    for i, (pl, tl) in enumerate(zip(p_lens, t_lens)):
        labels[i, pl - 1 : pl - 1 + tl] = ids[i, pl : pl + tl]  # position j predicts token j+1
    return TargetBatch(ids, mask, torch.tensor(p_lens), torch.tensor(t_lens), labels)


def batch_logits(lm: LM, batch: TargetBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the last ``batch.keep`` positions and the matching labels: (B, K, V), (B, K)."""
    dev = lm.device
    k = batch.keep
    with forward_context(batch.prompt_lens):
        out = lm.model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                       logits_to_keep=k, use_cache=False)
    logits = out.logits[:, -k:, :]  # (B, K, V)
    return logits, batch.labels[:, -k:].to(dev)


def target_logits(lm: LM, batch: TargetBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits only at the positions that predict a target token: (N, V), their labels (N,) and rows (N,).

    The head runs on those N positions alone (a pre-hook on the head keeps them), not on every kept position
    of every row: with a 49k-token vocabulary the head is most of a short batch's cost."""
    dev = lm.device
    k = batch.keep
    labels = batch.labels[:, -k:].to(dev)
    sel = labels >= 0  # (B, K)

    def pick(_m, args, kwargs):
        h = args[0] if args else kwargs["input"]
        h = h[sel][None]  # (1, N, d)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "input": h})

    head = lm.model.get_submodule(lm.arch.head)
    with forward_context(batch.prompt_lens), installed([head.register_forward_pre_hook(pick, with_kwargs=True)]):
        out = lm.model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                       logits_to_keep=k, use_cache=False)
    rows = torch.arange(labels.shape[0], device=dev)[:, None].expand_as(labels)[sel]
    return out.logits[0], labels[sel], rows


def target_nll(lm: LM, batch: TargetBatch) -> torch.Tensor:
    """Per-row mean negative log-likelihood of the target tokens: (B,)."""
    logits, labels, rows = target_logits(lm, batch)
    tok = -torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None])[:, 0]  # (N,)
    return row_means(tok, rows, batch.labels.shape[0])


def row_means(tok: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """Per-row mean of per-token values ``tok`` (N,) whose rows are ``rows`` (N,): (B,) (0 for a row with none)."""
    total = torch.zeros(B, dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    count = torch.zeros(B, dtype=tok.dtype, device=tok.device).index_add(0, rows, torch.ones_like(tok))
    return total / count.clamp(min=1)


def request_batches(lm: LM, requests, batch_size: int) -> tuple[list[TargetBatch], list[int]]:
    """Teacher-forced batches of (prompt, target_new) for requests, ``batch_size`` per batch, and their sizes."""
    chunks = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    return [make_batch(lm, [r.prompt for r in ch], [r.target_new for r in ch]) for ch in chunks], [len(ch) for ch in chunks]
