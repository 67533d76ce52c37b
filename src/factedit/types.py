"""The nouns: what to change (`EditRequest`) and how to check it (`EvalCase`).

Both are frozen and validated on construction, so a bad record fails before any model work, with
a message that names the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import FactEditError


def _label(case_id: Any, where: str | None) -> str:
    parts = [p for p in (where, None if case_id is None else f"case_id={case_id}") if p]
    return " ".join(parts) if parts else "request"


def _need_str(value: Any, name: str, label: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise FactEditError(f"{label}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise FactEditError(f"{label}: field '{name}' is empty")
    return value


@dataclass(frozen=True)
class EditRequest:
    """Change the model so that ``prompt`` (which mentions ``subject``) continues with ``target_new``.

    ``prompt`` may contain ``{}`` in place of the subject (ROME style); it is filled in on construction.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | int | None = None
    where: str | None = field(default=None, compare=False, repr=False)  # file:line, for error messages

    def __post_init__(self) -> None:
        label = _label(self.case_id, self.where)
        _need_str(self.prompt, "prompt", label)
        _need_str(self.subject, "subject", label)
        _need_str(self.target_new, "target_new", label)
        if self.target_true is not None:
            _need_str(self.target_true, "target_true", label)
        if "{}" in self.prompt:
            object.__setattr__(self, "prompt", self.prompt.replace("{}", self.subject, 1))
        if self.subject not in self.prompt:
            raise FactEditError(f"{label}: subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise FactEditError(f"{label}: target_new equals target_true ({self.target_new!r})")

    @property
    def label(self) -> str:
        return _label(self.case_id, self.where)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "subject": self.subject, "target_new": self.target_new,
                "target_true": self.target_true, "case_id": self.case_id}

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None) -> EditRequest:
        if not isinstance(d, dict):
            raise FactEditError(f"{where or 'request'}: expected an object, got {type(d).__name__}")
        label = _label(d.get("case_id"), where)
        for key in ("prompt", "subject", "target_new"):
            if key not in d:
                raise FactEditError(f"{label}: missing field '{key}'")
        return cls(prompt=d["prompt"], subject=d["subject"], target_new=d["target_new"],
                   target_true=d.get("target_true"), case_id=d.get("case_id"), where=where)


@dataclass(frozen=True)
class EvalCase:
    """One benchmark case: the edit plus the probes that measure it.

    CounterFact: paraphrases are scored new-vs-true; neighbourhood prompts (other subjects, same
    relation) should keep ``neighborhood_target`` (default: the request's true object) over target_new.
    zsRE: ``locality`` holds (question, answer) pairs scored by token accuracy and by agreement with
    the pre-edit model.
    """

    request: EditRequest
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_target: str | None = None
    locality: tuple[tuple[str, str], ...] = ()
    # KnowEdit: the kind of each locality pair (Relation_Specificity, Forgetfulness; empty: one kind), and the
    # portability questions as (kind, prompt, answer) triples (Reasoning, Subject_Aliasing, ...)
    locality_kinds: tuple[str, ...] = ()
    portability: tuple[tuple[str, str, str], ...] = ()
    generation_prompts: tuple[str, ...] = ()
    # further edits applied together with ``request`` (a multi-hop case edits up to four facts at once)
    extra_requests: tuple[EditRequest, ...] = ()

    def __post_init__(self) -> None:
        label = self.request.label
        for r in (self.request, *self.extra_requests):
            if not isinstance(r, EditRequest):
                raise FactEditError(f"{label}: edit requests must be EditRequest, got {type(r).__name__}")
        for p in self.paraphrase_prompts + self.neighborhood_prompts + self.generation_prompts:
            _need_str(p, "probe prompt", label)
        for pair in self.locality:
            if len(pair) != 2:
                raise FactEditError(f"{label}: locality entries must be (prompt, answer) pairs")
            _need_str(pair[0], "locality prompt", label)
            _need_str(pair[1], "locality answer", label)
        if self.locality_kinds and len(self.locality_kinds) != len(self.locality):
            raise FactEditError(f"{label}: {len(self.locality_kinds)} locality kinds for {len(self.locality)} pairs")
        for trip in self.portability:
            if len(trip) != 3:
                raise FactEditError(f"{label}: portability entries must be (kind, prompt, answer) triples")
            for part, what in zip(trip, ("portability kind", "portability prompt", "portability answer")):
                _need_str(part, what, label)
        if self.neighborhood_prompts and (self.neighborhood_target or self.request.target_true) is None:
            raise FactEditError(f"{label}: neighbourhood prompts need a true object (target_true)")

    @property
    def case_id(self):
        return self.request.case_id

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        """Every edit of the case, the main one first."""
        return (self.request, *self.extra_requests)
