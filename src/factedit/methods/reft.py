"""Representation editors: LoReFT (Wu et al., 2024) and BaFT (Liu et al., ICLR 2025).

LoReFT: Φ(h) = h + Rᵀ(W h + b − R h), R ∈ R^{r×d} with orthonormal rows, W ∈ R^{r×d}, b ∈ R^r
(specs/representation.md). BaFT weights each basis by a function of the same representation:
Φ(h) = h + Rᵀ diag(s(h)) (W h + b − R h), s(h) = sigmoid(A h + a) by default (our reconstruction: the paper's
equations are not public; docs/methods.md). With s ≡ 1 (``gate: constant``) BaFT is LoReFT.

Both are applied to the block output at chosen layers and prompt positions of the frozen model, trained on the
requests' teacher-forced target NLL; BaFT adds a locality term on unrelated prompts (their basis weights driven
to 0, and the KL from the unedited model's predictions) and an incremental load-balancing term. The patch is a
module patch: the model's weights never change.

Continual mode (``continual: true``, both methods): one module carried across rounds, trained further on each
round's facts. Its tensors (and BaFT's cumulative basis usage) are the editor's sequential state, saved through
the stream protocol; each round's patch holds the whole module and replaces the previous round's when applied
(a *carried* module patch, ``patch.modules``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import NonNegFloat, NonNegInt, PosFloat, PosInt
from ..errors import FactEditError
from ..lm.arch import Site
from ..lm.batch import TargetBatch, make_batch, request_batches, row_means, target_logits, target_nll
from ..lm.load import LM
from ..patch.modules import ModulePatch, Placement, carried_suspended, position_mask, register_intervention
from ..types import EditRequest
from .base import Editor
from .train import TrainSettings, train_loop

log = logging.getLogger(__name__)

GATES = ("sigmoid", "softmax", "constant")


@register_intervention("loreft")
class LoReFTIntervention(nn.Module):
    """Inference form of Φ with R materialised (no parametrisation cost per forward)."""

    def __init__(self, d: int, rank: int) -> None:
        super().__init__()
        self.d, self.rank = d, rank
        self.R = nn.Parameter(torch.zeros(rank, d))  # (r, d), orthonormal rows
        self.W = nn.Parameter(torch.zeros(rank, d))  # (r, d)
        self.b = nn.Parameter(torch.zeros(rank))  # (r,)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (..., d); (W h + b − R h): (..., r); back to (..., d) through Rᵀ
        return h + (h @ self.W.T + self.b - h @ self.R.T) @ self.R

    def spec(self) -> dict:
        return {"d": self.d, "rank": self.rank}

    @classmethod
    def from_spec(cls, spec: dict) -> LoReFTIntervention:
        return cls(int(spec["d"]), int(spec["rank"]))


def gate_input(h: torch.Tensor) -> torch.Tensor:
    """What the gate reads: h standardised over its d coordinates and scaled by 1/√d (our choice). Block outputs
    are large and dominated by a few coordinates (SmolLM2-135M, layer 10: norm ≈ 125, one coordinate ≈ 80); read
    raw, one AdamW step on A moves every gate logit by about lr·‖h‖₁ ≈ 35 at lr 2e-2, and the first steps
    saturated three of four gates at 0 for good. Standardised and scaled, a step moves a logit by about lr·√d."""
    hc = h - h.mean(-1, keepdim=True)
    return hc / (hc.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6) / h.shape[-1] ** 0.5


def basis_weights(z: torch.Tensor, gate: str) -> torch.Tensor:
    """s from the gate logits z = A h + a (..., r): sigmoid (each basis on or off by itself), softmax (a router:
    the weights sum to 1) or constant 1 (LoReFT)."""
    if gate == "sigmoid":
        return torch.sigmoid(z)
    if gate == "softmax":
        return torch.softmax(z, dim=-1)
    if gate == "constant":
        return torch.ones_like(z)
    raise FactEditError(f"unknown BaFT gate '{gate}' (known: {', '.join(GATES)})")


@register_intervention("baft")
class BaFTIntervention(LoReFTIntervention):
    """Φ(h) = h + Rᵀ diag(s(h)) (W h + b − R h), s(h) = gate(A ĥ + a), ĥ = ``gate_input(h)``."""

    def __init__(self, d: int, rank: int, gate: str = "sigmoid") -> None:
        super().__init__(d, rank)
        if gate not in GATES:
            raise FactEditError(f"unknown BaFT gate '{gate}' (known: {', '.join(GATES)})")
        self.gate = gate
        self.A = nn.Parameter(torch.zeros(rank, d))  # (r, d)
        self.a = nn.Parameter(torch.zeros(rank))  # (r,)

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        return basis_weights(gate_input(h) @ self.A.T + self.a, self.gate)  # (..., r)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + (self.weights(h) * (h @ self.W.T + self.b - h @ self.R.T)) @ self.R

    def spec(self) -> dict:
        return {"d": self.d, "rank": self.rank, "gate": self.gate}

    @classmethod
    def from_spec(cls, spec: dict) -> BaFTIntervention:
        return cls(int(spec["d"]), int(spec["rank"]), str(spec.get("gate", "sigmoid")))


class _TrainableLoReFT(nn.Module):
    """Training form: R kept orthonormal by torch's orthogonal parametrisation."""

    def __init__(self, d: int, rank: int) -> None:
        super().__init__()
        self.rotate = nn.utils.parametrizations.orthogonal(nn.Linear(d, rank, bias=False))  # weight (r, d)
        self.source = nn.Linear(d, rank)  # W, b

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R = self.rotate.weight  # (r, d)
        return h + (self.source(h) - h @ R.T) @ R

    def _export_into(self, out: LoReFTIntervention) -> LoReFTIntervention:
        with torch.no_grad():
            out.R.copy_(self.rotate.weight)
            out.W.copy_(self.source.weight)
            out.b.copy_(self.source.bias)
        return out

    def export(self) -> LoReFTIntervention:
        return self._export_into(LoReFTIntervention(self.source.in_features, self.source.out_features))

    @torch.no_grad()
    def load_from(self, iv: LoReFTIntervention) -> None:
        """Continue from an exported module (continual mode): R through the parametrisation's right inverse."""
        self.rotate.weight = iv.R.detach().clone()
        self.source.weight.copy_(iv.W)
        self.source.bias.copy_(iv.b)


