"""MeG stage 2: the familiarity network, an entropy gate that says whether a query is about an edited fact.

Five residual feed-forward blocks ``x + Dropout(Linear(GELU(Linear(x))))`` (d -> 4d -> d, no norm) on the
encoder's embedding of the raw question, then a linear layer to K = 10 classes. Every edited fact's question gets a
random label in 0..K-1 and the network is trained with cross-entropy until it memorises them: on a question it has
seen (or a paraphrase the encoder maps near it) the prediction is confident, elsewhere it is spread out. A query
is "edited" when the prediction entropy (nats) is below ε.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class Familiarity(nn.Module):
    def __init__(self, dim: int, blocks: int = 5, classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                                  nn.Dropout(dropout)) for _ in range(blocks))
        self.head = nn.Linear(dim, classes)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        x = e
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)

    @torch.no_grad()
    def entropy(self, e: torch.Tensor) -> torch.Tensor:
        """Prediction entropy in nats (B,) (p clamped at 1e-8, as published)."""
        was = self.training
        self.eval()
        p = torch.softmax(self(e.float()), -1).clamp(min=1e-8)
        self.train(was)
        return -(p * p.log()).sum(-1)


def random_labels(n: int, classes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def train_familiarity(net: Familiarity, emb: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float = 1e-3,
                      batch_size: int = 2000, seed: int = 0, start_epoch: int = 0, on_epoch=None) -> list[float]:
    """AdamW on the (cached) embeddings with their random labels; ``on_epoch(epoch, net, opt)`` may checkpoint
    (return True to stop). Returns the loss per epoch."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    for ep in tqdm(range(start_epoch, epochs), desc="meg familiarity", disable=None):
        order = torch.randperm(emb.shape[0], generator=g)
        tot = 0.0
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            loss = nn.functional.cross_entropy(net(emb[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        losses.append(tot / len(order))
        if on_epoch is not None and on_epoch(ep + 1, net, opt):
            break
    net.eval()
    return losses


def choose_epsilon(pos: torch.Tensor, neg: torch.Tensor) -> tuple[float, dict[str, float]]:
    """The threshold ε on entropies that best separates ``pos`` (paraphrases of edited facts: should be below)
    from ``neg`` (unrelated prompts: should be above), by balanced accuracy over candidate midpoints; with its
    true and false positive rates."""
    cands = torch.cat([pos, neg]).sort().values
    mids = torch.cat([cands[:1] - 1e-6, (cands[1:] + cands[:-1]) / 2, cands[-1:] + 1e-6])
    best, best_eps = -1.0, float(mids[0])
    for e in mids.tolist():
        tpr = float((pos < e).float().mean())
        fpr = float((neg < e).float().mean())
        bal = (tpr + 1 - fpr) / 2
        if bal > best + 1e-12:
            best, best_eps = bal, e
    return best_eps, gate_rates(pos, neg, best_eps)


def gate_rates(pos: torch.Tensor, neg: torch.Tensor, eps: float) -> dict[str, float]:
    return {"tpr": round(float((pos < eps).float().mean()), 4), "fpr": round(float((neg < eps).float().mean()), 4)}
