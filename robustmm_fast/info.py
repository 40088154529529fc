"""`python -m robustmm_fast.info` / `robustmm info`: versions and each backend's availability."""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__, _backend


def report() -> str:
    lines = [f"robustmm_fast {__version__}",
             f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
             f"OpenMP: {torch.backends.openmp.is_available()}, threads: {torch.get_num_threads()})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton: not importable ({exc.__class__.__name__})")
    if torch.cuda.is_available():
        lines.append(f"CUDA devices: {', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))}")
    else:
        lines.append("CUDA devices: none")
    if _backend._C is not None:
        lines.append(f"C++ extension: CPU kernels {_backend.cpu_capability()}, OpenMP {_backend._C.openmp()}")
    lines.append(f"compiler: {_first_line('c++', 'g++')}; nvcc: {_first_line('nvcc', version_line=-1)}")
    lines.append("")
    lines.append(f"{'backend':<10} {'available':<10} {'devices':<28} reason")
    for name, info in _backend.backends().items():
        lines.append(f"{name:<10} {str(info['available']):<10} {info['devices']:<28} {info['reason'] or ''}")
    lines.append("\nlimitations (auto skips these; requesting them raises with the reason):")
    for (op, backend, device, dtype), why in _backend.LIMITATIONS.items():
        lines.append(f"  {op} on {backend}, {device} {str(dtype).removeprefix('torch.')}: {why}")
    lines.append(f"\nrequested backend: {_backend.requested_backend()} (ROBUSTMM_BACKEND / use_backend)")
    return "\n".join(lines)


def _first_line(*names: str, version_line: int = 0) -> str:
    """A line of `NAME --version` for the first of `names` on PATH (line 0, or -1 for the last)."""
    import shutil
    import subprocess
    for name in names:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
        except Exception:
            return path
        lines = [line for line in out.splitlines() if line.strip()]
        return lines[version_line] if lines else path
    return "not found"


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
