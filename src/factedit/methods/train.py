"""One training loop for every editor that trains tensors: FT-L's ΔW, LoReFT's (and BaFT's) interventions,
trained editors (hyper-networks, MeG's neuron fits and generator).

``train_loop`` runs passes over a fixed list of batches: zero the gradients, take the loss, backpropagate,
clip the gradient norm, step, and project the parameters (FT-L's L∞ ball); it stops early once a pass's
mean loss is below ``early_stop_loss``. It shows a progress bar with the loss (and the gradient norm), logs
every pass, and, given a checkpoint folder, saves the parameters and the optimiser state (safetensors + JSON,
written atomically) so that a killed run resumes to the same final tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import FactEditError
from ..fsutil import read_bundle, write_bundle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    steps: int  # passes over the batches
    lr: float
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    grad_clip: float | None = None  # max global gradient norm (None: no clipping)
    early_stop_loss: float | None = None  # stop once a pass's mean loss is below this
    desc: str = "train"
    checkpoint_every: int = 0  # optimiser steps (batches) between checkpoints (0: at the end only)
    log_every: int = 0  # passes between INFO log lines with the loss (0: DEBUG only; trained editors log)


@dataclass
class TrainResult:
    steps: int  # passes run in total (including those of an earlier, interrupted run)
    loss: float  # the mean loss of the last pass
    history: list[float] = field(default_factory=list)  # mean loss per pass
    grad_norm: float = float("nan")
    stopped_early: bool = False


def make_optimizer(params: Sequence[torch.Tensor], s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay)
    raise FactEditError(f"unknown optimizer '{s.optimizer}' (adam, adamw or sgd)")


# ---- checkpoints: parameters and optimiser state, no pickle --------------------------------------------------
def _flat_state(params: Sequence[torch.Tensor], opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    tensors = {f"param.{i}": p.detach().contiguous().cpu() for i, p in enumerate(params)}
    meta: dict[str, Any] = {"groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                            "state": {}}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = v.detach().contiguous().cpu()
            else:
                meta["state"][f"{i}.{k}"] = v
    return tensors, meta


def _load_state(params: Sequence[torch.Tensor], opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"].to(p.device))
    for g, saved in zip(opt.param_groups, meta["groups"]):
        g.update(saved)
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        st.update({k.split(".", 1)[1]: v for k, v in meta["state"].items() if k.split(".", 1)[0] == str(i)})
        if st:
            opt.state[p] = st


def save_checkpoint(path: Path, params, opt, done: int, history: list[float], extra: dict | None = None,
                    state: Sequence[torch.Tensor] = ()) -> None:
    tensors, meta = _flat_state(params, opt)
    tensors.update({f"state.{i}": t for i, t in enumerate(state)})
    write_bundle(path, tensors, {"done": done, "history": history, "extra": extra or {}, **meta}, json_default=float)


def load_checkpoint(path: Path, params, opt, state: Sequence[torch.Tensor] = ()) -> tuple[int, list[float], dict] | None:
    got = read_bundle(path)
    if got is None:
        return None
    tensors, meta = got
    if sum(k.startswith("param.") for k in tensors) != len(params):
        raise FactEditError(f"checkpoint {path} holds another set of parameters; remove it to start again")
    _load_state(params, opt, tensors, meta)
    with torch.no_grad():
        for i, t in enumerate(state):
            t.copy_(tensors[f"state.{i}"].to(t.device))
    return int(meta["done"]), list(meta["history"]), meta.get("extra", {})


# ---- the loop ---------------------------------------------------------------------------------------------
def train_loop(params: Sequence[torch.Tensor], batches: Sequence[Any], loss_fn: Callable[[Any], torch.Tensor],
               s: TrainSettings, *, weights: Sequence[float] | None = None,
               project: Callable[[], None] | None = None, checkpoint: Path | None = None,
               state: Sequence[torch.Tensor] = (), progress: bool = True,
               on_step: Callable[[int], dict[str, str] | None] | None = None,
               write_checkpoints: bool = True) -> TrainResult:
    """Minimise ``loss_fn(batch)`` over ``params``, ``s.steps`` passes over ``batches``.

    weights: each batch's share in a pass's mean loss (e.g. its number of rows; default equal);
    project: called after every optimiser step (under no_grad) to project the parameters;
    state: tensors that are not optimised but change during training (e.g. a running normaliser's buffers),
    saved and restored with the checkpoint; on_step(n): called after optimiser step n (counted over every pass,
    from 1) before any checkpoint, e.g. to validate; what it returns joins the progress bar. The bar counts
    batches. write_checkpoints False: read the checkpoint to resume but never write it (the ranks after the
    first of a distributed run, which rank 0 checkpoints for all). A checkpoint may fall inside a pass: a resumed run continues at the
    next batch, with the pass's running loss, and ends with the same tensors as an uninterrupted one."""
    params = list(params)
    opt = make_optimizer(params, s)
    w = list(weights) if weights is not None else [1.0] * len(batches)
    done, history, start_batch, carried = 0, [], 0, 0.0
    save = checkpoint is not None and write_checkpoints
    if checkpoint is not None:
        got = load_checkpoint(checkpoint, params, opt, state)
        if got is not None:
            done, history, extra = got
            start_batch, carried = int(extra.get("batch", 0)), float(extra.get("total", 0.0))
            log.info("%s: resuming at pass %d, batch %d from %s", s.desc, done + 1, start_batch, checkpoint)
    result = TrainResult(steps=done, loss=history[-1] if history else float("nan"), history=history)
    if result.history and s.early_stop_loss is not None and result.loss < s.early_stop_loss:
        result.stopped_early = True
        return result
    n_opt = 0
    bar = tqdm(total=s.steps * len(batches), initial=done * len(batches) + start_batch, desc=s.desc, leave=False,
               disable=None if progress else True)
    post: dict[str, str] = {}
    for step in range(done, s.steps):
        total = carried if step == done else 0.0
        for bi in range(start_batch if step == done else 0, len(batches)):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(batches[bi])
            loss.backward()
            if s.grad_clip is not None:
                result.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, s.grad_clip))
            opt.step()
            if project is not None:
                with torch.no_grad():
                    project()
            total += float(loss.detach()) * w[bi]
            n_opt += 1
            post["loss"] = f"{float(loss.detach()):.3f}"
            if s.grad_clip is not None:
                post["|g|"] = f"{result.grad_norm:.2g}"
            if on_step is not None:
                post.update(on_step(step * len(batches) + bi + 1) or {})
            bar.update(1)
            bar.set_postfix(post, refresh=False)
            if save and s.checkpoint_every and n_opt % s.checkpoint_every == 0 \
                    and bi + 1 < len(batches):
                save_checkpoint(checkpoint, params, opt, step, history, {"batch": bi + 1, "total": total}, state)
        mean = total / sum(w)
        if not math.isfinite(mean):
            raise FactEditError(f"{s.desc}: the loss is not finite at pass {step + 1}; lower the learning rate")
        history.append(mean)
        result.steps, result.loss = step + 1, mean
        every = s.log_every and (step + 1) % s.log_every == 0
        log.log(logging.INFO if every else logging.DEBUG, "%s: pass %d/%d loss %.4f%s", s.desc, step + 1, s.steps, mean,
                f" |g| {result.grad_norm:.3g}" if s.grad_clip is not None else "")
        if s.early_stop_loss is not None and mean < s.early_stop_loss:
            result.stopped_early = True
            break
        if save and s.checkpoint_every:
            save_checkpoint(checkpoint, params, opt, step + 1, history, {}, state)
    bar.close()
    if save:
        save_checkpoint(checkpoint, params, opt, result.steps, history, {}, state)
    return result
