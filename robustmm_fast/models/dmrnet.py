"""DMRNet: robust multimodal learning via representation decoupling.

Wei et al., "Robust Multimodal Learning via Representation Decoupling", ECCV 2024. The
behaviour reproduced is the official audio-visual code's (shicaiwei123/ECCV2024-DMRNet,
"audio-visual classification/": main.py, models/basic_model.py, models/fusion_modules.py,
utils/utils.py, at 8472850; docs/fidelity.md has the table with file:line), generalised
to any number M >= 1 of modalities:

    e_m   = present[:, m] Enc_m(zero_absent(x_m))            (B, hidden)   make_encoder
    h     = [e_1, ..., e_M]                                   (B, M hidden)
    mu    = BN(W_mu h),  logvar = BN(W_v h)                   (B, latent)   GaussianBottleneck
    z     = mu + exp(logvar / 2) eps  (training),  z = mu (inference)      reparameterize_kl
    y_hat = W_c drop_c(z) + b_c                               drop_c: classifier_dropout
    loss  = task(y_hat, y)                                     "task"
          + kl_weight * mean_b sum_d KL(N(mu, e^logvar) || N(0, I))    "kl"
          + beta * (1/B') sum_{b: combination(b) hard} task_b(y_hat, y)  "hard"

B' is the number of rows with a modality present (= B: the recipe keeps >= 1 per row): the
hard samples' task loss gets the extra weight beta on top of their share in "task" (official
main.py:163-169: the same fc_out logits, summed over the weak-only rows and divided by the
batch size), so the term is 0 in a batch without a hard sample. Nothing is detached: every
term reaches every parameter, as in the official code. latent_dim defaults to the
concatenated width M * hidden, as in the official code (Linear(1024, 1024) + BatchNorm1d heads
on two 512-wide features, fusion_modules.py:22-29).

The combination of a sample is the set of its present modalities, coded as the integer
sum_m present[m] 2^m (1 .. 2^M - 1; 0 = nothing present). `extras["variance"]` (B,) is the
mean predicted variance exp(logvar) over the latent dims (official main.py:141-143) and
`extras["combination"]` (B,) the codes: DMRNetRecipe accumulates the variance per
combination during the warm-up epochs, then fixes the top-k combinations by mean variance as
the "hard" set the model's `hard` argument receives (a (2^M,) bool tensor).

Absent modalities: their inputs are zeroed with torch.where and their features replaced by 0,
in training and at test, so NaN there reaches neither the output nor a gradient. The official
code multiplies the encoder's output feature map by the 0/1 mask (basic_model.py:50-57, train
and test alike): the same 0 feature, but its ResNet encoders' BatchNorm2d see the absent
samples' real inputs in their training batch statistics; our encoders have no batch
statistics, so zeroing before the encoder changes nothing but that leak. Rows with no
modality present (never produced by the recipe) are excluded from the bottleneck's batch
statistics and the KL (their z is 0 in training; in eval BN's running statistics apply).

Departures from the official model, each an option; None = "as `official` says"
(official=True: the official code's; official=False, the default: ours):
  - classifier_dropout: official 0.0 (fc_out is applied to z directly, fusion_modules.py:48;
    the official model has no dropout anywhere); ours `dropout`, the regulariser every model
    of this package puts before its head on small data. Measured on Handwritten: no effect
    within noise (98.58 vs 98.42 complete, 95.22 vs 95.16 mean of subsets, 3 seeds).
  - init: official "xavier" (utils.py:15-18, applied to the whole model, main.py:291:
    xavier_normal_ on every Linear weight, zero biases); ours "torch" (PyTorch's default,
    as the package's other models). Measured: xavier 97.83 / 93.28 vs 98.42 / 95.16.
(benches/results/dmrnet-departures-handwritten-2026-12-02.md has every departure's effect.)
Not reproducible, and not options: the encoders (official ResNet-18 on spectrograms and
frames, 512 wide; ours make_encoder on the given features) -- their dropout is `dropout`
(the ResNet has none: set dropout=0 for that).
"""
from __future__ import annotations

from typing import Optional

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import ModelOutput, Recipe, TrainConfig, task_loss, zero_absent
from ..nn.gaussian_bottleneck import GaussianBottleneck
from .base import MultimodalModel
from .encoders import make_encoder
from .late_fusion import masked_task_loss

