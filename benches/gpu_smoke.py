"""One-pass smoke test: every op x backend x dtype against the reference (issue 14's GPU check).

    python benches/gpu_smoke.py --device cuda               # in benches/gpu_check.sh
    python benches/gpu_smoke.py --device cpu --size tiny    # the same logic on CPU (tests)

For each case of each op, each backend and each dtype it runs the op on that backend, forward
and backward with a random upstream gradient, checks that the backend really ran both
(``_backend.backend_calls`` / ``backward_calls``: a silent fall back to the reference fails),
and compares the outputs and every input gradient with the ground truth: the reference backend
on float64 copies of the same inputs. Tolerance (DESIGN §7, as tests/conftest.py):

    float64, float32   |x - truth| <= atol + rtol |truth|  (1e-12/1e-10, 1e-5/1e-5), or, for
                       float32, the low-precision rule below
    float16, bfloat16  max |x - truth| <= 2 max |ref - truth| + 1e-6 (1 + max |truth|), ref being
                       the reference backend run in that dtype (flash-attention's rule)

Masked-out inputs hold NaN (an excluded row, an absent modality's keys), so a kernel that reads
them fails. A row is PASS, FAIL (too far, non-finite, an exception, a fall back) or SKIP (the op
has no kernel on that backend, a documented limitation in ``_backend.LIMITATIONS``, or the
backend is unavailable here -- a FAIL with ``--require``). ``--perturb OP:BACKEND`` scales that
backend's first output of OP by 1.25 after the call (forward values and, through autograd,
gradients become wrong): the failure path, checked by tests/test_gpu_check.py. Exit status 1
if any row failed.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import robustmm_fast
from robustmm_fast import _backend
from robustmm_fast.ops import cycle_reconstruction_loss, masked_cross_attention, reparameterize_kl

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
LOW_PRECISION = (torch.float16, torch.bfloat16)
FIXED_TOLS = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-5)}  # (atol, rtol)
OPS = ("reparam_kl", "masked_attention", "cycle_loss")
PERTURB = 1.25


@dataclass
class Case:
    """floats: the differentiable inputs (float64); extra: the other arguments; call(**both)
    returns a tuple of outputs; seeded: reseed torch before each call (in-kernel randomness);
    float32_noise: the in-kernel eps is float32 Box-Muller on every backend (its last ulp
    depends on each backend's log/cos/sin), so float64 is held to float32's tolerance."""
    op: str
    name: str
    floats: dict
    extra: dict
    call: Callable
    seeded: bool = False
    float32_noise: bool = False


def _randn(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def _cases(size: str, device: torch.device) -> list[Case]:
    tiny = size == "tiny"
    gen = torch.Generator().manual_seed(0)
    to = lambda d: {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}  # noqa: E731
    out = []

    # reparameterize_kl: a given eps, a full prior and a row mask (awkward D); in-kernel eps (D % 4 == 0)
    B, L, D = (3, 5, 13) if tiny else (32, 50, 257)
    mask = torch.rand(B, L, generator=gen) > 0.25
    mask[0, 0] = False
    mu = _randn(gen, B, L, D)
    mu[0, 0] = float("nan")  # an excluded row: must not reach anything
    floats = dict(mu=mu, logvar=_randn(gen, B, L, D, scale=0.5), eps=_randn(gen, B, L, D),
                  prior_mu=_randn(gen, B, L, D, scale=0.3), prior_logvar=_randn(gen, B, L, D, scale=0.3))
    out.append(Case("reparam_kl", "eps given, prior, mask", to(floats), to(dict(mask=mask)),
                    lambda **a: reparameterize_kl(**a, reduction="none")))
    B, L, D = (2, 3, 8) if tiny else (16, 50, 1024)
    floats = dict(mu=_randn(gen, B, L, D), logvar=_randn(gen, B, L, D, scale=0.5))
    out.append(Case("reparam_kl", "in-kernel eps", to(floats), {},
                    lambda **a: reparameterize_kl(**a, reduction="none"), seeded=True,
                    float32_noise=True))

    # masked_cross_attention: modalities absent per sample + key padding (one sample with no
    # key, one with a single modality); causal with dropout
    B, H, Lq, lengths, d = (3, 2, 5, (4, 3, 5), 8) if tiny else (8, 4, 50, (50, 37, 50), 64)
    Lk = sum(lengths)
    present = torch.rand(B, len(lengths), generator=gen) > 0.3
    present[0] = False
    present[1] = torch.tensor([False, True, False])
    padding = torch.rand(B, Lk, generator=gen) < 0.1
    k = _randn(gen, B, H, Lk, d)
    k[1, :, :lengths[0]] = float("nan")  # sample 1's absent first modality
    floats = dict(q=_randn(gen, B, H, Lq, d), k=k, v=_randn(gen, B, H, Lk, d))
    out.append(Case("masked_attention", "present, padding", to(floats),
                    to(dict(present=present, key_lengths=lengths, key_padding_mask=padding)),
                    lambda **a: (masked_cross_attention(**a),)))
    B, H, L, d = (2, 2, 9, 8) if tiny else (4, 2, 67, 32)
    floats = dict(q=_randn(gen, B, H, L, d), k=_randn(gen, B, H, L, d), v=_randn(gen, B, H, L, d))
    out.append(Case("masked_attention", "causal, dropout 0.1", to(floats), {},
                    lambda **a: (masked_cross_attention(**a, is_causal=True, dropout_p=0.1),),
                    seeded=True))

    # cycle_reconstruction_loss: every distance, a pair dim, a row mask, per-row losses
    P, B, D = (2, 5, 13) if tiny else (3, 200, 129)
    for distance in ("mse", "l1", "smooth_l1", "cosine"):
        mask = torch.rand(P, B, generator=gen) > 0.25
        mask[0, 0] = False
        fp = _randn(gen, P, B, D)
        fp[0, 0] = float("nan")
        floats = dict(forward_pred=fp, target=_randn(gen, P, B, D), cycle_pred=_randn(gen, P, B, D),
                      source=_randn(gen, P, B, D))
        out.append(Case("cycle_loss", distance, to(floats), to(dict(mask=mask)),
                        lambda distance=distance, **a: (cycle_reconstruction_loss(
                            **a, distance=distance, beta=0.5, reduction="none",
                            forward_weight=1.0, cycle_weight=0.5),)))
    return out


def _run(case: Case, backend: str, dtype: torch.dtype, upstream: list | None, perturb: bool):
    """Outputs and input gradients ({name: tensor}) of `case` on `backend` in `dtype`, the
    upstream gradients used (drawn in float64 on the first call), and the backend calls."""
    inputs = {k: v.detach().to(dtype).requires_grad_() for k, v in case.floats.items()}
    key = (case.op, backend)
    before = (_backend.backend_calls[key], _backend.backward_calls[key])
    if case.seeded:
        torch.manual_seed(1234)
    with robustmm_fast.use_backend(backend):
        outs = tuple(case.call(**inputs, **case.extra))
    if perturb:
        outs = (outs[0] * PERTURB,) + outs[1:]
    if upstream is None:
        gen = torch.Generator().manual_seed(1)
        upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outs]
    grads = torch.autograd.grad(outs, list(inputs.values()), [g.to(o.dtype) for g, o in zip(upstream, outs)],
                                allow_unused=True)  # backward outside the use_backend block
    ran = (_backend.backend_calls[key] - before[0], _backend.backward_calls[key] - before[1])
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    result.update({f"d{k}": g for k, g in zip(inputs, grads) if g is not None})
    return result, upstream, ran


def _ratio(actual: torch.Tensor, truth: torch.Tensor, ref: torch.Tensor,
           tol_dtype: torch.dtype) -> tuple[float, float, float]:
    """(error / tolerance, max abs error, tolerance) of `actual` (held to `tol_dtype`'s rule):
    PASS when the first is <= 1."""
    a, t, r = actual.double(), truth.double(), ref.double()
    finite_t = torch.isfinite(t)
    if not torch.equal(torch.isfinite(a), finite_t):
        return float("inf"), float("inf"), 0.0
    diff = torch.where(finite_t, (a - t).abs(), torch.zeros((), dtype=a.dtype, device=a.device))
    err = diff.max().item() if diff.numel() else 0.0
    ref_err = (torch.where(finite_t, (r - t).abs(), torch.zeros_like(diff)).max().item()
               if diff.numel() else 0.0)
    floor = 1e-6 * (1.0 + (t[finite_t].abs().max().item() if finite_t.any() else 0.0))
    lowp_tol = 2.0 * ref_err + floor
    ratio = err / lowp_tol
    if tol_dtype in FIXED_TOLS:
        atol, rtol = FIXED_TOLS[tol_dtype]
        fixed = (diff / (atol + rtol * t.abs().where(finite_t, torch.zeros_like(t)))).max().item() \
            if diff.numel() else 0.0
        if tol_dtype == torch.float64 or fixed < ratio:
            return fixed, err, atol + rtol * (t[finite_t].abs().max().item() if finite_t.any() else 0.0)
    return ratio, err, lowp_tol


def _skip_reason(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    implemented = getattr(importlib.import_module(f"robustmm_fast.ops.{op}"), "IMPLEMENTED",
                          _backend.BACKENDS)  # ops/<op>.py lists its kernels when not all four
    if backend not in implemented:
        return f"n/a: {op} has no {backend} kernel"
    limitation = getattr(_backend, "LIMITATIONS", {}).get((op, backend, device.type, dtype))
    if limitation:
        return f"limitation: {limitation}"
    why = _backend._unavailable_reason(backend, device, op)
    return None if why is None else f"unavailable: {why}"


def smoke(device: torch.device, size: str, backends, dtypes, ops, perturb: set, require: bool,
          verbose: bool, log=print) -> list[dict]:
    rows = []
    for case in _cases(size, device):
        if case.op not in ops:
            continue
        truth, upstream, _ = _run(case, "reference", torch.float64, None, False)
        for dtype in dtypes:
            ref = truth if dtype == torch.float64 else _run(case, "reference", dtype, upstream, False)[0]
            for backend in backends:
                row = dict(op=case.op, case=case.name, backend=backend,
                           dtype=str(dtype).split(".")[-1], status="PASS", worst="", note="")
                rows.append(row)
                skip = _skip_reason(case.op, backend, device, dtype)
                if skip is not None:
                    hard = require and skip.startswith("unavailable")
                    row.update(status="FAIL" if hard else "SKIP", note=skip)
                    continue
                start = time.perf_counter()
                try:
                    got, _, (fwd, bwd) = _run(case, backend, dtype, upstream,
                                              (case.op, backend) in perturb)
                except Exception as exc:  # noqa: BLE001 -- reported, and the table goes on
                    row.update(status="FAIL", note=f"{exc.__class__.__name__}: {str(exc)[:300]}")
                    if verbose:
                        traceback.print_exc()
                    continue
                if fwd < 1 or bwd < 1:
                    row.update(status="FAIL", note=f"{backend} did not run (forward calls {fwd}, "
                                                   f"backward calls {bwd}): a fall back")
                    continue
                worst = (-1.0, "", 0.0, 0.0)
                tol_dtype = torch.float32 if case.float32_noise and dtype == torch.float64 else dtype
                for name, t in truth.items():
                    if name not in got:
                        row.update(status="FAIL", note=f"no {name}")
                        break
                    r, err, tol = _ratio(got[name], t, ref[name], tol_dtype)
                    if verbose:
                        log(f"    {case.op} [{case.name}] {backend} {row['dtype']} {name}: "
                            f"err {err:.2e} tol {tol:.2e}")
                    if not r <= worst[0]:
                        worst = (r, name, err, tol)
                r, name, err, tol = worst
                row["worst"] = f"{name} {err:.1e} / {tol:.1e}"
                row["note"] = row["note"] or f"{1e3 * (time.perf_counter() - start):.0f} ms"
                if row["status"] == "PASS" and not r <= 1.0:
                    row["status"] = "FAIL"
        log(f"  {case.op} [{case.name}] done")
    return rows


def table(rows: list[dict]) -> str:
    head = ("op", "case", "backend", "dtype", "status", "worst (tensor err / tol)", "note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) for k in ("op", "case", "backend", "dtype",
                                                           "status", "worst", "note")) + " |")
    count = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    lines.append("")
    lines.append(f"{count['PASS']} PASS, {count['FAIL']} FAIL, {count['SKIP']} SKIP")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--size", choices=("default", "tiny"), default="default")
    p.add_argument("--backend", action="append", dest="backends",
                   help="backends to check (repeatable; default: reference + this device's kernels)")
    p.add_argument("--dtype", action="append", dest="dtypes", choices=tuple(DTYPES),
                   help="dtypes (repeatable; default: all four)")
    p.add_argument("--op", action="append", dest="ops", choices=OPS, help="ops (repeatable; default all)")
    p.add_argument("--perturb", action="append", default=[], metavar="OP:BACKEND",
                   help="scale that backend's output of OP by 1.25 (tests the failure path)")
    p.add_argument("--require", action="store_true",
                   help="an unavailable backend is a FAIL, not a SKIP (as ROBUSTMM_REQUIRE_EXT=1)")
    p.add_argument("--output", metavar="FILE", help="also write the table to FILE")
    p.add_argument("--verbose", action="store_true", help="every tensor's error; tracebacks")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    backends = args.backends or (["reference", "cuda", "triton"] if device.type == "cuda" else
                                 ["reference", "cpp"] + (["triton"] if _backend._triton_interpret() else []))
    perturb = set()
    for item in args.perturb:
        op, sep, backend = item.partition(":")
        if not sep or op not in OPS:
            p.error(f"--perturb expects OP:BACKEND with OP in {OPS}, got {item!r}")
        perturb.add((op, backend))
    dtypes = [DTYPES[d] for d in (args.dtypes or DTYPES)]
    print(f"gpu_smoke on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"size {args.size}, backends {', '.join(backends)}; torch {torch.__version__}"
          + (f", perturbed: {sorted(perturb)}" if perturb else ""), flush=True)
    start = time.perf_counter()
    rows = smoke(device, args.size, backends, dtypes, set(args.ops or OPS), perturb, args.require,
                 args.verbose, log=lambda s: print(s, flush=True))
    text = table(rows)
    print()
    print(text)
    print(f"\n{time.perf_counter() - start:.1f} s")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
