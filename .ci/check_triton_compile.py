"""Every Triton kernel variant our tests and benches launch compiles for sm_80 and sm_90, on a
machine without a GPU; registers and spills per variant from ptxas.

    python .ci/check_triton_compile.py [--arch 80 --arch 90]

How: Triton's active driver is replaced by one that reports a CUDA target of the arch, and
JITFunction.run compiles with warmup=True (compile, do not launch). The real host wrappers in
kernels/*.py are then called with CPU tensors over a grid of configurations (dtypes, masks,
causal, dropout, head dims 16-256, noise modes, priors, distances, need_grad bits): each launch
they make is compiled exactly as on a GPU (Triton's own specialisation of the arguments, the
wrappers' own block sizes and constexprs). ptxas -v (Triton's bundled one) then reports
registers and spills of each distinct kernel.

Cache: Triton's compile cache and the ptxas reports live under
${ROBUSTMM_CACHE:-~/.cache/robustmm_fast}/triton-compile (keyed by Triton on the source,
options and target), so a rerun with unchanged kernels takes seconds.

Time: about 10 minutes per arch on 2 cores from a cold cache (about 2100 distinct kernels per
arch), seconds warm; .ci/run checks sm_90 (ROBUSTMM_TRITON_ARCH=80 for sm_80).

Exit status: 0 when every variant compiled (or when triton is not installed: skipped with a
message); 1 on any compile error (each failure printed with its configuration).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("ROBUSTMM_CACHE", Path.home() / ".cache" / "robustmm_fast")) \
    / "triton-compile"
os.environ.setdefault("TRITON_CACHE_DIR", str(CACHE / "triton"))
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver as _triton_driver
    from triton.runtime.jit import JITFunction
except ImportError as exc:  # pragma: no cover - CI installs triton on Linux
    print(f"check_triton_compile: SKIPPED -- triton is not importable ({exc})")
    sys.exit(0)

import torch  # noqa: E402


class _CompileOnlyDriver:
    """What JITFunction.run asks the driver for, for a CUDA target with no device present."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one binder cache per arch

    def get_current_stream(self, device):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


_compiled: list = []  # (kernel name, constexprs, signature, CompiledKernel)
_failures: list = []
_original_run = JITFunction.run


def _compile_only_run(self, *args, grid, warmup, **kwargs):
    try:
        kernel = _original_run(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- every failure is reported, then CI fails
        _failures.append((self.fn.__name__, _current_config, _describe(exc)))
        raise _CompileFailed from exc
    _compiled.append((self.fn.__name__, _current_config, kernel))
    return kernel


def _describe(exc: BaseException) -> str:
    """The error and its innermost cause (a CompilationError's first line is only where the
    failing call is; the reason is in the exception it was raised from)."""
    text = f"{type(exc).__name__}: {exc}"
    root = exc
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    if root is not exc:
        text += f"\n    caused by {type(root).__name__}: {str(root).strip().splitlines()[-1]}"
    return text


class _CompileFailed(Exception):
    pass


_current_config = ""


# ---------------------------------------------------------------- the configurations

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _reparam_configs():
    from robustmm_fast.kernels import reparam_kl as K
    for dtype in DTYPES + (torch.float64,):
        for D in (7, 64, 1024):
            for noise in (0, 1, 2):
                for prior in (False, True):
                    for masked in (False, True):
                        def run(dtype=dtype, D=D, noise=noise, prior=prior, masked=masked):
                            mu = torch.zeros(5, D, dtype=dtype)
                            eps = torch.zeros_like(mu) if noise == 1 else None
                            pm = torch.zeros_like(mu) if prior else None
                            mask = torch.ones(5, dtype=torch.bool) if masked else None
                            seed = 1234
                            K.reparam_kl_forward(mu, mu, eps, pm, pm, mask, seed, noise)
                            kl = torch.zeros(5, dtype=torch.float64 if dtype == torch.float64
                                             else torch.float32)
                            K.reparam_kl_backward(mu, kl, mu, mu, eps, pm, pm, mask, seed, noise,
                                                  noise == 1, prior)
                        yield (f"reparam_kl {str(dtype)[6:]} D={D} noise={noise} prior={prior} "
                               f"mask={masked}"), run


def _cycle_configs():
    from robustmm_fast.kernels import cycle_loss as K
    every_subset = tuple(range(1, 16))  # the backward's need_grad bits (0 launches nothing)
    for dtype in DTYPES + (torch.float64,):
        # D = 4099: rows longer than one chunk (cosine's two-loop backward)
        for D in (7, 128, 1024, 4099):
            for distance in range(4):
                for masked in (False, True):
                    def run(dtype=dtype, D=D, distance=distance, masked=masked):
                        x = torch.zeros(2, 5, D, dtype=dtype)
                        mask = torch.ones(2, 5, dtype=torch.bool) if masked else None
                        terms = K.cycle_loss_forward(x, x, x, x, mask, distance, 0.5)
                        for bits in every_subset if D == 128 else (15, 1, 2, 10):
                            K.cycle_loss_backward(terms, x, x, x, x, mask, distance, 0.5, bits)
                    yield (f"cycle_loss {str(dtype)[6:]} D={D} distance={distance} "
                           f"mask={masked}"), run


def _attention_configs():
    from robustmm_fast.kernels import masked_attention as K
    for dtype in DTYPES:
        for d in (16, 20, 32, 64, 80, 128, 256):
            for masked in (False, True):
                for causal in (False, True):
                    for dropout in (0.0, 0.25):
                        for Lq, Lk in ((5, 13), (64, 150)):
                            def run(dtype=dtype, d=d, masked=masked, causal=causal,
                                    dropout=dropout, Lq=Lq, Lk=Lk):
                                q = torch.zeros(2, 2, Lq, d, dtype=dtype)
                                k = torch.zeros(2, 2, Lk, d, dtype=dtype)
                                keep = torch.ones(2, Lk, dtype=torch.bool) if masked else None
                                out, lse = K.masked_attention_forward(q, k, k, keep, causal,
                                                                      dropout, 0.125, 99)
                                K.masked_attention_backward(out, q, k, k, out, lse, keep,
                                                            causal, dropout, 0.125, 99)
                            yield (f"masked_attention {str(dtype)[6:]} d={d} mask={masked} "
                                   f"causal={causal} dropout={dropout} Lq={Lq} Lk={Lk}"), run


# ---------------------------------------------------------------- ptxas

def _ptxas_report(ptx: str, arch: int, cache: dict) -> tuple[int, int]:
    """(registers, spill bytes: stores + loads) of the PTX's kernel, from ptxas -v."""
    key = hashlib.sha256(f"{arch}:{ptx}".encode()).hexdigest()
    if key in cache:
        return tuple(cache[key])
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={sm}", str(src), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{text}")
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    cache[key] = (regs, spills)
    return regs, spills


