"""MeG's dynamic neuron: one extra FFN unit at one layer, its weights given per query (row).

The neuron's weights are one flat vector per row, laid out ``[w_in (d), b (1, GELU families only), w_out (d)]``:

- SwiGLU families (Llama, Qwen, Gemma, ...: the MLP has a ``gate_proj``): an extra *linear* unit, as the authors do
  for Llama-3: a = w_in · x, no gate and no activation, and the MLP output gains a · w_out (one more row of the
  up projection and one more column of the down projection);
- GELU families (GPT-2, GPT-J, Phi-2, ...): an extra neuron with a bias through the MLP's own activation,
  a = act(w_in · x + b), the output gaining a · w_out.

x is the MLP's input (after the block's norm) and the unit's contribution joins the MLP's output (before a post-MLP
norm, where the family has one): the neuron sits inside the FFN as one more hidden unit. On SmolLM2-135M (d = 576)
a neuron is 1,152 numbers.

``RowNeurons`` is the intervention used while fitting and checking neurons: its state is a (B, P) tensor of
per-row weights (``None`` rows: untouched, bit-identical to the unedited model). ``initial_neuron`` is the fixed
starting point every fact's fit starts from (the default ``nn.Linear`` initialisation, from a fixed seed, never the
global generator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import FactEditError
from ...lm.arch import Site
from ...lm.load import LM

_ACTS = {"gelu": lambda z: F.gelu(z), "gelu_new": lambda z: F.gelu(z, approximate="tanh"),
         "gelu_pytorch_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu, "silu": F.silu}


@dataclass(frozen=True)
class NeuronShape:
    d_in: int  # the MLP's input width (the hidden size)
    d_out: int  # the MLP's output width (the hidden size)
    d_ff: int  # the MLP's own number of hidden units (sets the initial scale of w_out)
    act: str | None  # None: a linear unit (SwiGLU families); else the MLP's activation (GELU families)

    @property
    def bias(self) -> bool:
        return self.act is not None

    @property
    def size(self) -> int:
        return self.d_in + int(self.bias) + self.d_out

    def split(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(..., P) -> w_in (..., d_in), b (..., 1) or None, w_out (..., d_out)."""
        w_in = w[..., : self.d_in]
        b = w[..., self.d_in : self.d_in + 1] if self.bias else None
        return w_in, b, w[..., self.d_in + int(self.bias) :]

    def to_dict(self) -> dict:
        return {"d_in": self.d_in, "d_out": self.d_out, "d_ff": self.d_ff, "act": self.act}


def _activation_name(mlp: nn.Module, config) -> str:
    for attr in ("activation_function", "hidden_act", "hidden_activation"):
        name = getattr(config, attr, None)
        if isinstance(name, str):
            return name
    raise FactEditError(f"cannot tell the activation of {type(mlp).__name__}: set it in the model config")


def neuron_shape(lm: LM, layer: int) -> NeuronShape:
    """The dynamic neuron's shape at ``layer`` of ``lm`` (gated MLP: a linear unit; else the MLP's activation)."""
    lm.check_layers([layer], "meg layer")
    mlp_path = lm.arch.mlp_out.rpartition(".")[0]
    mlp = lm.model.get_submodule(f"{lm.arch.block_path(layer)}.{mlp_path}")
    d = lm.hidden_size
    d_ff = lm.model.get_submodule(lm.arch.mlp_in_path(layer))
    w = d_ff.weight
    n_ff = w.shape[1] if lm.arch.layout == "conv1d" else w.shape[0]
    if hasattr(mlp, "gate_proj"):
        return NeuronShape(d, d, int(n_ff), None)
    act = _activation_name(mlp, lm.model.config)
    if act not in _ACTS:
        raise FactEditError(f"meg: activation '{act}' of {type(mlp).__name__} is not supported "
                            f"(known: {', '.join(_ACTS)})")
    return NeuronShape(d, d, int(n_ff), act)


def neuron_site(layer: int) -> Site:
    return Site("mlp_output", layer)


def initial_neuron(shape: NeuronShape, seed: int = 0) -> torch.Tensor:
    """The fixed initial neuron (P,): ``nn.Linear``'s default initialisation of one more input row (bound
    1/√d_in, the bias likewise) and of one more column of the out-projection (bound 1/√(d_ff + 1)), drawn from a
    generator of its own."""
    g = torch.Generator().manual_seed(seed)
    w_in = (torch.rand(shape.d_in, generator=g) * 2 - 1) / math.sqrt(shape.d_in)
    parts = [w_in]
    if shape.bias:
        parts.append((torch.rand(1, generator=g) * 2 - 1) / math.sqrt(shape.d_in))
    parts.append((torch.rand(shape.d_out, generator=g) * 2 - 1) / math.sqrt(shape.d_ff + 1))
    return torch.cat(parts)


def neuron_output(shape: NeuronShape, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The unit's contribution to the MLP output: x (B, T, d_in), per-row weights w (B, P) -> (B, T, d_out)."""
    w_in, b, w_out = shape.split(w)
    a = torch.einsum("btd,bd->bt", x, w_in)  # (B, T)
    if shape.act is not None:
        a = _ACTS[shape.act](a + b)  # b (B, 1)
    return a[..., None] * w_out[:, None, :]


class RowNeurons(nn.Module):
    """An intervention at ``Site("mlp_output", layer)`` whose per-row neuron weights are set by the caller
    (``self.weights``: (B, P); ``self.active``: (B,) bool, rows left untouched where False). Acts on every token,
    decoding steps included. Not registered (never saved): fitting and checking neurons use it in-process."""

    acts_on_decode = True
    reads_input = True

    def __init__(self, shape: NeuronShape) -> None:
        super().__init__()
        self.shape = shape
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # the hook reads the module's dtype
        self.weights: torch.Tensor | None = None
        self.active: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w = self.weights
        if w is None:
            return h
        if w.shape[0] != h.shape[0]:
            raise FactEditError(f"meg: {w.shape[0]} neurons for a forward of {h.shape[0]} rows")
        out = h + neuron_output(self.shape, x, w.to(h.dtype))
        if self.active is None:
            return out
        return torch.where(self.active.to(h.device)[:, None, None], out, h)
