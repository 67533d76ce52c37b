"""Machinery shared by ROME, MEMIT, AlphaEdit and NSE (specs/locate.md §0).

- context templates sampled once from the model (recorded seed, cached per model fingerprint);
- keys: the MLP out-projection input at the subject's last token, averaged over templates;
- target values z*: a free vector δ per request added at one site (a block output, MEMIT; or an MLP
  output, ROME) at the subject's last token of every prompt, optimised for the target NLL with a KL
  and a norm term. All requests of a batch are optimised together in one forward/backward per step;
  each request's δ only touches its own rows, so the result equals the one-at-a-time loop.

Speed (the result is unchanged): the hidden states entering the first block above the site are
computed once and reused every step (only the blocks from the site up run per step), and the LM head
runs only on the (row, position) pairs the loss reads.

The z* store (zstore.py) keeps each result per weights digest (``compute_z(..., cache=True)``)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...errors import FactEditError
from ...lm.hooks import Trace, first, installed, replace_first
from ...lm.load import LM
from ...lm.tokens import encode, encode_target, pad_batch, subject_last_index
from ...types import EditRequest
from .keys import Rows, block_index
from .templates import fill
from .upper import UpperStack
from .zstore import ZStore

log = logging.getLogger(__name__)

PRECAST_BF16 = True  # cast the frozen MLP and head weights to bf16 once per z* call (False: autocast does it per call)


@contextmanager
def bf16_mlps(lm: LM) -> Iterator[None]:
    """bf16 autocast inside every block's MLP and the LM head, for the duration.

    Attention, the norms and the residual stream stay in fp32 (an MLP's bf16 output is promoted when
    it is added back). On a CPU, the MLPs are most of the FLOPs, while whole-forward autocast runs the
    flash-attention backward in bf16, about 10x slower than in fp32, and casts the attention
    projections' weights on every call (docs/results.md, session 11)."""
    blocks = lm.model.get_submodule(lm.arch.blocks)
    sub = lm.arch.mlp_out.rpartition(".")[0]  # the MLP: the out-projection's parent ("mlp")
    mods = [blk.get_submodule(sub) if sub else blk.get_submodule(lm.arch.mlp_out) for blk in blocks]
    mods.append(lm.model.get_output_embeddings())
    dev = lm.device.type
    entered: list = []
    # Each linear layer's weight cast to bf16 once for the duration, not on every call: autocast's own
    # cast cache holds only weights that require a gradient, and the frozen model's do not, so it
    # re-cast them (and the LM head) at every forward (10% of a bf16 z* step on a 2-core CPU). The
    # numbers are the same: autocast's linear casts input and weight to bf16 either way.
    lins = [m for mod in mods for m in mod.modules()
            if type(m) is torch.nn.Linear and not m.weight.requires_grad and m.weight.dtype == torch.float32
            and "forward" not in m.__dict__] if PRECAST_BF16 else []

    def bf16_forward(w: torch.Tensor, b: torch.Tensor | None):
        return lambda x: torch.nn.functional.linear(x, w, b)

    def pre(_m, _a):
        c = torch.autocast(dev, dtype=torch.bfloat16)
        c.__enter__()
        entered.append(c)

    def post(_m, _a, _o):
        if entered:
            entered.pop().__exit__(None, None, None)

    try:
        for m in lins:
            m.forward = bf16_forward(m.weight.detach().to(torch.bfloat16),
                                     None if m.bias is None else m.bias.detach().to(torch.bfloat16))
        with installed([h for m in mods for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]):
            yield
    finally:
        for m in lins:
            m.__dict__.pop("forward", None)  # back to the class's forward
        while entered:  # an exception inside a module skipped its forward hook
            entered.pop().__exit__(None, None, None)


def head_logits(lm: LM, x: torch.Tensor) -> torch.Tensor:
    """The model's LM head on final-norm outputs x (N, d), with the family's soft-capping if any."""
    logits = lm.model.get_output_embeddings()(x)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# ---- z* -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZSettings:
    steps: int = 25
    lr: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    kl_direction: str = "current_initial"  # KL(P_current ‖ P_initial), as the reference code computes it
    weight_decay: float = 0.5
    early_stop_loss: float = 0.05
    early_stop_prob: float = 0.0  # also stop once the target's probability reaches this (0: off)
    batch: int = 16  # requests optimised together
    fast: bool = True  # reuse hidden states below the site; LM head only where the loss reads
    autocast: str = "none"  # "none" or "bf16" (resolved: ``auto`` is decided in ``z_settings``)


