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
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ...config import NonNegFloat, NonNegInt, PosFloat, PosInt
from ...errors import FactEditError
from ...fsutil import read_bundle, write_bundle
from ...lm.arch import weight_as_out_in
from ...lm.batch import make_batch, target_logits
from ...lm.hooks import Trace
from ...lm.load import LM, cache_root
from ...lm.prefix import block_inputs, pad_hidden, start_at
from ...patch.weights import Delta, WeightPatch
from ...types import EditRequest, EvalCase
from ..train import TrainResult, TrainSettings, train_loop
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
    # Adam; published 1e-5 at rank 1920: the residual branch's step grows with the rank, so at rank 512 the
    # spec's scaling √(1920/512) ≈ 1.9 gives 2e-5
    meta_lr: PosFloat = 2e-5
    edit_batch: PosInt = 256  # m, facts per meta-step (published 512 zsRE, 1024 FEVER)
    lm_batch: PosInt = 32  # facts per LM forward/backward
    # passes over the training facts: published one epoch of ⌊N/m⌋ ≈ 100 steps (FEVER); on the 9,102
    # CounterFact training facts at m = 256 one epoch is 36 steps, three give 108. 0: the untrained counterpart
    # (identity networks, η from the search, normalisers fitted on the training captures), for comparisons
    epochs: NonNegInt = 3
    loc_coef: NonNegFloat = 1.0  # weight of the locality loss
    grad_clip: PosFloat = 1.0
    seed: int = 0  # the networks' initialisation
    # our additions (specs/hypernetwork.md lists the official behaviour each departs from)
    eta_search: bool = True  # η from a grid search on the first edit batch (official: η starts at eta_init)
    val_size: NonNegInt = 256  # validation cases (0: none); the best validated state is kept (official: the last)
    val_every: PosInt = 10  # meta-steps between validations (and one at the end)
    cache_prefix: bool = True  # run the frozen blocks below the first edited layer once per training tuple
    # edit time only: every module's η multiplied by this (training ignores it). It scales the shift linearly;
    # used to tune the untrained counterpart to the trained editor's efficacy (issue 22, item 7)
    eta_scale: PosFloat = 1.0


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


