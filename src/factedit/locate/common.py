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
"""

from __future__ import annotations

import json
import logging
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import FactEditError
from ..fsutil import write_json
from ..lm.load import LM, cache_root
from ..lm.tokens import encode, encode_target, pad_batch, subject_last_index
from ..types import EditRequest

log = logging.getLogger(__name__)
TEMPLATE_SEEDS = ("The", "Therefore", "Because", "I", "You")


# ---- context templates --------------------------------------------------------------------------------
def context_templates(lm: LM, lengths: Sequence[int], per_length: int, seed: int = 0) -> list[str]:
    """["{}"] + ``per_length`` sampled prefixes of each length (top-k 5), each followed by ". {}".

    Sampled from the unedited model once and cached by fingerprint; the seed is part of the key."""
    from ..eval.scoring import sample

    lengths = [int(x) for x in lengths]
    if per_length <= 0 or not lengths:
        return ["{}"]
    key = f"l{'-'.join(map(str, lengths))}-n{per_length}-s{seed}"
    path = cache_root() / "templates" / lm.fingerprint[:16] / f"{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())["templates"]
        except (ValueError, KeyError):
            log.warning("ignoring unreadable template cache %s", path)
    out = ["{}"]
    k = 0
    for length in lengths:
        for i in range(per_length):
            start = TEMPLATE_SEEDS[i % len(TEMPLATE_SEEDS)]
            n0 = len(encode(lm.tokenizer, start))
            text = start + sample(lm, start, max_length=n0 + length, top_k=5, seed=seed + k)
            k += 1
            out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    write_json(path, {"templates": out, "seed": seed, "lengths": lengths, "per_length": per_length,
                      "fingerprint": lm.fingerprint})
    return out


def fill(template: str, prompt: str) -> tuple[str, int]:
    """The templated text and the character offset where ``prompt`` starts inside it."""
    i = template.index("{}")
    return template[:i] + prompt + template[i + 2 :], i


# ---- forward helpers ---------------------------------------------------------------------------------
def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def _hooks(hs: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in hs:
            h.remove()


class _Stop(Exception):
    pass


@dataclass
class Rows:
    """A right-padded batch of texts with one marked position per row (the subject's last token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pos: torch.Tensor  # (B,)


def _rows(lm: LM, texts: list[str], subjects: list[str], starts: list[int]) -> Rows:
    seqs, pos = [], []
    for t, s, st in zip(texts, subjects, starts):
        seqs.append(encode(lm.tokenizer, t))
        pos.append(subject_last_index(lm.tokenizer, t, s, start=st))
    ids, mask = pad_batch(seqs, lm.tokenizer.pad_token_id)
    return Rows(ids, mask, torch.tensor(pos))


@torch.no_grad()
def capture_at(lm: LM, texts: list[str], subjects: list[str], starts: list[int], modules: dict,
               kind: str = "input", batch_size: int = 64) -> dict:
    """The input (or output) of each named module at each row's subject-last token: {key: (N, d)}."""
    res: dict = {k: [] for k in modules}
    deepest = max(_block_index(lm, p) for p in modules.values())
    for s in range(0, len(texts), batch_size):
        rows = _rows(lm, texts[s : s + batch_size], subjects[s : s + batch_size], starts[s : s + batch_size])
        got: dict = {}
        hs = []
        for k, path in modules.items():
            mod = lm.model.get_submodule(path)
            if kind == "input":
                hs.append(mod.register_forward_pre_hook(lambda _m, a, k=k: got.__setitem__(k, a[0])))
            else:
                hs.append(mod.register_forward_hook(lambda _m, _a, o, k=k: got.__setitem__(k, _first(o))))
        stop = lm.model.get_submodule(lm.arch.block_path(deepest))
        hs.append(stop.register_forward_hook(lambda *_: (_ for _ in ()).throw(_Stop())))
        with _hooks(hs):
            try:
                lm.model(input_ids=rows.input_ids.to(lm.device), attention_mask=rows.attention_mask.to(lm.device),
                         use_cache=False)
            except _Stop:
                pass
        b = torch.arange(len(rows.pos))
        for k in modules:
            res[k].append(got[k][b, rows.pos.to(got[k].device)].float().cpu())
    return {k: torch.cat(v) for k, v in res.items()}


def _block_index(lm: LM, path: str) -> int:
    prefix = lm.arch.blocks + "."
    if not path.startswith(prefix):
        raise FactEditError(f"module '{path}' is not inside a transformer block")
    return int(path[len(prefix) :].split(".")[0])


def template_keys(lm: LM, requests: Sequence[EditRequest], templates: list[str],
                  layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Keys per layer and template (u, n_templates, d0): the MLP out-projection input at the subject's
    last token of each templated prompt."""
    texts, subjects, starts = [], [], []
    for r in requests:
        for t in templates:
            text, off = fill(t, r.prompt)
            texts.append(text)
            subjects.append(r.subject)
            starts.append(off + r.prompt.index(r.subject))
    mods = {l: lm.arch.mlp_out_path(l) for l in layers}
    got = capture_at(lm, texts, subjects, starts, mods, "input")
    return {l: got[l].view(len(requests), len(templates), -1) for l in layers}


def average_keys(k: torch.Tensor, average: str = "group") -> torch.Tensor:
    """(u, n_templates, d0) -> (u, d0). "group" (MEMIT): mean of the "{}" group (template 0) and of the
    prefix group; "flat" (ROME): mean over all templates."""
    if average == "flat" or k.shape[1] == 1:
        return k.mean(1)
    return (k[:, 0] + k[:, 1:].mean(1)) / 2


def compute_keys(lm: LM, requests: Sequence[EditRequest], templates: list[str], layers: Sequence[int],
                 average: str = "group") -> dict[int, torch.Tensor]:
    """Template-averaged keys (u, d0) per layer (see ``average_keys``)."""
    return {l: average_keys(k, average) for l, k in template_keys(lm, requests, templates, layers).items()}


def site_values(lm: LM, requests: Sequence[EditRequest], site_path: str) -> torch.Tensor:
    """The output of ``site_path`` at the subject's last token of each bare prompt: (u, d)."""
    return capture_at(lm, [r.prompt for r in requests], [r.subject for r in requests],
                      [r.prompt.index(r.subject) for r in requests], {0: site_path}, "output")[0]


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
    batch: int = 16  # requests optimised together
    fast: bool = True  # reuse hidden states below the site; LM head only where the loss reads
    autocast: str = "none"  # "none" or "bf16"


class _Upper:
    """Runs the blocks from ``start`` upwards on cached hidden states (checked against the full model
    once; families whose forward cannot start mid-stack fall back to the full forward)."""

    # model -> {start block: usable}; weak keys, so a later model reusing a freed model's id() can
    # never inherit its verdict
    _ok: "weakref.WeakKeyDictionary[nn.Module, dict[int, bool]]" = weakref.WeakKeyDictionary()

    def __init__(self, lm: LM, start: int) -> None:
        self.lm, self.start = lm, start
        parent_path, _, self.attr = lm.arch.blocks.rpartition(".")
        self.parent = lm.model.get_submodule(parent_path) if parent_path else lm.model

    @contextmanager
    def truncated(self) -> Iterator[None]:
        full = getattr(self.parent, self.attr)
        setattr(self.parent, self.attr, nn.ModuleList(list(full)[self.start :]))
        try:
            yield
        finally:
            setattr(self.parent, self.attr, full)

    def final_hidden(self, rows: Rows, cached: torch.Tensor | None) -> torch.Tensor:
        """Final-norm output (B, T, d) of a forward pass, from ``cached`` block inputs if given."""
        got = {}
        norm = self.lm.model.get_submodule(self.lm.arch.final_norm)
        h = norm.register_forward_hook(lambda _m, _a, o: got.__setitem__("h", _first(o)))
        with _hooks([h]):
            dev = self.lm.device
            mask = rows.attention_mask.to(dev)
            if cached is not None:
                with self.truncated():
                    self.lm.model(inputs_embeds=cached, attention_mask=mask, use_cache=False, logits_to_keep=1)
            else:
                self.lm.model(input_ids=rows.input_ids.to(dev), attention_mask=mask, use_cache=False, logits_to_keep=1)
        return got["h"]

    @torch.no_grad()
    def block_inputs(self, rows: Rows) -> torch.Tensor:
        got = {}
        blk = self.lm.model.get_submodule(self.lm.arch.block_path(self.start))

        def pre(_m, args, kwargs):
            got["x"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        h = blk.register_forward_pre_hook(pre, with_kwargs=True)
        with _hooks([h]):
            try:
                self.lm.model(input_ids=rows.input_ids.to(self.lm.device),
                              attention_mask=rows.attention_mask.to(self.lm.device), use_cache=False)
            except _Stop:
                pass
        return got["x"].detach()

    @torch.no_grad()
    def usable(self, rows: Rows) -> bool:
        known = _Upper._ok.setdefault(self.lm.model, {})
        if self.start not in known:
            ref = self.final_hidden(rows, None)
            try:
                alt = self.final_hidden(rows, self.block_inputs(rows))
                m = rows.attention_mask.bool().to(ref.device)
                err = float((ref - alt)[m].abs().max() / ref[m].abs().max().clamp(min=1e-6))
                ok = err < 1e-4
            except Exception as e:  # noqa: BLE001 - any failure means "use the full forward"
                err, ok = str(e), False
            if not ok:
                log.info("z*: %s cannot start its forward at block %d (%s); using the full forward",
                         self.lm.model.config.model_type, self.start, err)
            known[self.start] = ok
        return known[self.start]


def compute_z(lm: LM, requests: Sequence[EditRequest], templates: list[str], site_path: str,
              s: ZSettings, progress: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """Target values z* = h_init + δ* (u, d) at ``site_path`` (a block or an MLP out-projection).

    Loss per request (mean over its templated prompts):
      NLL(target_new | template(prompt)) + kl_factor·KL(…"{subject} is a") + weight_decay·‖δ‖/‖h_init‖²
    Adam on δ; after each step δ is projected into ‖δ‖ ≤ clamp_norm_factor·‖h_init‖; a request stops
    once its loss is below ``early_stop_loss`` (checked before the step, as the reference does)."""
    if s.kl_direction not in ("current_initial", "initial_current"):
        raise FactEditError(f"unknown kl_direction '{s.kl_direction}' (current_initial or initial_current)")
    if s.autocast not in ("none", "bf16"):
        raise FactEditError(f"unknown autocast '{s.autocast}' (none or bf16)")
    zs, infos = [], []
    chunks = [list(requests[i : i + s.batch]) for i in range(0, len(requests), max(1, s.batch))]
    bar = tqdm(total=len(requests), desc="z*", leave=False, disable=None if progress else True)
    for ch in chunks:
        z, info = _compute_z_batch(lm, ch, templates, site_path, s)
        zs.append(z)
        infos.extend(info)
        bar.update(len(ch))
    bar.close()
    return torch.cat(zs), infos


@torch.enable_grad()
def _compute_z_batch(lm, requests, templates, site_path, s: ZSettings):
    tok = lm.tokenizer
    dev = lm.device
    u, n_t = len(requests), len(templates)
    seqs, subj_pos, owner, t_lens, p_lens = [], [], [], [], []
    for j, r in enumerate(requests):
        for t in templates:
            text, off = fill(t, r.prompt)
            p_ids, t_ids = encode_target(tok, text, r.target_new)
            seqs.append(p_ids + t_ids)
            subj_pos.append(subject_last_index(tok, text, r.subject, start=off + r.prompt.index(r.subject)))
            owner.append(j)
            p_lens.append(len(p_ids))
            t_lens.append(len(t_ids))
    n_rw = len(seqs)
    for j, r in enumerate(requests):  # KL rows: "{subject} is a"
        kl = f"{r.subject} is a"
        seqs.append(encode(tok, kl))
        subj_pos.append(subject_last_index(tok, kl, r.subject))
        owner.append(j)
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    rows = Rows(ids, mask, torch.tensor(subj_pos))
    owner_t = torch.tensor(owner, device=dev)
    pos_t = rows.pos.to(dev)
    # (row, position) pairs the loss reads: target-predicting positions of rewriting rows, subject of KL rows
    nll_r, nll_p, nll_lab, nll_own = [], [], [], []
    for i in range(n_rw):
        for k in range(t_lens[i]):
            nll_r.append(i)
            nll_p.append(p_lens[i] - 1 + k)
            nll_lab.append(seqs[i][p_lens[i] + k])
            nll_own.append(i)
    nll_r_t, nll_p_t = torch.tensor(nll_r, device=dev), torch.tensor(nll_p, device=dev)
    nll_lab_t = torch.tensor(nll_lab, device=dev)
    row_ntok = torch.tensor(t_lens, device=dev, dtype=torch.float32)
    kl_rows = torch.arange(n_rw, len(seqs), device=dev)

    layer = _block_index(lm, site_path)
    upper = _Upper(lm, layer)
    cached = upper.block_inputs(rows) if (s.fast and upper.usable(rows)) else None
    site = lm.model.get_submodule(site_path)
    d = lm.hidden_size
    delta = torch.zeros(u, d, device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=s.lr)
    h_init = torch.zeros(u, d, device=dev)
    bare_rows = torch.arange(0, n_rw, n_t, device=dev)  # template 0 is "{}"
    state = {"first": True}

    def hook(_m, _a, out):
        o = _first(out)
        if state["first"]:
            h_init.copy_(o[bare_rows, pos_t[bare_rows]].detach().float())
        add = torch.zeros(o.shape, dtype=delta.dtype, device=o.device)
        add = add.index_put((torch.arange(o.shape[0], device=o.device), pos_t), delta[owner_t])
        o2 = o + add.to(o.dtype)
        return (o2,) + tuple(out[1:]) if isinstance(out, tuple) else o2

    kl_init = None
    done = torch.zeros(u, dtype=torch.bool)
    last_loss = torch.zeros(u)
    n_steps = torch.zeros(u, dtype=torch.long)
    def ac():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if s.autocast == "bf16" else nullcontext()

    handle = site.register_forward_hook(hook)
    try:
        for it in range(s.steps):
            opt.zero_grad(set_to_none=True)
            with ac():
                if s.fast:
                    hfin = upper.final_hidden(rows, cached)
                    x = torch.cat([hfin[nll_r_t, nll_p_t], hfin[kl_rows, pos_t[kl_rows]]])
                    logits = head_logits(lm, x).float()
                else:  # the straightforward path: full forward, logits everywhere, then pick
                    full = lm.model(input_ids=rows.input_ids.to(dev), attention_mask=rows.attention_mask.to(dev),
                                    use_cache=False).logits
                    logits = torch.cat([full[nll_r_t, nll_p_t], full[kl_rows, pos_t[kl_rows]]]).float()
            state["first"] = False
            logp = torch.log_softmax(logits, -1)
            n_nll = len(nll_r)
            tok_lp = logp[:n_nll].gather(1, nll_lab_t[:, None])[:, 0]
            row_nll = torch.zeros(n_rw, device=dev).index_add(0, nll_r_t, -tok_lp) / row_ntok
            req_nll = torch.zeros(u, device=dev).index_add(0, owner_t[:n_rw], row_nll) / n_t
            kl_lp = logp[n_nll:]
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            if s.kl_direction == "current_initial":
                kl = (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)
            else:
                kl = (kl_init.exp() * (kl_init - kl_lp)).sum(-1)
            decay = s.weight_decay * delta.norm(dim=1) / h_init.norm(dim=1).clamp(min=1e-8) ** 2
            loss = req_nll + s.kl_factor * kl + decay
            lv = loss.detach().cpu()
            active = ~done
            last_loss[active] = lv[active]
            n_steps[active] = it
            done |= lv < s.early_stop_loss
            if bool(done.all()) or it == s.steps - 1:
                break
            keep = delta.detach()[done.to(dev)].clone()
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                if done.any():
                    delta[done.to(dev)] = keep
                max_norm = s.clamp_norm_factor * h_init.norm(dim=1)
                nrm = delta.norm(dim=1)
                scale = torch.where(nrm > max_norm, max_norm / nrm.clamp(min=1e-12), torch.ones_like(nrm))
                delta.mul_(scale[:, None])
    finally:
        handle.remove()
    z = (h_init + delta.detach()).float().cpu()
    infos = []
    for j, r in enumerate(requests):
        infos.append({"case": r.label, "loss": round(float(last_loss[j]), 4), "steps": int(n_steps[j]),
                      "init_norm": round(float(h_init[j].norm()), 3),
                      "delta_norm": round(float(delta.detach()[j].norm()), 3)})
    return z, infos


@contextmanager
def restored(lm: LM, names) -> Iterator[None]:
    """Put the named parameters back to their current values on exit (bit-exact copies)."""
    params = dict(lm.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


@contextmanager
def swapped_weights(lm: LM, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace named parameters' values (used by NSE to rewind to the original weights)."""
    params = dict(lm.model.named_parameters())
    with restored(lm, weights):
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        yield
