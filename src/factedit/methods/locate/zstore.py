"""The z* store: each request's z* on disk per digest of the weights it was computed on.

Each z* is saved under ``<cache>/zstar/<digest of the current weights>/<request key>.safetensors``, the key
covering the site, the z* settings, the templates and the request. A later call on the same weights (a
resumed round, NSE's rounds, which always rewind to the original weights, a re-run with another λ, another
method whose z* is defined the same way: MEMIT, AlphaEdit and NSE share it) reads it instead of optimising
again; weights that differ in any byte give another digest, so nothing stale is read."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...fsutil import atomic_file
from ...lm.load import LM, cache_root, fingerprint_model
from ...types import EditRequest

log = logging.getLogger(__name__)


Z_STORE_VERSION = 1  # bump when the z* computation changes its result


class ZStore:
    """z* per request on disk, for one set of weights (see the module docstring)."""

    def __init__(self, lm: LM, templates: list[str], site_path: str, settings: dict) -> None:
        """settings: the z* settings (``vars(ZSettings)``)."""
        root = Path(os.environ["FACTEDIT_ZSTAR_CACHE"]) if os.environ.get("FACTEDIT_ZSTAR_CACHE") \
            else cache_root() / "zstar"
        self.dir = root / fingerprint_model(lm.model)  # the weights z* is computed on, byte for byte
        tok = lm.tokenizer
        settings = {k: v for k, v in settings.items() if k != "batch"}  # the batch size does not change z*
        if not settings.get("early_stop_prob"):
            settings.pop("early_stop_prob", None)  # off: the z* of the store's earlier entries
        if settings.get("autocast") == "bf16":
            settings["autocast"] = "bf16_mlps"  # bf16 in the MLPs and head only (session 11): not the older whole-forward z*
        self.base = json.dumps({"v": Z_STORE_VERSION, "site": site_path, "z": settings, "templates": templates,
                                "tokenizer": [type(tok).__name__, len(tok)], "device": lm.device.type},
                               sort_keys=True)

    def path(self, r: EditRequest) -> Path:
        k = json.dumps([self.base, r.prompt, r.subject, r.target_new])
        return self.dir / (hashlib.sha256(k.encode()).hexdigest()[:32] + ".safetensors")

    def get(self, r: EditRequest) -> tuple[torch.Tensor, dict] | None:
        p = self.path(r)
        if not p.exists():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                z, info = f.get_tensor("z"), json.loads(f.metadata()["info"])
        except Exception as e:  # noqa: BLE001 - an unreadable entry is recomputed (and overwritten)
            log.warning("z* store: ignoring unreadable %s (%s)", p, e)
            return None
        return z, {**info, "case": r.label, "stored": True}

    def put(self, r: EditRequest, z: torch.Tensor, info: dict) -> None:
        p = self.path(r)
        with atomic_file(p) as tmp:
            save_file({"z": z.detach().float().contiguous()}, str(tmp), metadata={"info": json.dumps(info)})
