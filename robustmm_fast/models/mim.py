"""MIM: multimodal information modulation (unimodal purification + knowledge guidance).

Zeng, Mai, Yan, Hu, "Multimodal Reaction: Information Modulation for Cross-Modal
Representation Learning", IEEE Transactions on Multimedia 2023. The behaviour reproduced is the
official code's (issue #7: its train script, modules/model_github.py and utils/loss.py),
generalised to any number M >= 1 of modalities of any lengths (vector views: L = 1):

    t_m   = LN(Blocks(Conv1d_k(zero_absent(x_m)) + P))     (B, L_m, H)  k = conv_kernel, no bias
            (padded tokens zeroed; Blocks: `layers` pre-norm self-attention + FFN layers on the
            fused masked_cross_attention op, encoders._Block; P: sinusoidal positions)
  UPN (Unimodal Purification Network), per modality, over the time axis of the fixed L_m:
    c_t   = relu(W_2 relu(W_1 BiLSTM(t_m)_t + b_1) + b_2)  (B, L_m)  score >= 0 (ReLU, official)
    a     = V_2 relu(V_1 c + d_1) + d_2 + gate_bias        (B, L_m)  bottleneck L_m -> r -> L_m
    s     = sigmoid((log u - log(1 - u) + a) / T)          u ~ U(1e-6, 1 - 1e-6)  (training)
            sigmoid(a)                                       (inference, unless stochastic_test)
    sb    = clamp(s (zeta - gamma) + gamma, 0, 1)
    g_t   = 1[sb > threshold] + sb - sb.detach()           straight-through hard gate
    l0_m  = mean over valid steps of sigmoid(a - T log(-gamma / zeta))   (P[gate not 0])
    v_m   = mean_valid act(g * t_m),  w_m = mean_valid act(t_m)   purified / ungated vectors
            (act: pool_activation, identity by default; mean over the valid steps, i.e. closed
            gates count in the denominator as the official AdaptiveAvgPool1d does)
  fusion (over the available modalities: present with >= 1 valid step):
    product:  h = tanh(W_f prod_m v_m),  an unavailable m contributes 1 (torch.where)
    add:      h = sum_m v_m,             an unavailable m contributes 0
    concat:   h = tanh(W_f [v_1, ..., v_M]), an unavailable m contributes a 0 block
    y_hat = W_o drop(h) + b_o
  KGS (Knowledge Guidance Scheme), with the unimodal heads C_m (Linear H -> out_dim):
    L_m^g = task(C_m(v_m), y), L_m^u = task(C_m(w_m), y)   over the samples where m is available
    intra_m = MSE(C_m(v_m).detach(), C_m(w_m)) if L_m^g < L_m^u, MSE(C_m(v_m), C_m(w_m).detach())
              if L_m^g > L_m^u, else 0                     (the better view teaches)
    lam_m = L_m^g / sum_k L_k^g,  alpha_m = S prod_{k!=m}(1 + lam_k) / sum_j prod_{k!=j}(1 + lam_k)
            (over the S modalities available somewhere in the batch; losses detached)
    teacher t = argmin_m L_m^g;  KL_m = KL(softmax(v_t).detach() || softmax(v_m)), batch mean
            over the samples where t and m are both available
    inter = sum_{m != t} alpha_m KL_m                      (inter_weighting "student")
          | (10 alpha_t)^2 mean_{m != t} KL_m              (inter_weighting "teacher": official)

losses (each already weighted; `out.loss` is their sum):
    main optimizer:  "task" (fusion), "uni_<m>" (unimodal_weight L_m^u),
                     "intra" (intra_weight sum_m intra_m), "inter" (inter_weight inter)
    gate optimizer:  "gate_l0" (l0_weight sum_m l0_m), "gate_uni_<m>" (unimodal_weight L_m^g)
The gate terms are the keys starting with GATE_PREFIX ("gate_"); `gate_loss`/`main_loss` sum
each group. The graph is built so that ONE backward of `out.loss` gives every parameter exactly
its own group's gradient (MIMRecipe then steps both AdamWs; nothing is stale):
  - the gate terms are computed on a copy of the path whose encoder tokens (the UPN's input
    and the gated tokens) and unimodal head weights are detached: they reach only the UPN;
  - the main terms see the gates as constants (g.detach()): they reach every parameter but
    the UPN's. The gates' optimizer therefore trains on l0_weight L0 + the gated unimodal
    losses alone (the issue's wording); the main losses never flow through the
    straight-through estimator. gates_from_main=True (official) lets them: the main terms
    then use the live gates and their gradient reaches the UPN too (added to the gate terms'
    gradient; the UPN still steps only with the gate optimizer).

The official code, and where this deviates (found in the public repository; no released
global_configs.py, so its width d_l, activation `activate`, lr, epochs and batch size are
unknown -- our presets are ours):
  - Its settings: Conv1d kernel 3 (no bias), MulT TransformerEncoder (3 layers, 5 heads, attn
    dropout 0.5, relu/res dropout 0.3, embed dropout 0.2), BiLSTM(d, d/2 per direction), score
    MLP Linear(d, d/2)-ReLU-Linear(d/2, 1)-ReLU, bottleneck L -> L // 5 -> L (gate_bottleneck
    None = max(1, L // 5)), HardConcrete(beta=1/3, gamma=-0.2, zeta=1.0, loc_bias=3), threshold
    0.6 with the straight-through estimator, L0 weight 0.1, every other KGS weight 1, L1 loss,
    unimodal heads Linear(d, 1) shared by the gated and ungated views, fusion "multiplication"
    tanh(Linear(l * a * v)) then Linear(d, 1). Intra/inter losses summed over modalities.
  - Its text encoder is a fine-tuned BERT; ours takes pre-extracted features (every modality
    gets the same Conv1d + transformer encoder).
  - Optimizers: the official code has Adam on the UPN (penalty + gated losses) and Adam on
    every parameter (ungated + inter + intra + fusion losses), the UPN one stepped before the
    second backward (a stale-graph error on current PyTorch). Here: one backward, then both
    steps, AdamW (weight_decay 0 = its Adam); the encoders do not get the gated losses'
    gradient (the official second zero_grad discards it too). The UPN's input tokens are
    always detached here, so no loss reaches the encoders through the gates (officially the
    main losses do, through the straight-through gates and the LSTM).
  - Quirks, each an option defaulting to None = "as `official` says" (official=False: ours):
      stochastic_test   official True: HardConcrete samples u at test time too (no eval branch);
                        ours: deterministic gates sigmoid(a) at inference.
      inter_weighting   official "teacher": loss_kd's temperature 10 alpha_teacher enters only
                        as the factor temp^2 on the mean of the students' KLs; ours "student":
                        sum_{m != t} alpha_m KL_m (each student weighted by its own alpha).
      gates_from_main   official True (the main optimizer covers the UPN): see above.
  - Its utils/loss.py is unfinished (Loss_inter / Loss_penalty are missing, Adjuster is
    commented out); the intra/inter formulas above follow its train script and comments.
  - Missing modalities (not in the official code): inputs zeroed with torch.where, gates of
    absent samples and padded steps forced to 0 and excluded from every mean; a modality present
    with no valid step counts as unavailable. The LSTM runs over the whole fixed-length sequence
    with padded steps zeroed (the official data are zero-padded to a fixed length too); padded
    steps' scores are set to 0 before the bottleneck.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.cross_modal_transformer import sinusoid_positions
from ..train.recipe import Recipe
from .base import ModelOutput, MultimodalModel, task_loss, zero_absent
from .encoders import _Block, _zero_padding
from .late_fusion import masked_task_loss

__all__ = ["MIM", "MIMRecipe", "hard_concrete", "kgs_alpha", "gate_loss", "main_loss",
           "GATE_PREFIX", "FUSIONS", "OFFICIAL_QUIRKS", "OUR_QUIRKS"]

FUSIONS = ("product", "add", "concat")
INTER_WEIGHTINGS = ("student", "teacher")
POOL_ACTIVATIONS = ("none", "tanh", "relu")
GATE_PREFIX = "gate_"
OFFICIAL_QUIRKS = {"stochastic_test": True, "inter_weighting": "teacher", "gates_from_main": True}
OUR_QUIRKS = {"stochastic_test": False, "inter_weighting": "student", "gates_from_main": False}
OFFICIAL_KD_TEMPERATURE = 10.0     # train script's loss_kd: temp = 10 * alpha_teacher
NOISE_EPS = 1e-6                   # u ~ U(1e-6, 1 - 1e-6), the official HardConcrete's range
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def hard_concrete(logits: Tensor, valid: Tensor, *, sample: bool, u: Optional[Tensor] = None,
                  temperature: float = 1 / 3, gamma: float = -0.2, zeta: float = 1.0,
                  threshold: float = 0.6) -> tuple[Tensor, Tensor]:
    """Hard-concrete gates with a straight-through threshold (see the module docstring).

    logits (B, L) (the gate bias included); valid (B, L) bool; sample: draw the noise (training,
    or stochastic_test) else s = sigmoid(logits); u (B, L) in (0, 1): the uniform noise (None:
    drawn from torch's global RNG in [1e-6, 1 - 1e-6]). Returns (gates (B, L): value
    1[sb > threshold], gradient d sb, 0 where not valid; l0 (): the mean over the valid entries
    of sigmoid(logits - temperature log(-gamma / zeta)), 0 when none is valid).
    """
    if sample:
        if u is None:
            u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device)
            u = u * (1 - 2 * NOISE_EPS) + NOISE_EPS
        elif u.shape != logits.shape:
            raise ValueError(f"gate noise must be {tuple(logits.shape)}, got {tuple(u.shape)}")
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / temperature)
    else:
        s = torch.sigmoid(logits)
    sb = (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)
    hard = (sb > threshold).to(sb.dtype)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    gates = torch.where(valid, hard + (sb - sb.detach()), zero)   # value exactly `hard`
    p_open = torch.sigmoid(logits - temperature * math.log(-gamma / zeta))
    l0 = torch.where(valid, p_open, zero).sum() / valid.sum().clamp(min=1).to(logits.dtype)
    return gates, l0


def kgs_alpha(losses: Tensor, active: Tensor) -> Tensor:
    """(M,) inter-modal weights: lam_m = L_m / sum_active L, alpha_m proportional to
    prod_{k != m, active}(1 + lam_k) (= prod_active(1 + lam) / (1 + lam_m)), normalised to sum to
    the number S of active modalities; 0 for an inactive one. losses (M,) (detach them first)."""
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    L = torch.where(active, losses, zero)
    lam = L / L.sum().clamp_min(torch.finfo(L.dtype).tiny)
    w = torch.where(active, 1.0 / (1.0 + lam), zero)
    return active.sum().to(L.dtype) * w / w.sum().clamp_min(torch.finfo(L.dtype).tiny)


class TokenEncoder(nn.Module):
    """Conv1d (kernel k, 'same' padding, no bias) + sinusoidal positions + pre-norm
    self-attention layers + LayerNorm: (B, L, D) [+ padding (B, L)] -> tokens (B, L, H), padded
    tokens 0. The input must already be NaN-free (zero_absent)."""

    def __init__(self, dim: int, hidden: int, layers: int, heads: int, kernel: int,
                 dropout: float, attn_dropout: float, embed_dropout: float):
        super().__init__()
        self.conv = nn.Conv1d(dim, hidden, kernel, padding=kernel // 2, bias=False)
        self.layers = nn.ModuleList(_Block(hidden, heads, dropout, attn_dropout)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.embed_dropout = embed_dropout

    def forward(self, x: Tensor, padding: Optional[Tensor]) -> Tensor:
        if self.conv.kernel_size[0] == 1:  # a pointwise conv: the same map, as a matmul
            t = F.linear(x, self.conv.weight.squeeze(-1))                  # (B, L, H)
        else:
            t = self.conv(x.transpose(1, 2)).transpose(1, 2)               # (B, L, H)
        t = t + sinusoid_positions([t.shape[1]], t.shape[-1], t.device).to(t.dtype)
        t = F.dropout(t, self.embed_dropout, self.training)
        for layer in self.layers:
            t = layer(t, padding)
        return _zero_padding(self.norm(t), padding)


class UPN(nn.Module):
    """The gate logits (without the bias) of one modality: BiLSTM -> score MLP (ReLU, >= 0) per
    step -> bottleneck over the time axis (L -> r -> L). tokens (B, L, H), valid (B, L)."""

    def __init__(self, hidden: int, seq_len: int, bottleneck: int):
        super().__init__()
        half = max(1, hidden // 2)
        self.lstm = nn.LSTM(hidden, half, batch_first=True, bidirectional=True)
        self.score = nn.Sequential(nn.Linear(2 * half, half), nn.ReLU(), nn.Linear(half, 1),
                                   nn.ReLU())
        self.bottleneck = nn.Sequential(nn.Linear(seq_len, bottleneck), nn.ReLU(),
                                        nn.Linear(bottleneck, seq_len))

    def forward(self, tokens: Tensor, valid: Tensor) -> Tensor:
        h, _ = self.lstm(tokens)                                           # (B, L, 2 half)
        score = self.score(h).squeeze(-1)                                  # (B, L)
        score = torch.where(valid, score, torch.zeros((), dtype=score.dtype, device=score.device))
        return self.bottleneck(score)                                      # (B, L)


def _resolve_quirk(name: str, value, official: bool):
    return (OFFICIAL_QUIRKS if official else OUR_QUIRKS)[name] if value is None else value


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class MIM(MultimodalModel):
    """MIM for M >= 1 modalities of shapes {name: (L_m, D_m)} (see the module docstring).

    Args:
        modalities, task, num_classes: as MultimodalModel.
        hidden: token width H. layers, heads: transformer layers per modality (0: none) and
            heads (H must be a multiple). conv_kernel: odd Conv1d kernel size (official 3).
        dropout: residual/FFN dropout of the layers; attn_dropout; embed_dropout: after the
            positions.
        gate_bottleneck: r of the UPN's time bottleneck (None: max(1, L_m // 5), official).
        gate_bias (3.0), temperature (1/3), gamma (-0.2), zeta (1.0), threshold (0.6): the
            hard-concrete gate.
        fusion: "product" (official), "add" or "concat". out_dropout: before the output layer.
        pool_activation: "none" (default), "tanh" or "relu" before the time means (the
            official code applies a configurable `activate` whose value is not public).
        unimodal_weight, intra_weight, inter_weight, l0_weight: loss weights (official 1, 1,
            1, 0.1).
        stochastic_test, inter_weighting, gates_from_main, official: the official quirks (None
            = as `official` says).
        regression_loss: "l1" (official) or "mse".

    forward(inputs, present, labels=None, padding=None, stage=None, gate_noise=None): stage None
    or "main"; gate_noise {m: u (B, L_m)} fixes the hard-concrete noise (else drawn from
    torch's global RNG when sampling). extras: "gates" {m: (B, L_m) hard gates (straight-through
    gradient)}, "gate_logits" {m: (B, L_m)}, "l0" (M,) unweighted per-modality L0, "purified"
    and "ungated" {m: (B, H)}, "available" (B, M), and with labels "alpha" (M,), "teacher" ()
    int64 (-1: no modality available), "gate_terms" (the gate optimizer's loss names);
    "tokens" {m: (B, L_m, H)} the encoder's tokens (invalid steps 0).
    """

    def __init__(self, modalities: dict[str, tuple[int, int]], task: str, num_classes: int = 0, *,
                 hidden: int = 64, layers: int = 2, heads: int = 4, conv_kernel: int = 1,
                 dropout: float = 0.1, attn_dropout: float = 0.0, embed_dropout: float = 0.0,
                 gate_bottleneck: Optional[int] = None, gate_bias: float = 3.0,
                 temperature: float = 1 / 3, gamma: float = -0.2, zeta: float = 1.0,
                 threshold: float = 0.6, fusion: str = "product", out_dropout: float = 0.0,
                 pool_activation: str = "none", unimodal_weight: float = 1.0,
                 intra_weight: float = 1.0, inter_weight: float = 1.0, l0_weight: float = 0.1,
                 stochastic_test: Optional[bool] = None, inter_weighting: Optional[str] = None,
                 gates_from_main: Optional[bool] = None, official: bool = False,
                 regression_loss: str = "l1"):
        super().__init__(modalities, task, num_classes)
        _int("hidden", hidden, 1)
        _int("layers", layers, 0)
        _int("heads", heads, 1)
        _int("conv_kernel", conv_kernel, 1)
        if conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (length-preserving padding), got "
                             f"{conv_kernel}")
        if layers > 0 and hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        if gate_bottleneck is not None:
            _int("gate_bottleneck", gate_bottleneck, 1)
        for name, v in (("dropout", dropout), ("attn_dropout", attn_dropout),
                        ("embed_dropout", embed_dropout), ("out_dropout", out_dropout)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        for name, v in (("gate_bias", gate_bias), ("temperature", temperature), ("gamma", gamma),
                        ("zeta", zeta), ("threshold", threshold),
                        ("unimodal_weight", unimodal_weight), ("intra_weight", intra_weight),
                        ("inter_weight", inter_weight), ("l0_weight", l0_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not gamma < 0 or not zeta > 0:
            raise ValueError(f"gamma must be < 0 and zeta > 0 (the stretch (gamma, zeta) around "
                             f"[0, 1]), got gamma={gamma!r}, zeta={zeta!r}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
        for name, v in (("unimodal_weight", unimodal_weight), ("intra_weight", intra_weight),
                        ("inter_weight", inter_weight), ("l0_weight", l0_weight)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if pool_activation not in POOL_ACTIVATIONS:
            raise ValueError(f"pool_activation must be one of {POOL_ACTIVATIONS}, got "
                             f"{pool_activation!r}")
        if regression_loss not in ("l1", "mse"):
            raise ValueError(f"regression_loss must be 'l1' or 'mse', got {regression_loss!r}")
        if not isinstance(official, bool):
            raise ValueError(f"official must be True or False, got {official!r}")
        self.official = official
        self.stochastic_test = _resolve_quirk("stochastic_test", stochastic_test, official)
        self.inter_weighting = _resolve_quirk("inter_weighting", inter_weighting, official)
        self.gates_from_main = _resolve_quirk("gates_from_main", gates_from_main, official)
        for name, v in (("stochastic_test", self.stochastic_test),
                        ("gates_from_main", self.gates_from_main)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be None, True or False, got {v!r}")
        if self.inter_weighting not in INTER_WEIGHTINGS:
            raise ValueError(f"inter_weighting must be None or one of {INTER_WEIGHTINGS}, got "
                             f"{inter_weighting!r}")
        self.hidden, self.fusion, self.pool_activation = hidden, fusion, pool_activation
        self.gate_bias, self.temperature = float(gate_bias), float(temperature)
        self.gamma, self.zeta, self.threshold = float(gamma), float(zeta), float(threshold)
        self.out_dropout = float(out_dropout)
        self.unimodal_weight, self.intra_weight = float(unimodal_weight), float(intra_weight)
        self.inter_weight, self.l0_weight = float(inter_weight), float(l0_weight)
        self.regression_loss = regression_loss

        self.encoders = nn.ModuleDict({
            m: TokenEncoder(D, hidden, layers, heads, conv_kernel, dropout, attn_dropout,
                            embed_dropout) for m, (_, D) in self.modalities.items()})
        self.upn = nn.ModuleDict({
            m: UPN(hidden, L, gate_bottleneck if gate_bottleneck is not None else max(1, L // 5))
            for m, (L, _) in self.modalities.items()})
        self.heads = nn.ModuleDict({m: nn.Linear(hidden, self.out_dim) for m in self.modalities})
        M = len(self.modalities)
        if fusion == "product":
            self.fuse = nn.Linear(hidden, hidden)
        elif fusion == "concat":
            self.fuse = nn.Linear(M * hidden, hidden)
        else:
            self.fuse = None
        self.out_layer = nn.Linear(hidden, self.out_dim)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The UPN's parameters (LSTM, score MLP, bottleneck): the gate optimizer's."""
        return list(self.upn.parameters())

    def gate_terms(self) -> tuple[str, ...]:
        return ("gate_l0",) + tuple(f"gate_uni_{m}" for m in self.names)

    # ------------------------------------------------------------------ pieces

    def _act(self, x: Tensor) -> Tensor:
        if self.pool_activation == "tanh":
            return torch.tanh(x)
        if self.pool_activation == "relu":
            return F.relu(x)
        return x

    def _pool(self, gated: Tensor, count: Tensor) -> Tensor:
        """(B, L, H) with invalid steps already 0 -> mean over the valid steps (B, H)."""
        return self._act(gated).sum(1) / count

    def _flat(self, z: Tensor) -> Tensor:
        return z if self.task == "classification" else z.squeeze(-1)

    def fuse_vectors(self, vectors: Tensor, available: Tensor) -> Tensor:
        """vectors (M, B, H), available (B, M) -> the fusion's hidden h (B, H)."""
        on = available.t().unsqueeze(-1)                                    # (M, B, 1)
        if self.fusion == "product":
            one = torch.ones((), dtype=vectors.dtype, device=vectors.device)
            return torch.tanh(self.fuse(torch.where(on, vectors, one).prod(0)))
        zero = torch.zeros((), dtype=vectors.dtype, device=vectors.device)
        kept = torch.where(on, vectors, zero)
        if self.fusion == "add":
            return kept.sum(0)
        return torch.tanh(self.fuse(torch.cat(kept.unbind(0), -1)))

    def _masked_mse(self, a: Tensor, b: Tensor, keep: Tensor) -> Tensor:
        per = (a - b).pow(2).reshape(a.shape[0], -1).mean(1)               # (B,)
        per = torch.where(keep, per, torch.zeros((), dtype=per.dtype, device=per.device))
        return per.sum() / keep.sum().clamp(min=1).to(per.dtype)

    def inter_loss(self, vectors: Tensor, keep: Tensor, losses: Tensor) -> tuple[Tensor, Tensor,
                                                                                   Tensor]:
        """(inter (), alpha (M,), teacher () int64; -1 when no modality is available) from the
        purified vectors (M, B, H), availability (B, M) and the gated losses (M,)."""
        M = vectors.shape[0]
        active = keep.any(0)                                                # (M,)
        losses = losses.detach()
        alpha = kgs_alpha(losses, active)
        inf = torch.full((), float("inf"), dtype=losses.dtype, device=losses.device)
        teacher = torch.where(active, losses, inf).argmin()
        teacher = torch.where(active.any(), teacher, torch.full_like(teacher, -1))
        t = teacher.clamp(min=0)
        logp = F.log_softmax(vectors, -1)                                   # (M, B, H)
        p_t = logp[t].detach().exp()                                        # (B, H)
        kl = (p_t * (logp[t].detach() - logp)).sum(-1)                      # (M, B)
        both = keep.t() & keep[:, t].unsqueeze(0)                           # (M, B)
        zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
        kl = torch.where(both, kl, zero).sum(1) / both.sum(1).clamp(min=1).to(kl.dtype)  # (M,)
        student = active & (torch.arange(M, device=kl.device) != t)         # (M,)
        kl = torch.where(student, kl, zero)
        if self.inter_weighting == "student":
            inter = (alpha * kl).sum()
        else:
            scale = (OFFICIAL_KD_TEMPERATURE * alpha[t]) ** 2
            inter = scale * kl.sum() / student.sum().clamp(min=1).to(kl.dtype)
        return inter, alpha, teacher

    # ------------------------------------------------------------------ forward

    def forward(self, inputs: dict[str, Tensor], present: Tensor, labels: Optional[Tensor] = None,
                padding: Optional[dict[str, Tensor]] = None, stage: Optional[str] = None,
                gate_noise: Optional[dict[str, Tensor]] = None) -> ModelOutput:
        if stage is not None and stage != "main":
            raise ValueError(f"MIM stage must be None or 'main', got {stage!r}")
        self.check_inputs(inputs, present)
        if gate_noise is not None and set(gate_noise) - set(self.names):
            raise ValueError(f"gate_noise has unknown modalities "
                             f"{sorted(set(gate_noise) - set(self.names))}")
        padding = padding or {}
        sample = self.training or self.stochastic_test
        gates, logits, l0s, pur, ung, gate_pur, keep, tokens = {}, {}, [], {}, {}, {}, [], {}
        for i, (m, x) in enumerate(inputs.items()):
            pad = padding.get(m)
            valid = present[:, i, None].expand(x.shape[0], x.shape[1])
            if pad is not None:
                valid = valid & ~pad
            t = self.encoders[m](zero_absent(x, present[:, i], pad), pad)    # (B, L, H)
            t = torch.where(valid.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype,
                                                                device=t.device))
            a = self.upn[m](t.detach(), valid) + self.gate_bias              # (B, L)
            g, l0 = hard_concrete(a, valid, sample=sample,
                                  u=None if gate_noise is None else gate_noise.get(m),
                                  temperature=self.temperature, gamma=self.gamma,
                                  zeta=self.zeta, threshold=self.threshold)
            count = valid.sum(1, keepdim=True).clamp(min=1).to(t.dtype)     # (B, 1)
            g_main = g if self.gates_from_main else g.detach()
            pur[m] = self._pool(g_main.unsqueeze(-1) * t, count)            # (B, H)
            ung[m] = self._pool(t, count)
            gate_pur[m] = self._pool(g.unsqueeze(-1) * t.detach(), count)
            gates[m], logits[m], tokens[m] = g, a, t
            l0s.append(l0)
            keep.append(valid.any(1))
        available = torch.stack(keep, 1)                                    # (B, M)
        vectors = torch.stack([pur[m] for m in self.names])                 # (M, B, H)
        h = self.fuse_vectors(vectors, available)
        y = self.out_layer(F.dropout(h, self.out_dropout, self.training))
        out = ModelOutput(**self.head_output(y), extras={
            "gates": gates, "gate_logits": logits, "l0": torch.stack(l0s).detach(),
            "purified": pur, "ungated": ung, "tokens": tokens, "available": available})
        if labels is None:
            return out

        task, reg = self.task, self.regression_loss
        losses = {"task": task_loss(out.output, labels, task, reg)}
        gated_losses, intra, gate_terms = [], None, {}
        for i, m in enumerate(self.names):
            k = available[:, i]
            head = self.heads[m]
            y_g, y_u = head(pur[m]), head(ung[m])                           # (B, out_dim)
            l_g = masked_task_loss(self._flat(y_g), labels, task, k, reg)
            l_u = masked_task_loss(self._flat(y_u), labels, task, k, reg)
            losses[f"uni_{m}"] = self.unimodal_weight * l_u
            # the better (lower-loss) view teaches the other; equal losses: no transfer
            lg, lu = l_g.detach(), l_u.detach()
            zero = torch.zeros((), dtype=lg.dtype, device=lg.device)
            term = torch.where(lg < lu, self._masked_mse(y_g.detach(), y_u, k),
                               torch.where(lg > lu, self._masked_mse(y_g, y_u.detach(), k), zero))
            intra = term if intra is None else intra + term
            gated_losses.append(l_g)
            # the gate optimizer's copy: head weights detached, so it reaches only the UPN
            y_gate = F.linear(gate_pur[m], head.weight.detach(), head.bias.detach())
            gate_terms[f"gate_uni_{m}"] = self.unimodal_weight * masked_task_loss(
                self._flat(y_gate), labels, task, k, reg)
        losses["intra"] = self.intra_weight * intra
        inter, alpha, teacher = self.inter_loss(vectors, available, torch.stack(gated_losses))
        losses["inter"] = self.inter_weight * inter
        losses["gate_l0"] = self.l0_weight * torch.stack(l0s).sum()
        losses.update(gate_terms)
        out.losses = losses
        out.extras.update(alpha=alpha, teacher=teacher, gate_terms=self.gate_terms())
        return out