class _TrainableBaFT(_TrainableLoReFT):
    def __init__(self, d: int, rank: int, gate: str) -> None:
        super().__init__(d, rank)
        self.gate_kind = gate
        # A, a; zero at the start: every basis weight is gate(0) (sigmoid: 1/2). Built without drawing from the
        # global generator, so that R, W, b start as LoReFT's for the same seed (every layer's module alike)
        with torch.random.fork_rng(devices=[]):
            self.gate = nn.Linear(d, rank)
        with torch.no_grad():
            self.gate.weight.zero_()
            self.gate.bias.zero_()
        self.record: list[torch.Tensor] | None = None  # the basis weights of each forward, while recording

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R = self.rotate.weight
        s = basis_weights(self.gate(gate_input(h)), self.gate_kind)  # (B, T, r)
        if self.record is not None:
            self.record.append(s)
        return h + (s * (self.source(h) - h @ R.T)) @ R

    def export(self) -> BaFTIntervention:
        out = self._export_into(BaFTIntervention(self.source.in_features, self.source.out_features, self.gate_kind))
        with torch.no_grad():
            out.A.copy_(self.gate.weight)
            out.a.copy_(self.gate.bias)
        return out

    @torch.no_grad()
    def load_from(self, iv: BaFTIntervention) -> None:
        super().load_from(iv)
        self.gate.weight.copy_(iv.A)
        self.gate.bias.copy_(iv.a)


@dataclass(frozen=True)
class LoReFTConfig:
    layers: tuple[int, ...] = (8,)  # blocks whose output is intervened on
    rank: PosInt = 4  # r, the subspace dimension
    positions: Literal["last", "first_last", "all", "every"] = "last"  # prompt positions (every: decoding too)
    lr: PosFloat = 4e-3  # AdamW learning rate
    steps: PosInt = 100  # passes over the requests
    batch_size: PosInt = 64
    weight_decay: NonNegFloat = 0.0
    early_stop_loss: NonNegFloat = 1e-2
    seed: int = 0  # initialisation of R, W, b
    # one module carried across the rounds of a sequential stream, trained further on each round's facts
    continual: bool = False