def compute_z(lm: LM, requests: Sequence[EditRequest], templates: list[str], site_path: str,
              s: ZSettings, progress: bool = True, cache: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """Target values z* = h_init + δ* (u, d) at ``site_path`` (a block or an MLP out-projection).

    Loss per request (mean over its templated prompts):
      NLL(target_new | template(prompt)) + kl_factor·KL(…"{subject} is a") + weight_decay·‖δ‖/‖h_init‖²
    Adam on δ; after each step δ is projected into ‖δ‖ ≤ clamp_norm_factor·‖h_init‖; a request stops
    once its loss is below ``early_stop_loss`` (checked before the step, as the reference does) or, with
    ``early_stop_prob`` > 0, once its target probability exp(−NLL) (NLL: its mean over the request's
    templates of the per-token mean) reaches ``early_stop_prob``; its rows leave the batch."""
    if s.kl_direction not in ("current_initial", "initial_current"):
        raise FactEditError(f"unknown kl_direction '{s.kl_direction}' (current_initial or initial_current)")
    if s.autocast not in ("none", "bf16"):
        raise FactEditError(f"unknown autocast '{s.autocast}' (none or bf16; resolve auto with z_settings)")
    if not 0.0 <= s.early_stop_prob <= 1.0:
        raise FactEditError(f"early_stop_prob must lie in [0, 1], not {s.early_stop_prob}")
    store = ZStore(lm, templates, site_path, vars(s)) if cache else None
    found = {}
    if store is not None:
        for i, r in enumerate(requests):
            got = store.get(r)
            if got is not None:
                found[i] = got
        if found:
            log.info("z*: %d of %d requests read from the z* store %s, which MEMIT, AlphaEdit and NSE share on the "
                     "same weights and settings (z_cache=false computes them here: for timings)", len(found),
                     len(requests), store.dir)
    todo = [i for i in range(len(requests)) if i not in found]
    chunks = [todo[i : i + s.batch] for i in range(0, len(todo), max(1, s.batch))]
    bar = tqdm(total=len(requests), initial=len(found), desc="z*", leave=False, disable=None if progress else True)
    for ch in chunks:
        z, info = compute_z_batch(lm, [requests[i] for i in ch], templates, site_path, s)
        for k, i in enumerate(ch):
            found[i] = (z[k], info[k])
            if store is not None:
                store.put(requests[i], z[k], info[k])
        bar.update(len(ch))
    bar.close()
    if not requests:
        return torch.zeros(0, lm.hidden_size), []
    return torch.stack([found[i][0] for i in range(len(requests))]), [found[i][1] for i in range(len(requests))]


@torch.enable_grad()
def compute_z_batch(lm, requests, templates, site_path, s: ZSettings):
    tok = lm.tokenizer
    dev = lm.device
    u, n_t = len(requests), len(templates)
    # Rows: each template filled with the prompt, followed by the target; then one KL row per request.
    # The fast path drops the tokens no read depends on (the model is causal): a rewriting row's last
    # target token (nothing is predicted from it) and the " is a" after the subject of a KL row (the
    # reference code reads the KL distribution at the subject's last token).
    seqs, subj_pos, owner, t_lens, p_lens, labels = [], [], [], [], [], []
    for j, r in enumerate(requests):
        for t in templates:
            text, off = fill(t, r.prompt)
            p_ids, t_ids = encode_target(tok, text, r.target_new)
            seqs.append(p_ids + (t_ids[:-1] if s.fast else t_ids))
            labels.append(t_ids)
            subj_pos.append(subject_last_index(tok, text, r.subject, start=off + r.prompt.index(r.subject)))
            owner.append(j)
            p_lens.append(len(p_ids))
            t_lens.append(len(t_ids))
    n_rw = len(seqs)
    for j, r in enumerate(requests):  # KL rows: "{subject} is a"
        kl = f"{r.subject} is a"
        subj_pos.append(subject_last_index(tok, kl, r.subject))
        seqs.append(encode(tok, kl)[: subj_pos[-1] + 1] if s.fast else encode(tok, kl))
        owner.append(j)
    lens = [len(x) for x in seqs]
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    rows = Rows(ids, mask, torch.tensor(subj_pos))
    n_rows = len(seqs)
    owner_t = torch.tensor(owner, device=dev)
    pos_t = rows.pos.to(dev)
    # The (row, column) pairs the loss reads: the target-predicting columns of the rewriting rows
    # (reads 0..n_nll-1), then the subject column of each KL row (reads n_nll.., one per request).
    rd_row, rd_col, rd_lab = [], [], []
    for i in range(n_rw):
        for k in range(t_lens[i]):
            rd_row.append(i)
            rd_col.append(p_lens[i] - 1 + k)
            rd_lab.append(labels[i][k])
    n_nll = len(rd_row)
    for i in range(n_rw, n_rows):
        rd_row.append(i)
        rd_col.append(subj_pos[i])
        rd_lab.append(-1)
    rd_row_t = torch.tensor(rd_row, device=dev)
    rd_lab_t = torch.tensor(rd_lab, device=dev)
    row_ntok = torch.tensor(t_lens + [1] * (n_rows - n_rw), device=dev, dtype=torch.float32)
    reads_of_row: list[list[int]] = [[] for _ in range(n_rows)]
    for r_i, row in enumerate(rd_row):
        reads_of_row[row].append(r_i)

    # One "call" per forward: the rows it runs, their δ-column inside its output, the reads it serves.
    t0 = time.perf_counter()
    upper = UpperStack(lm, block_index(lm, site_path))
    straight = not s.fast  # the straightforward path: full forward, logits everywhere, then pick
    groups = (None if straight else upper.split(rows, lens)) or [None]  # [None]: one full-forward call
    t_prep = time.perf_counter() - t0

    def call_meta(g, act_req: torch.Tensor):
        """(keep, rows, δ columns, read ids, read (row-in-call, col-in-call)) for the active rows."""
        g_rows = torch.arange(n_rows, device=dev) if g is None else g.rows
        off = torch.zeros(n_rows, dtype=torch.long, device=dev) if g is None else g.P
        keep = act_req[owner_t[g_rows]]
        rws, offs = g_rows[keep], off[keep]
        rid, rr, rc = [], [], []
        for k, (row, o) in enumerate(zip(rws.tolist(), offs.tolist())):
            for r_i in reads_of_row[row]:
                rid.append(r_i)
                rr.append(k)
                rc.append(rd_col[r_i] - o)
        return (None if bool(keep.all()) else keep.nonzero()[:, 0], rws, pos_t[rws] - offs,
                torch.tensor(rid, device=dev, dtype=torch.long), torch.tensor(rr, device=dev, dtype=torch.long),
                torch.tensor(rc, device=dev, dtype=torch.long))

    site = lm.model.get_submodule(site_path)
    d = lm.hidden_size
    delta = torch.zeros(u, d, device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=s.lr)
    site_init = torch.zeros(n_rows, d, device=dev)
    bare_rows = torch.arange(0, n_rw, n_t, device=dev)  # template 0 is "{}"
    state: dict = {"first": True}

    def hook(out, _args):
        o = first(out)
        b = torch.arange(o.shape[0], device=o.device)
        if state["first"]:
            site_init[state["rows"]] = o[b, state["cols"]].detach().float()
        add = torch.zeros(o.shape, dtype=delta.dtype, device=o.device)
        add = add.index_put((b, state["cols"]), delta[owner_t[state["rows"]]])
        return replace_first(out, o + add.to(o.dtype))

    kl_init = None
    h_init = known = None
    done = torch.zeros(u, dtype=torch.bool, device=dev)
    last_loss = torch.zeros(u)
    last_prob = torch.zeros(u)
    n_steps = torch.zeros(u, dtype=torch.long)
    metas = None

    # bf16 only inside the MLPs and the LM head, and only for the steps: the split's check and the
    # cached prefix above ran in fp32 (see bf16_mlps)
    with Trace(site, retain_output=False, edit_output=hook), (bf16_mlps(lm) if s.autocast == "bf16" else nullcontext()):
        for it in range(s.steps):
            opt.zero_grad(set_to_none=True)
            if metas is None:  # (re)built at the start and whenever a request finishes
                metas = [(g, call_meta(g, ~done)) for g in groups]
                metas = [(g, m) for g, m in metas if len(m[1])]
            xs, rids = [], []
            for g, (keep, rws, cols, rid, rr, rc) in metas:
                state["rows"], state["cols"] = rws, cols
                if straight:
                    full = lm.model(input_ids=rows.input_ids[rws.cpu()].to(dev),
                                    attention_mask=rows.attention_mask[rws.cpu()].to(dev), use_cache=False).logits
                    xs.append(full[rr, rc])
                else:
                    hfin = upper.full(rows.input_ids[rws.cpu()].to(dev), rows.attention_mask[rws.cpu()].to(dev)) \
                        if g is None else upper.run(g, keep)
                    xs.append(hfin[rr, rc])
                rids.append(rid)
            x = torch.cat(xs)
            logits = x.float() if straight else head_logits(lm, x).float()
            rid = torch.cat(rids)
            logp = torch.log_softmax(logits, -1)
            is_nll = rid < n_nll
            nll_lp = logp[is_nll].gather(1, rd_lab_t[rid[is_nll]][:, None])[:, 0]
            nll_rows = rd_row_t[rid[is_nll]]
            if state["first"]:
                h_init = site_init[bare_rows].clone()
                state["first"] = False
                # δ = 0: is the target already the greedy continuation of the bare prompt (row "{}")?
                miss = (logits[is_nll].argmax(-1) != rd_lab_t[rid[is_nll]]).float()
                known = torch.zeros(n_rows, device=dev).index_add(0, nll_rows, miss)[bare_rows] == 0
            row_nll = torch.zeros(n_rows, device=dev).index_add(0, nll_rows, -nll_lp) / row_ntok
            req_nll = torch.zeros(u, device=dev).index_add(0, owner_t[:n_rw], row_nll[:n_rw]) / n_t
            kl_lp = logp[~is_nll]
            kl_idx = rid[~is_nll] - n_nll  # = request index (one KL row per request, in order)
            if kl_init is None:
                kl_init = torch.zeros(u, kl_lp.shape[1], device=dev)
                kl_init[kl_idx] = kl_lp.detach()
            ki = kl_init[kl_idx]
            if s.kl_direction == "current_initial":
                kl_r = (kl_lp.exp() * (kl_lp - ki)).sum(-1)
            else:
                kl_r = (ki.exp() * (ki - kl_lp)).sum(-1)
            kl = torch.zeros(u, device=dev).index_add(0, kl_idx, kl_r)
            decay = s.weight_decay * delta.norm(dim=1) / h_init.norm(dim=1).clamp(min=1e-8) ** 2
            loss = req_nll + s.kl_factor * kl + decay
            lv = loss.detach()
            active = ~done
            last_loss[active.cpu()] = lv[active].cpu()
            last_prob[active.cpu()] = torch.exp(-req_nll.detach()[active]).cpu()
            n_steps[active.cpu()] = it
            if log.isEnabledFor(logging.DEBUG):
                log.debug("z* step %d: active %s nll %s kl %s decay %s", it, active.tolist(),
                          req_nll.detach().tolist(), kl.detach().tolist(), decay.detach().tolist())
            stop = lv < s.early_stop_loss
            if s.early_stop_prob > 0:
                stop |= req_nll.detach() <= -math.log(s.early_stop_prob)
            newly = active & stop
            done |= newly
            if bool(done.all()) or it == s.steps - 1:
                break
            keep_d = delta.detach()[done].clone()
            (loss * active).sum().backward()
            opt.step()
            with torch.no_grad():
                if done.any():
                    delta[done] = keep_d
                max_norm = s.clamp_norm_factor * h_init.norm(dim=1)
                nrm = delta.norm(dim=1)
                scale = torch.where(nrm > max_norm, max_norm / nrm.clamp(min=1e-12), torch.ones_like(nrm))
                delta.mul_(scale[:, None])
            if bool(newly.any()):
                metas = None
    z = (h_init + delta.detach()).float().cpu()
    log.info("z*: %d requests, %d rows in %d groups: prepare %.1f s, %d steps %.1f s (%d request-steps)", u, n_rows,
             len(groups), t_prep, it + 1, time.perf_counter() - t0 - t_prep, int(n_steps.sum()) + u)
    infos = []
    for j, r in enumerate(requests):
        infos.append({"case": r.label, "known": bool(known[j]), "loss": round(float(last_loss[j]), 4),
                      "prob": round(float(last_prob[j]), 4), "steps": int(n_steps[j]),
                      "init_norm": round(float(h_init[j].norm()), 3),
                      "delta_norm": round(float(delta.detach()[j].norm()), 3)})
    return z, infos
