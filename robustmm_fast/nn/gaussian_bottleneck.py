"""GaussianBottleneck: mu/logvar heads + fused reparameterize_kl (CyIN's token-level IB,
DMRNet's probabilistic embedding)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.reparam_kl import reparameterize_kl
from .masked_batch_norm import masked_batch_norm
from ..reference.reparam_kl import REDUCTIONS


class GaussianBottleneck(nn.Module):
    """x -> (z, kl) with mu = W_mu x, logvar = W_lv x, z = mu + exp(logvar/2) * eps and
    kl = KL(N(mu, e^logvar) || N(0, I)) summed over the latent dim.

    Args:
        in_dim, latent_dim: feature sizes.
        hidden_dim: if set, each head is Linear(in, hidden) -> ReLU -> Linear(hidden, latent);
            otherwise one Linear.
        joint_head: one head Linear(in, hidden) -> ReLU -> Linear(hidden, 2 latent) whose output
            halves are mu and logvar (CyIN's Encoder: two 1x1 convolutions, then
            `mu, logvar = h.chunk(2, dim=1)`); needs hidden_dim. Default False: two heads.
        sample_in_eval: draw z in eval mode too (CyIN samples at test time); by default eval
            gives z = mu (DMRNet). `forward(sample=...)` overrides both.
        reduction: how `kl` is reduced, as in reparameterize_kl.
        logvar_clamp: optional (min, max) clamp of logvar for numerical safety.
        batch_norm: BatchNorm1d after each head's last linear (DMRNet's mu = BN(W h)).

    Works on ``(B, in_dim)`` vectors and ``(B, L, in_dim)`` token sequences alike (a Linear
    over the last dim is a 1x1 convolution over time).
    """

    def __init__(self, in_dim: int, latent_dim: int, *, hidden_dim: Optional[int] = None,
                 sample_in_eval: bool = False, reduction: str = "none",
                 logvar_clamp: Optional[tuple[float, float]] = None, batch_norm: bool = False,
                 bias: bool = True, joint_head: bool = False):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("latent_dim", latent_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden_dim is not None and (not isinstance(hidden_dim, int) or hidden_dim <= 0):
            raise ValueError(f"hidden_dim must be a positive int or None, got {hidden_dim!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if logvar_clamp is not None and not (len(logvar_clamp) == 2 and logvar_clamp[0] < logvar_clamp[1]):
            raise ValueError(f"logvar_clamp must be (min, max) with min < max, got {logvar_clamp!r}")
        if joint_head and hidden_dim is None:
            raise ValueError("joint_head=True needs hidden_dim (the shared hidden layer's width)")
        self.in_dim, self.latent_dim = in_dim, latent_dim
        self.sample_in_eval, self.reduction, self.logvar_clamp = sample_in_eval, reduction, logvar_clamp
        self.joint_head = bool(joint_head)
        if self.joint_head:
            self.head = self._head(in_dim, 2 * latent_dim, hidden_dim, bias)
        else:
            self.mu = self._head(in_dim, latent_dim, hidden_dim, bias)
            self.logvar = self._head(in_dim, latent_dim, hidden_dim, bias)
        self.mu_norm = nn.BatchNorm1d(latent_dim) if batch_norm else None
        self.logvar_norm = nn.BatchNorm1d(latent_dim) if batch_norm else None

    @staticmethod
    def _head(in_dim, latent_dim, hidden_dim, bias) -> nn.Module:
        if hidden_dim is None:
            return nn.Linear(in_dim, latent_dim, bias=bias)
        return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=bias), nn.ReLU(),
                             nn.Linear(hidden_dim, latent_dim, bias=bias))

    def moments(self, x: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of x: (..., in_dim) -> two (..., latent_dim) tensors. Rows excluded by
        `mask` are zeroed before the heads, so nothing they hold (NaN included) reaches the
        parameters' gradients or the batch-norm statistics."""
        if x.dim() < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(f"x must have last dim in_dim={self.in_dim}, got shape {tuple(x.shape)}")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = include), got "
                                f"{getattr(mask, 'dtype', type(mask).__name__)}")
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"mask must have shape {tuple(x.shape[:-1])} (x without its last "
                                 f"dim), got {tuple(mask.shape)}")
            x = torch.where(mask.unsqueeze(-1), x, 0)
        if self.joint_head:
            mu, logvar = self.head(x).chunk(2, dim=-1)
        else:
            mu, logvar = self.mu(x), self.logvar(x)
        mu = masked_batch_norm(self.mu_norm, mu, mask)
        logvar = masked_batch_norm(self.logvar_norm, logvar, mask)
        if self.logvar_clamp is not None:
            logvar = logvar.clamp(*self.logvar_clamp)
        return mu, logvar

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, *, sample: Optional[bool] = None,
                eps: Optional[Tensor] = None, return_moments: bool = False):
        """x: (..., in_dim); mask: bool (...) True = include.

        Returns (z, kl), or (z, kl, mu, logvar) with return_moments=True (DMRNet tracks the
        predicted variance). z: (..., latent_dim); kl reduced as `self.reduction`.
        """
        mu, logvar = self.moments(x, mask)
        if sample is None:
            sample = self.training or self.sample_in_eval
        z, kl = reparameterize_kl(mu, logvar, eps=eps, mask=mask, sample=sample,
                                  reduction=self.reduction)
        return (z, kl, mu, logvar) if return_moments else (z, kl)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, latent_dim={self.latent_dim}, "
                f"sample_in_eval={self.sample_in_eval}, reduction={self.reduction!r}, "
                f"joint_head={self.joint_head}")