class LoReFTEditor(Editor):
    name = "loreft"
    Config = LoReFTConfig
    STATE_KEYS = ("layers", "rank", "positions", "continual")

    def __init__(self, config: Any | None = None, preset: str | None = None) -> None:
        super().__init__(config, preset)
        self.carried: dict[str, torch.Tensor] | None = None  # continual: the module tensors of the last round
        self.rounds = 0

    # ---- what a subclass changes -------------------------------------------------------------------------
    def _build(self, d: int) -> list[nn.Module]:
        return [_TrainableLoReFT(d, self.config.rank) for _ in self.config.layers]

    def _spec(self, d: int) -> dict:
        return {"d": d, "rank": self.config.rank}

    def _intervention(self, spec: dict) -> LoReFTIntervention:
        return LoReFTIntervention.from_spec(spec)

    def _prepare(self, lm: LM, requests: list[EditRequest], mods: list[nn.Module]) -> tuple[list, list[int]]:
        """The training batches and their sizes (BaFT adds the unrelated prompts and their reference)."""
        return request_batches(lm, requests, self.config.batch_size)

    def _loss(self, lm: LM, batch, mods: list[nn.Module]) -> torch.Tensor:
        return target_nll(lm, batch).mean()

    def _finish(self, lm: LM, requests: list[EditRequest], mods: list[nn.Module], patch: ModulePatch) -> None:
        """Called on the finished patch, the trained modules still installed (BaFT records the basis usage)."""

    # ---- compute -----------------------------------------------------------------------------------------
    @property
    def carry_key(self) -> str:
        return f"{self.name}:continual"

    def _sites(self) -> list[Placement]:
        c = self.config
        return [Placement(Site("block_output", int(layer)), positions=c.positions) for layer in c.layers]

    def _compute(self, lm: LM, requests: list[EditRequest]) -> ModulePatch:
        c = self.config
        if not c.continual:
            return self._train(lm, requests)
        with carried_suspended(lm, self.carry_key):  # train on the model without this stream's earlier module
            return self._train(lm, requests)

    def _train(self, lm: LM, requests: list[EditRequest]) -> ModulePatch:
        c = self.config
        sites = self._sites()
        gen = torch.random.fork_rng(devices=[])
        with gen:
            torch.manual_seed(c.seed + (self.rounds if c.continual else 0))
            train_mods = self._build(lm.hidden_size)
            if c.continual and self.carried is not None:  # (the orthogonal map's right inverse draws random numbers)
                for i, m in enumerate(train_mods):
                    iv = self._intervention(self._spec(lm.hidden_size))
                    iv.load_state_dict({k.split("::", 1)[1]: v for k, v in self.carried.items()
                                        if k.startswith(f"{i}::")})
                    m.load_from(iv)
        train_patch = ModulePatch(method=self.name, config={}, base_fingerprint=lm.fingerprint, placements=sites,
                                  modules=train_mods)
        params = [p for m in train_mods for p in m.parameters()]
        batches, sizes = self._prepare(lm, requests, train_mods)
        settings = TrainSettings(steps=c.steps, lr=c.lr, optimizer="adamw", weight_decay=c.weight_decay,
                                 early_stop_loss=c.early_stop_loss, desc=self.name)
        meta: dict[str, Any] = {"preset": self.preset}
        if c.continual:
            meta.update(carry=self.carry_key, round=self.rounds)
        with train_patch.apply(lm):
            for m in train_mods:
                m.train()
            res = train_loop(params, batches, lambda b: self._loss(lm, b, train_mods), settings, weights=sizes)
            for m in train_mods:
                m.eval()
            meta["final_loss"] = res.loss
            log.info("%s: layers %s rank %d, final loss %.3f", self.name, list(c.layers), c.rank, res.loss)
            patch = ModulePatch(method=self.name, config=self.config_dict(), base_fingerprint=lm.fingerprint,
                                requests=list(requests), meta=meta, placements=sites,
                                modules=[m.export() for m in train_mods])
            self._finish(lm, requests, train_mods, patch)
        return patch

    # ---- continual state -----------------------------------------------------------------------------------
    @property
    def remembers_rounds(self) -> bool:
        return bool(self.config.continual)

    def commit(self, patch) -> None:
        if not self.config.continual:
            return
        self.carried = {k: v.detach().clone() for k, v in patch.tensors().items()}
        self.rounds += 1

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"module.{k}": v for k, v in (self.carried or {}).items()}
        return tensors, {"rounds": self.rounds}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        mod = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("module.")}
        self.carried = mod or None
        self.rounds = int(meta.get("rounds", 0))


