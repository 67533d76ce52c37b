"""Hooks written once (after MEMIT's ``nethook``) and the per-call forward context.

Every hook in factedit goes through these context managers, which always remove what they installed,
even when the forward raises:

- ``Trace(module, ...)``: keep a module's input and/or output (optionally with its gradient), replace the
  output with ``edit_output(output, inputs)``, or stop the forward right after the module (``stop=True``;
  the ``StopForward`` it raises is swallowed when the ``with`` block ends).
- ``TraceDict(model, paths, ...)``: the same for several named modules at once.
- ``installed(handles)``: removes raw ``torch`` hook handles on exit (for hooks that need their own body).

Per-call context: a caller that knows where each row's prompt ends, or has per-row data an intervention needs
(query texts, ...), sets it with ``forward_context(...)`` around its forward passes. It lives in a
``contextvars.ContextVar``, not in an attribute of the shared model, so another thread's forward never sees it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a stopping hook to end a forward early; swallowed by the ``Trace`` that raised it."""


def first(x: Any) -> Any:
    """The hidden state of a module output that may be a tuple (blocks return (h, ...) in some families)."""
    return x[0] if isinstance(x, tuple) else x


def replace_first(out: Any, h: torch.Tensor) -> Any:
    return (h, *out[1:]) if isinstance(out, tuple) else h


@contextlib.contextmanager
def installed(handles: Iterable[Any]) -> Iterator[None]:
    """Remove the given hook handles on exit, whatever happens inside."""
    hs = list(handles)
    try:
        yield
    finally:
        for h in hs:
            h.remove()


class Trace(contextlib.AbstractContextManager):
    """Hook one module for the duration of a ``with`` block.

    retain_input: keep the module's first positional input (or its ``hidden_states`` keyword) as ``.input``;
    retain_output: keep its output's hidden state as ``.output``; retain_grad: call ``retain_grad()`` on what is
    kept (for value gradients); detach: keep detached copies instead; edit_output(output, inputs) -> new output;
    stop: raise ``StopForward`` after the module ran (swallowed on exit of the ``with`` block)."""

    def __init__(self, module: nn.Module, *, retain_input: bool = False, retain_output: bool = True,
                 retain_grad: bool = False, detach: bool = False,
                 edit_output: Callable[[Any, tuple], Any] | None = None, stop: bool = False) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.stop = stop
        hs = []

        def keep(t: torch.Tensor) -> torch.Tensor:
            if detach:
                return t.detach()
            if retain_grad and t.requires_grad:
                t.retain_grad()
            return t

        if retain_input:
            def pre(_m, args, kwargs):
                self.input = keep(args[0] if args else kwargs["hidden_states"])

            hs.append(module.register_forward_pre_hook(pre, with_kwargs=True))

        def post(_m, args, out):
            if edit_output is not None:
                out = edit_output(out, args)
            if retain_output:
                self.output = keep(first(out))
            if stop:
                raise StopForward()
            return out

        if retain_output or edit_output is not None or stop:
            hs.append(module.register_forward_hook(post))
        self._hooks = hs

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return bool(self.stop and exc_type is not None and issubclass(exc_type, StopForward))


class TraceDict(dict, contextlib.AbstractContextManager):
    """``Trace`` for several modules of ``model`` named by dotted path: ``td[path].input`` / ``.output``.
    ``stop=True`` stops the forward after the last of them in forward order (the deepest block's)."""

    def __init__(self, model: nn.Module, paths: Iterable[str], *, stop_after: str | None = None,
                 **kw: Any) -> None:
        super().__init__()
        self.stop = stop_after is not None
        try:
            for p in paths:
                self[p] = Trace(model.get_submodule(p), **kw)
            if stop_after is not None:
                self["__stop__"] = Trace(model.get_submodule(stop_after), retain_output=False, stop=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for t in self.values():
            t.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return bool(self.stop and exc_type is not None and issubclass(exc_type, StopForward))


# ---- the per-call forward context -------------------------------------------------------------------------
@dataclass
class ForwardContext:
    """What the caller of a forward knows about its rows.

    prompt_lens: (B,) prompt tokens per row, or None when the whole input of a multi-token forward is the
    prompt; rows: per-row data an intervention needs (e.g. ``{"query": [str, ...]}``); cache: what an
    intervention prepared from this context (once per context, e.g. a generated neuron per query), keyed by the
    intervention; decoding: the forwards now run are single-token decoding steps after the prompt (set by the
    generator after its prompt forward)."""

    prompt_lens: torch.Tensor | None = None
    decoding: bool = False
    rows: dict[str, Any] = field(default_factory=dict)
    cache: dict[int, Any] = field(default_factory=dict, repr=False)


_CONTEXT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("factedit_forward", default=None)


def current_context() -> ForwardContext | None:
    return _CONTEXT.get()


@contextlib.contextmanager
def forward_context(prompt_lens: torch.Tensor | None = None, **rows: Any) -> Iterator[ForwardContext]:
    """Set the forward context for the forwards run inside the block (this thread / task only)."""
    ctx = ForwardContext(prompt_lens=prompt_lens, rows=rows)
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)
