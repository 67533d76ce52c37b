"""Context templates (specs/locate.md §0.2): ["{}"] plus prefixes sampled once from the unedited model,
each followed by ". {}", cached per model fingerprint with the seed in the key; and filling them with prompts."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from ...fsutil import write_json
from ...lm.load import LM, cache_root
from ...lm.tokens import encode
from ...types import EditRequest

log = logging.getLogger(__name__)


TEMPLATE_SEEDS = ("The", "Therefore", "Because", "I", "You")


def context_templates(lm: LM, lengths: Sequence[int], per_length: int, seed: int = 0) -> list[str]:
    """["{}"] + ``per_length`` sampled prefixes of each length (top-k 5), each followed by ". {}".

    Sampled from the unedited model once and cached by fingerprint; the seed is part of the key."""
    from ...lm.generate import sample

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


def templated(requests: Sequence[EditRequest], templates: list[str]) -> tuple[list[str], list[str], list[int]]:
    """Texts (request-major, each template filled with the prompt), subjects, and each subject's
    character offset in its text."""
    texts, subjects, starts = [], [], []
    for r in requests:
        for t in templates:
            text, off = fill(t, r.prompt)
            texts.append(text)
            subjects.append(r.subject)
            starts.append(off + r.prompt.index(r.subject))
    return texts, subjects, starts
