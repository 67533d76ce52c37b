"""The editor network of MEND and MALMEN (specs/hypernetwork.md §2, §6): one per edited weight shape, shared by
the modules of that shape through per-module embeddings.

    x = normalise([u; g])                                  running mean / std per shape, (n, d_in + d_out)
    x ← x + s_ℓ ⊙ ReLU(x A_k B_k + b_k) + t_ℓ,  k = 1..K    residual low-rank blocks; A ~ N(0, 1), B = 0, b = 0
    ũ, g̃ = split(x)                                        pseudo-key (n, d_in), pseudo-value-gradient (n, d_out)

with per-module scale s_ℓ (init 1) and shift t_ℓ (init 0) after the ReLU (as the official MALMEN code places
them), and per-module step size η_ℓ (init 1e-6) and log-regulariser λ̃_ℓ (init 0, λ_ℓ = e^{λ̃_ℓ}). With B = 0 the
network starts as the identity on the normalised inputs; the ReLU is written clamp(min=0), as MEND's own code
does, because torch.relu has zero gradient at the all-zero start and the blocks would never train. The normaliser is cumulative over every row it is
updated with, and never updated by fewer than two rows (a one-row variance is NaN and would poison it).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import FactEditError


class RunningNorm(nn.Module):
    """Cumulative mean and variance of the rows seen (float64 buffers), merged batch by batch (Chan et al.)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(d, dtype=torch.float64))  # sum of squared deviations

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the rows of x (n, d) into the running statistics; fewer than two rows are ignored."""
        n = x.shape[0]
        if n < 2:
            return
        xd = x.detach().double()
        b_mean = xd.mean(0)
        b_m2 = ((xd - b_mean) ** 2).sum(0)
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta**2 * self.count * n / total
        self.count.fill_(total)

    @property
    def std(self) -> torch.Tensor:
        var = self.m2 / (self.count - 1).clamp(min=1)
        return var.sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(self.count) < 2:
            raise FactEditError("the editor network's normaliser has seen fewer than two rows: capture first")
        return (x - self.mean.to(x.dtype)) / (self.std.to(x.dtype) + self.eps)


class EditorNet(nn.Module):
    """g_θ for one weight shape (d_in, d_out), shared by ``n_modules`` modules of that shape."""

    def __init__(self, d_in: int, d_out: int, n_modules: int, rank: int, n_blocks: int = 2,
                 eta_init: float = 1e-6) -> None:
        super().__init__()
        if rank < 1 or n_blocks < 0 or n_modules < 1:
            raise FactEditError("editor network: rank and the number of modules must be positive")
        self.d_in, self.d_out, self.n_modules, self.rank, self.n_blocks = d_in, d_out, n_modules, rank, n_blocks
        D = d_in + d_out
        self.norm = RunningNorm(D)
        self.A = nn.ParameterList([nn.Parameter(torch.randn(D, rank)) for _ in range(n_blocks)])  # (D, r)
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(rank, D)) for _ in range(n_blocks)])  # (r, D)
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(D)) for _ in range(n_blocks)])  # (D,)
        self.scale = nn.Parameter(torch.ones(n_blocks, n_modules, D))  # s_ℓ per block and module
        self.shift = nn.Parameter(torch.zeros(n_blocks, n_modules, D))  # t_ℓ
        self.eta = nn.Parameter(torch.full((n_modules,), float(eta_init)))  # η_ℓ
        self.log_lam = nn.Parameter(torch.zeros(n_modules))  # λ̃_ℓ

    def spec(self) -> dict:
        return {"d_in": self.d_in, "d_out": self.d_out, "n_modules": self.n_modules, "rank": self.rank,
                "n_blocks": self.n_blocks}

    def forward(self, u: torch.Tensor, g: torch.Tensor, module: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ũ, g̃) for keys u (n, d_in) and value gradients g (n, d_out) of module index ``module``."""
        if not 0 <= module < self.n_modules:
            raise FactEditError(f"editor network: module index {module} out of range 0..{self.n_modules - 1}")
        x = self.norm(torch.cat([u, g], -1))  # (n, D)
        for k in range(self.n_blocks):
            # ReLU as clamp(min=0), whose gradient at 0 is 1 (torch.relu's is 0): with B = 0 and b = 0 every
            # pre-activation starts at exactly 0, and a relu there would never let a gradient reach B or b
            h = (x @ self.A[k] @ self.B[k] + self.b[k]).clamp(min=0)  # (n, D) through rank r
            x = x + self.scale[k, module] * h + self.shift[k, module]
        return x[:, : self.d_in], x[:, self.d_in :]

    def lam(self, module: int) -> torch.Tensor:
        return self.log_lam[module].exp()