@dataclass
class _Tuples:
    """The meta-training tuples of a list of cases: every case's edit requests (flattened; ``edit_of[i]`` indexes
    case i's), one equivalent and one unrelated (prompt, target) per case (None: no unrelated prompt), and, once
    cached, the hidden states entering the first edited block per tuple and kind."""

    edit: list[EditRequest]
    edit_of: list[list[int]]
    gen: list[tuple[str, str]]
    unrel: list[tuple[str, str] | None]
    hidden: dict[str, list[torch.Tensor | None]] | None = None

    @classmethod
    def of(cls, cases: list[EvalCase]) -> _Tuples:
        edit, edit_of, gen, unrel = [], [], [], []
        for case in cases:
            reqs, eq, un = _tuples(case)
            edit_of.append(list(range(len(edit), len(edit) + len(reqs))))
            edit += reqs
            gen.append(eq)
            unrel.append(un)
        return cls(edit, edit_of, gen, unrel)

    def prompts(self) -> dict[str, list[tuple[str, str] | None]]:
        return {"edit": [(r.prompt, r.target_new) for r in self.edit], "gen": self.gen, "unrel": self.unrel}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.prompts()).encode()).hexdigest()[:16]


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
        self._ddp = None  # the networks under DistributedDataParallel while meta-training on several ranks

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.nets)

    def _shift(self, path: str, cap, factored: bool = False):
        """Module ``path``'s shift from the captured U, G: S (d_in, d_out), or with ``factored`` the pair (L, R)
        with S = Lᵀ R of rank ≤ n (MALMEN: L = U, R = (UUᵀ + λI)⁻¹ D, the dual form; MEND: L = −η Ũ, R = G̃)."""
        name, i = self.slots[path]
        net = self.nets[name]
        U, G = cap.U[path], cap.G[path]  # (n, d_in), (n, d_out)
        ut, gt = net(U, G, i)
        eta = net.eta[i] * self.config.eta_scale  # (× 1.0 is exact: the default changes nothing)
        if self.aggregation == "ridge":
            D = value_differences(U, ut, gt, eta)
            return (U.double(), ridge_factors(U, D, net.lam(i))) if factored else ridge_solve(U, D, net.lam(i)).float()
        return (-eta * ut, gt) if factored else mend_sum(ut, gt, eta)

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

    def _first_layer(self) -> int:
        return min(int(l) for l in self.config.layers)

    def _tuples_of(self, lm: LM, cases: list[EvalCase], what: str) -> _Tuples:
        """The training tuples of ``cases``, with the hidden states entering the first edited block cached (on
        disk, by model, data and layer: the frozen blocks below run once per record for every training)."""
        t = _Tuples.of(cases)
        if not self.config.cache_prefix:
            return t
        layer = self._first_layer()
        key = hashlib.sha256(json.dumps([lm.fingerprint, layer, t.fingerprint()]).encode()).hexdigest()[:16]
        folder = Path(os.environ.get("FACTEDIT_PREFIX_CACHE") or cache_root() / "prefix") / key
        rank, world = _dist()
        if rank == 0 and read_bundle(folder, "hidden") is None:  # several ranks: the first computes for all
            self._cache_hidden(lm, t, folder, what)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        tensors = read_bundle(folder, "hidden")[0]
        log.info("%s: %s hidden states entering block %d read from %s", self.name, what, layer, folder)
        t.hidden = {k: [tensors.get(f"{k}.{i}") for i in range(len(v))] for k, v in t.prompts().items()}
        return t

    def _cache_hidden(self, lm: LM, t: _Tuples, folder: Path, what: str) -> None:
        layer = self._first_layer()
        log.info("%s: running blocks 0..%d once for the %d %s cases (cached in %s)", self.name, layer - 1,
                 len(t.gen), what, folder)
        bs = self.config.lm_batch
        items = t.prompts()
        hidden: dict[str, torch.Tensor] = {}
        with tqdm(total=sum(p is not None for v in items.values() for p in v), desc=f"{self.name} cache {what}",
                  leave=False) as bar:
            for k, pairs in items.items():
                idx = [i for i, p in enumerate(pairs) if p is not None]
                for s0 in range(0, len(idx), bs):
                    ch = idx[s0 : s0 + bs]
                    b = make_batch(lm, [pairs[i][0] for i in ch], [pairs[i][1] for i in ch])
                    for i, h in zip(ch, block_inputs(lm, b, layer)):
                        hidden[f"{k}.{i}"] = h
                    bar.update(len(ch))
        write_bundle(folder, hidden, {"model": lm.name, "fingerprint": lm.fingerprint, "layer": layer,
                                      "cases": len(t.gen)}, "hidden")

    def _run(self, lm: LM, t: _Tuples, kind: str, idx: list[int]):
        """(batch, context factory) for tuples ``idx`` of ``kind``: the context starts the forward at the cached layer."""
        pairs = [t.prompts()[kind][i] for i in idx]
        b = make_batch(lm, [p for p, _ in pairs], [tg for _, tg in pairs])
        if t.hidden is None:
            return b, contextlib.nullcontext
        h = pad_hidden([t.hidden[kind][i] for i in idx], b)
        return b, lambda: start_at(lm, self._first_layer(), h)

    def _capture_cached(self, lm: LM, t: _Tuples, e_idx: list[int]):
        hidden = [t.hidden["edit"][j] for j in e_idx] if t.hidden is not None else None
        return capture(lm, [t.edit[j] for j in e_idx], list(self.slots), self.config.tokens, self.config.lm_batch,
                       hidden=hidden, layer=self._first_layer() if hidden is not None else None)

    def _update_norms(self, cap) -> None:
        for path, (name, _) in self.slots.items():
            self.nets[name].norm.update(torch.cat([cap.U[path], cap.G[path]], -1))

    def _normalise_on(self, lm: LM, t: _Tuples, chunk: list[int]) -> None:
        self._update_norms(self._capture_cached(lm, t, [j for i in chunk for j in t.edit_of[i]]))

    def _losses(self, lm: LM, t: _Tuples, chunk: list[int], update_norm: bool = True,
                stats: bool = False, sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(generalisation NLL, locality KL) for the edit batch of cases ``chunk``: capture, (update the
        normalisers), predict the shifts with the networks' graph kept, mount them, take both losses.

        sharded (meta-training under torch.distributed): this rank captures and scores its contiguous share of
        ``chunk``; the captured rows of every rank are gathered (in rank order, i.e. the chunk's order) so each
        rank predicts and solves the same shifts, and each rank's losses are scaled so that the mean over ranks
        that DistributedDataParallel takes of their gradients is the gradient of the whole batch's loss."""
        c = self.config
        rank, world = _dist() if sharded else (0, 1)
        mine = _share(chunk, rank, world)
        e_idx = [j for i in mine for j in t.edit_of[i]]
        cap = self._capture_cached(lm, t, e_idx) if e_idx else None
        if world > 1:
            cap = _gather_capture(cap, list(self.slots), lm)
        if update_norm:
            self._update_norms(cap)
        S = self._ddp(cap) if (sharded and self._ddp is not None) else self.shifts(cap)
        if not mine:  # nothing to score here: a zero loss that still reaches every parameter (for DDP)
            zero = sum(x.sum() for x in S.values()) * 0.0
            return zero, zero, {}
        gen, gen_ctx = self._run(lm, t, "gen", mine)
        u_idx = [i for i in mine if t.unrel[i] is not None]
        want_loc = (c.loc_coef > 0 or stats) and bool(_all_sum(len(u_idx), world))
        out: dict = {}
        if want_loc and u_idx:
            loc, loc_ctx = self._run(lm, t, "unrel", u_idx)
            with torch.no_grad(), loc_ctx():
                pre = target_logits(lm, loc)[0]  # (N, V) unedited, at the unrelated targets' positions
        with self._mounted(lm, S):
            with gen_ctx():
                logits, labels, rows = target_logits(lm, gen)
            nll = -torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]
            gen_loss = _row_mean(nll, rows, len(mine)).sum() * (world / len(chunk))  # the chunk's mean
            if stats:
                out["gen_acc"] = float(_row_mean((logits.argmax(-1) == labels).float(), rows, len(mine)).mean())
            kl = gen_loss * 0.0
            if want_loc and u_idx:
                with loc_ctx():
                    post = target_logits(lm, loc)[0]
                lp_pre, lp_post = torch.log_softmax(pre.float(), -1), torch.log_softmax(post.float(), -1)
                kl_pos = (lp_pre.exp() * (lp_pre - lp_post)).sum(-1)  # KL(pre ‖ post) per position
                kl = kl_pos.sum() * (world / _all_sum(kl_pos.shape[0], world))  # mean over the chunk's positions
                if stats:
                    out["loc_agree"] = float((pre.argmax(-1) == post.argmax(-1)).float().mean())
            if stats:
                eb, e_ctx = self._run(lm, t, "edit", e_idx)
                with e_ctx():
                    el, elab, erows = target_logits(lm, eb)
                out["edit_acc"] = float(_row_mean((el.argmax(-1) == elab).float(), erows, len(e_idx)).mean())
        return gen_loss, kl, out

    def _meta_loss(self, lm: LM, t: _Tuples, chunk: list[int]) -> torch.Tensor:
        gen, kl = self._losses(lm, t, chunk, sharded=True)[:2]
        return gen + self.config.loc_coef * kl

    @torch.no_grad()
    def _search_eta(self, lm: LM, t: _Tuples, chunk: list[int]) -> float:
        """Our departure (specs/hypernetwork.md: η starts at 1e-6 and Adam at 1e-5 spends the first ~100
        meta-steps growing it): η of every module set to the grid value, 1e-6 .. 1e-1, with the lowest meta loss
        on the first edit batch, with the untrained networks."""
        best = (float("inf"), self.config.eta_init)
        saved = [b.clone() for net in self.nets.values() for b in net.norm.buffers()]
        self._normalise_on(lm, t, chunk)  # the networks need statistics; training re-reads this batch itself
        for eta in [10.0 ** e for e in range(-6, 0)] + [3 * 10.0 ** e for e in range(-6, -1)]:
            for net in self.nets.values():
                net.eta.fill_(eta)
            gen, kl, _ = self._losses(lm, t, chunk, update_norm=False)
            loss = float(gen + self.config.loc_coef * kl)
            log.debug("%s: η %.0e meta loss %.4f", self.name, eta, loss)
            if loss < best[0]:
                best = (loss, eta)
        for net in self.nets.values():
            net.eta.fill_(best[1])
        for dst, src in zip([b for net in self.nets.values() for b in net.norm.buffers()], saved):
            dst.copy_(src)
        log.info("%s: η initialised to %.0e by a search on the first edit batch (meta loss %.4f)", self.name, best[1],
                 best[0])
        return best[1]

    def _validate(self, lm: LM, t: _Tuples) -> dict:
        """Edit the validation slice in edit batches of m facts and measure: meta loss (the selection score),
        edit and equivalent token accuracy, agreement with the unedited model at the unrelated targets."""
        for net in self.nets.values():
            net.eval()
        m = self.config.edit_batch
        sums: dict[str, float] = {}
        n = len(t.gen)
        for i in range(0, n, m):
            chunk = list(range(i, min(i + m, n)))
            with torch.no_grad():
                gen, kl, st = self._losses(lm, t, chunk, update_norm=False, stats=True)
            w = len(chunk) / n
            st["loss"] = float(gen + self.config.loc_coef * kl)
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + w * float(v)
        for net in self.nets.values():
            net.train()
        return sums

    def _fit(self, lm: LM, cases: list[EvalCase], checkpoint: Path | None,
             val_cases: list[EvalCase] | None = None) -> dict:
        c = self.config
        if c.eta_scale != 1.0:
            raise FactEditError(f"{self.name}: eta_scale is an edit-time setting; train with eta_scale = 1")
        if any(_tuples(case)[2] is None for case in cases):
            log.warning("%s: some training cases have no unrelated prompt; their locality term is left out", self.name)
        train = self._tuples_of(lm, cases, "training")
        val = self._tuples_of(lm, val_cases[: c.val_size], "validation") if val_cases and c.val_size else None
        chunks = [list(range(i, min(i + c.edit_batch, len(cases)))) for i in range(0, len(cases), c.edit_batch)]
        params = [p for net in self.nets.values() for p in net.parameters()]
        norms = [b for net in self.nets.values() for b in net.norm.buffers()]
        best = [p.detach().clone() for p in params] + [b.clone() for b in norms]  # the best validated state
        best_score = torch.full((), float("inf"), dtype=torch.float64)
        state = norms + best + [best_score]
        resuming = checkpoint is not None and read_bundle(checkpoint) is not None
        rank, world = _dist()
        if world > 1 and c.epochs > 0:  # DistributedDataParallel averages the ranks' gradients (no buffer
            # broadcast: the normalisers see the gathered rows on every rank alike); MEND's log-λ takes no gradient
            from torch.nn.parallel import DistributedDataParallel

            self._ddp = DistributedDataParallel(_Shifter(self), broadcast_buffers=False, find_unused_parameters=True)
            log.info("%s: meta-training on %d ranks (this is rank %d)", self.name, world, rank)
        for net in self.nets.values():
            net.train()
        if c.eta_search and not resuming:
            self._search_eta(lm, train, chunks[0])
        history: list[dict] = []

        def on_step(n: int) -> dict[str, str]:
            etas = torch.cat([net.eta.detach() for net in self.nets.values()])
            post = {"eta": f"{float(etas.mean()):.2g}"}
            if val is not None and (n % c.val_every == 0 or n == len(chunks) * c.epochs):
                v = self._validate(lm, val)
                v["step"] = n
                history.append(v)
                log.info("%s: step %d validation %s", self.name, n,
                         " ".join(f"{k} {x:.4f}" for k, x in v.items() if k != "step"))
                if v["loss"] < float(best_score):
                    best_score.fill_(v["loss"])
                    for dst, src in zip(best, params + norms):
                        dst.copy_(src.detach())
                post["val"] = f"{v['loss']:.3f}"
            return post

        settings = TrainSettings(steps=c.epochs, lr=c.meta_lr, grad_clip=c.grad_clip, desc=f"{self.name} meta",
                                 checkpoint_every=1, log_every=1)
        if c.epochs == 0:  # untrained: only the normalisers see the training captures (no meta-step)
            for ch in tqdm(chunks, desc=f"{self.name} normalisers", leave=False, disable=None if rank == 0 else True):
                self._normalise_on(lm, train, ch)
            res = TrainResult(steps=0, loss=float("nan"))
            if val is not None:
                on_step(0)
        else:
            try:
                res = train_loop(params, chunks, lambda ch: self._meta_loss(lm, train, ch), settings,
                                 weights=[len(ch) for ch in chunks], checkpoint=checkpoint, state=state,
                                 on_step=on_step, progress=rank == 0, write_checkpoints=rank == 0)
            finally:
                self._ddp = None
        if c.epochs > 0 and val is not None and torch.isfinite(best_score):
            with torch.no_grad():  # keep the best validated state (the official code keeps the last: our addition)
                for dst, src in zip(params + norms, best):
                    dst.copy_(src)
        for net in self.nets.values():
            net.eval()
        etas = {name: [round(float(e), 8) for e in net.eta.detach()] for name, net in self.nets.items()}
        if not all(torch.isfinite(p).all() for p in params):
            raise FactEditError(f"{self.name}: meta-training produced non-finite parameters; lower meta_lr")
        out = {"meta_loss": res.loss, "passes": res.steps, "meta_steps": res.steps * len(chunks),
               "grad_norm": res.grad_norm, "eta": etas}
        if val is not None:
            out.update({"val_best_loss": float(best_score), "val_cases": len(val.gen), "validation": history})
        return out


def _dist() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(chunk: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of ``chunk`` (sizes differ by at most one)."""
    q, r = divmod(len(chunk), world)
    start = rank * q + min(rank, r)
    return chunk[start : start + q + (rank < r)]


def _all_sum(n: int, world: int) -> int:
    if world == 1:
        return n
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t)
    return int(t)


def _gather_rows(x: torch.Tensor, device) -> torch.Tensor:
    """Every rank's rows of x (n_r, d), concatenated in rank order (all-gather of padded blocks)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    most = max(int(k) for k in sizes)
    pad = torch.zeros((max(most, 1), x.shape[1]), dtype=x.dtype, device=device)
    pad[: x.shape[0]] = x.to(device)
    outs = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(outs, pad)
    return torch.cat([o[: int(k)] for o, k in zip(outs, sizes)]).to(x.device)


def _gather_capture(cap, paths: list[str], lm: LM):
    """The captures of every rank as one (rows in rank order); ``cap`` None: this rank captured nothing."""
    import torch.distributed as dist

    from .capture import Captured

    device = lm.device if dist.get_backend() == "nccl" else torch.device("cpu")
    U, G = {}, {}
    for p in paths:
        d_out, d_in = weight_as_out_in(lm.model.get_submodule(p), lm.arch).shape
        u = cap.U[p] if cap is not None else torch.zeros((0, d_in))
        g = cap.G[p] if cap is not None else torch.zeros((0, d_out))
        U[p], G[p] = _gather_rows(u, device), _gather_rows(g, device)
    fact = torch.zeros(U[paths[0]].shape[0], dtype=torch.long)  # row ownership is not needed after the gather
    return Captured(U, G, fact)


class _Shifter(nn.Module):
    """The editor networks as one module whose forward predicts the shifts: what DistributedDataParallel wraps."""

    def __init__(self, editor: HyperEditor) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(editor.nets)
        self.editor = editor

    def forward(self, cap) -> dict[str, torch.Tensor]:
        return self.editor.shifts(cap)


def _row_mean(x: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row mean of per-position values x (N,) whose rows are ``rows`` (N,): (n,)."""
    total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, rows, x)
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, rows, torch.ones_like(x))
    return total / count.clamp(min=1)


class MALMENEditor(HyperEditor):
    name = "malmen"
    aggregation = "ridge"
    Config = HyperConfig


class MENDEditor(HyperEditor):
    name = "mend"
    aggregation = "sum"
    Config = MENDConfig