# ---- BaFT ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaFTConfig(LoReFTConfig):
    gate: Literal["sigmoid", "softmax", "constant"] = "sigmoid"  # s(h); constant: LoReFT
    # unrelated prompts for the locality term: a training split (CounterFact, MEND zsRE or KnowEdit records), a
    # path or one relative to the data folder, read from record ``loc_from`` on; ``loc_per_edit`` of them per edit
    # request, picked by a hash of the request (0: no locality term)
    loc_data: str = "counterfact/counterfact-train.json.gz"
    loc_from: NonNegInt = 0
    loc_per_edit: NonNegInt = 1
    loc_gate: NonNegFloat = 1.0  # weight of the mean basis weight on the unrelated prompts (driven to 0)
    loc_kl: NonNegFloat = 1.0  # weight of KL(unedited ‖ edited) at their answer positions
    # weight of the incremental load balancing: the squared coefficient of variation of the cumulative basis usage
    # (earlier rounds' committed usage plus this round's) over the bases of each module
    load_balance: NonNegFloat = 0.1


@dataclass
class _BaFTBatch:
    """One training batch: the edit rows first, then their unrelated rows, in one teacher-forced batch (one
    forward per step: for single edits the per-forward cost dominates, and two forwards cost nearly twice one)."""

    rows: TargetBatch
    n_edit: int
    loc_ref: torch.Tensor | None  # (N, V) unedited log-probabilities at the unrelated rows' answer positions


