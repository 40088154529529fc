"""MIM: multimodal information modulation (unimodal purification + knowledge guidance).

Zeng, Mai, Yan, Hu, "Multimodal Reaction: Information Modulation for Cross-Modal
Representation Learning", IEEE Transactions on Multimedia 2023. Reproduced from the official
code, github.com/zengy268/MIM (train.py, modules/model.py, modules/transformer.py, utils/loss.py,
README.md; file:line citations below and in docs/fidelity.md), generalised to any number
M >= 1 of modalities of any lengths (vector views: L = 1):

  encoder, per modality (on the fused masked_cross_attention op):
    c_m   = Conv1d_k(zero_absent(x_m))                     (B, L_m, H)  k = conv_kernel, no bias
    t_m   = LN(Blocks(drop_e(sqrt(H) c_m + P 1[c_m,0 != 0])))   mult_encoder (official: the
            A_Encoder / V_Encoder, MulT's TransformerEncoder; Blocks: `layers` pre-norm
            self-attention + FFN H -> 4H -> H layers, MulT's xavier init; P: sinusoidal
            positions 1..L, none for a step whose first conv channel is exactly 0)
          | LN(Blocks(drop_e(c_m + P)))                    ours: FFN H -> 2H -> H, default init
    conv_only modalities (the official text path after BERT): t_m = c_m
  UPN (Unimodal Purification Network), per modality, over the time axis of the fixed L_m:
    c_t   = relu(W_2 relu(W_1 BiLSTM(t_m)_t + b_1) + b_2)  (B, L_m)  score >= 0
    a     = V_2 relu(V_1 c + d_1) + d_2 + gate_bias        (B, L_m)  bottleneck L_m -> r -> L_m
    s     = sigmoid((log u - log(1 - u) + a) / T)          u ~ U(1e-6, 1 - 1e-6)  (training,
            and at test when stochastic_test) | sigmoid(a) (inference otherwise)
    sb    = clamp(s (zeta - gamma) + gamma, 0, 1)
    g_t   = 1[sb > threshold] + sb - sb.detach()           straight-through hard gate
    l0_m  = mean over valid steps of sigmoid(a - T log(-gamma / zeta))
    v_m   = mean_valid act(g * t_m),  w_m = mean_valid act(t_m)   purified / ungated vectors
            (act: pool_activation; the mean divides by every valid step, closed gates included,
            as the official AdaptiveAvgPool1d)
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
    inter = (10 alpha_t)^2 mean_{m != t} KL_m              (inter_weighting "teacher": official)
          | sum_{m != t} alpha_m KL_m                      (inter_weighting "student": ours)

losses (each already weighted; `out.loss` is their sum):
    main optimizer:  "task" (fusion), "uni_<m>" (unimodal_weight L_m^u),
                     "intra" (intra_weight sum_m intra_m), "inter" (inter_weight inter)
    gate optimizer:  "gate_l0" (l0_weight sum_m l0_m), "gate_uni_<m>" (unimodal_weight L_m^g)
The gate terms are the keys starting with GATE_PREFIX ("gate_"); `gate_loss`/`main_loss` sum
each group. The gate terms are computed on a copy of the path whose gated tokens and unimodal
head weights are detached, so their gradient reaches the UPN (and, with gates_from_main, the
encoders through the UPN's input, a gradient MIMRecipe discards as the official code does).

gates_from_main=False (ours): the UPN reads detached tokens and the main terms see the gates as
    constants (g.detach()), so ONE backward of `out.loss` gives each group exactly its own
    gradient; the main AdamW covers every parameter but the UPN's, the gate AdamW the UPN's.
gates_from_main=True (official, train.py:62-68, 140-150): the main terms use the live gates, so
    their gradient reaches the UPN through the straight-through estimator and the encoders also
    through the UPN's BiLSTM input (model.py:192-199: x is not detached); the main Adam covers
    EVERY parameter (train.py:62: model.parameters(), the UPN included) and the gate Adam the
    UPN's (train.py:66-68): each step, the UPN moves by both Adams, each with its own moments and
    its own loss group's gradient. MIMRecipe takes the gate group's gradient w.r.t. the UPN with
    autograd.grad and the main group's with backward, both from the same forward.

Official settings (README.md:37-49 and the code) and where this implementation departs (the full
table with file:line is docs/fidelity.md):
  - README.md:37-49 publishes global_configs.DefaultConfigs (the committed global_configs.py is
    blank): max_seq_length 50, lr 1e-5, d_l 80, n_epochs 100, train_batch_size 16, dev/test
    batch 128, bert-base-uncased, MOSI dims 768/74/47, MOSEI's visual 35 (README.md:51-54: only
    the dims change). The registry's `mosi` / `mosei` presets carry these numbers. Two names the
    code reads are in neither: `activate` (model.py:37, 81, 111, 176; commented alternatives
    nn.ReLU / nn.Tanh at model.py:79-80, 109-110, 174-175), so pool_activation's official value
    is not published, and `seed` (train.py:308; utils/utils.py:16 overrides it with 3407).
  - Code settings: Conv1d kernel 3 without bias (model.py:76, 106), MulT encoder of 3 layers,
    5 heads, attention dropout 0.5, relu = residual dropout 0.3 (one `dropout` here), embedding
    dropout 0.2 (model.py:82-89), BiLSTM(d, d/2 per direction) (model.py:171), score MLP
    Linear(d, d/2)-ReLU-Linear(d/2, 1)-ReLU (model.py:179-184), bottleneck L -> L // 5 -> L
    (model.py:173, 186-190), HardConcrete(beta 1/3, gamma -0.2, zeta 1.0, loc_bias 3)
    (model.py:134) with threshold 0.6 and the straight-through estimator (model.py:157-159), L0
    weight 0.1 (train.py:98, 102), every KGS weight 1 (train.py:75, 119-132), L1 loss
    (utils/loss.py:13-20), unimodal heads Linear(d, 1) shared by the gated and ungated views
    (model.py:106-111), fusion "multiplication" tanh(Linear(l * a * v)) then Linear(d, 1)
    (model.py:227, 234, 239), two Adams at one lr (train.py:62-68).
  - Its utils/loss.py is unfinished (Loss_inter and Loss_penalty, imported at train.py:5, are
    not defined; Loss_intra does not parse; Adjuster's body is commented out), so the published
    code does not run; the intra/inter formulas follow train.py:45-50, 123-132 and the
    commented code at utils/loss.py:30-31, 41-55. The teacher there is the modality whose
    gated loss is strictly below every other's (a tie: no inter loss); ours takes argmin.
  - Its text encoder is a fine-tuned BERT then the Conv1d only (model.py:32-69); here every
    modality is pre-extracted features, and conv_only lists the modalities that get the Conv1d
    alone (the presets: "text").
  - Its data are zero-padded to 50 steps (utils/data_preparation.py:38-51) and nothing is
    masked: padded steps are attended, gated and counted in every mean. mask_padding=False
    (official) does the same (padded values are zeroed first, so their content stays inert);
    True (ours) excludes padded steps from attention, gates, L0 and means.
  - The official step runs the UPN's backward, steps it, then runs the main backward on the
    retained graph (train.py:140-150); on its torch 1.4 (requirements.txt), whose Adam updates
    p.data, that backward presumably uses partly post-step UPN weights (not run; torch >= 1.5
    raises an in-place-modification error there). Here both groups'
    gradients come from the same pre-step parameters. Its third Adam (optimizer_encoder,
    train.py:63-65) is never stepped and has no counterpart here.
  - Departures by default, each an option whose None means "as `official` says"
    (official=False: ours), measured on Handwritten in
    benches/results/mim-departures-handwritten-2026-12-02.md:
      stochastic_test   official True (HardConcrete has no eval branch, model.py:144-161);
                        ours False: deterministic gates sigmoid(a) at inference, so a
                        prediction does not depend on a noise draw (with product fusion one
                        closed draw zeroes the product; Handwritten: -16.6 points complete).
      inter_weighting   official "teacher" (train.py:45-50: temp = 10 alpha_teacher enters only
                        as temp^2 on the mean of the students' KLs); ours "student": each
                        student's KL weighted by its own alpha: >= 50x weaker for M = 3
                        (100 / (M - 1) at alpha ~ 1); Handwritten: +1.4 / +2.0 points.
      gates_from_main   official True (see above); ours False: the UPN is trained by its own
                        losses alone, with one backward that also runs under DDP (the
                        official two-gradient step is single-process); Handwritten: +0.3
                        complete, -0.3 subsets, within the seeds' spread.
      mask_padding      official False (see above); ours True: a sample's output does not
                        depend on how much padding it has (Handwritten has none: no effect;
                        not measured on padded data).
      mult_encoder      official True (MulT's encoder, model.py:82-89, transformer.py:23-90);
                        ours False: no sqrt(H) input scale, FFN 2H, PyTorch init -- the encoder
                        our Handwritten numbers were tuned with (MulT's: -0.6 complete,
                        -1.5 subsets there at our 20 epochs).
  - Missing modalities (not in the official code, which always has all three): inputs zeroed
    with torch.where, gates of absent samples forced to 0 and excluded from every mean, fusion
    and KGS over the available modalities only; a modality present with no valid step counts
    as unavailable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.cross_modal_transformer import _Block as _MulTBlock
from ..nn.cross_modal_transformer import sinusoid_positions
from ..nn.traceable_lstm import TraceableLSTM
from ..contract import (ModelOutput, Recipe, TrainConfig, adamw, check_finite, logged_terms,
                        task_loss, zero_absent)
from .base import MultimodalModel
from .encoders import _Block, _zero_padding
from .late_fusion import masked_task_loss

__all__ = ["MIM", "MIMConfig", "MIMRecipe", "hard_concrete", "kgs_alpha", "gate_loss", "main_loss",
           "GATE_PREFIX", "FUSIONS", "OFFICIAL_QUIRKS", "OUR_QUIRKS"]

FUSIONS = ("product", "add", "concat")
INTER_WEIGHTINGS = ("student", "teacher")
POOL_ACTIVATIONS = ("none", "tanh", "relu")
GATE_PREFIX = "gate_"
OFFICIAL_QUIRKS = {"stochastic_test": True, "inter_weighting": "teacher", "gates_from_main": True,
                   "mask_padding": False, "mult_encoder": True}
OUR_QUIRKS = {"stochastic_test": False, "inter_weighting": "student", "gates_from_main": False,
              "mask_padding": True, "mult_encoder": False}
OFFICIAL_KD_TEMPERATURE = 10.0     # train.py:47-48 loss_kd: temp = 10 * alpha_teacher
NOISE_EPS = 1e-6                   # u ~ U(1e-6, 1 - 1e-6), model.py:147
FFN_MULT = 4                       # MulT's FFN width 4 d (transformer.py:129-130)


def hard_concrete(logits: Tensor, valid: Tensor, *, sample: bool, u: Optional[Tensor] = None,
                  temperature: float = 1 / 3, gamma: float = -0.2, zeta: float = 1.0,
                  threshold: float = 0.6) -> tuple[Tensor, Tensor]:
    """Hard-concrete gates with a straight-through threshold (model.py:144-161).

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
    """(M,) inter-modal weights (utils/loss.py:41-50, commented there): lam_m = L_m / sum_active
    L, alpha_m proportional to prod_{k != m, active}(1 + lam_k) (= prod_active(1 + lam) /
    (1 + lam_m)), normalised to sum to the number S of active modalities; 0 for an inactive
    one. losses (M,) (detach them first)."""
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    L = torch.where(active, losses, zero)
    lam = L / L.sum().clamp_min(torch.finfo(L.dtype).tiny)
    w = torch.where(active, 1.0 / (1.0 + lam), zero)
    return active.sum().to(L.dtype) * w / w.sum().clamp_min(torch.finfo(L.dtype).tiny)