__all__ = ["DMRNet", "DMRNetConfig", "DMRNetRecipe", "STAGES", "CANDIDATES", "INITS", "OPTIMIZERS", "STATISTICS",
           "OFFICIAL_QUIRKS", "OUR_QUIRKS", "OFFICIAL_WARMUP_EPOCHS", "combination_codes",
           "combination_names"]

STAGES = ("warmup", "hard")
# which combinations may become hard: the single-modality ones (the official audio-visual code
# tracks the unimodal variances) or every non-empty combination
CANDIDATES = ("unimodal", "all")
INITS = ("torch", "xavier")
OPTIMIZERS = ("adamw", "sgd")
STATISTICS = ("pooled", "batch_mean")
# official main.py:145 trains epochs `<= 5` without the hard term and main.py:374 fixes the weak
# modality after epoch 5: epochs 0-5, six warm-up epochs
OFFICIAL_WARMUP_EPOCHS = 6
# the official code's behaviour for the quirk options (ours when official=False); model keys
# (classifier_dropout, init) and recipe keys (optimizer, lr_decay_step, variance_statistic).
# classifier_dropout None in OUR_QUIRKS: the model's `dropout`.
OFFICIAL_QUIRKS = {"classifier_dropout": 0.0, "init": "xavier", "optimizer": "sgd",
                   "lr_decay_step": 70, "variance_statistic": "batch_mean"}
OUR_QUIRKS = {"classifier_dropout": None, "init": "torch", "optimizer": "adamw",
              "lr_decay_step": 0, "variance_statistic": "pooled"}


def _resolve_quirk(name: str, value, official: bool):
    return (OFFICIAL_QUIRKS if official else OUR_QUIRKS)[name] if value is None else value


def _check_official(official) -> bool:
    if not isinstance(official, bool):
        raise ValueError(f"official must be True or False, got {official!r}")
    return official


def combination_codes(present: Tensor) -> Tensor:
    """(B, M) bool -> (B,) int64 codes sum_m present[:, m] 2^m."""
    weights = 2 ** torch.arange(present.shape[1], device=present.device)
    return (present.long() * weights).sum(1)


def combination_names(code: int, names: list[str]) -> tuple[str, ...]:
    """The modalities of combination `code`."""
    return tuple(m for i, m in enumerate(names) if code >> i & 1)


@dataclass(frozen=True)
class DMRNetConfig(TrainConfig):
    """Every DMRNet hyperparameter, with its default written once (see DMRNet and DMRNetRecipe
    for each key; the quirk options are None = as `official` says). Defaults: the official
    loss and schedule settings (KL 1e-3, beta 0.2, 6 warm-up epochs, top-1 unimodal hard
    combination), our encoders and optimizer."""
    hidden: int = 128
    encoder: str = "auto"
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    latent_dim: Optional[int] = None
    kl_weight: float = 1e-3
    beta: float = 0.2
    classifier_dropout: Optional[float] = None
    init: Optional[str] = None
    official: bool = False
    regression_loss: str = "l1"
    warmup_epochs: int = OFFICIAL_WARMUP_EPOCHS
    hard_k: int = 1
    hard_candidates: str = "unimodal"
    sample_combinations: bool = True
    optimizer: Optional[str] = None
    lr_decay_step: Optional[int] = None
    lr_decay_ratio: float = 0.1
    variance_statistic: Optional[str] = None


_MODEL_KEYS = ("hidden", "encoder", "layers", "heads", "dropout", "latent_dim", "kl_weight",
               "beta", "classifier_dropout", "init", "official", "regression_loss")


