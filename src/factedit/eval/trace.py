"""Causal tracing (Meng et al. 2022, ROME §2): which layers carry a fact at the subject's last token.

For a prompt whose subject the model completes with answer token a:

- clean run: P_clean(a);
- corrupted runs: Gaussian noise (std ``noise_factor`` × the std of the subject-token embeddings, ROME: 3)
  is added to the subject tokens' embeddings, ``samples`` times: P_corrupt(a), averaged;
- restored runs: the corrupted run again, with one state put back to its clean value: the block output
  ("hidden") at layer l, or the MLP / attention outputs ("mlp", "attn") of a ``window`` of layers
  centred on l, at one token position: P_restored(a).

The indirect effect of (kind, l, position) is P_restored − P_corrupt. ROME edits the layer where the MLP
effect at the subject's last token peaks; MEMIT's layer window covers the rise of that curve. All
restorations of one prompt run in batched forwards (each row restores its own state; the noise of
sample i is the same in every row of sample i).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import FactEditError
from ..lm.batch import batch_logits, make_batch
from ..lm.hooks import Trace, TraceDict, first, replace_first
from ..lm.load import LM
from ..lm.tokens import encode, encode_target, subject_last_index

log = logging.getLogger(__name__)
KINDS = ("hidden", "mlp", "attn")


@dataclass
class Fact:
    prompt: str
    subject: str
    answer: str | None = None  # None: the model's own greedy next token


def _subject_span(lm: LM, prompt: str, subject: str) -> tuple[int, int]:
    """Token indices [first, last] of the subject's first occurrence in ``prompt``."""
    start = prompt.find(subject)
    if start < 0:
        raise FactEditError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    last = subject_last_index(lm.tokenizer, prompt, subject, start=start)
    enc = lm.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    first = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and b > a)
    return first, last


@torch.no_grad()
def embedding_std(lm: LM, facts: Sequence[Fact]) -> float:
    """Standard deviation of the subject tokens' input embeddings (ROME's ``collect_embedding_std``)."""
    emb = lm.model.get_input_embeddings()
    vals = []
    for f in facts:
        ids = encode(lm.tokenizer, f.subject)
        vals.append(emb(torch.tensor([ids], device=lm.device))[0].float())
    return float(torch.cat(vals).std())


def _module_path(lm: LM, kind: str, layer: int) -> str:
    if kind == "hidden":
        return lm.arch.block_path(layer)
    if kind == "mlp":
        return lm.arch.mlp_out_path(layer)  # the out-projection is the MLP's last op: its output is the MLP's
    return f"{lm.arch.block_path(layer)}.{lm.arch.attn_out}"