class TokenEncoder(nn.Module):
    """Conv1d (kernel k, 'same' padding, no bias) + sinusoidal positions + pre-norm
    self-attention layers + final LayerNorm: (B, L, D) [+ padding (B, L) for the attention's
    keys] -> tokens (B, L, H), padded tokens 0. The input must be NaN-free (zero_absent).

    mult=True: the official A_Encoder / V_Encoder (model.py:72-129), MulT's TransformerEncoder
        (transformer.py:23-90): t = drop_e(sqrt(H) c + P 1[c_0 != 0]), layers with an FFN
        H -> 4H -> H and relu = residual dropout `dropout`, MulT's xavier init of the FFN and
        out_proj (transformer.py:190-195, multihead_attention:42-51). fairseq's make_positions
        (position_embedding:22-27) gives a step whose first channel is exactly 0 the padding
        position, whose embedding is 0 (position_embedding:59).
    mult=False (ours): t = drop_e(c + P), FFN H -> 2H -> H, PyTorch's default init.
    conv_only: the Conv1d alone (the official text path after BERT, model.py:65-69)."""

    def __init__(self, dim: int, hidden: int, layers: int, heads: int, kernel: int,
                 dropout: float, attn_dropout: float, embed_dropout: float,
                 conv_only: bool = False, mult: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(dim, hidden, kernel, padding=kernel // 2, bias=False)
        self.conv_only, self.mult = conv_only, mult
        n = 0 if conv_only else layers
        if mult:
            self.layers = nn.ModuleList(_MulTBlock(hidden, heads, FFN_MULT * hidden, attn_dropout,
                                                   dropout, dropout) for _ in range(n))
            for layer in self.layers:
                nn.init.xavier_uniform_(layer.attn.out_proj.weight)
        else:
            self.layers = nn.ModuleList(_Block(hidden, heads, dropout, attn_dropout)
                                        for _ in range(n))
        self.norm = None if conv_only else nn.LayerNorm(hidden)
        self.embed_dropout = embed_dropout

    def forward(self, x: Tensor, padding: Optional[Tensor]) -> Tensor:
        if self.conv.kernel_size[0] == 1:  # a pointwise conv: the same map, as a matmul
            c = F.linear(x, self.conv.weight.squeeze(-1))                  # (B, L, H)
        else:
            c = self.conv(x.transpose(1, 2)).transpose(1, 2)               # (B, L, H)
        if self.conv_only:
            return _zero_padding(c, padding)
        if self.mult:
            acc = torch.float64 if c.dtype == torch.float64 else torch.float32
            pos = sinusoid_positions([c.shape[1]], c.shape[-1], c.device, acc).to(c.dtype)
            zero = torch.zeros((), dtype=c.dtype, device=c.device)
            t = math.sqrt(c.shape[-1]) * c + torch.where(c[..., :1] != 0, pos, zero)
        else:
            t = c + sinusoid_positions([c.shape[1]], c.shape[-1], c.device).to(c.dtype)
        t = F.dropout(t, self.embed_dropout, self.training)
        for layer in self.layers:
            t = layer(t, None, key_padding_mask=padding) if self.mult else layer(t, padding)
        return _zero_padding(self.norm(t), padding)


class UPN(nn.Module):
    """The gate logits (without the bias) of one modality (model.py:167-199): BiLSTM -> score
    MLP (ReLU, >= 0) per step -> bottleneck over the time axis (L -> r -> L). tokens (B, L, H),
    valid (B, L)."""

    def __init__(self, hidden: int, seq_len: int, bottleneck: int):
        super().__init__()
        half = max(1, hidden // 2)
        # nn.LSTM's parameters, init and eager numbers; one graph under torch.compile
        self.lstm = TraceableLSTM(hidden, half, batch_first=True, bidirectional=True)
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


@dataclass(frozen=True)
class MIMConfig(TrainConfig):
    """Every MIM hyperparameter, with its default written once (see MIM and MIMRecipe for each
    key; the departure options are None = as `official` says); gate_lr: the gate optimizer's
    lr (None: lr)."""
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    conv_kernel: int = 1
    dropout: float = 0.1
    attn_dropout: float = 0.0
    embed_dropout: float = 0.0
    conv_only: tuple = ()
    gate_bottleneck: Optional[int] = None
    gate_bias: float = 3.0
    temperature: float = 1 / 3
    gamma: float = -0.2
    zeta: float = 1.0
    threshold: float = 0.6
    fusion: str = "product"
    out_dropout: float = 0.0
    pool_activation: str = "none"
    unimodal_weight: float = 1.0
    intra_weight: float = 1.0
    inter_weight: float = 1.0
    l0_weight: float = 0.1
    stochastic_test: Optional[bool] = None
    inter_weighting: Optional[str] = None
    gates_from_main: Optional[bool] = None
    mask_padding: Optional[bool] = None
    mult_encoder: Optional[bool] = None
    official: bool = False
    regression_loss: str = "l1"
    gate_lr: Optional[float] = None


_MODEL_KEYS = ('hidden', 'layers', 'heads', 'conv_kernel', 'dropout', 'attn_dropout', 'embed_dropout', 'conv_only', 'gate_bottleneck', 'gate_bias', 'temperature', 'gamma', 'zeta', 'threshold', 'fusion', 'out_dropout', 'pool_activation', 'unimodal_weight', 'intra_weight', 'inter_weight', 'l0_weight', 'stochastic_test', 'inter_weighting', 'gates_from_main', 'mask_padding', 'mult_encoder', 'official', 'regression_loss')


class MIM(MultimodalModel):
    """MIM for M >= 1 modalities of shapes {name: (L_m, D_m)} (see the module docstring).

    Args (official values: the README's MOSI configuration and the code, file:line in
    docs/fidelity.md; the registry's `mosi` preset has them):
        modalities, task, num_classes: as MultimodalModel.
        hidden: token width H (official d_l 80, README.md:39). layers, heads: transformer
            layers per modality (0: none) and heads, H a multiple (official 3, 5).
            conv_kernel: odd Conv1d kernel size (official 3).
        dropout: relu and residual dropout of the layers (official 0.3 both); attn_dropout
            (official 0.5); embed_dropout: after the scaled tokens + positions (official 0.2).
        conv_only: modality names whose encoder is the Conv1d alone (official: the text,
            after its BERT; default none). Names the data lack are ignored, so the `mosi`
            preset's ["text"] builds on any dataset.
        gate_bottleneck: r of the UPN's time bottleneck (None: max(1, L_m // 5), official).
        gate_bias (3.0), temperature (1/3), gamma (-0.2), zeta (1.0), threshold (0.6): the
            hard-concrete gate (official values).
        fusion: "product" (official), "add" or "concat". out_dropout: before the output layer
            (official none: 0).
        pool_activation: "none" (default), "tanh" or "relu" before the time means; the
            official code applies `config.activate`, whose value is published nowhere (README's
            configuration omits it; the code's comments name nn.ReLU and nn.Tanh).
        unimodal_weight, intra_weight, inter_weight, l0_weight: loss weights (official 1, 1,
            1, 0.1).
        stochastic_test, inter_weighting, gates_from_main, mask_padding, mult_encoder: the
            departures of our defaults (module docstring); None = as `official` says.
        official: the value the five None options take (True: the official code's).
        regression_loss: "l1" (official) or "mse".

    forward(inputs, present, labels=None, padding=None, stage=None, gate_noise=None): stage None
    or "main"; gate_noise {m: u (B, L_m)} fixes the hard-concrete noise (else drawn from
    torch's global RNG when sampling). extras: "gates" {m: (B, L_m) hard gates (straight-through
    gradient)}, "gate_logits" {m: (B, L_m)}, "l0" (M,) unweighted per-modality L0, "purified"
    and "ungated" {m: (B, H)}, "available" (B, M), and with labels "alpha" (M,), "teacher" ()
    int64 (-1: no modality available), "gate_terms" (the gate optimizer's loss names);
    "tokens" {m: (B, L_m, H)} the encoder's tokens (invalid steps 0).
    """

    def __init__(self, modalities: dict[str, tuple[int, int]], task: str, num_classes: int = 0,
                 config=None, **overrides):
        """config: a MIMConfig or a dict of its keys; overrides: keys of it."""
        super().__init__(modalities, task, num_classes)
        cfg = MIMConfig.from_dict(config, name="MIM")
        cfg = cfg.replace(**overrides) if overrides else cfg
        (hidden, layers, heads, conv_kernel, dropout, attn_dropout, embed_dropout, conv_only,
         gate_bottleneck, gate_bias, temperature, gamma, zeta, threshold, fusion, out_dropout,
         pool_activation, unimodal_weight, intra_weight, inter_weight, l0_weight,
         stochastic_test, inter_weighting, gates_from_main, mask_padding, mult_encoder, official,
         regression_loss) = (getattr(cfg, k) for k in _MODEL_KEYS)
        _int("hidden", hidden, 1)
        _int("layers", layers, 0)
        _int("heads", heads, 1)
        _int("conv_kernel", conv_kernel, 1)
        if conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (length-preserving padding), got "
                             f"{conv_kernel}")
        if isinstance(conv_only, str) or not all(isinstance(m, str) for m in conv_only):
            raise ValueError(f"conv_only must be a list of modality names, got {conv_only!r}")
        if layers > 0 and hidden % heads and set(self.modalities) - set(conv_only):
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
        self.mask_padding = _resolve_quirk("mask_padding", mask_padding, official)
        self.mult_encoder = _resolve_quirk("mult_encoder", mult_encoder, official)
        for name in ("stochastic_test", "gates_from_main", "mask_padding", "mult_encoder"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be None, True or False, got "
                                 f"{getattr(self, name)!r}")
        if self.inter_weighting not in INTER_WEIGHTINGS:
            raise ValueError(f"inter_weighting must be None or one of {INTER_WEIGHTINGS}, got "
                             f"{inter_weighting!r}")
        self.hidden, self.fusion, self.pool_activation = hidden, fusion, pool_activation
        self.conv_only = tuple(m for m in self.modalities if m in set(conv_only))
        self.gate_bias, self.temperature = float(gate_bias), float(temperature)
        self.gamma, self.zeta, self.threshold = float(gamma), float(zeta), float(threshold)
        self.out_dropout = float(out_dropout)
        self.unimodal_weight, self.intra_weight = float(unimodal_weight), float(intra_weight)
        self.inter_weight, self.l0_weight = float(inter_weight), float(l0_weight)
        self.regression_loss = regression_loss

        self.encoders = nn.ModuleDict({
            m: TokenEncoder(D, hidden, layers, heads, conv_kernel, dropout, attn_dropout,
                            embed_dropout, conv_only=m in self.conv_only,
                            mult=self.mult_encoder)
            for m, (_, D) in self.modalities.items()})
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
        # indexing by the teacher tensor, not by a Python int: no host sync, one compiled graph
        t = teacher.clamp(min=0).reshape(1)                                 # (1,)
        logp = F.log_softmax(vectors, -1)                                   # (M, B, H)
        logp_t = logp.index_select(0, t).detach()                           # (1, B, H)
        kl = (logp_t.exp() * (logp_t - logp)).sum(-1)                       # (M, B)
        both = keep.t() & keep.index_select(1, t).t()                       # (M, B)
        zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
        kl = torch.where(both, kl, zero).sum(1) / both.sum(1).clamp(min=1).to(kl.dtype)  # (M,)
        student = active & (torch.arange(M, device=kl.device) != t)         # (M,)
        kl = torch.where(student, kl, zero)
        if self.inter_weighting == "student":
            inter = (alpha * kl).sum()
        else:
            scale = (OFFICIAL_KD_TEMPERATURE * alpha.index_select(0, t).squeeze(0)) ** 2
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
            masked = pad if self.mask_padding else None  # official: padded steps are steps
            valid = present[:, i, None].expand(x.shape[0], x.shape[1])
            if masked is not None:
                valid = valid & ~masked
            t = self.encoders[m](zero_absent(x, present[:, i], pad), masked)  # (B, L, H)
            t = torch.where(valid.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype,
                                                                device=t.device))
            # official: the UPN reads the live tokens (model.py:192-199), so the main losses
            # reach the encoders through it too; ours: detached
            a = self.upn[m](t if self.gates_from_main else t.detach(), valid) + self.gate_bias
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
    """MIM's two optimizers, one stage ("main"); official: Adam at one lr for both
    (train.py:62-68), no weight decay, no clipping, no schedule, 100 epochs of batch 16
    (README.md:38-41).

    "gate": AdamW over the UPN parameters (model.gate_parameters()), lr gate_lr (None: lr);
    "main": AdamW over every other parameter, lr -- or, when the model's gates_from_main is
    True (official), over EVERY parameter, the UPN included (train.py:62).
    A step: one forward; then
      gates_from_main False: one backward of `out.loss` (the model's graph routes each group's
        terms to its own parameters only), per-optimizer clipping (grad_clip > 0), both steps;
      gates_from_main True: the gate terms' gradient w.r.t. the UPN (autograd.grad; their
        gradient elsewhere is discarded, as the official optimizer_model.zero_grad() does,
        train.py:145), the main terms' gradient w.r.t. every parameter (backward), clipping
        each, the main step, then the gate step with the gate gradient. Single-process only.
    Optional per-sample modality dropout (modality_dropout > 0) so training sees missing
    modalities (official: none, it has no missing modalities).

    Config keys: epochs, batch_size, lr, gate_lr, weight_decay, grad_clip, modality_dropout.
    """

    clip_each_optimizer = True   # the two groups train on different losses

    Config = MIMConfig

    def __init__(self, config=None):
        super().__init__(config)
        gate_lr = self.cfg.gate_lr
        self.gate_lr = self.lr if gate_lr is None else float(gate_lr)
        for name, v in (("lr", self.lr), ("gate_lr", self.gate_lr)):
            if not v > 0 or not math.isfinite(v):
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip!r}")

    @staticmethod
    def _net(model: nn.Module) -> nn.Module:
        from ..train.distributed import unwrap
        net = unwrap(model)
        if not hasattr(net, "gate_parameters"):
            raise ValueError(f"MIMRecipe needs a model with gate_parameters() (MIM), got "
                             f"{type(net).__name__}")
        return net

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        net = self._net(model)
        gate = net.gate_parameters()
        ids = {id(p) for p in gate}
        if getattr(net, "gates_from_main", False):
            main = list(net.parameters())            # official: Adam(model.parameters())
        else:
            main = [p for p in net.parameters() if id(p) not in ids]
        return {"main": adamw(main, self.lr, self.weight_decay),
                "gate": adamw(gate, self.gate_lr, self.weight_decay)}

    def stage(self, epoch: int) -> str:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return "main"

    def train_step(self, model: nn.Module, batch, optimizers: dict, *, epoch: int, step: int,
                   stage: str) -> dict[str, float]:
        """Forward, loss check, the gradients (see the class docstring), per-optimizer
        clipping, then both steps."""
        if stage != "main":
            raise ValueError(f"MIM stage must be 'main', got {stage!r}")
        if set(optimizers) != {"main", "gate"}:
            raise ValueError(f"MIMRecipe.train_step needs the optimizers 'main' and 'gate', got "
                             f"{sorted(optimizers)}")
        official = getattr(self._net(model), "gates_from_main", False)
        if official and isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("MIM with gates_from_main=True (the official two-Adam UPN update) "
                             "runs in one process only; use gates_from_main=False under DDP")
        out = model(batch.inputs, batch.present, labels=batch.labels, padding=batch.padding,
                    stage=stage)
        if not official:
            return self.optimize(model, out, optimizers, epoch=epoch, step=step)
        return self._two_gradient_step(out, optimizers, epoch=epoch, step=step)

    def _two_gradient_step(self, out, optimizers: dict, *, epoch: int, step: int) -> dict:
        check_finite(out.losses, epoch=epoch, step=step)
        params = {k: [p for g in opt.param_groups for p in g["params"]]
                  for k, opt in optimizers.items()}
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        gate_grads = torch.autograd.grad(gate_loss(out.losses), params["gate"],
                                         retain_graph=True, allow_unused=True)
        main_loss(out.losses).backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params["main"], self.grad_clip)
        optimizers["main"].step()
        for p, g in zip(params["gate"], gate_grads):
            p.grad = g
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params["gate"], self.grad_clip)
        optimizers["gate"].step()
        return logged_terms(out)
