"""DMRNet: robust multimodal learning via representation decoupling.

Wei et al., "Robust Multimodal Learning via Representation Decoupling", ECCV 2024. The
behaviour reproduced is the official code's (issue #7), generalised to any number M >= 1 of
modalities:

    e_m   = present[:, m] Enc_m(zero_absent(x_m))            (B, hidden)   make_encoder
    h     = [e_1, ..., e_M]                                   (B, M hidden)
    mu    = BN(W_mu h),  logvar = BN(W_v h)                   (B, latent)   GaussianBottleneck
    z     = mu + exp(logvar / 2) eps  (training),  z = mu (inference)      reparameterize_kl
    y_hat = W_c drop(z) + b_c
    loss  = task(y_hat, y)                                     "task"
          + kl_weight * mean_b sum_d KL(N(mu, e^logvar) || N(0, I))    "kl"
          + beta * (1/B') sum_{b: combination(b) hard} task_b(y_hat, y)  "hard"

B' is the number of rows with a modality present: the hard samples' task loss gets the extra
weight beta on top of their share in "task" (the official code's sum over the weak-only samples
divided by the batch size), so the term is 0 in a batch without a hard sample.
latent_dim defaults to the concatenated width M * hidden, as in the official code (whose mu and
logvar heads are Linear(1024, 1024) on two 512-wide features).

The combination of a sample is the set of its present modalities, coded as the integer
sum_m present[m] 2^m (1 .. 2^M - 1; 0 = nothing present). `extras["variance"]` (B,) is the
mean predicted variance exp(logvar) over the latent dims and `extras["combination"]` (B,) the
codes: DMRNetRecipe accumulates the variance per combination during the warm-up epochs, then
fixes the top-k combinations by mean variance as the "hard" set the model's `hard` argument
receives (a (2^M,) bool tensor).

Rows with no modality present are excluded from the bottleneck's batch statistics and the KL
(their z is 0 in training; in eval BN's running statistics apply). Absent modalities' inputs
are zeroed with torch.where and their features replaced by 0, so NaN there reaches neither
the output nor a gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.gaussian_bottleneck import GaussianBottleneck
from ..train.recipe import Recipe
from .base import ModelOutput, MultimodalModel, task_loss, zero_absent
from .encoders import make_encoder
from .late_fusion import masked_task_loss

__all__ = ["DMRNet", "DMRNetRecipe", "STAGES", "CANDIDATES", "combination_codes", "combination_names"]

STAGES = ("warmup", "hard")
# which combinations may become hard: the single-modality ones (the official audio-visual code
# tracks the unimodal variances) or every non-empty combination
CANDIDATES = ("unimodal", "all")


def combination_codes(present: Tensor) -> Tensor:
    """(B, M) bool -> (B,) int64 codes sum_m present[:, m] 2^m."""
    weights = 2 ** torch.arange(present.shape[1], device=present.device)
    return (present.long() * weights).sum(1)


def combination_names(code: int, names: list[str]) -> tuple[str, ...]:
    """The modalities of combination `code`."""
    return tuple(m for i, m in enumerate(names) if code >> i & 1)


class DMRNet(MultimodalModel):
    """DMRNet for M >= 1 modalities of shapes {name: (L_m, D_m)} (see the module docstring).

    Args:
        modalities, task, num_classes: as MultimodalModel.
        hidden: encoder width per modality. encoder, layers, heads: make_encoder's settings.
        dropout: encoder dropout and dropout before the classifier.
        latent_dim: size of the probabilistic embedding z (None: M * hidden, the official code's).
        kl_weight: weight of the KL term (official 1e-3).
        beta: weight of the hard-combination task loss (official scripts 0.2-0.3).
        regression_loss: "l1" or "mse" (regression only).

    forward(inputs, present, labels=None, padding=None, stage=None, hard=None): stage is
    accepted (the recipe passes it; it changes nothing here); hard: None or a (2^M,) bool
    tensor of the hard combinations (the "hard" loss term appears when it is given).
    """

    def __init__(self, modalities: dict[str, tuple[int, int]], task: str, num_classes: int = 0, *,
                 hidden: int = 128, encoder: str = "auto", layers: int = 2, heads: int = 4,
                 dropout: float = 0.1, latent_dim: Optional[int] = None, kl_weight: float = 1e-3,
                 beta: float = 0.2, regression_loss: str = "l1"):
        super().__init__(modalities, task, num_classes)
        if latent_dim is None and isinstance(hidden, int):
            latent_dim = len(self.modalities) * hidden
        for name, value in (("hidden", hidden), ("latent_dim", latent_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not kl_weight >= 0 or not beta >= 0:
            raise ValueError(f"kl_weight and beta must be >= 0, got {kl_weight!r} and {beta!r}")
        if regression_loss not in ("l1", "mse"):
            raise ValueError(f"regression_loss must be 'l1' or 'mse', got {regression_loss!r}")
        self.latent_dim, self.dropout = latent_dim, float(dropout)
        self.kl_weight, self.beta = float(kl_weight), float(beta)
        self.regression_loss = regression_loss
        self.num_combinations = 2 ** len(self.modalities)
        self.encoders = nn.ModuleDict({
            m: make_encoder(L, D, hidden, kind=encoder, layers=layers, heads=heads,
                            dropout=dropout)
            for m, (L, D) in self.modalities.items()})
        self.bottleneck = GaussianBottleneck(len(self.modalities) * hidden, latent_dim,
                                             batch_norm=True, reduction="mean")
        self.classifier = nn.Linear(latent_dim, self.out_dim)

    def forward(self, inputs: dict[str, Tensor], present: Tensor, labels: Optional[Tensor] = None,
                padding: Optional[dict[str, Tensor]] = None, stage: Optional[str] = None,
                hard: Optional[Tensor] = None) -> ModelOutput:
        self.check_inputs(inputs, present)
        if stage is not None and stage not in STAGES:
            raise ValueError(f"DMRNet stage must be None or one of {STAGES}, got {stage!r}")
        padding = padding or {}
        feats = []
        for i, (m, x) in enumerate(inputs.items()):
            pad = padding.get(m)
            e = self.encoders[m](zero_absent(x, present[:, i], pad), pad)     # (B, hidden)
            feats.append(torch.where(present[:, i, None], e,
                                     torch.zeros((), dtype=e.dtype, device=e.device)))
        h = torch.cat(feats, 1)                                               # (B, M hidden)
        rows = present.any(1)                                                 # (B,)
        z, kl, mu, logvar = self.bottleneck(h, rows, return_moments=True)     # kl: mean over rows
        y = self.classifier(F.dropout(z, self.dropout, self.training))
        codes = combination_codes(present)
        out = ModelOutput(**self.head_output(y), extras={
            "mu": mu, "logvar": logvar, "variance": logvar.detach().exp().mean(-1),
            "combination": codes})
        if labels is None:
            return out
        losses = {"task": task_loss(out.output, labels, self.task, self.regression_loss),
                  "kl": self.kl_weight * kl}
        if hard is not None:
            if hard.dtype != torch.bool or hard.shape != (self.num_combinations,):
                raise ValueError(f"hard must be a bool ({self.num_combinations},) tensor, got "
                                 f"{hard.dtype} {tuple(hard.shape)}")
            keep = hard.to(codes.device)[codes] & rows                       # (B,)
            per = masked_task_loss(out.output, labels, self.task, keep, self.regression_loss)
            # masked_task_loss averages over the hard rows; the official term is over all rows
            share = keep.sum().to(per.dtype) / rows.sum().clamp(min=1).to(per.dtype)
            losses["hard"] = self.beta * per * share
        out.losses = losses
        return out


class DMRNetRecipe(Recipe):
    """DMRNet's schedule: "warmup" for the first warmup_epochs epochs (the mean predicted
    variance accumulated per combination), then "hard" (the top hard_k combinations by mean
    variance over the warm-up get the extra loss beta * L_hard). Every training batch's present
    mask is replaced by one non-empty combination drawn uniformly per sample (2^M - 1 choices)
    intersected with what is present; a sample left with nothing keeps one of its present
    modalities, chosen uniformly (sample_combinations=False: the mask as it comes, plus the
    base recipe's modality dropout). One optimizer (AdamW; SGD with `official`); every epoch
    selectable.

    hard_candidates: "unimodal" (default, the official code's: only single-modality
    combinations can be hard) or "all" (any non-empty combination).
    official: SGD with momentum 0.9 (the official code's optimizer, there at lr 1e-3 and weight
    decay 1e-4) instead of AdamW. Not reproduced: its StepLR decay at epoch 70 (the engine has
    no schedules) and its warm-up statistic summed only over epochs that improved the test
    accuracy (a selection on the test set). Its `epoch <= 5` warm-up is warmup_epochs=6.

    Config keys: epochs (30), warmup_epochs (5), hard_k (1), hard_candidates ("unimodal"),
    sample_combinations (True), official (False), lr, weight_decay, batch_size, grad_clip,
    modality_dropout.

    State (state_dict, tensors): var_sum / var_count (2^M,) float64 accumulators over the
    warm-up; hard (2^M,) bool (all False until the warm-up ends). Under DDP on_epoch_end
    all-reduces the epoch's accumulators, so every rank holds the same hard set.
    """

    def __init__(self, config: Optional[dict] = None):
        config = dict(config or {})
        super().__init__(config)
        self.warmup_epochs = int(config.get("warmup_epochs", 5))
        self.hard_k = int(config.get("hard_k", 1))
        self.sample_combinations = bool(config.get("sample_combinations", True))
        self.official = bool(config.get("official", False))
        self.hard_candidates = str(config.get("hard_candidates", "unimodal"))
        if self.hard_candidates not in CANDIDATES:
            raise ValueError(f"hard_candidates must be one of {CANDIDATES}, got "
                             f"{self.hard_candidates!r}")
        if self.warmup_epochs < 0 or self.hard_k < 0:
            raise ValueError(f"warmup_epochs and hard_k must be >= 0, got {self.warmup_epochs} "
                             f"and {self.hard_k}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.var_sum: Optional[Tensor] = None     # (2^M,) float64, over the finished epochs
        self.var_count: Optional[Tensor] = None
        self.hard: Optional[Tensor] = None        # (2^M,) bool
        self._epoch_sum: Optional[Tensor] = None  # this epoch's (this rank's) accumulators
        self._epoch_count: Optional[Tensor] = None

    # ---------------------------------------------------------------- schedule
    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        if not self.official:
            return super().optimizers(model)
        return {"main": torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9,
                                        weight_decay=self.weight_decay)}

    def stage(self, epoch: int) -> str:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return "warmup" if epoch < self.warmup_epochs else "hard"

    def augment(self, present: Tensor, *, epoch: int, stage: str,
                generator: torch.Generator) -> Tensor:
        _check_stage(stage)
        if not self.sample_combinations:
            return super().augment(present, epoch=epoch, stage=stage, generator=generator)
        B, M = present.shape
        gen_device = generator.device if generator is not None else torch.device("cpu")
        codes = torch.randint(1, 2 ** M, (B,), generator=generator, device=gen_device)
        keys = torch.rand(present.shape, generator=generator, device=gen_device)
        codes, keys = codes.to(present.device), keys.to(present.device)
        bits = (codes[:, None] >> torch.arange(M, device=present.device)) & 1
        kept = present & bits.bool()                                          # (B, M)
        lost = present.any(1) & ~kept.any(1)
        pick = torch.where(present, keys, -1.0).argmax(1)
        rows = lost.nonzero().squeeze(1)
        kept[rows, pick[rows]] = True
        return kept

    # ---------------------------------------------------------------- one step
    def train_step(self, model: nn.Module, batch, optimizers: dict, *, epoch: int, step: int,
                   stage: str) -> dict[str, float]:
        """Forward with the stage (and the hard set after the warm-up), then `optimize`; in the
        warm-up, the batch's predicted variances are accumulated."""
        _check_stage(stage)
        M = batch.present.shape[1]
        hard = None
        if stage == "hard":
            hard = self.hard if self.hard is not None else torch.zeros(2 ** M, dtype=torch.bool)
        out = model(batch.inputs, batch.present, labels=batch.labels, padding=batch.padding,
                    stage=stage, hard=hard)
        if stage == "warmup":
            self._accumulate(out.extras["variance"], out.extras["combination"], 2 ** M)
        return self.optimize(model, out, optimizers, epoch=epoch, step=step)

    def _accumulate(self, variance: Tensor, codes: Tensor, n: int) -> None:
        if self._epoch_sum is None or self._epoch_sum.numel() != n:
            self._epoch_sum = torch.zeros(n, dtype=torch.float64)
            self._epoch_count = torch.zeros(n, dtype=torch.float64)
        keep = codes > 0
        v, c = variance.detach()[keep].double().cpu(), codes[keep].cpu()
        self._epoch_sum.index_add_(0, c, v)
        self._epoch_count.index_add_(0, c, torch.ones_like(v))

    def on_epoch_end(self, model: nn.Module, epoch: int, stage: str) -> None:
        """Fold the epoch's variance accumulators in (all-reduced under DDP); after the last
        warm-up epoch, fix the hard set."""
        if stage != "warmup":
            return
        n = getattr(model, "num_combinations", None)
        if n is None and self._epoch_sum is not None:
            n = self._epoch_sum.numel()
        if n is None:
            return
        s = self._epoch_sum if self._epoch_sum is not None else torch.zeros(n, dtype=torch.float64)
        c = self._epoch_count if self._epoch_count is not None else torch.zeros(n, dtype=torch.float64)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            device = next(model.parameters()).device
            both = torch.stack([s, c]).to(device)
            dist.all_reduce(both)
            s, c = both.cpu().unbind(0)
        self.var_sum = s.clone() if self.var_sum is None else self.var_sum + s
        self.var_count = c.clone() if self.var_count is None else self.var_count + c
        self._epoch_sum = self._epoch_count = None
        if epoch == self.warmup_epochs - 1:
            self.hard = self.hard_set(self.var_sum, self.var_count, self.hard_k,
                                      unimodal=self.hard_candidates == "unimodal")

    @staticmethod
    def hard_set(var_sum: Tensor, var_count: Tensor, k: int, unimodal: bool = True) -> Tensor:
        """(2^M,) bool: the k combinations (among those seen; single-modality ones only when
        `unimodal`) with the largest mean variance."""
        mean = mean_variance(var_sum, var_count)
        seen = var_count > 0
        if unimodal:
            codes = torch.arange(var_sum.numel())
            seen = seen & (codes > 0) & ((codes & (codes - 1)) == 0)
        k = min(k, int(seen.sum()))
        hard = torch.zeros(var_sum.numel(), dtype=torch.bool)
        if k > 0:
            hard[torch.where(seen, mean, -torch.inf).topk(k).indices] = True
        return hard

    def mean_variance(self) -> Optional[Tensor]:
        """(2^M,) mean predicted variance per combination over the warm-up (NaN: never seen)."""
        if self.var_sum is None:
            return None
        return mean_variance(self.var_sum, self.var_count)

    # ---------------------------------------------------------------- resumable state
    def state_dict(self) -> dict:
        return {"var_sum": self.var_sum, "var_count": self.var_count, "hard": self.hard}

    def load_state_dict(self, state: dict) -> None:
        self.var_sum, self.var_count = state.get("var_sum"), state.get("var_count")
        self.hard = state.get("hard")
        self._epoch_sum = self._epoch_count = None


def mean_variance(var_sum: Tensor, var_count: Tensor) -> Tensor:
    return torch.where(var_count > 0, var_sum / var_count.clamp(min=1),
                       torch.full_like(var_sum, float("nan")))


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"DMRNet stage must be one of {STAGES}, got {stage!r}")
