"""MeG (Wan et al., ICLR 2026): massive editing by dynamic weight generation. ``factedit train --method meg``
trains it *on the facts to edit*; the trained editor's patch (``MeGModule``) is the edit.

Stages (each resumable inside the training checkpoint folder, ``OUT.partial``; each stage's time is reported):

0. the unedited model's greedy answers to the template-wrapped edit prompts and locality prompts (kept: how many
   it already answers with the target, and the locality answers the generation protocol compares with);
1. the text encoder's last layer, InfoNCE on (paraphrase, original) pairs of *auxiliary* records disjoint from the
   edit set (the last ``enc_records`` of ``aux_data``, texts in the question template), checkpointed per epoch;
2. the familiarity network on the encoder's embeddings of the raw edit questions with random labels; ε is chosen
   on a pseudo-edit validation set (a second familiarity network trained the same way on the first
   ``val_records`` auxiliary records, its entropies on their paraphrases against their neighbourhood prompts), so
   no evaluated prompt is looked at; the gate's rates on the edit set's own paraphrase and locality prompts are
   reported beside;
3. one neuron per fact (``fit.fit_neurons``), checkpointed per batch; only successful fits train the generator;
4. the generator (DiT or MLP) on (encoder embedding of the template-wrapped question, neuron × scale) with the
   hybrid diffusion loss, checkpointed every ``gen_ckpt_every`` epochs; every ``gen_eval_every`` epochs the
   reconstruction error of sampled neurons on a fixed subset is measured and the best state is kept (as the
   authors select checkpoints).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ...config import NonNegInt, PosFloat, PosInt, Probability
from ...errors import FactEditError
from ...fsutil import read_bundle, write_bundle
from ...lm.generate import greedy_answers
from ...lm.load import LM
from ...patch.modules import ModulePatch, Placement
from ...types import EditRequest, EvalCase
from ..trained import TrainedEditor
from .diffusion import Diffusion
from .encoder import TextEncoder, train_encoder
from .familiarity import Familiarity, choose_epsilon, gate_rates, random_labels, train_familiarity
from .fit import FitResult, fit_neurons, matches
from .module import MeGModule, build_generator
from .neuron import initial_neuron, neuron_shape, neuron_site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeGConfig:
    layer: NonNegInt = 13  # the layer whose FFN gets the neuron
    # the question template of the generation protocol ({q}: the prompt; auto: the model family's, as the
    # evaluation's); the neuron is fitted after it and the gate reads the question inside it
    template: str = "auto"
    max_new_tokens: PosInt = 20
    # auxiliary records (disjoint from the edit set): the encoder's pairs and the ε validation; a path, or one
    # relative to the data folder, read with benchmark ``aux_bench``'s loader
    aux_data: str = "counterfact/counterfact-train.json.gz"
    aux_bench: str = "counterfact"
    # stage 1: text encoder
    encoder: str = "minilm"  # the pip package's all-MiniLM-L6-v2, or a local BERT-like folder
    pooling: Literal["cls", "mean"] = "cls"
    enc_records: NonNegInt = 2000  # the last records of aux_data (0: keep the encoder as it is)
    enc_epochs: NonNegInt = 100
    enc_lr: PosFloat = 1e-4
    enc_tau: PosFloat = 1.0
    enc_batch: PosInt = 4000
    # stage 2: familiarity network and gate
    fam_blocks: PosInt = 5
    fam_classes: PosInt = 10
    fam_epochs: PosInt = 1000
    fam_lr: PosFloat = 1e-3
    fam_batch: PosInt = 2000
    epsilon: PosFloat | None = None  # the gate's threshold (nats); None: chosen on the pseudo-edit validation
    val_records: NonNegInt = 0  # the first records of aux_data for choosing ε (0: as many as the edit set)
    gate: bool = True  # False: every query gets its generated neuron (the ablation without the gate)
    # stage 3: neuron fitting
    fit_lr: PosFloat = 0.02
    fit_steps: PosInt = 50
    fit_batch: PosInt = 16
    fit_cosine: bool = False
    neuron_seed: int = 0
    # stage 4: generator
    generator: Literal["dit", "mlp"] = "dit"
    # x0 = neuron × scale. Published 100 (GPT-J's neuron entries are ~0.01: x0 of unit size); None: 1 / the RMS of
    # the fitted neurons, the same principle for any model (SmolLM2's entries are ~0.15)
    scale: PosFloat | None = None
    dit_hidden: PosInt = 384
    dit_depth: PosInt = 6
    dit_heads: PosInt = 6
    patch: PosInt = 96
    zero_init: bool = False
    mlp_hidden: PosInt = 1024
    mlp_depth: PosInt = 3
    cond_dropout: Probability = 0.2
    diffusion_steps: PosInt = 1000
    sample_steps: PosInt = 50
    gen_lr: PosFloat = 1e-4
    gen_epochs: NonNegInt = 2000
    gen_batch: PosInt = 512
    gen_ckpt_every: PosInt = 50
    gen_eval_every: PosInt = 200
    gen_eval_rows: PosInt = 64
    seed: int = 0


def _flat_opt(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state as flat tensors plus JSON (no pickle)."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        keys = []
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
                keys.append(k)
            else:
                meta["state"].setdefault(str(pid), {})[k] = v
        meta["state"].setdefault(str(pid), {})["_tensors"] = keys
    return tensors, meta


def _load_opt(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {}
    for pid, st in meta["state"].items():
        d = {k: v for k, v in st.items() if k != "_tensors"}
        for k in st["_tensors"]:
            d[k] = tensors[f"opt.{pid}.{k}"]
        state[int(pid)] = d
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_main(folder: Path, tensors: dict, record: dict) -> None:
    """Checkpoint writes from rank 0 only (under torchrun every rank runs the same stages)."""
    if _world()[0] == 0:
        write_bundle(folder, tensors, record)


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class MeGEditor(TrainedEditor):
    name = "meg"
    Config = MeGConfig

    def __init__(self, config: Any | None = None, preset: str | None = None) -> None:
        super().__init__(config, preset)
        self.encoder: TextEncoder | None = None
        self.fam: Familiarity | None = None
        self.gen: nn.Module | None = None
        self.shape = None

    # ---- modules ----------------------------------------------------------------------------------------------
    def check_config(self, lm: LM) -> None:
        super().check_config(lm)
        if self.config.template == "auto":
            from ...eval.generation import question_template

            self.config = replace(self.config, template=question_template(lm))
        if "{q}" not in self.config.template:
            raise FactEditError(f"meg template {self.config.template!r} has no {{q}} for the question")
        if self.config.generator == "dit" and self.config.dit_hidden % self.config.dit_heads:
            raise FactEditError(f"meg: dit_hidden {self.config.dit_hidden} is not a multiple of dit_heads "
                                f"{self.config.dit_heads}")

    def validate(self, lm: LM, requests):
        if self.config.template == "auto":  # an editor constructed directly, not through create()
            self.check_config(lm)
        return super().validate(lm, requests)

    def build(self, lm: LM) -> None:
        c = self.config
        self.shape = neuron_shape(lm, c.layer)
        if self.encoder is None:
            self.encoder = TextEncoder.load(c.encoder, c.pooling)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation; the caller's generator is left alone
            torch.manual_seed(c.seed)
            self.fam = Familiarity(self.encoder.dim, c.fam_blocks, c.fam_classes)
            self.gen = build_generator(c.generator, self.shape.size, self.encoder.dim, self._gen_spec())

    def _gen_spec(self) -> dict:
        c = self.config
        return {"dit_hidden": c.dit_hidden, "dit_depth": c.dit_depth, "dit_heads": c.dit_heads, "patch": c.patch,
                "zero_init": c.zero_init, "mlp_hidden": c.mlp_hidden, "mlp_depth": c.mlp_depth,
                "cond_dropout": c.cond_dropout}

    def modules(self) -> dict[str, nn.Module]:
        return {"enc_top": self.encoder.top, "fam": self.fam, "gen": self.gen}

    def q(self, prompt: str) -> str:
        return self.config.template.replace("{q}", prompt)

    @property
    def epsilon(self) -> float:
        if self.config.epsilon is not None:
            return float(self.config.epsilon)
        eps = ((self.trained or {}).get("metrics") or {}).get("epsilon")
        if eps is None:
            raise FactEditError("meg: no ε (set epsilon=..., or train the editor to choose it)")
        return float(eps)

    @property
    def scale(self) -> float:
        if self.config.scale is not None:
            return float(self.config.scale)
        got = ((self.trained or {}).get("metrics") or {}).get("scale") or getattr(self, "_scale", None)
        if got is None:
            raise FactEditError("meg: no scale (set scale=..., or train the editor to derive it)")
        return float(got)

    def module_spec(self) -> dict:
        c = self.config
        return {"shape": self.shape.to_dict(), "layer": c.layer, "template": c.template, "epsilon": self.epsilon,
                "gate": c.gate, "scale": self.scale, "seed": c.seed, "encoder": c.encoder, "pooling": c.pooling,
                "fam_blocks": c.fam_blocks, "fam_classes": c.fam_classes, "generator": c.generator,
                "gen": self._gen_spec(), "diffusion_steps": c.diffusion_steps, "sample_steps": c.sample_steps}

    def _compute(self, lm: LM, requests: list[EditRequest]) -> ModulePatch:
        mod = MeGModule(self.module_spec(), encoder=self.encoder)
        mod.fam.load_state_dict(self.fam.state_dict())
        mod.gen.load_state_dict(self.gen.state_dict())  # enc_top is the editor's own last layer
        return ModulePatch(method=self.name, config=self.config_dict(), base_fingerprint=lm.fingerprint,
                           requests=list(requests), placements=[Placement(neuron_site(self.config.layer), "every")],
                           modules=[mod], meta={"n_trained": (self.trained or {}).get("n_train")})

    # ---- training ---------------------------------------------------------------------------------------------
    def _aux_cases(self) -> list[EvalCase]:
        from ...data.paths import default_data_dir
        from ...eval.benches import get_benchmark

        path = Path(self.config.aux_data)
        if not path.is_file():
            root = default_data_dir()
            if root is None or not (root / path).is_file():
                raise FactEditError(f"meg: aux_data '{path}' not found (set aux_data=FILE or the data folder)")
            path = root / path
        return get_benchmark(self.config.aux_bench).load(path, None, {"zsre_target": "alt"})

    def _fit(self, lm: LM, cases: list[EvalCase], checkpoint: Path | None,
             val_cases: list[EvalCase] | None = None) -> dict[str, Any]:
        c = self.config
        ck = Path(checkpoint) if checkpoint else None
        if ck:
            ck.mkdir(parents=True, exist_ok=True)
        times: dict[str, float] = {}
        metrics: dict[str, Any] = {"stage_s": times}
        reqs = [cs.request for cs in cases]
        prompts = [self.q(r.prompt) for r in reqs]
        targets = [r.target_new for r in reqs]

        def timed(name, fn):
            t0 = time.perf_counter()
            out = fn()
            times[name] = round(times.get(name, 0.0) + time.perf_counter() - t0, 2)
            return out

        pre = timed("0_pre_answers", lambda: self._stage0(lm, cases, ck))
        metrics["pre_known"] = sum(matches(a, t) for a, t in zip(pre["edit"], targets))
        aux = self._aux_cases() if (c.enc_records and c.enc_epochs) or c.epsilon is None else []
        metrics["encoder_loss"] = timed("1_encoder", lambda: self._stage1(aux, ck))
        metrics.update(timed("2_familiarity", lambda: self._stage2(cases, aux, ck)))
        fit = timed("3_neurons", lambda: self._stage3(lm, prompts, targets, ck))
        metrics["fit_success"] = int(fit.success.sum())
        metrics["fit_n"] = len(targets)
        metrics.update(timed("4_generator", lambda: self._stage4(prompts, fit, ck)))
        log.info("meg: stage times %s", times)
        return metrics

    def _stage0(self, lm: LM, cases: list[EvalCase], ck: Path | None) -> dict:
        import json

        f = ck / "stage0.json" if ck else None
        if f and f.is_file():
            return json.loads(f.read_text())
        edit = greedy_answers(lm, [self.q(cs.request.prompt) for cs in cases], self.config.max_new_tokens)
        loc_p = [self.q(cs.neighborhood_prompts[0]) for cs in cases if cs.neighborhood_prompts]
        out = {"edit": edit, "locality": greedy_answers(lm, loc_p, self.config.max_new_tokens) if loc_p else []}
        if f and _world()[0] == 0:
            from ...fsutil import write_json

            write_json(f, out)
        return out

    def _stage1(self, aux: list[EvalCase], ck: Path | None) -> list[float]:
        c = self.config
        if not c.enc_records or not c.enc_epochs:
            return []
        pairs = [(self.q(a.paraphrase_prompts[0]), self.q(a.request.prompt)) for a in aux if a.paraphrase_prompts]
        pairs = pairs[-c.enc_records :]
        folder = ck / "encoder" if ck else None
        got = read_bundle(folder) if folder else None
        start, losses = 0, []
        if got:
            tensors, rec = got
            self.encoder.load_trainable(_prefixed(tensors, "top."))
            start, losses = rec["epoch"], rec["losses"]
            if start >= c.enc_epochs:
                return losses
        def on_epoch(ep, opt, so_far):
            if ep < 0:  # resuming: the optimiser state saved with the encoder
                _load_opt(opt, got[0], got[1]["opt"])
                return
            if folder and (ep % 10 == 0 or ep == c.enc_epochs):
                t, m = _flat_opt(opt)
                tensors = {**{f"top.{k}": v for k, v in self.encoder.trainable_state().items()}, **t}
                _write_main(folder, tensors, {"epoch": ep, "losses": losses + so_far, "opt": m})

        new = train_encoder(self.encoder, [p for p, _ in pairs], [o for _, o in pairs], c.enc_epochs, lr=c.enc_lr,
                            tau=c.enc_tau, batch_size=c.enc_batch, seed=c.seed + 1, start_epoch=start,
                            on_epoch=on_epoch)
        return losses + new

    def _train_fam(self, net: Familiarity, emb: torch.Tensor, folder: Path | None, tag: str) -> list[float]:
        c = self.config
        labels = random_labels(emb.shape[0], c.fam_classes, c.seed)
        got = read_bundle(folder) if folder else None
        if got and got[1].get("done"):
            net.load_state_dict(_prefixed(got[0], "net."))
            return got[1]["losses"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed + 2)
            losses = train_familiarity(net, emb, labels, c.fam_epochs, lr=c.fam_lr, batch_size=c.fam_batch,
                                       seed=c.seed)
        if folder:
            _write_main(folder, {f"net.{k}": v for k, v in net.state_dict().items()},
                         {"done": True, "losses": losses[-5:], "tag": tag})
        return losses[-5:]

    def _stage2(self, cases: list[EvalCase], aux: list[EvalCase], ck: Path | None) -> dict:
        c = self.config
        enc = self.encoder
        out: dict[str, Any] = {}
        emb = enc.embed([cs.request.prompt for cs in cases])  # the raw questions, no template
        out["familiarity_loss"] = self._train_fam(self.fam, emb, ck / "familiarity" if ck else None, "edit")
        para = [cs.paraphrase_prompts[0] for cs in cases if cs.paraphrase_prompts]
        loc = [cs.neighborhood_prompts[0] for cs in cases if cs.neighborhood_prompts]
        if c.epsilon is None:
            val = [a for a in aux[: c.val_records or len(cases)] if a.paraphrase_prompts and a.neighborhood_prompts]
            if not val:
                raise FactEditError("meg: no auxiliary records with a paraphrase and a neighbourhood prompt to "
                                    "choose ε on (set epsilon=...)")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed + 3)
                shadow = Familiarity(enc.dim, c.fam_blocks, c.fam_classes)
            self._train_fam(shadow, enc.embed([a.request.prompt for a in val]),
                            ck / "familiarity_val" if ck else None, "validation")
            pos = shadow.entropy(enc.embed([a.paraphrase_prompts[0] for a in val]))
            neg = shadow.entropy(enc.embed([a.neighborhood_prompts[0] for a in val]))
            eps, rates = choose_epsilon(pos, neg)
            out["epsilon"] = round(eps, 6)
            out["gate_validation"] = {**rates, "n": len(val)}
        eps = c.epsilon if c.epsilon is not None else out["epsilon"]
        if para and loc:
            out["gate_edit_set"] = {**gate_rates(self.fam.entropy(enc.embed(para)), self.fam.entropy(enc.embed(loc)),
                                                 eps),
                                    "edit_prompts_in": round(float((self.fam.entropy(emb) < eps).float().mean()), 4)}
        return out

    def _stage3(self, lm: LM, prompts: list[str], targets: list[str], ck: Path | None) -> FitResult:
        c = self.config
        folder = ck / "neurons" if ck else None
        done = None
        got = read_bundle(folder) if folder else None
        if got:
            t, rec = got
            done = FitResult(t["weights"], t["success"].bool(), rec["answers"], t["loss"])
            if len(done.answers) >= len(prompts):
                return done

        def save(res: FitResult) -> None:
            if folder:
                _write_main(folder, {"weights": res.weights, "success": res.success.to(torch.uint8),
                                      "loss": res.final_loss}, {"answers": res.answers})

        init = initial_neuron(self.shape, c.neuron_seed)
        return fit_neurons(lm, self.shape, c.layer, prompts, targets, init, c.fit_lr, c.fit_steps,
                           batch_size=c.fit_batch, cosine=c.fit_cosine, done=done, on_batch=save)

    def _stage4(self, prompts: list[str], fit: FitResult, ck: Path | None) -> dict:
        c = self.config
        ok = [i for i in range(len(prompts)) if bool(fit.success[i])]
        if not ok or not c.gen_epochs:
            return {"gen_rows": len(ok), "gen_loss": None}
        cond = self.encoder.embed([prompts[i] for i in ok])
        w = fit.weights[ok]
        self._scale = c.scale if c.scale is not None else round(float(1.0 / w.pow(2).mean().sqrt()), 4)
        out = train_generator(self.gen, w * self._scale, cond, c, ck / "generator" if ck else None)
        return {"scale": self._scale, **out}


def recon_error(gen: nn.Module, diff: Diffusion, x0: torch.Tensor, cond: torch.Tensor, seed: int) -> float:
    """Median relative L2 error of neurons sampled for ``cond`` against their targets ``x0``."""
    was = gen.training
    gen.eval()
    gens = [torch.Generator().manual_seed(seed + i) for i in range(x0.shape[0])]
    got = diff.sample(gen, cond, x0.shape[1], gens)
    gen.train(was)
    err = (got - x0).norm(dim=-1) / x0.norm(dim=-1).clamp(min=1e-12)
    return float(err.median())


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_generator(gen: nn.Module, x0: torch.Tensor, cond: torch.Tensor, c: MeGConfig, folder: Path | None,
                    on_step=None) -> dict:
    """The hybrid diffusion loss over fixed batches of (x0, cond), AdamW; resumable from ``folder`` (checkpoint
    every ``gen_ckpt_every`` epochs: networks, optimiser, the sampling generator's state, the best state).

    Under ``torchrun`` (a process group of W ranks) the generator is wrapped in DistributedDataParallel: every rank
    draws the whole batch's timesteps and noise from the same generator, takes its contiguous share of the rows and
    weights its summed loss by W / B, so the averaged gradient is the one-process gradient of the whole batch (the
    condition dropout's masks are each rank's own). Rank 0 writes the checkpoints."""
    from tqdm.auto import tqdm

    rank, world = _world()
    model = gen
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(gen)
        log.info("meg: generator training on %d ranks", world)
    diff = Diffusion(c.diffusion_steps)
    sampler = diff.respaced(c.sample_steps)
    opt = torch.optim.AdamW(gen.parameters(), lr=c.gen_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(c.seed + 4)
    start, hist, best, best_state = 0, [], None, None
    got = read_bundle(folder) if folder else None
    if got:
        t, rec = got
        gen.load_state_dict(_prefixed(t, "gen."))
        _load_opt(opt, _prefixed(t, "o."), rec["opt"])
        g.set_state(t["rng"])
        start, hist, best = rec["epoch"], rec["hist"], rec["best"]
        best_state = _prefixed(t, "best.") or None
    n = x0.shape[0]
    eval_rows = list(range(min(c.gen_eval_rows, n)))
    batches = [(s, min(s + c.gen_batch, n)) for s in range(0, n, c.gen_batch)]

    def save(ep: int) -> None:
        if not folder or rank != 0:
            return
        ot, om = _flat_opt(opt)
        tensors = {**{f"gen.{k}": v for k, v in gen.state_dict().items()}, **{f"o.{k}": v for k, v in ot.items()},
                   "rng": g.get_state()}
        if best_state:
            tensors.update({f"best.{k}": v for k, v in best_state.items()})
        write_bundle(folder, tensors, {"epoch": ep, "hist": hist, "best": best, "opt": om})

    gen.train()
    bar = tqdm(range(start, c.gen_epochs), desc="meg generator", disable=None)
    for ep in bar:
        tot = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed * 1_000_003 + ep * 7919 + rank)  # the condition dropout's draws, per epoch
            for a, b in batches:
                i, noise = diff.draw(b - a, x0.shape[1], g)  # the whole batch's, the same on every rank
                if world == 1:
                    loss, parts = diff.loss(model, x0[a:b], cond[a:b], i=i, noise=noise)
                    full = float(loss.detach())
                else:
                    cut = [a + (b - a) * r // world for r in range(world + 1)]
                    lo, hi = cut[rank], cut[rank + 1]
                    weight = world / (b - a)
                    if hi == lo:  # fewer rows than ranks: a zero-weighted row keeps the collective calls in step
                        lo, hi, weight = a, a + 1, 0.0
                    rows, parts = diff.loss(model, x0[lo:hi], cond[lo:hi], i=i[lo - a : hi - a],
                                            noise=noise[lo - a : hi - a], reduce=False)
                    loss = rows.sum() * weight
                    full = float(loss.detach()) / world  # this rank's share of the batch mean
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot["loss"] += full * (b - a)
                tot["mse"] += parts["mse"] * (b - a)
                tot["vb"] += parts["vb"] * (b - a)
        row = {"epoch": ep + 1, **{k: round(v / n, 5) for k, v in tot.items()}}
        if (ep + 1) % c.gen_eval_every == 0 or ep + 1 == c.gen_epochs:
            err = recon_error(gen, sampler, x0[eval_rows], cond[eval_rows], c.seed)
            row["recon"] = round(err, 5)
            if best is None or err < best["recon"]:
                best = {"epoch": ep + 1, "recon": round(err, 5)}
                best_state = {k: v.detach().clone() for k, v in gen.state_dict().items()}
        hist.append(row)
        bar.set_postfix(loss=row["loss"], mse=row["mse"], recon=row.get("recon", "-"))
        if on_step is not None:
            on_step(row)
        if (ep + 1) % c.gen_ckpt_every == 0 or ep + 1 == c.gen_epochs:
            save(ep + 1)
    gen.eval()
    if best_state:
        gen.load_state_dict(best_state)
    return {"gen_rows": n, "gen_best": best, "gen_epochs_run": len(hist),
            "gen_hist": [r for r in hist if "recon" in r]}  # the rows where the reconstruction was measured
