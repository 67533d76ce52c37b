"""MeG stage 4: a conditional diffusion model over neuron weight vectors (written from the method's description).

- Data: x0 = the neuron's weight vector × ``scale`` (published: × 100), zero-padded to a multiple of the patch.
- Forward process: 1,000 steps, linear β from 1e-4 to 0.02 (float64 tables).
- The network predicts v = √ᾱ_t ε − √(1−ᾱ_t) x0 and, in a second channel, the interpolation value of a learned
  variance between the posterior variance β̃_t and β_t (learned range, as in improved DDPM / DiT).
- Training loss (hybrid): MSE(v̂, v) + the variational-bound term of the learned variance with the mean held fixed
  (KL of the true posterior to the model's Gaussian, in bits; at t = 0 the negative log-likelihood of x0 under a
  continuous Gaussian decoder: our choice, where image diffusion uses an 8-bit discretised likelihood that means
  nothing for weights).
- Sampling: ancestral (DDPM) over respaced steps {round(i · 999 / (S−1))} (S = 50: 0, 20, 41, …, 999), with the
  respaced β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}} and the learned variance; the network sees the original timestep.
  diffusers' ``DDPMScheduler(prediction_type="v_prediction", variance_type="learned_range",
  timestep_spacing="linspace", clip_sample=False)`` gives the same step (a test checks it).

Generators: ``DiT1D`` (patches of the vector as tokens, fixed 1-D sin-cos positions, adaLN blocks conditioned on
the timestep embedding plus the projected L2-normalised query embedding, dropout on the condition) and ``MLPGen``
(the paper's ablation). Both output (B, 2, P): v̂ and the variance value.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---- the Gaussian diffusion ------------------------------------------------------------------------------


def respaced_steps(T: int, S: int) -> list[int]:
    """S timesteps of 0..T-1 evenly spaced and rounded (linspace spacing), ascending."""
    if S >= T:
        return list(range(T))
    return sorted({int(round(x)) for x in np.linspace(0, T - 1, S)})


class Diffusion:
    """The noise schedule and its tables (float64 numpy, converted per use), optionally respaced."""

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 steps: list[int] | None = None) -> None:
        base = np.linspace(beta_start, beta_end, T, dtype=np.float64)
        abar_full = np.cumprod(1.0 - base)
        self.T, self.beta_start, self.beta_end = T, beta_start, beta_end
        self.timesteps = list(range(T)) if steps is None else list(steps)  # original timestep of each index
        abar = abar_full[self.timesteps]
        prev = np.append(1.0, abar[:-1])
        self.betas = 1.0 - abar / prev
        self.abar, self.abar_prev = abar, prev
        self.post_var = self.betas * (1.0 - prev) / (1.0 - abar)
        # log of the posterior variance, its first (zero) entry replaced by the second (improved DDPM's clip)
        self.post_logvar = np.log(np.append(self.post_var[1], self.post_var[1:])) if len(abar) > 1 \
            else np.log(np.maximum(self.post_var, 1e-20))
        self.coef_x0 = self.betas * np.sqrt(prev) / (1.0 - abar)
        self.coef_xt = (1.0 - prev) * np.sqrt(1.0 - self.betas) / (1.0 - abar)

    def respaced(self, S: int) -> Diffusion:
        return Diffusion(self.T, self.beta_start, self.beta_end, steps=respaced_steps(self.T, S))

    @staticmethod
    def _at(table: np.ndarray, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(table, dtype=torch.float64, device=i.device)[i].to(like.dtype)
        return v.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self._at(self.abar, i, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def v_target(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self._at(self.abar, i, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def x0_from_v(self, xt: torch.Tensor, i: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a = self._at(self.abar, i, xt)
        return a.sqrt() * xt - (1 - a).sqrt() * v

    def p_mean_logvar(self, xt: torch.Tensor, i: torch.Tensor, out: torch.Tensor):
        """The model's Gaussian for x_{i-1}: mean, log-variance and the predicted x0, from its output (B, 2, ...)."""
        v, frac = out[:, 0], (out[:, 1] + 1) / 2
        x0 = self.x0_from_v(xt, i, v)
        mean = self._at(self.coef_x0, i, xt) * x0 + self._at(self.coef_xt, i, xt) * xt
        logvar = frac * self._at(np.log(self.betas), i, xt) + (1 - frac) * self._at(self.post_logvar, i, xt)
        return mean, logvar, x0

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, i: torch.Tensor):
        mean = self._at(self.coef_x0, i, xt) * x0 + self._at(self.coef_xt, i, xt) * xt
        return mean, self._at(self.post_logvar, i, xt)

    def draw(self, B: int, size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The timestep indices (B,) and noise (B, size) of one training batch."""
        i = torch.randint(0, len(self.timesteps), (B,), generator=generator)
        return i, torch.randn((B, size), generator=generator)

    def loss(self, model, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None,
             i: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             reduce: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """The hybrid loss on a batch x0 (B, P): MSE(v̂, v) + the variational-bound term, averaged over the batch
        (``reduce=False``: per row). The timesteps and noise are drawn from ``generator`` unless given."""
        B = x0.shape[0]
        if i is None or noise is None:
            i, noise = self.draw(B, x0.shape[1], generator)
        i, noise = i.to(x0.device), noise.to(x0.device, x0.dtype)
        xt = self.q_sample(x0, i, noise)
        t = torch.as_tensor(self.timesteps, device=x0.device)[i]
        out = model(xt, t, cond)  # (B, 2, P)
        mse = ((out[:, 0] - self.v_target(x0, i, noise)) ** 2).mean(-1)
        # the bound's term trains the variance only: the mean from a detached v̂
        frozen = torch.stack([out[:, 0].detach(), out[:, 1]], 1)
        mean, logvar, _ = self.p_mean_logvar(xt, i, frozen)
        tmean, tlogvar = self.q_posterior(x0, xt, i)
        kl = 0.5 * (-1.0 + logvar - tlogvar + torch.exp(tlogvar - logvar) + (tmean - mean) ** 2 * torch.exp(-logvar))
        kl = kl.mean(-1) / math.log(2.0)
        nll = 0.5 * (math.log(2 * math.pi) + logvar + (x0 - mean) ** 2 * torch.exp(-logvar))
        nll = nll.mean(-1) / math.log(2.0)
        vb = torch.where(i == 0, nll, kl)
        total = (mse + vb).mean() if reduce else mse + vb
        return total, {"mse": float(mse.detach().mean()), "vb": float(vb.detach().mean())}

    def step(self, xt: torch.Tensor, i: int, out: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """One ancestral step from index ``i`` (no noise at i = 0)."""
        idx = torch.full((xt.shape[0],), i, dtype=torch.long, device=xt.device)
        mean, logvar, _ = self.p_mean_logvar(xt, idx, out)
        if i == 0 or noise is None:
            return mean
        return mean + torch.exp(0.5 * logvar) * noise

    @torch.no_grad()
    def sample(self, model, cond: torch.Tensor, size: int, generators: list[torch.Generator]) -> torch.Tensor:
        """x0 samples (B, size), row b drawing all its noise from ``generators[b]`` (a query's neuron does not
        depend on which other queries share its batch)."""
        B = cond.shape[0]
        dev = cond.device

        def draw() -> torch.Tensor:
            return torch.stack([torch.randn(size, generator=g) for g in generators]).to(dev)

        x = draw()
        for i in reversed(range(len(self.timesteps))):
            t = torch.full((B,), self.timesteps[i], dtype=torch.long, device=dev)
            out = model(x, t, cond)
            x = self.step(x, i, out, draw() if i > 0 else None)
        return x


# ---- the networks ----------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim % 2))


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin-cos position table (n, dim)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos * omega[None]
    return F.pad(torch.cat([torch.sin(out), torch.cos(out)], 1), (0, dim % 2)).float()


class _Cond(nn.Module):
    """c = MLP(timestep embedding) + projected L2-normalised query embedding, with dropout on the sum."""

    def __init__(self, hidden: int, cond_dim: int, dropout: float) -> None:
        super().__init__()
        self.t_mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.proj = nn.Identity() if cond_dim == hidden else nn.Linear(cond_dim, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = self.t_mlp(timestep_embedding(t, 256)) + self.proj(F.normalize(cond.float(), dim=-1))
        return self.drop(c)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.n1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.n2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, -1)
        h = _modulate(self.n1(x), s1, sc1)
        x = x + g1[:, None] * self.attn(h, h, h, need_weights=False)[0]
        return x + g2[:, None] * self.mlp(_modulate(self.n2(x), s2, sc2))


class DiT1D(nn.Module):
    """A conditional 1-D DiT over patches of a flat vector: (x_t (B, P), t (B,), cond (B, c)) -> (B, 2, P)."""

    def __init__(self, size: int, cond_dim: int, hidden: int = 384, depth: int = 6, heads: int = 6,
                 patch: int = 96, mlp_ratio: float = 4.0, cond_dropout: float = 0.2, zero_init: bool = False) -> None:
        super().__init__()
        self.size, self.patch = size, patch
        self.n_tok = -(-size // patch)
        self.embed = nn.Linear(patch, hidden)
        self.register_buffer("pos", sincos_1d(self.n_tok, hidden), persistent=False)
        self.cond = _Cond(hidden, cond_dim, cond_dropout)
        self.blocks = nn.ModuleList(_Block(hidden, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, 2 * patch)
        if zero_init:  # adaLN-Zero (the published DiT); MeG's code leaves it commented out
            for m in [*(b.ada[-1] for b in self.blocks), self.ada[-1], self.out]:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        pad = self.n_tok * self.patch - self.size
        tok = F.pad(x, (0, pad)).view(B, self.n_tok, self.patch)  # (B, N, p)
        h = self.embed(tok) + self.pos[None]
        c = self.cond(t, cond)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.ada(c).chunk(2, -1)
        o = self.out(_modulate(self.norm(h), shift, scale))  # (B, N, 2p)
        o = o.view(B, self.n_tok, 2, self.patch).permute(0, 2, 1, 3).reshape(B, 2, self.n_tok * self.patch)
        return o[..., : self.size]


class MLPGen(nn.Module):
    """The ablation's generator: an MLP on [x_t, condition] -> (B, 2, P)."""

    def __init__(self, size: int, cond_dim: int, hidden: int = 1024, depth: int = 3, cond_dropout: float = 0.2) -> None:
        super().__init__()
        self.size = size
        self.cond = _Cond(hidden, cond_dim, cond_dropout)
        self.inp = nn.Linear(size, hidden)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU())
                                    for _ in range(depth))
        self.out = nn.Linear(hidden, 2 * size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = self.cond(t, cond)
        h = self.inp(x) + c
        for layer in self.layers:
            h = h + layer(h + c)
        return self.out(h).view(x.shape[0], 2, self.size)
