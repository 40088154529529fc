"""CyIN: cyclic informative latent space for complete and incomplete multimodal learning.

Lin et al., "CyIN: Cyclic Informative Latent Space for Bridging Complete and Incomplete
Multimodal Learning", NeurIPS 2025. The behaviour reproduced is the official code's (issue #6),
generalised to any number M >= 2 of modalities, on the three fused ops:

    x_m   = P_m zero_absent(input_m)                         (B, L_m, C)  1x1 conv (Linear/token)
    z_m, KL_m = IB_m(x_m)                                    GaussianBottleneck -> reparameterize_kl
                KL_m: KL(N(mu, e^logvar) || N(0, I)) element-averaged over the valid tokens
                of the samples where m is present (absent samples / padded tokens: masked rows)
    L_IB  = mean over (m, n) pairs present together of [KL_m + eta MSE(Dec_n(z_m), x_n)]
            (cyclic IB: every z_m rebuilds every projected modality x_n, m == n included)
    label = sum_m mean_{m present} task_loss(H_m(mean_t z_m), y)     (label-level IB; over the
            samples where m is present with at least one valid token, mean_t over valid tokens)
    f_m   = z_m where present; in training stage 2 (once per batch and modality, drawn from
            torch's global RNG) one of {G_{k->m}(z_k) for each other k, their combination, z_m};
            absent m (any stage): the combination of the translations from the present ones
            (CycleConsistency's `reconstructed`)
    h_m   = W_m f_m  (ib_dim -> fusion_dim);  o_n = CrossModalTransformer_n(h_n, [h_m, m != n])
            (one masked attention call per layer over all other segments, then a causal
            self-attention memory stack), pooled over valid time, concatenated over n
    y_hat = out(MLP(o) + o),   MLP = Linear-ReLU-Dropout-Linear          (MulT's head)
    loss  = task(y_hat, y) + label + (1/eta) L_IB + lam (forward + cycle)   [last: stage 2]

losses: "task", "label_ib" (label_weight * sum of the per-modality terms), "ib" ((1/eta) L_IB)
and "translation" (lam * CycleConsistency's loss; only with stage="stage2" and translate=True).

Generalisations and choices not fixed by the official code (it is written for M = 3 aligned or
fixed-length sequences):
- Unaligned data (modalities of different lengths L_m): Dec_n(z_m) and x_n are compared as their
  means over valid tokens, and the translators work on time-pooled latents (B, 1, D); a
  translated/reconstructed latent of such a modality enters fusion as a one-token sequence
  (the other positions padded). With equal lengths everything is token-wise: the decoder MSE
  over tokens valid in both m and n, the translators per token with a token mask valid where
  any present modality has a valid token (aligned data share their padding), a reconstructed
  latent valid on those tokens.
- A modality absent for a sample whose latent cannot be reconstructed (no other modality
  present, or translate=False) is masked out of fusion: it is no source of any attention and
  its own target stream pools to 0. With translate=False absent latents are zero-filled and
  masked that way (the ablation without translation).
- Stage-2 substitution: the draw "translation from k" falls back, for a sample where k is
  absent, to the combination of the present others, and any draw to the real latent where no
  other modality is present; absent modalities are always reconstructed.
- The official quirks are options: decoder_sigmoid (official True: a final Sigmoid on the
  decoders; default False since the projected features are unbounded), combine (official
  "sum" of the translations; default "mean", which keeps the scale whatever the number of
  present sources), stochastic_test (official True: z sampled at test; default False: z = mu).
  Each defaults to None = "as `official` says": official=True gives the official code's three
  behaviours, official=False (default) ours; an explicit True/False/"sum"/"mean" wins.
- Input and fusion projections have no bias (MulT's 1x1 convolutions).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.cross_modal_transformer import CrossModalTransformer
from ..nn.cycle_consistency import COMBINES, CycleConsistency
from ..nn.gaussian_bottleneck import GaussianBottleneck
from ..train.recipe import Recipe
from .base import ModelOutput, MultimodalModel, task_loss, zero_absent
from .encoders import masked_mean
from .late_fusion import masked_task_loss

__all__ = ["CyIN", "CyINRecipe", "STAGES", "OFFICIAL_QUIRKS"]

STAGES = ("stage1", "stage2")
# the official code's behaviour for the three quirk options (ours when official=False)
OFFICIAL_QUIRKS = {"decoder_sigmoid": True, "combine": "sum", "stochastic_test": True}
OUR_QUIRKS = {"decoder_sigmoid": False, "combine": "mean", "stochastic_test": False}
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _resolve_quirk(name: str, value, official: bool):
    return (OFFICIAL_QUIRKS if official else OUR_QUIRKS)[name] if value is None else value


class CyIN(MultimodalModel):
    """CyIN for M >= 2 modalities of shapes {name: (L_m, D_m)} (see the module docstring).

    Args:
        modalities, task, num_classes: as MultimodalModel.
        common_dim: width C of the input projections (and of the decoders' outputs).
        ib_inter_dim, ib_dim: hidden width and latent size D of the token-level IB encoders
            (two 1x1 convolutions with ReLU per head) and decoders.
        eta: the IB trade-off: L_IB = mean[KL + eta MSE], added as (1/eta) L_IB.
        decoder_sigmoid, combine, stochastic_test, official: the official code's quirks (see
            the module docstring): None = as `official` says.
        fusion_dim, mult_layers, mult_heads, memory_layers: MulT fusion width, cross-modal
            layers, heads and causal self-attention memory layers per target.
        attn_dropout, relu_dropout, res_dropout, embed_dropout: MulT's four dropouts;
            out_dropout: the residual MLP's dropout.
        translator_widths, translator_blocks: the cascaded residual autoencoders of the
            translators (one network per modality pair, shared by both directions).
        lam: weight of the translation (forward + cycle) loss in stage 2.
        translate: False disables translation (no translators; absent latents zero-filled
            and masked; no translation loss) -- the ablation.
        label_weight: weight of the label-level IB losses.
        regression_loss: "l1" (default, MMSA's) or "mse" for regression.

    forward(inputs, present, labels=None, padding=None, stage=None): stage None (inference),
    "stage1" or "stage2" (the recipe passes it). extras: "latents" {m: z_m (B, L_m, D)} (rows
    of absent samples are 0), "reconstructed" (M, B, T, D) CycleConsistency's latents (T = L
    when all lengths are equal, else 1; None when not computed), "available" (B, M) the
    modalities fusion used, "substitution" the stage-2 draws (M,) int64 (0 the real latent,
    1 the combination, 2 + j the translation from the j-th other modality; None outside
    stage-2 training; `describe_substitution` names them).
    """

    def __init__(self, modalities: dict[str, tuple[int, int]], task: str, num_classes: int = 0, *,
                 common_dim: int = 256, ib_inter_dim: int = 256, ib_dim: int = 128,
                 eta: float = 16.0, decoder_sigmoid: Optional[bool] = None,
                 combine: Optional[str] = None, stochastic_test: Optional[bool] = None,
                 official: bool = False, fusion_dim: int = 32, mult_layers: int = 2,
                 mult_heads: int = 8, memory_layers: int = 3, attn_dropout: float = 0.1,
                 relu_dropout: float = 0.1, res_dropout: float = 0.1, embed_dropout: float = 0.25,
                 out_dropout: float = 0.0, translator_widths: Sequence[int] = (64, 32, 16),
                 translator_blocks: int = 8, lam: float = 10.0, translate: bool = True,
                 label_weight: float = 1.0, regression_loss: str = "l1"):
        super().__init__(modalities, task, num_classes)
        M = len(self.modalities)
        if M < 2:
            raise ValueError(f"CyIN needs at least 2 modalities, got {M}")
        for name, value in (("common_dim", common_dim), ("ib_inter_dim", ib_inter_dim),
                            ("ib_dim", ib_dim), ("fusion_dim", fusion_dim),
                            ("mult_layers", mult_layers), ("mult_heads", mult_heads),
                            ("translator_blocks", translator_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(memory_layers, bool) or not isinstance(memory_layers, int) \
                or memory_layers < 0:
            raise ValueError(f"memory_layers must be an int >= 0, got {memory_layers!r}")
        if fusion_dim % mult_heads:
            raise ValueError(f"fusion_dim ({fusion_dim}) must be a multiple of mult_heads "
                             f"({mult_heads})")
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta!r}")
        if not lam >= 0 or not label_weight >= 0:
            raise ValueError(f"lam and label_weight must be >= 0, got {lam!r} and {label_weight!r}")
        if regression_loss not in ("l1", "mse"):
            raise ValueError(f"regression_loss must be 'l1' or 'mse', got {regression_loss!r}")
        self.official = bool(official)
        self.decoder_sigmoid = bool(_resolve_quirk("decoder_sigmoid", decoder_sigmoid, official))
        self.combine = _resolve_quirk("combine", combine, official)
        self.stochastic_test = bool(_resolve_quirk("stochastic_test", stochastic_test, official))
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES} (or None), got {combine!r}")
        self.ib_dim, self.eta, self.lam = ib_dim, float(eta), float(lam)
        self.translate, self.label_weight = bool(translate), float(label_weight)
        self.regression_loss = regression_loss
        lengths = [L for L, _ in self.modalities.values()]
        # token-wise translation / reconstruction when every modality has the same length
        self.tokenwise = len(set(lengths)) == 1

        self.proj = nn.ModuleDict({m: nn.Linear(D, common_dim, bias=False)
                                   for m, (_, D) in self.modalities.items()})
        self.ib = nn.ModuleDict({m: GaussianBottleneck(common_dim, ib_dim, hidden_dim=ib_inter_dim,
                                                       sample_in_eval=self.stochastic_test)
                                 for m in self.modalities})
        self.decoders = nn.ModuleDict({m: self._decoder(ib_dim, ib_inter_dim, common_dim)
                                       for m in self.modalities})
        self.label_heads = nn.ModuleDict({m: nn.Linear(ib_dim, self.out_dim)
                                          for m in self.modalities})
        self.cycle = (CycleConsistency(M, ib_dim, widths=tuple(translator_widths),
                                       n_blocks=translator_blocks, shared=True,
                                       combine=self.combine) if self.translate else None)
        self.fusion_proj = nn.ModuleDict({m: nn.Linear(ib_dim, fusion_dim, bias=False)
                                          for m in self.modalities})
        self.fusion = nn.ModuleDict({
            m: CrossModalTransformer(fusion_dim, mult_heads, mult_layers,
                                     attn_dropout=attn_dropout, relu_dropout=relu_dropout,
                                     res_dropout=res_dropout, embed_dropout=embed_dropout,
                                     memory_layers=memory_layers)
            for m in self.modalities})
        width = M * fusion_dim
        self.proj1, self.proj2 = nn.Linear(width, width), nn.Linear(width, width)
        self.out_dropout = out_dropout
        self.out_layer = nn.Linear(width, self.out_dim)

    def _decoder(self, ib_dim: int, inter: int, out: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(ib_dim, inter), nn.ReLU(), nn.Linear(inter, out)]
        if self.decoder_sigmoid:
            layers.append(nn.Sigmoid())
        return nn.Sequential(*layers)

    # ------------------------------------------------------------------ pieces

    def encode(self, inputs: dict[str, Tensor], present: Tensor,
               padding: dict[str, Tensor]) -> tuple[dict, dict, dict, dict]:
        """(x {m: (B, L_m, C)}, z {m: (B, L_m, D)}, kl {m: ()}, valid {m: (B, L_m) bool})."""
        xs, zs, kls, valid = {}, {}, {}, {}
        for i, (m, x) in enumerate(inputs.items()):
            pad = padding.get(m)
            keep = present[:, i, None].expand(x.shape[0], x.shape[1])
            if pad is not None:
                keep = keep & ~pad
            xp = self.proj[m](zero_absent(x, present[:, i], pad))          # (B, L_m, C)
            z, kl_rows = self.ib[m](xp, keep)                              # (B, L_m, D), (B, L_m)
            # element-average of the KL over the included rows' entries (official: mean)
            kls[m] = kl_rows.sum() / (keep.sum() * self.ib_dim).clamp(min=1).to(kl_rows.dtype)
            xs[m], zs[m], valid[m] = xp, z, keep
        return xs, zs, kls, valid

    def ib_loss(self, xs: dict, zs: dict, kls: dict, valid: dict) -> Tensor:
        """L_IB = mean over the (m, n) pairs with at least one valid sample/token in both of
        [KL_m + eta MSE(Dec_n(z_m), x_n)] (time means when L_m != L_n); 0 when none."""
        names = self.names
        kl = torch.stack([kls[m] for m in names])                          # (M,)
        if self.tokenwise:  # every pair token-wise, one decoder call per target n
            z = torch.cat([zs[m] for m in names], 1)                       # (B, M L, D)
            V = torch.stack([valid[m] for m in names])                     # (M, B, L)
            err = torch.stack([self.decoders[n](z).unflatten(1, (len(names), -1)).sub(
                xs[n].unsqueeze(1)).pow(2).mean(-1).transpose(0, 1) for n in names], 1)
            both = V[:, None] & V[None]                                    # (M m, M n, B, L)
            err = torch.where(both, err, torch.zeros((), dtype=err.dtype, device=err.device))
            count = both.sum((2, 3))                                       # (M, M)
            mse = err.sum((2, 3)) / count.clamp(min=1).to(err.dtype)
        else:
            lengths = [zs[m].shape[1] for m in names]
            sums, counts = [], []
            for n in names:
                out = self.decoders[n](torch.cat([zs[m] for m in names], 1))  # (B, sum L, C)
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
            M = len(names)
            count = torch.stack(counts).view(M, M).t()                     # (M m, M n)
            mse = torch.stack(sums).view(M, M).t() / count.clamp(min=1).to(kl.dtype)
        on = (count > 0).to(mse.dtype)
        return (on * (kl[:, None] + self.eta * mse)).sum() / on.sum().clamp(min=1)

    def _translation_space(self, zs: dict, valid: dict, present: Tensor):
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

    def _substitute(self, zt: Tensor, present: Tensor, token_mask: Optional[Tensor]):
        """Stage-2 draws, as tensors (no Python value depends on them, so torch.compile keeps
        one graph): (draws (M,) int64: 0 the real latent, 1 the combination, 2 + j the
        translation from the j-th other modality; latents (M, B, T, D) to use instead of the
        real ones where `use` (M, B) is True)."""
        M = len(self.names)
        cycle = self.cycle
        draws = torch.randint(0, M + 1, (M,)).to(zt.device)                # torch's global RNG
        on = present.t()                                                    # (M, B)
        tail = (1,) * (zt.dim() - 2)
        keep = on.view(M, -1, *tail)
        if token_mask is not None:
            keep = keep & token_mask.unsqueeze(-1)
        z = torch.where(keep, zt, 0)
        fwd = cycle.translator(z[cycle.src])                                # (P, B, T, D)
        src_on = on[cycle.src]                                              # (P, B)
        used = torch.where(src_on.view(*src_on.shape, *tail), fwd, 0)
        total = torch.zeros_like(z).index_add(0, cycle.dst, used)          # (M, B, T, D)
        count = torch.zeros_like(on, dtype=z.dtype).index_add(0, cycle.dst, src_on.to(z.dtype))
        if self.combine == "mean":
            total = total / count.clamp_min(1).view(M, -1, *tail)
        source, pair = self._draw_tables(zt.device)                         # (M, M + 1) each
        rows = torch.arange(M, device=zt.device)
        k = source[rows, draws]                                             # (M,) drawn source
        translated = fwd.index_select(0, pair[rows, draws])                 # (M, B, T, D)
        k_on = on.index_select(0, k).view(M, -1, *tail)
        from_k = (draws >= 2).view(M, 1, *tail) & k_on   # the drawn source, where it is present
        latents = torch.where(from_k, translated, total)
        use = (draws > 0).view(M, 1) & on & (count > 0)      # present, with a source to draw from
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

    # ------------------------------------------------------------------ forward

    def forward(self, inputs: dict[str, Tensor], present: Tensor, labels: Optional[Tensor] = None,
                padding: Optional[dict[str, Tensor]] = None,
                stage: Optional[str] = None) -> ModelOutput:
        if stage is not None and stage not in STAGES:
            raise ValueError(f"CyIN stage must be None or one of {STAGES}, got {stage!r}")
        self.check_inputs(inputs, present)
        padding = padding or {}
        names, M = self.names, len(self.names)
        xs, zs, kls, valid = self.encode(inputs, present, padding)

        # ---- translation: losses (stage 2), reconstructions of absent modalities
        cyc, token_mask, subs = None, None, None
        # complete inputs need no reconstruction outside stage 2; under torch.compile translate
        # anyway (the same result: reconstructed[n] = z_n where n is present) rather than
        # branch on the data
        translating = self.translate and (stage == "stage2" or torch.compiler.is_compiling()
                                          or not bool(present.all()))
        if translating:
            zt, token_mask = self._translation_space(zs, valid, present)
            cyc = self.cycle(zt, present, token_mask)
            if self.training and stage == "stage2":
                subs = self._substitute(zt, present, token_mask)
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
            feats.append(self.fusion_proj[m](lat))                            # (B, L, F)
            pads.append(pad)
        pooled = []
        for i, m in enumerate(names):
            others = [j for j in range(M) if j != i]
            o = self.fusion[m](feats[i], [feats[j] for j in others], present=available[:, others],
                               key_padding_mask=[pads[j] for j in others],
                               target_padding_mask=pads[i])                  # (B, L, F)
            pooled.append(masked_mean(o, pads[i]))                            # (B, F)
        h = torch.cat(pooled, -1)                                             # (B, M F)
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
        losses["ib"] = self.ib_loss(xs, zs, kls, valid) / self.eta
        if cyc is not None and stage == "stage2":
            losses["translation"] = self.lam * cyc.loss
        out.losses = losses
        return out


class CyINRecipe(Recipe):
    """CyIN's two stages: "stage1" for the first round(stage_divide * epochs) epochs (at most
    epochs - 1: at least one epoch of stage 2), then "stage2" (translation loss and latent
    substitution). One AdamW on every parameter (the official code gives a pre-trained BERT
    text encoder its own learning rate; our models take pre-extracted features and have no
    such encoder, so there is one lr). Only stage-2 epochs are selectable: before, the
    translators that rebuild absent modalities are untrained.

    Config keys: epochs (30), stage_divide (0.1), lr, weight_decay, batch_size, grad_clip,
    modality_dropout (0: the official code trains on complete data).
    """

    def __init__(self, config: Optional[dict] = None):
        config = dict(config or {})
        super().__init__(config)
        self.stage_divide = float(config.get("stage_divide", 0.1))
        if not 0.0 <= self.stage_divide <= 1.0:
            raise ValueError(f"stage_divide must be in [0, 1], got {self.stage_divide}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.stage1_epochs = min(int(round(self.stage_divide * self.epochs)), self.epochs - 1)

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """One AdamW; its fused kernel where every parameter allows it (a CPU or CUDA float
        tensor: ~6x faster than the per-tensor loop for CyIN's ~200 parameter tensors)."""
        params = list(model.parameters())
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES
                                     for p in params)
        return {"main": torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay,
                                          fused=fused or None)}

    def stage(self, epoch: int) -> str:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return "stage1" if epoch < self.stage1_epochs else "stage2"

    def selects(self, epoch: int) -> bool:
        return self.stage(epoch) == "stage2"

    def train_step(self, model: nn.Module, batch, optimizers: dict, *, epoch: int, step: int,
                   stage: str) -> dict[str, float]:
        """Forward with the stage, loss check, backward, AdamW step."""
        if stage not in STAGES:
            raise ValueError(f"CyIN stage must be one of {STAGES}, got {stage!r}")
        out = model(batch.inputs, batch.present, labels=batch.labels, padding=batch.padding,
                    stage=stage)
        return self.optimize(model, out, optimizers, epoch=epoch, step=step)
