"""Architecture knowledge as data.

One `ArchRecord` per model family names the modules an editor needs (the blocks, the MLP
projections, the final norm, the head) and the layout of the MLP out-projection weight. Records are
looked up by ``config.model_type``; an unknown type falls back to a structural probe of the model,
and users can register their own records. No model-name substring checks anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FactEditError

SITE_KINDS = ("block_input", "block_output", "attn_output", "mlp_input", "mlp_output", "mlp_out_input")


@dataclass(frozen=True)
class Site:
    """A place in the model, named for every family alike: ``Site("mlp_input", 14)``. Resolved to a module path
    by the family's record (``ArchRecord.site_path``) and to a module and width by ``resolve_site``."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise FactEditError(f"unknown site '{self.kind}' (known: {', '.join(SITE_KINDS)})")
        object.__setattr__(self, "layer", int(self.layer))


@dataclass(frozen=True)
class ArchRecord:
    family: str
    blocks: str  # dotted path of the ModuleList of transformer blocks
    mlp_out: str  # MLP out-projection, relative to a block (its input is the "key" k)
    mlp_in: str  # MLP in-projection (up / fc_in), relative to a block
    attn_out: str  # attention out-projection, relative to a block
    final_norm: str  # dotted path of the final norm
    embed: str  # token embedding
    head: str = "lm_head"
    layout: str = "linear"  # "linear": weight is (out, in); "conv1d": GPT-2 Conv1D stores (in, out)
    # a norm applied to the MLP's output before it joins the residual stream (Gemma 2/3:
    # post_feedforward_layernorm), relative to a block; None when the MLP output is added as it is
    mlp_post_norm: str | None = None

    def site_path(self, site: Site) -> tuple[str, str]:
        """(dotted module path, "input" or "output") of a named site: where a hook reads or replaces it."""
        blk = self.block_path(site.layer)
        mlp = self.mlp_out.rpartition(".")[0] or self.mlp_out
        attn = self.attn_out.rpartition(".")[0] or self.attn_out
        table = {
            "block_input": (blk, "input"),  # the residual stream entering the block
            "block_output": (blk, "output"),  # the residual stream leaving it
            "attn_output": (f"{blk}.{attn}", "output"),  # the attention module's output
            "mlp_input": (f"{blk}.{mlp}", "input"),  # the MLP's input (after its norm)
            "mlp_output": (f"{blk}.{mlp}", "output"),  # the MLP's output (before a post-MLP norm, if any)
            "mlp_out_input": (f"{blk}.{self.mlp_out}", "input"),  # the out-projection's input: the key k
        }
        return table[site.kind]

    def block_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def mlp_out_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp_out}"

    def mlp_in_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp_in}"

    def mlp_post_norm_path(self, layer: int) -> str | None:
        return f"{self.blocks}.{layer}.{self.mlp_post_norm}" if self.mlp_post_norm else None


_LLAMA_LIKE = dict(
    blocks="model.layers",
    mlp_out="mlp.down_proj",
    mlp_in="mlp.up_proj",
    attn_out="self_attn.o_proj",
    final_norm="model.norm",
    embed="model.embed_tokens",
)

_RECORDS: dict[str, ArchRecord] = {}


def register_arch(model_type: str, record: ArchRecord) -> None:
    """Register (or replace) the record used for ``config.model_type == model_type``."""
    _RECORDS[model_type] = record


for _t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "granite", "smollm3"):
    register_arch(_t, ArchRecord(family=_t, **_LLAMA_LIKE))
# Gemma 2/3 and OLMo 2 normalise the MLP output before adding it to the residual stream
for _t in ("gemma2", "gemma3", "gemma3_text"):
    register_arch(_t, ArchRecord(family=_t, **_LLAMA_LIKE, mlp_post_norm="post_feedforward_layernorm"))
