"""The MeG edit as a module patch: per query, encode it, gate it, generate its neuron, mount it.

``MeGModule`` (intervention kind ``meg``) sits at ``Site("mlp_output", layer)`` and reads the MLP's input. Once per
forward context (the prompt's forward; decoding steps reuse it) ``prepare`` finds each row's query (its prompt
tokens, given by the token-embedding hook: ``reads_ids``), and for each distinct query:

1. strips the question template to recover the raw question and asks the familiarity network for its prediction
   entropy on the encoder's embedding of it; at or above ε the query is not about an edited fact and its row is
   left untouched (bit-identical to the unedited model);
2. otherwise samples the neuron from the generator conditioned on the encoder's embedding of the template-wrapped
   query, with noise from a generator seeded by the query's text (the same query always gets the same neuron,
   whatever shares its batch), and divides by the scale.

The neuron then acts at every position of its row, prompt and generated tokens alike. The frozen text encoder
is not part of the module's state (it is the pip package's, checked by SHA-256): only its trained last layer is.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ...patch.modules import register_intervention
from .diffusion import Diffusion, DiT1D, MLPGen
from .encoder import TextEncoder
from .familiarity import Familiarity
from .neuron import NeuronShape, neuron_output


def strip_template(template: str, text: str) -> str:
    """The question inside ``template`` ("...{q}..."), or the text itself when it does not have the template's form."""
    pre, _, post = template.partition("{q}")
    if text.startswith(pre) and text.endswith(post) and len(text) >= len(pre) + len(post):
        return text[len(pre) : len(text) - len(post)]
    return text


def query_seed(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{text}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def build_generator(kind: str, size: int, cond_dim: int, g: dict) -> nn.Module:
    if kind == "dit":
        return DiT1D(size, cond_dim, hidden=g["dit_hidden"], depth=g["dit_depth"], heads=g["dit_heads"],
                     patch=g["patch"], cond_dropout=g["cond_dropout"], zero_init=g["zero_init"])
    return MLPGen(size, cond_dim, hidden=g["mlp_hidden"], depth=g["mlp_depth"], cond_dropout=g["cond_dropout"])


@register_intervention("meg")
class MeGModule(nn.Module):
    acts_on_decode = True
    reads_input = True
    reads_ids = True

    def __init__(self, spec: dict, encoder: TextEncoder | None = None) -> None:
        super().__init__()
        self._spec = dict(spec)
        self.shape = NeuronShape(**spec["shape"])
        enc = encoder if encoder is not None else TextEncoder.load(spec["encoder"], spec["pooling"])
        object.__setattr__(self, "encoder", enc)  # not a submodule: its frozen weights stay out of the state
        self.enc_top = enc.top
        self.fam = Familiarity(enc.dim, spec["fam_blocks"], spec["fam_classes"])
        self.gen = build_generator(spec["generator"], self.shape.size, enc.dim, spec["gen"])
        self.diffusion = Diffusion(spec["diffusion_steps"]).respaced(spec["sample_steps"])
        self.last_ids: torch.Tensor | None = None
        self.eval()

    def spec(self) -> dict:
        return self._spec

    def _apply(self, fn, recurse=True):  # .to(device) and friends move the frozen encoder too
        self.encoder.model._apply(fn)
        return super()._apply(fn, recurse)

    @classmethod
    def from_spec(cls, spec: dict) -> MeGModule:
        return cls(spec)

    # ---- per query -----------------------------------------------------------------------------------------
    def queries(self, ctx, lm) -> list[str]:
        ids = ctx.rows.get("input_ids") if ctx is not None else self.last_ids
        if ids is None:
            return []
        lens = ctx.prompt_lens if ctx is not None and ctx.prompt_lens is not None else None
        tok = lm.tokenizer
        out = []
        for i in range(ids.shape[0]):
            row = ids[i, : int(lens[i])] if lens is not None else ids[i]
            # special tokens kept (a chat template's markers are part of the query), the tokenizer's BOS dropped
            text = tok.decode(row.tolist(), skip_special_tokens=False)
            if tok.bos_token and text.startswith(tok.bos_token):
                text = text[len(tok.bos_token) :]
            out.append(text)
        return out

    @torch.no_grad()
    def neurons(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (N, P), gated in (N,), entropy (N,)) for distinct query texts (template-wrapped)."""
        s = self._spec
        raw = [strip_template(s["template"], t) for t in texts]
        dev = self.fam.head.weight.device
        ent = self.fam.entropy(self.encoder.embed(raw).to(dev)).cpu()
        on = ent < s["epsilon"] if s["gate"] else torch.ones(len(texts), dtype=torch.bool)
        w = torch.zeros(len(texts), self.shape.size)
        idx = [i for i in range(len(texts)) if bool(on[i])]
        if idx:
            cond = self.encoder.embed([texts[i] for i in idx]).to(dev)
            gens = [torch.Generator().manual_seed(query_seed(texts[i], s["seed"])) for i in idx]
            x0 = self.diffusion.sample(self.gen, cond, self.shape.size, gens)
            w[idx] = (x0 / s["scale"]).float().cpu()
        return w, on, ent

    def prepare(self, ctx, lm):
        texts = self.queries(ctx, lm)
        if not texts:
            return None
        uniq = sorted(set(texts))
        w, on, _ = self.neurons(uniq)
        pos = {t: i for i, t in enumerate(uniq)}
        rows = torch.tensor([pos[t] for t in texts])
        return w[rows], on[rows]

    def forward(self, h: torch.Tensor, x: torch.Tensor, state=None) -> torch.Tensor:
        if state is None:
            return h
        w, on = state
        if w.shape[0] != h.shape[0] or not bool(on.any()):
            return h
        out = h + neuron_output(self.shape, x, w.to(h.device, h.dtype))
        return torch.where(on.to(h.device)[:, None, None], out, h)
