"""Mapping a residual change through a norm after the MLP (Gemma 2/3, OLMo 2): the out-projection's output
change that moves the block output by R."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...errors import FactEditError

log = logging.getLogger(__name__)


def rms_gain(norm: nn.Module, d: int, like: torch.Tensor) -> torch.Tensor:
    """The gain g of an RMS norm n(x) = g ⊙ x / sqrt(mean(x²) + eps), read by probing it (Gemma's
    (1 + weight), OLMo 2's weight alike); refused for a norm that is not of that form."""
    with torch.no_grad():
        ones = torch.ones(1, d, dtype=like.dtype, device=like.device)
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        g = norm(ones)[0].double() * (1.0 + eps) ** 0.5
        x = torch.linspace(-2.0, 3.0, d, dtype=like.dtype, device=like.device)[None]
        want = g * x[0].double() / (x[0].double().pow(2).mean() + eps).sqrt()
        got = norm(x)[0].double()
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())):
            raise FactEditError(f"the norm after the MLP ({type(norm).__name__}) is not an RMS norm with a gain; "
                                "the residual cannot be mapped through it")
    return g


def _ellipsoid_point(g: torch.Tensor, t: torch.Tensor, target: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Per row: the v minimising ‖g ⊙ v − t‖ subject to ‖v‖² = target (g: (d,), t: (u, d), target:
    (u, 1)). Stationary points are v = g t / (g² + μ); ‖v(μ)‖² falls as μ rises on (−min g², ∞), so μ is
    found by bisection there (the global minimiser lies on that branch)."""
    g2 = g.pow(2)[None]
    gt = g[None] * t

    def size(mu):
        return (gt / (g2 + mu)).pow(2).sum(-1, keepdim=True)

    lo = torch.full_like(target, -float(g2.min())) * (1 - 1e-9)
    hi = torch.ones_like(target)
    for _ in range(200):  # grow the upper end until the size drops below the target
        over = size(hi) > target
        if not bool(over.any()):
            break
        hi = torch.where(over, hi * 4, hi)
    lo = torch.where(size(torch.zeros_like(target)) > target, torch.zeros_like(target), lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        big = size(mid) > target
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    return gt / (g2 + (lo + hi) / 2)


def through_post_norm(norm: nn.Module, m: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """For blocks that normalise the MLP output before adding it to the residual stream (Gemma 2/3,
    OLMo 2): the change of the out-projection's output m (u × d) that moves the block output by R.

    The block adds n(m) = g ⊙ m / rms(m), so it can only output g ⊙ v with ‖v‖² fixed by the scale (d
    when every gain is non-zero). Coordinates with a zero gain cannot be moved and keep m's values (their
    sum of squares a). For the wanted t = n(m) + R: where some scale r within a factor 4 of rms(m) reaches
    t exactly (r² (d − ‖t/g‖²) = a), m* = r·t/g. Otherwise m* = rms(m)·v with v the point of the
    reachable ellipsoid {g ⊙ v : ‖v‖² = ‖m_live‖²/rms(m)²} closest to t: components along the large-gain
    coordinates (Gemma's massive activations) stay where they are unless R asks to move them. MEMIT's
    spreading recomputes the remaining residual at every layer, so what one layer cannot reach passes to
    the next.
    """
    g = rms_gain(norm, m.shape[-1], m)
    md = m.double()
    d = m.shape[-1]
    with torch.no_grad():
        t = norm(m).double() + R.double()
    live = g.abs() > 1e-6 * float(g.abs().max())
    gl = torch.where(live, g, torch.ones_like(g))
    tl = torch.where(live, t, torch.zeros_like(t))
    u = tl / gl
    a = torch.where(live, torch.zeros_like(md), md).pow(2).sum(-1, keepdim=True)
    r0 = md.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-12)
    room = d - u.pow(2).sum(-1, keepdim=True)
    r_exact = (a / room.clamp(min=1e-24)).sqrt()
    exact = (room > 0) & (r_exact > r0 / 4) & (r_exact < 4 * r0)
    # the closest reachable output at m's own scale: ‖v_live‖² = (d r0² − a) / r0²
    size = ((d * r0.pow(2) - a).clamp(min=0) / r0.pow(2))
    v = _ellipsoid_point(torch.where(live, g, torch.zeros_like(g)), tl, size)
    target = torch.where(live, torch.where(exact, u * r_exact, v * r0), md)
    return target - md