def gate_loss(losses: dict[str, Tensor]) -> Tensor:
    """Sum of the gate optimizer's terms (keys starting with GATE_PREFIX)."""
    return torch.stack([v for k, v in losses.items() if k.startswith(GATE_PREFIX)]).sum()


def main_loss(losses: dict[str, Tensor]) -> Tensor:
    """Sum of the main optimizer's terms (every key not starting with GATE_PREFIX)."""
    return torch.stack([v for k, v in losses.items() if not k.startswith(GATE_PREFIX)]).sum()


class MIMRecipe(Recipe):
    """MIM's two optimizers, one stage ("main").

    "gate": AdamW over the UPN parameters (model.gate_parameters()), lr gate_lr (None: lr);
    "main": AdamW over every other parameter, lr. One forward, one backward of `out.loss` (the
    model's graph routes each group's terms to its own parameters only: see models/mim.py),
    gradient clipping per optimizer (grad_clip > 0), then both steps. Optional per-sample
    modality dropout (modality_dropout > 0) so training sees missing modalities.

    Config keys: epochs, batch_size, lr, gate_lr, weight_decay, grad_clip, modality_dropout.
    """

    clip_each_optimizer = True   # the two groups train on different losses

    def __init__(self, config: Optional[dict] = None):
        config = dict(config or {})
        super().__init__(config)
        gate_lr = config.get("gate_lr")
        self.gate_lr = self.lr if gate_lr is None else float(gate_lr)
        for name, v in (("lr", self.lr), ("gate_lr", self.gate_lr)):
            if not v > 0 or not math.isfinite(v):
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip!r}")

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        from ..train.distributed import unwrap
        net = unwrap(model)
        if not hasattr(net, "gate_parameters"):
            raise ValueError(f"MIMRecipe needs a model with gate_parameters() (MIM), got "
                             f"{type(net).__name__}")
        gate = net.gate_parameters()
        ids = {id(p) for p in gate}
        main = [p for p in net.parameters() if id(p) not in ids]
        return {"main": self._adamw(main, self.lr), "gate": self._adamw(gate, self.gate_lr)}

    def _adamw(self, params: list, lr: float) -> torch.optim.Optimizer:
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES
                                     for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay,
                                 fused=fused or None)

    def stage(self, epoch: int) -> str:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return "main"

    def train_step(self, model: nn.Module, batch, optimizers: dict, *, epoch: int, step: int,
                   stage: str) -> dict[str, float]:
        """Forward, loss check, one backward (both groups' gradients), per-optimizer clipping,
        then both steps."""
        if stage != "main":
            raise ValueError(f"MIM stage must be 'main', got {stage!r}")
        if set(optimizers) != {"main", "gate"}:
            raise ValueError(f"MIMRecipe.train_step needs the optimizers 'main' and 'gate', got "
                             f"{sorted(optimizers)}")
        out = model(batch.inputs, batch.present, labels=batch.labels, padding=batch.padding,
                    stage=stage)
        return self.optimize(model, out, optimizers, epoch=epoch, step=step)