register_arch("olmo2", ArchRecord(family="olmo2", **_LLAMA_LIKE, mlp_post_norm="post_feedforward_layernorm"))
register_arch(
    "gpt2",
    ArchRecord(family="gpt2", blocks="transformer.h", mlp_out="mlp.c_proj", mlp_in="mlp.c_fc",
               attn_out="attn.c_proj", final_norm="transformer.ln_f", embed="transformer.wte", layout="conv1d"),
)
register_arch(
    "gptj",
    ArchRecord(family="gptj", blocks="transformer.h", mlp_out="mlp.fc_out", mlp_in="mlp.fc_in",
               attn_out="attn.out_proj", final_norm="transformer.ln_f", embed="transformer.wte"),
)
register_arch(
    "gpt_neox",
    ArchRecord(family="gpt_neox", blocks="gpt_neox.layers", mlp_out="mlp.dense_4h_to_h", mlp_in="mlp.dense_h_to_4h",
               attn_out="attention.dense", final_norm="gpt_neox.final_layer_norm", embed="gpt_neox.embed_in",
               head="embed_out"),
)
register_arch(
    "phi",
    ArchRecord(family="phi", blocks="model.layers", mlp_out="mlp.fc2", mlp_in="mlp.fc1", attn_out="self_attn.dense",
               final_norm="model.final_layernorm", embed="model.embed_tokens"),
)


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise FactEditError(f"model has no module '{path}'") from e


def _probe(model: nn.Module) -> ArchRecord | None:
    """Structural fallback: try every known record and accept the first whose paths all resolve."""
    for rec in _RECORDS.values():
        try:
            model.get_submodule(rec.blocks)
            for p in (rec.mlp_out_path(0), rec.mlp_in_path(0), f"{rec.blocks}.0.{rec.attn_out}", rec.final_norm,
                      rec.embed):
                model.get_submodule(p)
            post = rec.mlp_post_norm
            if post is None and hasattr(model.get_submodule(f"{rec.blocks}.0"), "post_feedforward_layernorm"):
                post = "post_feedforward_layernorm"  # a norm after the MLP (Gemma 2/3 style)
            return ArchRecord(**{**rec.__dict__, "family": f"{rec.family}-like", "mlp_post_norm": post})
        except AttributeError:
            continue
    return None


def arch_for(model: nn.Module) -> ArchRecord:
    """The record for ``model``: by ``config.model_type`` first, then by structure."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _RECORDS:
        return _RECORDS[model_type]
    rec = _probe(model)
    if rec is None:
        raise FactEditError(
            f"unsupported architecture (model_type={model_type!r}); register one with factedit.lm.arch.register_arch"
        )
    return rec


def num_layers(model: nn.Module, arch: ArchRecord) -> int:
    return len(model.get_submodule(arch.blocks))


def weight_as_out_in(module: nn.Module, arch: ArchRecord) -> torch.Tensor:
    """A view of ``module.weight`` as (out_features, in_features) whatever the storage layout."""
    w = module.weight
    return w.T if arch.layout == "conv1d" else w


def linear_delta_out(x: torch.Tensor, delta: torch.Tensor, layout: str) -> torch.Tensor:
    """The output change x @ ΔWᵀ of a linear map whose weight delta is stored in the module's layout.

    x: (..., in); delta: (out, in) for "linear", (in, out) for "conv1d"  ->  (..., out)
    """
    return x @ delta if layout == "conv1d" else x @ delta.T


def resolve_site(model: nn.Module, arch: ArchRecord, site: Site) -> tuple[nn.Module, str, int]:
    """(module, "input" or "output", width of the hidden state there) for ``site`` on ``model``."""
    n = num_layers(model, arch)
    if not 0 <= site.layer < n:
        raise FactEditError(f"site layer {site.layer} is out of range: the model has layers 0..{n - 1}")
    path, where = arch.site_path(site)
    module = get_module(model, path)
    if site.kind == "mlp_out_input":
        width = int(weight_as_out_in(module, arch).shape[1])
    else:
        width = int(model.get_input_embeddings().weight.shape[1])
    return module, where, width
