"""MEND and MALMEN as trained editors (specs/hypernetwork.md): one loop, two aggregations.

Editing (``compute``): capture the keys U and value gradients G of the edited MLP out-projections for the
requests (one forward and backward of the unedited model), run the editor network of each weight shape on
[u; g], and aggregate the per-token shifts into one shift per module: MEND sums them, S = −η Ũᵀ G̃; MALMEN solves
S* = (UᵀU + λI)⁻¹ Uᵀ D for the value differences d_j = −η (u_j · ũ_j) g̃_j. The shift is a weight patch.

Meta-training (``fit``): for each edit batch of m facts, capture, update the normalisers, predict the shifts with
the networks' graph kept, mount them on the frozen model (a hook adds x S to each module's output), take the
generalisation loss (target NLL on the equivalent prompts) and the locality loss (KL between the unedited and the
edited model's next-token distributions at the unrelated prompts' target positions), and back-propagate through
the solve into the networks: the exact meta-gradient (at CPU scale the networks' graph fits, so the official
code's memory-saving re-run is not needed). Gradient clipping and Adam through ``methods.train.train_loop``,
resumable per edit batch.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from ...config import NonNegFloat, NonNegInt, PosFloat, PosInt
from ...errors import FactEditError
from ...lm.arch import weight_as_out_in
from ...lm.batch import batch_logits, make_batch, target_nll
from ...lm.hooks import Trace
from ...lm.load import LM
from ...patch.weights import Delta, WeightPatch
from ...types import EditRequest, EvalCase
from ..train import TrainSettings, train_loop
from ..trained import TrainedEditor
from .aggregate import mend_sum, ridge_factors, ridge_solve, value_differences
from .capture import capture
from .nets import EditorNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HyperConfig:
    layers: tuple[int, ...] = (24, 25, 26, 27, 28, 29)  # edited MLP out-projections (SmolLM2: the last six)
    rank: PosInt = 512  # of the residual blocks (published 1920 = 91% of D = 2,112 on SmolLM2; spec §6)
    n_blocks: NonNegInt = 2
    tokens: Literal["ans", "all"] = "ans"  # rows: target-predicting positions (MALMEN) or every position
    eta_init: PosFloat = 1e-6  # η_ℓ at the start (published)
    lam_init: PosFloat = 1.0  # λ_ℓ = e^{λ̃_ℓ} at the start (published: λ̃ = 0)
    meta_lr: PosFloat = 1e-5  # Adam (published)
    edit_batch: PosInt = 64  # m, facts per meta-step
    lm_batch: PosInt = 32  # facts per LM forward/backward
    epochs: PosInt = 1  # passes over the training facts (published: one)
    loc_coef: NonNegFloat = 1.0  # weight of the locality loss
    grad_clip: PosFloat = 1.0
    seed: int = 0  # the networks' initialisation


@dataclass(frozen=True)
class MENDConfig(HyperConfig):
    tokens: Literal["ans", "all"] = "all"  # the official repo's MEND baseline keys every position


def _tuples(case: EvalCase) -> tuple[list[EditRequest], tuple[str, str], tuple[str, str] | None]:
    """(edit requests, equivalent (prompt, target), unrelated (prompt, target)) of a training case."""
    r = case.request
    equiv = (case.paraphrase_prompts[0] if case.paraphrase_prompts else r.prompt, r.target_new)
    if case.neighborhood_prompts:
        unrel = (case.neighborhood_prompts[0], case.neighborhood_target or r.target_true)
    elif case.locality:
        unrel = case.locality[0]
    else:
        unrel = None
    return list(case.requests), equiv, unrel


class HyperEditor(TrainedEditor):
    """The shared machinery; subclasses choose the aggregation."""

    aggregation: ClassVar[str] = "ridge"
    Config = HyperConfig

    def _paths(self, lm: LM) -> list[str]:
        return [lm.arch.mlp_out_path(int(l)) for l in sorted(self.config.layers)]

    def build(self, lm: LM) -> None:
        c = self.config
        shapes: dict[tuple[int, int], list[str]] = {}
        for path in self._paths(lm):
            d_out, d_in = weight_as_out_in(lm.model.get_submodule(path), lm.arch).shape
            shapes.setdefault((int(d_in), int(d_out)), []).append(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.nets = {f"net_{d_in}x{d_out}": EditorNet(d_in, d_out, len(ps), c.rank, c.n_blocks, c.eta_init)
                         for (d_in, d_out), ps in sorted(shapes.items())}
        for net in self.nets.values():
            with torch.no_grad():
                net.log_lam.fill_(float(torch.tensor(c.lam_init).log()))
        self.slots = {p: (f"net_{d_in}x{d_out}", i) for (d_in, d_out), ps in shapes.items() for i, p in enumerate(ps)}

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.nets)

    def _shift(self, path: str, cap, factored: bool = False):
        """Module ``path``'s shift from the captured U, G: S (d_in, d_out), or with ``factored`` the pair (L, R)
        with S = Lᵀ R of rank ≤ n (MALMEN: L = U, R = (UUᵀ + λI)⁻¹ D, the dual form; MEND: L = −η Ũ, R = G̃)."""
        name, i = self.slots[path]
        net = self.nets[name]
        U, G = cap.U[path], cap.G[path]  # (n, d_in), (n, d_out)
        ut, gt = net(U, G, i)
        if self.aggregation == "ridge":
            D = value_differences(U, ut, gt, net.eta[i])
            return (U.double(), ridge_factors(U, D, net.lam(i))) if factored else ridge_solve(U, D, net.lam(i)).float()
        return (-net.eta[i] * ut, gt) if factored else mend_sum(ut, gt, net.eta[i])

    def shifts(self, cap) -> dict[str, torch.Tensor]:
        """One shift S (d_in, d_out) per edited module from the captured U, G."""
        return {path: self._shift(path, cap) for path in self.slots}

    def _capture(self, lm: LM, requests) -> object:
        return capture(lm, requests, list(self.slots), self.config.tokens, self.config.lm_batch)

    @torch.no_grad()
    def _compute(self, lm: LM, requests: list[EditRequest]) -> WeightPatch:
        cap = self._capture(lm, requests)
        deltas = {}
        for path in self.slots:
            w = lm.model.get_submodule(path).weight
            n, d_in, d_out = cap.n_rows, cap.U[path].shape[1], cap.G[path].shape[1]
            if n * (d_in + d_out) < d_in * d_out:  # kept factored: ΔW = u vᵀ in the module's layout
                L, R = self._shift(path, cap, factored=True)
                a, b = R.T.to(w.dtype).contiguous(), L.T.to(w.dtype).contiguous()  # (d_out, n), (d_in, n)
                deltas[f"{path}.weight"] = Delta(u=a, v=b) if lm.arch.layout == "linear" else Delta(u=b, v=a)
            else:
                S = self._shift(path, cap).to(w.dtype)  # (d_in, d_out)
                deltas[f"{path}.weight"] = Delta(dense=(S.T if lm.arch.layout == "linear" else S).contiguous())
        return WeightPatch(method=self.name, config=self.config_dict(), base_fingerprint=lm.fingerprint,
                           requests=list(requests), meta={"preset": self.preset, "rows": cap.n_rows}, deltas=deltas)

    # ---- meta-training ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _mounted(self, lm: LM, S: dict[str, torch.Tensor]):
        """The shifts on the frozen model, differentiably: each module's output gains x S."""
        with contextlib.ExitStack() as stack:
            for path, s in S.items():
                def add(out, args, s=s):
                    return out + (args[0].to(s.dtype) @ s).to(out.dtype)  # (..., d_in) @ (d_in, d_out)

                stack.enter_context(Trace(lm.model.get_submodule(path), retain_output=False, edit_output=add))
            yield

    def _meta_loss(self, lm: LM, chunk: list[EvalCase]) -> torch.Tensor:
        c = self.config
        parts = [_tuples(case) for case in chunk]
        reqs = [r for p in parts for r in p[0]]
        cap = self._capture(lm, reqs)
        for path, (name, _) in self.slots.items():
            self.nets[name].norm.update(torch.cat([cap.U[path], cap.G[path]], -1))
        S = self.shifts(cap)
        gen = make_batch(lm, [p[1][0] for p in parts], [p[1][1] for p in parts])
        unrel = [p[2] for p in parts if p[2] is not None]
        loc_batch = make_batch(lm, [u[0] for u in unrel], [u[1] for u in unrel]) if unrel and c.loc_coef > 0 else None
        if loc_batch is not None:
            with torch.no_grad():
                pre, labels = batch_logits(lm, loc_batch)  # (B, K, V) unedited
        with self._mounted(lm, S):
            loss = target_nll(lm, gen).mean()
            if loc_batch is not None:
                post, _ = batch_logits(lm, loc_batch)
                valid = labels >= 0  # the positions that predict the unrelated targets
                lp_pre, lp_post = torch.log_softmax(pre.float(), -1), torch.log_softmax(post.float(), -1)
                kl = (lp_pre.exp() * (lp_pre - lp_post)).sum(-1)  # KL(pre ‖ post) per position
                loss = loss + c.loc_coef * (kl * valid).sum() / valid.sum().clamp(min=1)
        return loss

    def _fit(self, lm: LM, cases: list[EvalCase], checkpoint: Path | None) -> dict:
        c = self.config
        if any(_tuples(case)[2] is None for case in cases):
            log.warning("%s: some training cases have no unrelated prompt; their locality term is left out", self.name)
        chunks = [cases[i : i + c.edit_batch] for i in range(0, len(cases), c.edit_batch)]
        params = [p for net in self.nets.values() for p in net.parameters()]
        state = [b for net in self.nets.values() for b in net.norm.buffers()]
        for net in self.nets.values():
            net.train()
        settings = TrainSettings(steps=c.epochs, lr=c.meta_lr, grad_clip=c.grad_clip, desc=f"{self.name} meta",
                                 checkpoint_every=1, log_every=1)
        res = train_loop(params, chunks, lambda ch: self._meta_loss(lm, ch), settings, weights=[len(ch) for ch in chunks],
                         checkpoint=checkpoint, state=state)
        for net in self.nets.values():
            net.eval()
        etas = {name: [round(float(e), 8) for e in net.eta.detach()] for name, net in self.nets.items()}
        if not all(torch.isfinite(p).all() for p in params):
            raise FactEditError(f"{self.name}: meta-training produced non-finite parameters; lower meta_lr")
        return {"meta_loss": res.loss, "passes": res.steps, "meta_steps": res.steps * len(chunks),
                "grad_norm": res.grad_norm, "eta": etas}


class MALMENEditor(HyperEditor):
    name = "malmen"
    aggregation = "ridge"
    Config = HyperConfig


class MENDEditor(HyperEditor):
    name = "mend"
    aggregation = "sum"
    Config = MENDConfig