class DMRNet(MultimodalModel):
    """DMRNet for M >= 1 modalities of shapes {name: (L_m, D_m)} (see the module docstring).

    Args:
        modalities, task, num_classes: as MultimodalModel.
        hidden: encoder width per modality. encoder, layers, heads: make_encoder's settings.
        dropout: encoder dropout (and, by default, the classifier's: see classifier_dropout).
        latent_dim: size of the probabilistic embedding z (None: M * hidden, the official code's).
        kl_weight: weight of the KL term (official --alpha 1e-3, cramed.sh:8, ks.sh:4).
        beta: weight of the hard-combination task loss (official --beta 0.2 on CREMA-D,
            cramed.sh:8; 0.3 on Kinetics-Sounds, ks.sh:4).
        classifier_dropout: dropout on z before the classifier. None: as `official` says
            (official 0.0; ours `dropout`).
        init: "torch" (PyTorch's default) or "xavier" (the official weight_init: xavier_normal_
            weights and zero biases on every nn.Linear). None: as `official` says.
        official: the official code's quirks for the options left None (module docstring).
        regression_loss: "l1" or "mse" (regression only).

    forward(inputs, present, labels=None, padding=None, stage=None, hard=None): stage is
    accepted (the recipe passes it; it changes nothing here); hard: None or a (2^M,) bool
    tensor of the hard combinations (the "hard" loss term appears when it is given).
    """

    def __init__(self, modalities: dict[str, tuple[int, int]], task: str, num_classes: int = 0,
                 config=None, **overrides):
        """config: a DMRNetConfig or a dict of its keys; overrides: keys of it."""
        super().__init__(modalities, task, num_classes)
        cfg = DMRNetConfig.from_dict(config, name="DMRNet")
        cfg = cfg.replace(**overrides) if overrides else cfg
        (hidden, encoder, layers, heads, dropout, latent_dim, kl_weight, beta, classifier_dropout,
         init, official, regression_loss) = (getattr(cfg, k) for k in _MODEL_KEYS)
        self.official = _check_official(official)
        if latent_dim is None and isinstance(hidden, int):
            latent_dim = len(self.modalities) * hidden
        for name, value in (("hidden", hidden), ("latent_dim", latent_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        classifier_dropout = _resolve_quirk("classifier_dropout", classifier_dropout, official)
        if classifier_dropout is None:
            classifier_dropout = dropout
        for name, value in (("dropout", dropout), ("classifier_dropout", classifier_dropout)):
            if isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        init = _resolve_quirk("init", init, official)
        if init not in INITS:
            raise ValueError(f"init must be None or one of {INITS}, got {init!r}")
        if not kl_weight >= 0 or not beta >= 0:
            raise ValueError(f"kl_weight and beta must be >= 0, got {kl_weight!r} and {beta!r}")
        if regression_loss not in ("l1", "mse"):
            raise ValueError(f"regression_loss must be 'l1' or 'mse', got {regression_loss!r}")
        self.latent_dim, self.dropout = latent_dim, float(dropout)
        self.classifier_dropout, self.init = float(classifier_dropout), init
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
        if init == "xavier":
            self.apply(xavier_init)

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
        y = self.classifier(F.dropout(z, self.classifier_dropout, self.training))
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


def xavier_init(module: nn.Module) -> None:
    """The official weight_init's Linear branch (utils.py:16-18): xavier_normal_ weight, 0 bias.
    (Its Conv2d/BatchNorm2d branches have no counterpart here.)"""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DMRNetRecipe(Recipe):
    """DMRNet's schedule: "warmup" for the first warmup_epochs epochs (the predicted variance
    accumulated per combination), then "hard" (the top hard_k combinations by mean variance
    over the warm-up get the extra loss beta * L_hard). Every training batch's present mask is
    replaced by one non-empty combination drawn uniformly per sample (2^M - 1 choices; official
    basic_model.py:11-25, 3 choices for M = 2) intersected with what is present; a sample left
    with nothing keeps one of its present modalities, chosen uniformly (sample_combinations=
    False: the mask as it comes, plus the base recipe's modality dropout). One optimizer; every
    epoch selectable (the engine selects on the validation split; the official code keeps the
    epoch of best *test* accuracy, main.py:383, which is not reproduced).

    Config keys:
        epochs (30; official 100, main.py:38), batch_size (64, official main.py:37), lr (1e-3,
        official main.py:41), weight_decay (1e-4, official main.py:298), grad_clip (0, none in
        the official code), modality_dropout (0).
        warmup_epochs (6 = OFFICIAL_WARMUP_EPOCHS: the official epochs 0-5).
        hard_k (1: the official code picks one weak modality), hard_candidates ("unimodal",
        the official code's: only single-modality combinations can be hard; or "all").
        sample_combinations (True, official).
        optimizer: "adamw" (ours: AdamW, the package's optimizer; weight decay decoupled) or
            "sgd" (official main.py:298: SGD, momentum 0.9, L2 weight decay). None: as
            `official` says. Measured on Handwritten (30 epochs): SGD 97.75 / 92.79 vs AdamW
            98.42 / 95.16 (complete / mean of subsets): at lr 1e-3 it trains too slowly.
        lr_decay_step, lr_decay_ratio: StepLR -- the lr of epoch e is lr * lr_decay_ratio **
            (e // lr_decay_step) (official main.py:299, 196: step 70, ratio 0.1); 0 = constant.
            lr_decay_step None: as `official` says (official 70; ours 0: our runs are shorter
            than 70 epochs, where the official schedule does not decay either).
        variance_statistic: the warm-up statistic ranking the combinations. "batch_mean"
            (official main.py:149-159, 371-372: per batch the mean variance over the
            combination's rows, summed over every batch of epochs 0-5 -- every epoch since the
            upstream fix 8d05ccb; before it, only over epochs that improved the test accuracy)
            taken here as the mean over the batches the combination occurs in (the same ranking
            when it occurs in every batch; where it does not, the official sum is NaN); or
            "pooled" (ours: the mean over every warm-up sample of the combination, so a batch
            weighs by its number of such samples). None: as `official` says. Measured: the
            same accuracy (98.33 / 95.16 vs 98.42 / 95.16).
        official (False): the official code's choice for each option left None.

    State (state_dict, tensors): var_sum / var_count (2^M,) float64 accumulators over the
    warm-up (pooled: sums of variances / sample counts; batch_mean: sums of batch means /
    batch counts); hard (2^M,) bool (all False until the warm-up ends). Under DDP on_epoch_end
    all-reduces the epoch's accumulators, so every rank holds the same hard set (batch_mean:
    the means of each rank's shard of a batch).
    """

    Config = DMRNetConfig

    def __init__(self, config=None):
        super().__init__(config)
        cfg = self.cfg
        self.official = _check_official(cfg.official)
        self.warmup_epochs = int(cfg.warmup_epochs)
        self.hard_k = int(cfg.hard_k)
        self.sample_combinations = bool(cfg.sample_combinations)
        self.hard_candidates = str(cfg.hard_candidates)
        self.optimizer = _resolve_quirk("optimizer", cfg.optimizer, self.official)
        self.lr_decay_step = _resolve_quirk("lr_decay_step", cfg.lr_decay_step, self.official)
        self.lr_decay_ratio = float(cfg.lr_decay_ratio)
        self.variance_statistic = _resolve_quirk("variance_statistic", cfg.variance_statistic,
                                                 self.official)
        if self.hard_candidates not in CANDIDATES:
            raise ValueError(f"hard_candidates must be one of {CANDIDATES}, got "
                             f"{self.hard_candidates!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be None or one of {OPTIMIZERS}, got "
                             f"{self.optimizer!r}")
        if self.variance_statistic not in STATISTICS:
            raise ValueError(f"variance_statistic must be None or one of {STATISTICS}, got "
                             f"{self.variance_statistic!r}")
        if isinstance(self.lr_decay_step, bool) or not isinstance(self.lr_decay_step, int) \
                or self.lr_decay_step < 0:
            raise ValueError(f"lr_decay_step must be None or an int >= 0, got "
                             f"{self.lr_decay_step!r}")
        if not 0.0 < self.lr_decay_ratio <= 1.0:
            raise ValueError(f"lr_decay_ratio must be in (0, 1], got {self.lr_decay_ratio}")
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
        if self.optimizer == "adamw":
            return super().optimizers(model)
        return {"main": torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9,
                                        weight_decay=self.weight_decay)}

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch `epoch` (StepLR stepped once per epoch, as main.py:196)."""
        if self.lr_decay_step == 0:
            return self.lr
        return self.lr * self.lr_decay_ratio ** (epoch // self.lr_decay_step)

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
        """Set the epoch's lr, forward with the stage (and the hard set after the warm-up),
        then `optimize`; in the warm-up, the batch's predicted variances are accumulated."""
        _check_stage(stage)
        lr = self.lr_at(epoch)
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr
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
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, c, v)
        count = torch.zeros(n, dtype=torch.float64).index_add_(0, c, torch.ones_like(v))
        if self.variance_statistic == "pooled":
            self._epoch_sum += total
            self._epoch_count += count
        else:                                    # batch_mean: this batch's mean per combination
            seen = count > 0
            self._epoch_sum += torch.where(seen, total / count.clamp(min=1), 0.0)
            self._epoch_count += seen.double()

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