@torch.no_grad()
def trace_fact(lm: LM, fact: Fact, noise: float, kinds: Sequence[str] = KINDS, samples: int = 10,
               window: int = 10, seed: int = 0, max_rows: int = 512) -> dict:
    """Indirect effects of one fact: {"p_clean", "p_corrupt", "answer", "positions": {name: index},
    kind: {position name: [P_restored − P_corrupt per layer]}}."""
    for k in kinds:
        if k not in KINDS:
            raise FactEditError(f"unknown trace kind '{k}' (one of {', '.join(KINDS)})")
    tok, dev, model = lm.tokenizer, lm.device, lm.model
    ids = encode(tok, fact.prompt)
    s0, s1 = _subject_span(lm, fact.prompt, fact.subject)
    n_layers = lm.n_layers
    x = torch.tensor([ids], device=dev)
    # clean run: every module output we may restore, at every position
    names = {(k, l): _module_path(lm, k, l) for k in kinds for l in range(n_layers)}
    with TraceDict(model, set(names.values()), detach=True) as td:
        logits = model(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1].float()
    clean = {key: td[p].output[0] for key, p in names.items()}
    if fact.answer is None:
        answer = int(logits.argmax())
    else:
        answer = encode_target(tok, fact.prompt, fact.answer)[1][0]
    p_clean = float(torch.softmax(logits, -1)[answer])

    gen = torch.Generator().manual_seed(seed)
    eps = (torch.randn(samples, s1 - s0 + 1, lm.hidden_size, generator=gen) * noise).to(dev)
    positions = {"subject_last": s1, "last": len(ids) - 1}
    # one config per (kind, layer, position); config -1 is the plain corrupted run
    configs = [(k, l, p) for k in kinds for l in range(n_layers) for p in positions.values()]
    all_cfg = [None] + configs
    probs = torch.zeros(len(all_cfg))
    per = max(1, max_rows // samples)
    emb = model.get_input_embeddings()
    for c0 in range(0, len(all_cfg), per):
        chunk = all_cfg[c0 : c0 + per]
        B = len(chunk) * samples

        def add_noise(out, B=B):
            out = out.clone()
            out[:, s0 : s1 + 1] += eps.repeat(B // samples, 1, 1).to(out.dtype)
            return out

        # which rows restore which module at which position
        restore: dict = {}
        for ci, cfg in enumerate(chunk):
            if cfg is None:
                continue
            k, l, p = cfg
            span = [l] if k == "hidden" else range(max(0, l - window // 2), min(n_layers, l - window // 2 + window))
            for ll in span:
                restore.setdefault((k, ll), []).append((ci, p))

        def put_back(out, _args, key, rows):
            o = first(out).clone()
            for ci, p in rows:
                o[ci * samples : (ci + 1) * samples, p] = clean[key][p].to(o.dtype)
            return replace_first(out, o)

        with contextlib.ExitStack() as stack:
            stack.enter_context(Trace(emb, retain_output=False, edit_output=lambda out, _a: add_noise(out)))
            for key, rows in restore.items():
                stack.enter_context(Trace(model.get_submodule(names[key]), retain_output=False,
                                          edit_output=functools.partial(put_back, key=key, rows=rows)))
            out = model(input_ids=x.expand(B, -1), use_cache=False, logits_to_keep=1).logits[:, -1].float()
        p = torch.softmax(out, -1)[:, answer].view(len(chunk), samples).mean(1)
        probs[c0 : c0 + len(chunk)] = p.cpu()
    p_corrupt = float(probs[0])
    res: dict = {"prompt": fact.prompt, "subject": fact.subject, "answer": tok.decode([answer]),
                 "p_clean": p_clean, "p_corrupt": p_corrupt, "positions": positions}
    for k in kinds:
        res[k] = {}
        for name, p in positions.items():
            res[k][name] = [round(float(probs[1 + configs.index((k, l, p))]) - p_corrupt, 6) for l in range(n_layers)]
    return res


@torch.no_grad()
def known_facts(lm: LM, facts: Sequence[Fact], limit: int | None = None, batch: int = 32) -> list[int]:
    """Indices of the facts the model knows (ROME's "known facts"): its greedy next token after the
    prompt is the first token of the fact's answer. Facts without an answer are refused. Scans in
    order and stops after ``limit`` known facts."""
    for i, f in enumerate(facts):
        if f.answer is None:
            raise FactEditError(f"known_facts: fact {i} ({f.prompt!r}) has no answer to compare with")
    keep: list[int] = []
    for b0 in range(0, len(facts), batch):
        chunk = facts[b0 : b0 + batch]
        tb = make_batch(lm, [f.prompt for f in chunk], [f.answer for f in chunk])
        logits, labels = batch_logits(lm, tb)  # only the positions that predict an answer token
        first = (labels >= 0).int().argmax(1)  # each row's first answer position
        rows = torch.arange(len(chunk), device=labels.device)
        hit = (logits[rows, first].argmax(-1) == labels[rows, first]).tolist()
        for r, ok in enumerate(hit):
            if ok:
                keep.append(b0 + r)
                if limit is not None and len(keep) >= limit:
                    return keep
    return keep


def trace(lm: LM, facts: Sequence[Fact], kinds: Sequence[str] = KINDS, samples: int = 10, window: int = 10,
          noise_factor: float = 3.0, seed: int = 0, progress: bool = True) -> dict:
    """Causal traces of ``facts`` and their mean indirect effect per kind, position and layer."""
    if not facts:
        raise FactEditError("trace: no facts to trace")
    if samples < 1 or window < 1:
        raise FactEditError("trace: samples and window must be >= 1")
    for i, f in enumerate(facts):
        if f.subject not in f.prompt:
            raise FactEditError(f"trace: fact {i}: subject {f.subject!r} does not occur in prompt {f.prompt!r}")
    noise = noise_factor * embedding_std(lm, facts)
    per = [trace_fact(lm, f, noise, kinds, samples, window, seed + i)
           for i, f in enumerate(tqdm(facts, desc="causal trace", disable=None if progress else True))]
    mean: dict = {}
    for k in kinds:
        mean[k] = {}
        for name in ("subject_last", "last"):
            rows = torch.tensor([r[k][name] for r in per])
            mean[k][name] = [round(float(v), 6) for v in rows.mean(0)]
    mlp = mean.get("mlp", mean.get("hidden"))["subject_last"]
    peak = int(torch.tensor(mlp).argmax())
    return {"n_facts": len(facts), "samples": samples, "window": window, "noise_factor": noise_factor,
            "noise_std": noise, "seed": seed, "num_layers": lm.n_layers,
            "mean_p_clean": sum(r["p_clean"] for r in per) / len(per),
            "mean_p_corrupt": sum(r["p_corrupt"] for r in per) / len(per),
            "mean": mean, "peak_layer": peak, "peak_kind": "mlp" if "mlp" in mean else "hidden", "facts": per}
