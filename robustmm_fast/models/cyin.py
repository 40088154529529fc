"""CyIN: cyclic informative latent space for complete and incomplete multimodal learning.

Lin et al., "CyIN: Cyclic Informative Latent Space for Bridging Complete and Incomplete
Multimodal Learning", NeurIPS 2025; official code RH-Lin/CyIN (models/generationBased/CyIN.py,
trains/generationBased/CyIN.py, config/config_regression.json; docs/fidelity.md cites lines).
Generalised to any number M >= 2 of modalities, on the three fused ops:

    x_m     = zero_absent(input_m)                    (B, L_m, D_m)  the raw features
    mu, lv  = Enc_m(x_m)                              one Linear-ReLU-Linear(2 D) per token,
                                                      halves (CyIN's Encoder, Conv1d k=1)
    z_m     = mu + e^{lv/2} eps,  KL_m                reparameterize_kl; KL_m element-averaged
                                                      over the valid tokens of the samples
                                                      where m is present (official: mean)
    L_IB    = mean over (m, n) pairs present together of [KL_m + eta MSE(Dec_n(z_m), x_n)]
              (cyclic IB: every z_m rebuilds every raw input x_n, m == n included; the target
              is the fixed input, never a trainable tensor; Dec_n = Linear-ReLU-Linear[-Sigmoid])
    label   = sum_m mean_{m present} task_loss(H_m(mean_t z_m), y)     (label-level IB)
    f_m     = z_m where present; in training stage 2 (once per batch and modality, from torch's
              global RNG) one of {G_{k->m}(z_k) for each other k, their combination, z_m};
              absent m (any stage): the combination of the translations from the present ones
    h_m     = Conv1d_k(f_m)   (D -> common_dim, kernel fusion_kernel, no padding, no bias)
    o       = MulTFusion(h) or JointFusion(h)          (fusion="mult" / "joint")
    y_hat   = out(proj2(drop(relu(proj1(o)))) + o)                       (MulT's head)
    loss    = task(y_hat, y) + label + (1/eta) L_IB + lam TRANSLATE      [last: stage 2]
    TRANSLATE = CycleConsistency(objective="cyin"): (1/9) [6 pair + 3 combination forward
              terms] + (1/9) [the same 9 cycle terms] for M = 3 (nn.MSELoss each)

losses: "task", "label_ib" (label_weight * sum of the per-modality terms), "ib" ((1/eta) L_IB)
and "translation" (lam * TRANSLATE; only with stage="stage2" and translate=True).

Options where our default departs from the official code (each None = "as `official` says":
official=True gives the official behaviour, official=False ours; an explicit value wins):
- decoder_sigmoid: official True (a Sigmoid on the decoders' output, although the raw targets
  are unbounded BERT/audio/vision features); ours False (a sigmoid cannot reach targets
  outside (0, 1), so the reconstruction term cannot go to 0).
- combine: official "sum" of the translations; ours "mean" (keeps the latent's scale whatever
  the number of present sources).
- stochastic_test: official True (z sampled at test); ours False (z = mu: deterministic
  predictions).
- ib_samples: official "per_pair" (each of the M^2 (m, n) IB terms draws its own sample, and
  z_m used downstream is the last one drawn); ours "shared" (one sample per modality for all
  terms: the same expected loss, one draw instead of M).
- select_last (the recipe): official True (no validation: the model after the last epoch);
  ours False (the best stage-2 epoch on the validation split).
Generalisations the official code (M = 3, aligned sequences, no padding) does not fix:
- Unaligned data (modalities of different lengths L_m): Dec_n(z_m) and x_n are compared as
  their means over valid tokens, and the translators work on time-pooled latents (B, 1, D); a
  translated latent of such a modality enters fusion as a one-token sequence. (The official
  code first average-pools audio and vision to the text length, AlignSubNet "avg_pool".)
- A modality absent for a sample whose latent cannot be rebuilt (no other modality present, or
  translate=False) is masked out of fusion: no key of any attention, and its own target stream
  pools to 0.
- Stage-2 substitution: the draw "translation from k" falls back, for a sample where k is
  absent, to the combination of the present others, and any draw to the real latent where no
  other modality is present; absent modalities are always rebuilt.
- Padding: the fusion convolution's output token is valid where its window holds a valid token;
  time means are over valid tokens (the official mean is over all L tokens: no padding there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import ModelOutput, Recipe, TrainConfig, adamw, task_loss, zero_absent
from ..nn.cycle_consistency import COMBINES, OBJECTIVES, CycleConsistency
from ..nn.gaussian_bottleneck import GaussianBottleneck
from ..nn.multimodal_fusion import FUSIONS, JointFusion, MulTFusion
from ..ops.reparam_kl import reparameterize_kl
from .base import MultimodalModel
from .encoders import masked_mean
from .late_fusion import masked_task_loss

__all__ = ["CyIN", "CyINConfig", "CyINRecipe", "STAGES", "OFFICIAL_QUIRKS"]

STAGES = ("stage1", "stage2")
# the official code's behaviour for the quirk options (ours when official=False)
OFFICIAL_QUIRKS = {"decoder_sigmoid": True, "combine": "sum", "stochastic_test": True,
                   "ib_samples": "per_pair", "select_last": True}
OUR_QUIRKS = {"decoder_sigmoid": False, "combine": "mean", "stochastic_test": False,
              "ib_samples": "shared", "select_last": False}
IB_SAMPLES = ("shared", "per_pair")


@dataclass(frozen=True)
class CyINConfig(TrainConfig):
    """Every CyIN hyperparameter, with its default written once. Defaults: the official MOSI
    configuration (config/config_regression.json, "cyin" / "mosi"), with our choices for the
    quirk options (None = as `official` says; see the module docstring) and one attention
    dropout for every source (the official code has one per modality: preset "mosi").

    Model: ib_inter_dim (IB_inter_dim), ib_dim (IB_btnk_dim), eta (p_eta: L_IB = mean[KL + eta
    MSE], added as (1/eta) L_IB); common_dim (the MulT width); fusion ("mult": MulT's structure,
    "joint": ours); fusion_kernel (conv1d_kernel_size; no padding); mult_layers (nlevels),
    fusion_kernel None: 3, the official
    conv1d_kernel_size, where every modality has >= 3 tokens, else 1 (vectors);
    mult_heads (num_heads), memory_layers (None: max(nlevels, 3), as CyIN's get_network);
    attn_dropout (one probability, or {modality: p} -- official attn_dropout_l/_a/_v, applied to
    the cross-modal transformers whose source it is); memory_attn_dropout (attn_dropout_mem);
    relu_dropout, res_dropout (0.0 in CyIN's get_network); embed_dropout; out_dropout
    (output_dropout); causal (attn_mask); translator_widths (RAE_layers), translator_blocks
    (RAE_n_blocks), translator_kernel (3: CyIN's RAE_kernel_size), translator_bias (False);
    objective (CycleConsistency's: "cyin" = the official 9 + 9 terms); lam (w_imgaine);
    translate (False: the ablation without translation); label_weight (1: the official sum of
    the per-modality label losses); regression_loss ("l1": the official nn.L1Loss).
    Recipe: stage_divide (stage 1 = the epochs e = 1, 2, ... with e <= epochs * stage_divide),
    select_last, and TrainConfig's keys (official: AdamW lr 5e-4, weight decay 1e-3, batch 128,
    30 epochs, clip_grad_value_(5.0)).
    """
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 1e-3
    grad_clip: float = 5.0
    grad_clip_mode: str = "value"
    stage_divide: float = 0.1
    select_last: Optional[bool] = None
    ib_inter_dim: int = 256
    ib_dim: int = 128
    eta: float = 16.0
    common_dim: int = 256
    fusion: str = "mult"
    fusion_kernel: Optional[int] = None
    mult_layers: int = 2
    mult_heads: int = 8
    memory_layers: Optional[int] = None
    attn_dropout: Union[float, dict] = 0.1
    memory_attn_dropout: float = 0.4
    relu_dropout: float = 0.0
    res_dropout: float = 0.0
    embed_dropout: float = 0.0
    out_dropout: float = 0.3
    causal: bool = True
    translator_widths: tuple = (64, 32, 16)
    translator_blocks: int = 8
    translator_kernel: int = 3
    translator_bias: bool = False
    objective: str = "cyin"
    lam: float = 10.0
    translate: bool = True
    label_weight: float = 1.0
    regression_loss: str = "l1"
    decoder_sigmoid: Optional[bool] = None
    combine: Optional[str] = None
    stochastic_test: Optional[bool] = None
    ib_samples: Optional[str] = None
    official: bool = False

    def __post_init__(self):
        super().__post_init__()
        for name in ("ib_inter_dim", "ib_dim", "common_dim", "mult_layers", "mult_heads",
                     "translator_blocks", "fusion_kernel", "translator_kernel"):
            value = getattr(self, name)
            if name == "fusion_kernel" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.memory_layers is not None and (isinstance(self.memory_layers, bool)
                                               or not isinstance(self.memory_layers, int)
                                               or self.memory_layers < 0):
            raise ValueError(f"memory_layers must be None or an int >= 0, got "
                             f"{self.memory_layers!r}")
        if self.common_dim % self.mult_heads:
            raise ValueError(f"common_dim ({self.common_dim}) must be a multiple of mult_heads "
                             f"({self.mult_heads})")
        if not self.eta > 0:
            raise ValueError(f"eta must be > 0, got {self.eta!r}")
        if not self.lam >= 0 or not self.label_weight >= 0:
            raise ValueError(f"lam and label_weight must be >= 0, got {self.lam!r} and "
                             f"{self.label_weight!r}")
        for name, value, choices in (("fusion", self.fusion, FUSIONS),
                                     ("objective", self.objective, OBJECTIVES),
                                     ("regression_loss", self.regression_loss, ("l1", "mse")),
                                     ("combine", self.combine, (None, *COMBINES)),
                                     ("ib_samples", self.ib_samples, (None, *IB_SAMPLES))):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if not 0.0 <= self.stage_divide <= 1.0:
            raise ValueError(f"stage_divide must be in [0, 1], got {self.stage_divide}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        drops = (self.attn_dropout.values() if isinstance(self.attn_dropout, dict)
                 else [self.attn_dropout])
        for name, values in (("attn_dropout", drops),
                             ("memory_attn_dropout", [self.memory_attn_dropout]),
                             ("relu_dropout", [self.relu_dropout]),
                             ("res_dropout", [self.res_dropout]),
                             ("embed_dropout", [self.embed_dropout]),
                             ("out_dropout", [self.out_dropout])):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
                       for v in values):
                raise ValueError(f"{name} must be a probability in [0, 1) (attn_dropout: or a "
                                 f"{{modality: probability}} dict), got {getattr(self, name)!r}")

    def resolved(self, name: str):
        """An option's value: as set, or (None) as `official` says."""
        value = getattr(self, name)
        return (OFFICIAL_QUIRKS if self.official else OUR_QUIRKS)[name] if value is None else value


class CyIN(MultimodalModel):
    """CyIN for M >= 2 modalities of shapes {name: (L_m, D_m)} (see the module docstring).

    CyIN(modalities, task, num_classes, config=None, **overrides): config a CyINConfig (or a
    dict of its keys; default CyINConfig()), overrides keys of it.

    forward(inputs, present, labels=None, padding=None, stage=None): stage None (inference),
    "stage1" or "stage2" (the recipe passes it). extras: "latents" {m: z_m (B, L_m, D)} (rows
    of absent samples are 0), "reconstructed" (M, B, T, D) CycleConsistency's latents (T = L
    when all lengths are equal, else 1; None when not computed), "available" (B, M) the
    modalities fusion used, "substitution" the stage-2 draws (M,) int64 (0 the real latent,
    1 the combination, 2 + j the translation from the j-th other modality; None outside
    stage-2 training; `describe_substitution` names them).
    """

    def __init__(self, modalities: dict[str, tuple[int, int]], task: str, num_classes: int = 0,
                 config: Union[CyINConfig, dict, None] = None, **overrides):
        super().__init__(modalities, task, num_classes)
        cfg = CyINConfig.from_dict(config, name="CyIN")
        cfg = cfg.replace(**overrides) if overrides else cfg
        self.cfg = cfg
        M = len(self.modalities)
        if M < 2:
            raise ValueError(f"CyIN needs at least 2 modalities, got {M}")
        lengths = [L for L, _ in self.modalities.values()]
        if cfg.fusion_kernel is None:  # the official 3 taps where the sequences allow them
            cfg = cfg.replace(fusion_kernel=3 if min(lengths) >= 3 else 1)
            self.cfg = cfg
        if min(lengths) < cfg.fusion_kernel:
            raise ValueError(f"fusion_kernel {cfg.fusion_kernel} (a convolution without padding, "
                             f"as CyIN's proj_m) needs sequences of >= {cfg.fusion_kernel} tokens; "
                             f"the shortest modality has {min(lengths)}: set fusion_kernel=1")
        self.official = cfg.official
        self.decoder_sigmoid = bool(cfg.resolved("decoder_sigmoid"))
        self.combine = cfg.resolved("combine")
        self.stochastic_test = bool(cfg.resolved("stochastic_test"))
        self.ib_samples = cfg.resolved("ib_samples")
        self.ib_dim, self.eta, self.lam = cfg.ib_dim, float(cfg.eta), float(cfg.lam)
        self.translate, self.label_weight = bool(cfg.translate), float(cfg.label_weight)
        self.regression_loss = cfg.regression_loss
        # token-wise translation / reconstruction when every modality has the same length
        self.tokenwise = len(set(lengths)) == 1

        self.ib = nn.ModuleDict({m: GaussianBottleneck(D, cfg.ib_dim, hidden_dim=cfg.ib_inter_dim,
                                                       joint_head=True,
                                                       sample_in_eval=self.stochastic_test)
                                 for m, (_, D) in self.modalities.items()})
        self.decoders = nn.ModuleDict({m: self._decoder(cfg.ib_dim, cfg.ib_inter_dim, D)
                                       for m, (_, D) in self.modalities.items()})
        self.label_heads = nn.ModuleDict({m: nn.Linear(cfg.ib_dim, self.out_dim)
                                          for m in self.modalities})
        self.cycle = (CycleConsistency(M, cfg.ib_dim, widths=tuple(cfg.translator_widths),
                                       n_blocks=cfg.translator_blocks, shared=True,
                                       kernel_size=cfg.translator_kernel,
                                       bias=cfg.translator_bias, combine=self.combine,
                                       objective=cfg.objective)
                      if self.translate else None)
        self.fusion_proj = nn.ModuleDict({m: nn.Conv1d(cfg.ib_dim, cfg.common_dim,
                                                       cfg.fusion_kernel, bias=False)
                                          for m in self.modalities})
        self.fusion = self._fusion(cfg, M)
        width = self.fusion.out_dim
        self.proj1, self.proj2 = nn.Linear(width, width), nn.Linear(width, width)
        self.out_dropout = cfg.out_dropout
        self.out_layer = nn.Linear(width, self.out_dim)

    def _fusion(self, cfg: CyINConfig, M: int) -> nn.Module:
        drop = cfg.attn_dropout
        if isinstance(drop, dict):
            if sorted(drop) != sorted(self.names):
                raise ValueError(f"attn_dropout: a dict needs one probability per modality "
                                 f"{self.names}, got keys {sorted(drop)}")
            if cfg.fusion == "joint":
                raise ValueError("attn_dropout: fusion='joint' attends to all sources in one "
                                 "softmax, so it takes one probability, not one per modality")
            drop = [float(drop[m]) for m in self.names]
        common = dict(relu_dropout=cfg.relu_dropout, res_dropout=cfg.res_dropout,
                      embed_dropout=cfg.embed_dropout)
        memory = max(cfg.mult_layers, 3) if cfg.memory_layers is None else cfg.memory_layers
        if cfg.fusion == "mult":
            if memory < 1:
                raise ValueError("memory_layers must be >= 1 for fusion='mult' (MulT's memory)")
            return MulTFusion(M, cfg.common_dim, cfg.mult_heads, cfg.mult_layers,
                              memory_layers=memory, attn_dropout=drop,
                              memory_attn_dropout=cfg.memory_attn_dropout, causal=cfg.causal,
                              **common)
        return JointFusion(M, cfg.common_dim, cfg.mult_heads, cfg.mult_layers,
                           memory_layers=memory, attn_dropout=drop, **common)

    def _decoder(self, ib_dim: int, inter: int, out: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(ib_dim, inter), nn.ReLU(), nn.Linear(inter, out)]
        if self.decoder_sigmoid:
            layers.append(nn.Sigmoid())
        return nn.Sequential(*layers)

    # ------------------------------------------------------------------ pieces

    def encode(self, inputs: dict[str, Tensor], present: Tensor, padding: dict[str, Tensor]):
        """(x {m: (B, L_m, D_m)} the raw zero-filled inputs, z {m: (B, L_m, D)}, kl {m: ()},
        valid {m: (B, L_m) bool}, decoder_inputs {m: [M tensors (B, L_m, D)]}: the sample
        decoder n reads for the (m, n) term -- z_m itself with ib_samples="shared", else one
        draw per n, z_m being the last, as the official IB_translate calls)."""
        xs, zs, kls, valid, dec_in = {}, {}, {}, {}, {}
        M = len(self.names)
        for i, (m, x) in enumerate(inputs.items()):
            pad = padding.get(m)
            keep = present[:, i, None].expand(x.shape[0], x.shape[1])
            if pad is not None:
                keep = keep & ~pad
            x0 = zero_absent(x, present[:, i], pad)                        # (B, L_m, D_m)
            if self.training and self.ib_samples == "per_pair":
                mu, logvar = self.ib[m].moments(x0, keep)
                draws = [reparameterize_kl(mu, logvar, mask=keep) for _ in range(M)]
                z, kl_rows = draws[-1]
                dec_in[m] = [d[0] for d in draws]
            else:
                z, kl_rows = self.ib[m](x0, keep)                          # (B, L_m, D), (B, L_m)
                dec_in[m] = [z] * M
            # element-average of the KL over the included rows' entries (official: mean)
            kls[m] = kl_rows.sum() / (keep.sum() * self.ib_dim).clamp(min=1).to(kl_rows.dtype)
            xs[m], zs[m], valid[m] = x0, z, keep
        return xs, zs, kls, valid, dec_in

    def ib_loss(self, xs: dict, kls: dict, valid: dict, dec_in: dict) -> Tensor:
        """L_IB = mean over the (m, n) pairs with at least one valid sample/token in both of
        [KL_m + eta MSE(Dec_n(z_m), x_n)] (time means when L_m != L_n); 0 when none."""
        names = self.names
        kl = torch.stack([kls[m] for m in names])                          # (M,)
        M = len(names)
        if self.tokenwise:  # every pair token-wise, one decoder call per target n
            V = torch.stack([valid[m] for m in names])                     # (M, B, L)
            err = torch.stack([self.decoders[n](torch.cat([dec_in[m][j] for m in names], 1))
                               .unflatten(1, (M, -1)).sub(xs[n].unsqueeze(1)).pow(2).mean(-1)
                               .transpose(0, 1) for j, n in enumerate(names)], 1)
            both = V[:, None] & V[None]                                    # (M m, M n, B, L)
            err = torch.where(both, err, torch.zeros((), dtype=err.dtype, device=err.device))
            count = both.sum((2, 3))                                       # (M, M)
            mse = err.sum((2, 3)) / count.clamp(min=1).to(err.dtype)
        else:
            lengths = [xs[m].shape[1] for m in names]
            sums, counts = [], []
            for j, n in enumerate(names):
                out = self.decoders[n](torch.cat([dec_in[m][j] for m in names], 1))
                for m, rec in zip(names, out.split(lengths, 1)):
                    if rec.shape[1] == xs[n].shape[1]:
                        both = valid[m] & valid[n]                         # (B, L)
                        e = (rec - xs[n]).pow(2).mean(-1)
                    else:  # unaligned: compare the time means over valid tokens
                        both = valid[m].any(1) & valid[n].any(1)           # (B,)
                        e = (masked_mean(rec, ~valid[m])
                             - masked_mean(xs[n], ~valid[n])).pow(2).mean(-1)
                    sums.append(torch.where(both, e, torch.zeros((), dtype=e.dtype,
                                                                 device=e.device)).sum())
                    counts.append(both.sum())
            count = torch.stack(counts).view(M, M).t()                     # (M m, M n)
            mse = torch.stack(sums).view(M, M).t() / count.clamp(min=1).to(kl.dtype)
        on = (count > 0).to(mse.dtype)
        return (on * (kl[:, None] + self.eta * mse)).sum() / on.sum().clamp(min=1)

    def _translation_space(self, zs: dict, valid: dict):
        """(latents (M, B, T, D) for the translators, token_mask (B, T) or None): token-wise
        latents when every length is equal, else time-pooled (T = 1)."""
        if self.tokenwise:
            token_mask = torch.stack([valid[m] for m in self.names]).any(0)      # (B, L)
            return torch.stack([zs[m] for m in self.names]), token_mask
        pooled = [masked_mean(zs[m], ~valid[m]).unsqueeze(1) for m in self.names]  # (B, 1, D)
        return torch.stack(pooled), None

    def _place(self, t: Tensor, length: int, token_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """A translated latent t (B, T, D) as modality input (B, L, D) and its padding (B, L)."""
        if self.tokenwise:
            return t, ~token_mask
        B = t.shape[0]
        seq = torch.cat([t, t.new_zeros(B, length - 1, t.shape[-1])], 1)
        pad = (torch.arange(length, device=t.device) >= 1).expand(B, length)
        return seq, pad

    def _substitute(self, fwd: Tensor, present: Tensor, reconstructed_count: Tensor,
                    total: Tensor):
        """Stage-2 draws, as tensors (no Python value depends on them, so torch.compile keeps
        one graph): (draws (M,) int64: 0 the real latent, 1 the combination, 2 + j the
        translation from the j-th other modality; latents (M, B, T, D) to use instead of the
        real ones where `use` (M, B) is True). fwd: the pairs' translations (P, B, T, D)."""
        M = len(self.names)
        draws = torch.randint(0, M + 1, (M,)).to(fwd.device)               # torch's global RNG
        on = present.t()                                                    # (M, B)
        tail = (1,) * (fwd.dim() - 2)
        source, pair = self._draw_tables(fwd.device)                        # (M, M + 1) each
        rows = torch.arange(M, device=fwd.device)
        k = source[rows, draws]                                             # (M,) drawn source
        translated = fwd.index_select(0, pair[rows, draws])                 # (M, B, T, D)
        k_on = on.index_select(0, k).view(M, -1, *tail)
        from_k = (draws >= 2).view(M, 1, *tail) & k_on   # the drawn source, where it is present
        latents = torch.where(from_k, translated, total)
        use = (draws > 0).view(M, 1) & on & (reconstructed_count > 0)  # present, with a source
        return draws, latents, use

    def _draw_tables(self, device) -> tuple[Tensor, Tensor]:
        """source[n, d]: the modality draw d takes modality n's latent from (n itself for
        d < 2); pair[n, d]: the translator row k -> n of that draw (0 for d < 2)."""
        M = len(self.names)
        index = {p: i for i, p in enumerate(self.cycle.pairs)}
        source = [[n, n] + [k for k in range(M) if k != n] for n in range(M)]
        pair = [[0, 0] + [index[(k, n)] for k in range(M) if k != n] for n in range(M)]
        return (torch.tensor(source, device=device), torch.tensor(pair, device=device))

    def describe_substitution(self, draws: Optional[Tensor]) -> dict[str, str]:
        """{modality: "real" | "combination" | the source modality} of extras["substitution"]."""
        if draws is None:
            return {}
        out = {}
        for n, d in enumerate(draws.tolist()):
            others = [k for k in self.names if k != self.names[n]]
            out[self.names[n]] = "real" if d == 0 else "combination" if d == 1 else others[d - 2]
        return out

    def _project(self, m: str, lat: Tensor, pad: Tensor) -> tuple[Tensor, Tensor]:
        """Conv1d over time without padding (CyIN's proj_m): (B, L, D) -> (B, L - k + 1, C);
        an output token is padding when its whole window is."""
        k = self.cfg.fusion_kernel
        lat = torch.where(pad.unsqueeze(-1), 0, lat)
        out = self.fusion_proj[m](lat.transpose(1, 2)).transpose(1, 2)
        if k > 1:
            pad = pad.unfold(1, k, 1).all(-1)                               # (B, L - k + 1)
        return out, pad

    # ------------------------------------------------------------------ forward

    def forward(self, inputs: dict[str, Tensor], present: Tensor, labels: Optional[Tensor] = None,
                padding: Optional[dict[str, Tensor]] = None,
                stage: Optional[str] = None) -> ModelOutput:
        if stage is not None and stage not in STAGES:
            raise ValueError(f"CyIN stage must be None or one of {STAGES}, got {stage!r}")
        self.check_inputs(inputs, present)
        padding = padding or {}
        names, M = self.names, len(self.names)
        xs, zs, kls, valid, dec_in = self.encode(inputs, present, padding)

        # ---- translation: losses (stage 2), reconstructions of absent modalities
        cyc, token_mask, subs = None, None, None
        # complete inputs need no reconstruction outside stage 2; under torch.compile translate
        # anyway (the same result: reconstructed[n] = z_n where n is present) rather than
        # branch on the data
        translating = self.translate and (stage == "stage2" or torch.compiler.is_compiling()
                                          or not bool(present.all()))
        if translating:
            zt, token_mask = self._translation_space(zs, valid)
            cyc = self.cycle(zt, present, token_mask)
            if self.training and stage == "stage2":
                subs = self._substitute(cyc.translations, present, cyc.sources, cyc.combined)
        others_on = (present.sum(1, keepdim=True) - present.long()) > 0       # (B, M)
        available = present | others_on if self.translate else present

        # ---- fusion inputs: the latent each modality contributes, and its padding
        feats, pads = [], []
        for i, m in enumerate(names):
            L = zs[m].shape[1]
            lat, pad = zs[m], ~valid[m]
            if cyc is not None:
                absent = ~present[:, i] & available[:, i]                     # (B,) reconstructed
                t, t_pad = self._place(cyc.reconstructed[i], L, token_mask)
                if subs is not None:
                    s, s_pad = self._place(subs[1][i], L, token_mask)
                    use = subs[2][i]                                          # (B,)
                    lat = torch.where(use.view(-1, 1, 1), s, lat)
                    pad = torch.where(use.view(-1, 1), s_pad, pad)
                lat = torch.where(absent.view(-1, 1, 1), t, lat)
                pad = torch.where(absent.view(-1, 1), t_pad, pad)
            pad = pad | ~available[:, i, None]
            h, pad = self._project(m, lat, pad)                               # (B, L', C)
            feats.append(h)
            pads.append(pad)
        h = self.fusion(feats, pads, available)                               # (B, width)
        h = self.proj2(F.dropout(F.relu(self.proj1(h)), self.out_dropout, self.training)) + h
        out = ModelOutput(**self.head_output(self.out_layer(h)), extras={
            "latents": zs, "available": available,
            "reconstructed": None if cyc is None else cyc.reconstructed,
            "substitution": None if subs is None else subs[0]})
        if labels is None:
            return out
        losses = {"task": task_loss(out.output, labels, self.task, self.regression_loss)}
        label = None
        for i, m in enumerate(names):
            y = self.label_heads[m](masked_mean(zs[m], ~valid[m]))            # (B, out_dim)
            y = y if self.task == "classification" else y.squeeze(-1)
            term = masked_task_loss(y, labels, self.task, valid[m].any(1), self.regression_loss)
            label = term if label is None else label + term
        losses["label_ib"] = self.label_weight * label
        losses["ib"] = self.ib_loss(xs, kls, valid, dec_in) / self.eta
        if cyc is not None and stage == "stage2":
            losses["translation"] = self.lam * cyc.loss
        out.losses = losses
        return out

    def _combination(self, fwd: Tensor, present: Tensor, count: Tensor, zt: Tensor) -> Tensor:
        """c_n (M, B, T, D): the combination (sum / mean) of the present sources' translations
        (CycleConsistency's rule; forward reads it from the layer's output)."""
        return self.cycle._combine(fwd, present.t()[self.cycle.src], self.cycle.dst, count, zt,
                                   (1,) * (zt.dim() - 2))


class CyINRecipe(Recipe):
    """CyIN's two stages (trains/generationBased/CyIN.py): "stage1" for the epochs e = 1, 2, ...
    with e <= epochs * stage_divide (floor(epochs * stage_divide) of them; with official=False
    at most epochs - 1, so at least one epoch of stage 2), then "stage2" (translation loss and
    latent substitution). One AdamW on every parameter with the config's weight decay (the
    official code gives its BERT text encoder lr_lm; our models take pre-extracted features and
    have no such encoder). Gradient clipping: grad_clip / grad_clip_mode (official:
    clip_grad_value_(5.0)). Selection: select_last (official: the model after the last epoch,
    no validation) or, ours, the best stage-2 epoch on the validation split (before stage 2 the
    translators that rebuild absent modalities are untrained).
    """

    Config = CyINConfig

    def __init__(self, config: Union[CyINConfig, dict, None] = None):
        super().__init__(config)
        cfg = self.cfg
        self.stage_divide = float(cfg.stage_divide)
        limit = self.epochs * self.stage_divide  # the official `epochs <= max_epoch * stage_divide`
        stage1 = sum(1 for e in range(1, self.epochs + 1) if e <= limit)
        self.stage1_epochs = stage1 if cfg.official else min(stage1, self.epochs - 1)
        self.select_last = bool(cfg.resolved("select_last"))

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """One AdamW (contract.adamw: its fused kernel where the parameters allow)."""
        return {"main": adamw(model.parameters(), self.lr, self.weight_decay)}

    def stage(self, epoch: int) -> str:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return "stage1" if epoch < self.stage1_epochs else "stage2"

    def selects(self, epoch: int) -> bool:
        if self.select_last:
            return epoch == self.epochs - 1
        return self.stage(epoch) == "stage2"

    def train_step(self, model: nn.Module, batch, optimizers: dict, *, epoch: int, step: int,
                   stage: str) -> dict[str, float]:
        """Forward with the stage, loss check, backward, clipping, AdamW step."""
        if stage not in STAGES:
            raise ValueError(f"CyIN stage must be one of {STAGES}, got {stage!r}")
        out = model(batch.inputs, batch.present, labels=batch.labels, padding=batch.padding,
                    stage=stage)
        return self.optimize(model, out, optimizers, epoch=epoch, step=step)
