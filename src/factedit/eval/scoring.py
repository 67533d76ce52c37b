"""Scoring primitives: teacher-forced target scores, perplexity, sampling, n-gram entropy."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..lm.batch import batch_logits, make_batch
from ..lm.hooks import forward_context
from ..lm.load import LM, holds_lock
from ..lm.tokens import encode, encode_target, pad_batch


@dataclass
class TargetScore:
    nll: float  # mean over target tokens of −log P(token | prompt, previous target tokens)
    token_acc: float  # fraction of target tokens that are the argmax at their position
    argmax: list[int]  # the argmax token at each target position (for pre/post agreement)



@torch.no_grad()
@holds_lock
def score_targets(lm: LM, prompts: list[str], targets: list[str], batch_size: int = 32,
                  desc: str | None = None, pack: bool | None = None) -> list[TargetScore]:
    """Teacher-forced scores of ``target`` after ``prompt`` for each pair, in batches sorted by length.

    ``pack`` (default: whenever ``packable(lm)``) scores all the targets of one prompt in one row: the
    prompt once, then each target's tokens attending only to the prompt and to themselves (a block
    attention mask, position ids restarting after the prompt). CounterFact asks every prompt for two
    targets, so this runs the prompt once instead of twice; the scores are those of the separate rows
    up to float rounding (tested)."""
    if pack is None:
        pack = packable(lm)
    if pack:
        return _score_packed(lm, prompts, targets, batch_size, desc)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
    out: list[TargetScore | None] = [None] * len(prompts)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=desc, leave=False, disable=None if desc else True):
        idx = order[s : s + batch_size]
        batch = make_batch(lm, [prompts[i] for i in idx], [targets[i] for i in idx])
        logits, labels = batch_logits(lm, batch)  # (B, K, V), (B, K)
        logp = torch.log_softmax(logits.float(), dim=-1)
        valid = labels >= 0
        tok_lp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, K)
        am = logits.argmax(-1)  # (B, K)
        for row, i in enumerate(idx):
            v = valid[row]
            lab = labels[row][v]
            pred = am[row][v]
            out[i] = TargetScore(nll=float(-tok_lp[row][v].mean()), token_acc=float((pred == lab).float().mean()),
                                 argmax=pred.tolist())
    return out  # type: ignore[return-value]


def packable(lm: LM) -> bool:
    """Whether targets may share their prompt's row: only for a model without forward hooks. A hooked
    module (a module patch, an intervention) may read the whole input, e.g. pool over it, and would
    then see the other targets too; edited weights act token by token and are safe. And only with
    attention kernels that take an arbitrary mask (``sdpa``, ``eager``; flash-attention takes padding
    masks only)."""
    if getattr(lm.model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def _window_limit(lm: LM) -> int | None:
    """The attention window of models with sliding-window layers (a block mask cannot give those layers
    their own window, so longer packed rows fall back to separate rows)."""
    w = getattr(lm.model.config, "sliding_window", None)
    return int(w) if isinstance(w, int) and w > 0 else None


def _score_packed(lm: LM, prompts: list[str], targets: list[str], batch_size: int, desc: str | None) -> list[TargetScore]:
    tok, dev = lm.tokenizer, lm.device
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    # One row per distinct prompt: prompt ids, then for each of its targets the target's tokens but the
    # last (the first target token is predicted from the prompt's last position, shared by all targets).
    # (ids, segment id per column, position per column, prompt length, [(pair, target ids, columns predicting them)])
    rows = []
    for p, idx in groups.items():
        p_ids = encode(tok, p)
        ids, seg, pos, reads = list(p_ids), [0] * len(p_ids), list(range(len(p_ids))), []
        for j, i in enumerate(idx, start=1):
            t_ids = encode_target(tok, p, targets[i])[1]
            start = len(ids)
            ids += t_ids[:-1]
            seg += [j] * (len(t_ids) - 1)
            pos += [len(p_ids) + k for k in range(len(t_ids) - 1)]
            reads.append((i, t_ids, [len(p_ids) - 1] + [start + k for k in range(len(t_ids) - 1)]))
        rows.append((ids, seg, pos, len(p_ids), reads))
    limit = _window_limit(lm)
    if limit is not None and any(max(r[2]) + 1 > limit for r in rows):
        return score_targets(lm, prompts, targets, batch_size, desc, pack=False)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
    out: list[TargetScore | None] = [None] * len(prompts)
    dtype = next(lm.model.parameters()).dtype
    neg = torch.finfo(dtype).min
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=None if desc else True):
        part = [rows[r] for r in order[s : s + batch_size]]
        T = max(len(r[0]) for r in part)
        B = len(part)
        ids = pad_batch([r[0] for r in part], tok.pad_token_id if tok.pad_token_id is not None else 0)[0]
        seg = pad_batch([r[1] for r in part], -1)[0]  # padding: segment -1, seen by no real column
        pos = pad_batch([r[2] for r in part], 0)[0]
        col = torch.arange(T)
        # query q sees key k when k is not after q, k is real, and k is a prompt column or in q's own target
        see = (col[None, None, :] <= col[None, :, None]) & (seg[:, None, :] >= 0) \
            & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
        see |= torch.eye(T, dtype=torch.bool)[None]  # padding queries see themselves (no empty softmax rows)
        mask = torch.zeros((B, 1, T, T), dtype=dtype).masked_fill(~see[:, None], neg)
        p_lens = torch.tensor([r[3] for r in part])
        first = int(p_lens.min()) - 1  # the earliest column any read needs: the shortest prompt's last
        keep = T - first
        with forward_context(p_lens):
            logits = lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                              logits_to_keep=keep, use_cache=False).logits[:, -keep:]
        bi, ci, lab, who = [], [], [], []
        for b, (_, _, _, _, reads) in enumerate(part):
            for i, t_ids, cols in reads:
                bi += [b] * len(cols)
                ci += [c - first for c in cols]
                lab += t_ids
                who.append((i, len(cols)))
        picked = logits[torch.tensor(bi, device=dev), torch.tensor(ci, device=dev)].float()  # (N, V)
        lab_t = torch.tensor(lab, device=dev)
        tok_lp = torch.log_softmax(picked, -1).gather(1, lab_t[:, None])[:, 0]
        hit = picked.argmax(-1)
        at = 0
        for i, n in who:
            lp, am, lb = tok_lp[at : at + n], hit[at : at + n], lab_t[at : at + n]
            out[i] = TargetScore(nll=float(-lp.mean()), token_acc=float((am == lb).float().mean()), argmax=am.tolist())
            at += n
    return out  # type: ignore[return-value]


def _prefix(tok) -> list[int]:
    """The ids the tokenizer puts before every text (Gemma's / Llama's BOS; none for SmolLM2)."""
    probe = "a b"
    full, bare = encode(tok, probe), list(tok(probe, add_special_tokens=False)["input_ids"])
    n = len(full) - len(bare)
    return full[:n] if n > 0 and full[n:][: len(bare)] == bare else []


@torch.no_grad()
@holds_lock
def perplexity(lm: LM, text: str, max_tokens: int = 16384, window: int = 512) -> float:
    """Token perplexity of the first ``max_tokens`` tokens of ``text`` in non-overlapping windows.

    Every window starts the way the tokenizer starts a text: with BOS where it adds one (Gemma degrades
    badly without it), which is then context, not scored. Without a BOS (SmolLM2) the first token of
    each window is context only."""
    tok = lm.tokenizer
    pre = _prefix(tok)
    body = list(tok(text[: max_tokens * 8], add_special_tokens=False)["input_ids"])[:max_tokens]
    if len(body) < 2:
        raise ValueError("perplexity text is empty")
    step = window - len(pre)
    if step < 2:
        raise ValueError(f"perplexity window {window} is too short")
    nll, count = 0.0, 0
    for s in range(0, len(body) - (0 if pre else 1), step):
        chunk = torch.tensor([pre + body[s : s + step]], device=lm.device)  # (1, W)
        if chunk.shape[1] < 2:
            break
        with forward_context(torch.tensor([chunk.shape[1]])):
            logits = lm.model(input_ids=chunk, use_cache=False).logits[0, :-1].float()  # (W-1, V)
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str) -> float:
    """CounterFact's generation entropy of one text: mean of (2/3)·H₂ and (4/3)·H₃, where Hₙ is the
    entropy (bits) of the text's n-gram frequency distribution. Words are split with a regex
    (word runs and single punctuation marks), standing in for NLTK's word_tokenize."""
    words = _WORD.findall(text)
    hs = []
    for n, w in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        hs.append(w * h)
    return sum(hs) / len(hs)
