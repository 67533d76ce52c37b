"""The closed-form solves of the locate family, in float64, with errors a user can act on."""

from __future__ import annotations

import torch

from ...errors import FactEditError


def solve(A: torch.Tensor, B: torch.Tensor, what: str) -> torch.Tensor:
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise FactEditError(f"{what}: the system contains NaN or infinite values (check the key statistics)")
    try:
        return torch.linalg.solve(A, B)
    except torch.linalg.LinAlgError:
        raise FactEditError(f"{what}: the system is singular; collect key statistics over more tokens "
                            "(--set mom2_tokens=...) or raise the regulariser") from None