def _cv2(u: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of a usage vector (r,): 0 when every basis is used alike."""
    return u.var(unbiased=False) / u.mean().clamp(min=1e-8) ** 2


class BaFTEditor(LoReFTEditor):
    name = "baft"
    Config = BaFTConfig
    STATE_KEYS = ("layers", "rank", "positions", "continual", "gate")

    def __init__(self, config: Any | None = None, preset: str | None = None) -> None:
        super().__init__(config, preset)
        self.usage: torch.Tensor | None = None  # (n_layers, r) cumulative basis usage of the committed rounds
        self._pool: list[tuple[str, str]] | None = None

    def check_config(self, lm: LM) -> None:
        super().check_config(lm)
        if self._use_loc():
            self.pool()  # a missing or unreadable file is refused now, before any edit

    def pool(self) -> list[tuple[str, str]]:
        if self._pool is None:
            from ..data.knowedit import locality_pool
            from ..data.paths import default_data_dir

            path = Path(self.config.loc_data)
            if not path.is_absolute() and not path.exists():
                root = default_data_dir()
                if root is None:
                    raise FactEditError(f"baft: loc_data '{path}' not found and no data folder (set loc_data=FILE, "
                                        "FACTEDIT_DATA, or loc_per_edit=0 for no locality term)")
                path = root / path
            self._pool = locality_pool(path, self.config.loc_from)
            log.info("baft: %d unrelated prompts from %s (from record %d)", len(self._pool), path, self.config.loc_from)
        return self._pool

    def _unrelated(self, r: EditRequest) -> list[tuple[str, str]]:
        pool, k = self.pool(), self.config.loc_per_edit
        h = int.from_bytes(hashlib.sha256(f"{r.prompt}\x00{r.target_new}".encode()).digest()[:8], "big")
        return [pool[(h + j * 7919) % len(pool)] for j in range(min(k, len(pool)))]

    def _build(self, d: int) -> list[nn.Module]:
        return [_TrainableBaFT(d, self.config.rank, self.config.gate) for _ in self.config.layers]

    def _spec(self, d: int) -> dict:
        return {"d": d, "rank": self.config.rank, "gate": self.config.gate}

    def _intervention(self, spec: dict) -> BaFTIntervention:
        return BaFTIntervention.from_spec(spec)

    def _use_loc(self) -> bool:
        c = self.config
        return bool(c.loc_per_edit and (c.loc_gate or c.loc_kl))

    def _prepare(self, lm: LM, requests: list[EditRequest], mods: list[nn.Module]) -> tuple[list, list[int]]:
        c = self.config
        out, sizes = [], []
        for s in range(0, len(requests), c.batch_size):
            chunk = requests[s : s + c.batch_size]
            pairs = [p for r in chunk for p in self._unrelated(r)] if self._use_loc() else []
            rows = make_batch(lm, [r.prompt for r in chunk] + [p for p, _ in pairs],
                              [r.target_new for r in chunk] + [a for _, a in pairs])
            ref = None
            if pairs and c.loc_kl:
                with torch.no_grad():  # called before the trained modules are installed: the unedited model
                    logits, _, rws = target_logits(lm, rows)
                    ref = torch.log_softmax(logits[rws >= len(chunk)].float(), dim=-1)
            out.append(_BaFTBatch(rows, len(chunk), ref))
            sizes.append(len(chunk))
        return out, sizes

    def _site_weights(self, mods, batch: TargetBatch) -> list[torch.Tensor]:
        """Per module, the basis weights recorded in the last forward at the intervened positions of ``batch``,
        with the row of each: [((n_positions, r), (n_positions,))]."""
        out = []
        for m in mods:
            rec = m.record or []
            if not rec:
                out.append((torch.zeros(0, self.config.rank), torch.zeros(0, dtype=torch.long)))
                continue
            s = rec[-1]  # (B, T, r)
            mask = position_mask(batch.prompt_lens, s.shape[0], s.shape[1], self.config.positions, s.device)
            if mask is None:
                out.append((s.new_zeros(0, s.shape[-1]), torch.zeros(0, dtype=torch.long)))
                continue
            rows = torch.arange(s.shape[0], device=s.device)[:, None].expand(mask.shape)[mask]
            out.append((s[mask], rows))
        return out

    def _loss(self, lm: LM, batch: _BaFTBatch, mods: list[nn.Module]) -> torch.Tensor:
        c = self.config
        for m in mods:
            m.record = []
        try:
            logits, labels, rows = target_logits(lm, batch.rows)
            weights = self._site_weights(mods, batch.rows)
        finally:
            for m in mods:
                m.record = None
        n = batch.n_edit
        logp = torch.log_softmax(logits.float(), dim=-1)
        edit = rows < n
        tok = -logp[edit].gather(-1, labels[edit][:, None])[:, 0]  # the edits' target tokens
        loss = row_means(tok, rows[edit], n).mean()  # mean over edits of each one's mean target NLL (LoReFT's)
        if c.loc_gate and not bool(edit.all()):
            loc_s = [w[r >= n] for w, r in weights if bool((r >= n).any())]
            if loc_s:
                loss = loss + c.loc_gate * torch.stack([w.mean() for w in loc_s]).mean()
        if c.loc_kl and batch.loc_ref is not None:
            kl = (batch.loc_ref.exp() * (batch.loc_ref - logp[~edit])).sum(-1)  # (N_loc,)
            loss = loss + c.loc_kl * kl.mean()
        if c.load_balance and c.gate != "constant":
            terms = []
            for i, (w, r) in enumerate(weights):
                w = w[r < n]
                if w.numel():
                    u = w.sum(0)
                    if self.usage is not None and c.continual:
                        u = u + self.usage[i].to(u)
                    terms.append(_cv2(u))
            if terms:
                loss = loss + c.load_balance * torch.stack(terms).mean()
        return loss

    @torch.no_grad()
    def _finish(self, lm: LM, requests: list[EditRequest], mods: list[nn.Module], patch: ModulePatch) -> None:
        """The round's basis usage (Σ s(h) over the edits' intervened positions, per module) as commit data."""
        usage = torch.zeros(len(mods), self.config.rank)
        for s in range(0, len(requests), self.config.batch_size):
            chunk = requests[s : s + self.config.batch_size]
            b = make_batch(lm, [r.prompt for r in chunk], [r.target_new for r in chunk])
            for m in mods:
                m.record = []
            target_logits(lm, b)
            for i, (w, _) in enumerate(self._site_weights(mods, b)):
                if w.numel():
                    usage[i] += w.sum(0).float().cpu()
            for m in mods:
                m.record = None
        patch.commit_data["usage"] = usage
        patch.meta["basis_usage"] = [[round(float(x), 4) for x in row] for row in usage]

    def commit(self, patch) -> None:
        if not self.config.continual:
            return
        super().commit(patch)
        u = patch.commit_data.get("usage")
        if u is not None:
            self.usage = u.clone() if self.usage is None else self.usage + u

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state_dict()
        if self.usage is not None:
            tensors["usage"] = self.usage
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.usage = tensors.get("usage")
