"""Tokenisation helpers shared by editors and evaluation.

Targets are tokenised *in context*: we encode ``prompt + " " + target`` and take the tokens after the
prompt's, so each tokenizer's own leading-space convention (GPT-2 'Ġ', SentencePiece '▁') is honoured
and BOS handling (Gemma adds ``<bos>``, SmolLM2 adds none) stays the tokenizer's business.
"""

from __future__ import annotations

import torch

from ..errors import FactEditError


def encode(tok, text: str) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens (BOS where the model expects one)."""
    return list(tok(text, add_special_tokens=True)["input_ids"])


def encode_target(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) for the continuation ``" " + target`` of ``prompt``."""
    p_ids = encode(tok, prompt)
    sep = "" if (prompt.endswith((" ", "\n")) or target.startswith(" ")) else " "
    full = encode(tok, prompt + sep + target)
    eos = tok.eos_token_id
    if eos is not None and p_ids and full and p_ids[-1] == eos and full[-1] == eos:
        p_ids, full = p_ids[:-1], full[:-1]  # tokenizers configured to append EOS to every text
    if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
        return p_ids, full[len(p_ids):]
    # The boundary merged across prompt and target: fall back to encoding the target on its own.
    t_ids = list(tok(sep + target, add_special_tokens=False)["input_ids"])
    if not t_ids:
        raise FactEditError(f"target {target!r} encodes to no tokens")
    return p_ids, t_ids


def subject_last_index(tok, prompt: str, subject: str, start: int | None = None) -> int:
    """Index (in ``encode(tok, prompt)``) of the last token of ``subject``: its first occurrence, or
    the occurrence at character offset ``start``."""
    if start is None:
        start = prompt.find(subject)
    elif prompt[start : start + len(subject)] != subject:
        raise FactEditError(f"subject {subject!r} is not at offset {start} of {prompt!r}")
    if start < 0:
        raise FactEditError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    end = start + len(subject)
    enc = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)
    last = None
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and a < end:  # the token overlaps the subject's span or precedes its end
            if b > start:
                last = i
    if last is None:
        raise FactEditError(f"subject {subject!r} maps to no token of prompt {prompt!r}")
    return last


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a (B, T) id tensor and its attention mask. Right padding keeps real tokens at
    positions 0..n-1, so no position-id bookkeeping is needed for causal LMs."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