# ---------------------------------------------------------------- main

def main() -> int:
    global _current_config
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="80, 90 (default both)")
    args = parser.parse_args()
    archs = args.arch or [80, 90]
    CACHE.mkdir(parents=True, exist_ok=True)
    reports_path = CACHE / "ptxas-reports.json"
    reports = json.loads(reports_path.read_text()) if reports_path.exists() else {}
    JITFunction.run = _compile_only_run
    start = time.perf_counter()
    configs = [*_reparam_configs(), *_cycle_configs(), *_attention_configs()]
    print(f"check_triton_compile: triton {triton.__version__}, {len(configs)} host-wrapper "
          f"configurations x sm_{'/sm_'.join(map(str, archs))}; cache {CACHE}")
    rows = {}
    for arch in archs:
        _triton_driver.set_active(_CompileOnlyDriver(arch))
        for i, (name, run) in enumerate(configs):
            if i % 50 == 0:
                print(f"  sm_{arch}: {i}/{len(configs)} configurations, {len(_compiled)} "
                      f"launches compiled, {time.perf_counter() - start:.0f} s", flush=True)
            _current_config = name
            before = len(_compiled)
            try:
                run()
            except _CompileFailed:
                continue
            except Exception as exc:  # noqa: BLE001 -- a host-side error is a failure too
                _failures.append(("host wrapper", name, f"{type(exc).__name__}: {exc}"))
                continue
            for kernel_name, config, kernel in _compiled[before:]:
                ptx = kernel.asm["ptx"]
                variant = hashlib.sha256(ptx.encode()).hexdigest()[:12]
                if (arch, kernel_name, variant) in rows:
                    continue
                regs, spills = _ptxas_report(ptx, arch, reports)
                rows[(arch, kernel_name, variant)] = (regs, spills, config)
    reports_path.write_text(json.dumps(reports))
    JITFunction.run = _original_run

    print(f"\n{'arch':<6} {'kernel':<26} {'variants':>8} {'max regs':>8} {'spilling':>8}  "
          "worst spill (bytes, configuration)")
    summary = {}
    for (arch, kernel_name, _), (regs, spills, config) in sorted(rows.items()):
        s = summary.setdefault((arch, kernel_name), [0, 0, 0, (0, "")])
        s[0] += 1
        s[1] = max(s[1], regs)
        s[2] += spills > 0
        if spills > s[3][0]:
            s[3] = (spills, config)
    for (arch, kernel_name), (n, regs, spilling, worst) in sorted(summary.items()):
        worst_text = f"{worst[0]} ({worst[1]})" if worst[0] else "-"
        print(f"sm_{arch:<3} {kernel_name:<26} {n:>8} {regs:>8} {spilling:>8}  {worst_text}")
    print(f"\n{len(rows)} distinct kernels compiled in {time.perf_counter() - start:.0f} s")
    if _failures:
        print(f"\n{len(_failures)} COMPILE FAILURE(S):")
        shown = set()
        for kernel_name, config, error in _failures:
            first, *rest = error.splitlines()
            print(f"  {kernel_name} [{config}]: {first[:300]}")
            if kernel_name not in shown:  # the whole error once per kernel
                shown.add(kernel_name)
                print("\n".join(f"      {line}" for line in rest))
        return 1
    print("check_triton_compile: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
