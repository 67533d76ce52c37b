"""Aggregating per-token shifts into one weight shift per module (specs/hypernetwork.md §2, §6).

Shapes follow MALMEN's notation, with the weight viewed as W ∈ R^{d_in × d_out} (value v = Wᵀu); a module stored as
(d_out, d_in) (torch's Linear) takes the transpose.

- MEND: the sum of the per-token rank-one shifts, S = −η Σ_j ũ_j g̃_jᵀ = −η Ũᵀ G̃.
- MALMEN: the one shift that realises every token's value change d_j by least squares,
  S* = argmin Σ_j ‖u_jᵀ S − d_j‖² + λ‖S‖²_F = (UᵀU + λI)⁻¹ Uᵀ D, solved in float64, in the primal (d_in × d_in)
  or the dual (n × n: S* = Uᵀ (UUᵀ + λI)⁻¹ D, the push-through identity) form, whichever is smaller, by a
  Cholesky factorisation. Autograd differentiates through the solve, so the meta-gradient is exact.
"""

from __future__ import annotations

import torch

from ...errors import FactEditError


def mend_sum(U_t: torch.Tensor, G_t: torch.Tensor, eta: torch.Tensor | float) -> torch.Tensor:
    """S = −η Ũᵀ G̃: (n, d_in), (n, d_out) -> (d_in, d_out)."""
    return -eta * (U_t.transpose(0, 1) @ G_t)


def value_differences(U: torch.Tensor, U_t: torch.Tensor, G_t: torch.Tensor, eta: torch.Tensor | float) -> torch.Tensor:
    """MALMEN's d_j = −η (u_j · ũ_j) g̃_j, the change token j's own rank-one shift makes to its value: (n, d_out)."""
    return -eta * (U * U_t).sum(-1, keepdim=True) * G_t


def ridge_solve(U: torch.Tensor, D: torch.Tensor, lam: torch.Tensor | float, form: str = "auto") -> torch.Tensor:
    """S* = (UᵀU + λI)⁻¹ Uᵀ D for U (n, d_in), D (n, d_out), λ > 0, in float64; returns (d_in, d_out) float64.

    form: "primal", "dual" or "auto" (the smaller system)."""
    if U.shape[0] != D.shape[0]:
        raise FactEditError(f"ridge solve: U has {U.shape[0]} rows, D has {D.shape[0]}")
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=U.device)
    if not bool(lam_t > 0):
        raise FactEditError("ridge solve: λ must be positive")
    Ud, Dd = U.double(), D.double()
    n, d_in = Ud.shape
    if form == "auto":
        form = "dual" if n < d_in else "primal"
    if form == "primal":
        A = Ud.T @ Ud + lam_t * torch.eye(d_in, dtype=torch.float64, device=U.device)  # (d_in, d_in)
        L = torch.linalg.cholesky(A)
        return torch.cholesky_solve(Ud.T @ Dd, L)  # (d_in, d_out)
    if form == "dual":
        A = Ud @ Ud.T + lam_t * torch.eye(n, dtype=torch.float64, device=U.device)  # (n, n)
        L = torch.linalg.cholesky(A)
        return Ud.T @ torch.cholesky_solve(Dd, L)  # (d_in, d_out)
    raise FactEditError(f"unknown solve form '{form}' (primal, dual or auto)")


def ridge_factors(U: torch.Tensor, D: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """M (n, d_out) with S* = Uᵀ M: the dual form kept factored (S* has rank ≤ n), float64."""
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=U.device)
    if not bool(lam_t > 0):
        raise FactEditError("ridge solve: λ must be positive")
    Ud = U.double()
    A = Ud @ Ud.T + lam_t * torch.eye(Ud.shape[0], dtype=torch.float64, device=U.device)  # (n, n)
    return torch.cholesky_solve(D.double(), torch.linalg.cholesky(A))
