"""Build of robustmm_fast: the pure-Python package plus two optional extensions.

- robustmm_fast._C       C++ CPU kernels and the op schemas, built whenever torch is importable.
- robustmm_fast._C_cuda  CUDA kernels, built when torch is a CUDA build and nvcc exists, or when
                         FORCE_CUDA=1 / TORCH_CUDA_ARCH_LIST is set.

A failed extension build does not fail the install: the package installs without it, the
failure is printed loudly and recorded in robustmm_fast/_build_status.json, which
`robustmm info` shows. Without torch at build time (a plain isolated `pip install .`) no
extension is built and the import says how to get one.
"""
import json
import os
import sys
import traceback

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = find_packages(include=["robustmm_fast", "robustmm_fast.*"]) + ["robustmm_fast.kernels"]
PACKAGE_DIR = {"robustmm_fast.kernels": "kernels"}
STATUS_FILE = "_build_status.json"
NOT_RUN = "not built: the build did not reach it"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _sources(folder, suffix):
    path = os.path.join("csrc", folder)
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(suffix))


def _warn(message):
    bar = "!" * 78
    print(f"\n{bar}\nrobustmm_fast: {message}\n{bar}\n", file=sys.stderr, flush=True)


def _want_cuda(torch, cuda_home):
    if os.environ.get("FORCE_CUDA", "0") == "1" or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True, "requested by FORCE_CUDA/TORCH_CUDA_ARCH_LIST"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return False, "nvcc / CUDA_HOME not found"
    return True, f"torch CUDA {torch.version.cuda}, CUDA_HOME={cuda_home}"


def _extensions():
    """(ext_modules, cmdclass, status) -- status records why an extension is absent."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # isolated build: no torch here
        reason = (f"torch is not importable at build time ({exc.__class__.__name__}: {exc}); "
                  "installed without the C++/CUDA extensions. Reinstall with "
                  "`pip install --no-build-isolation .` in an environment that has torch.")
        _warn(reason)
        return [], {}, {"_C": reason, "_C_cuda": reason}

    include = [os.path.join(ROOT, "csrc", "include")]
    opt = ["-O3", "-fno-math-errno", "-fno-trapping-math"]  # no -march=native: see csrc/cpu
    cxx = list(opt)  # no -std: torch's build helper picks the standard its headers need
    link = []
    if torch.backends.openmp.is_available():
        cxx.append("-fopenmp")  # at::parallel_for is OpenMP inline code in torch's headers
        link.append("-fopenmp")
    ext = [CppExtension("robustmm_fast._C", ["csrc/ops.cpp", *_sources("cpu", ".cpp")],
                        include_dirs=include, extra_compile_args={"cxx": cxx},
                        extra_link_args=link)]
    status = {"_C": NOT_RUN, "_C_cuda": NOT_RUN}
    want, why = _want_cuda(torch, CUDA_HOME)
    if want and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch picks the visible GPU's arch; with none it would build for every arch nvcc knows
        # (or fail). Ampere and Hopper natively, newer GPUs through the PTX.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        print(f"robustmm_fast: no GPU visible, building CUDA for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}",
              file=sys.stderr)
    if want:
        nvcc = ["-O3", "--use_fast_math", "-lineinfo",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        ext.append(CUDAExtension("robustmm_fast._C_cuda", _sources("cuda", ".cu") + _sources("cuda", ".cpp"),
                                 include_dirs=include,
                                 extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc}))
    else:
        status["_C_cuda"] = f"not built: {why}"

    class OptionalBuildExt(BuildExtension):
        """Builds each extension on its own; a failure is recorded, not fatal."""

        def build_extension(self, extension):
            name = extension.name.rsplit(".", 1)[-1]
            try:
                super().build_extension(extension)
                status[name] = None
            except Exception as exc:
                tail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                status[name] = (f"build failed: {tail[-2000:]} (reinstall with `pip install -v "
                                "--no-build-isolation .` to see the compiler's output)")
                _warn(f"building {extension.name} failed; installing without it.\n{tail}")

        def build_extensions(self):
            try:
                self._build_all()
            finally:
                # later steps (copying into the source tree for -e, the wheel's file list)
                # must not look for an extension that failed
                self.extensions = [e for e in self.extensions if status[e.name.rsplit(".", 1)[-1]] is None]

        def _build_all(self):
            try:
                super().build_extensions()
            except Exception as exc:  # e.g. torch's nvcc/CUDA version check, before any compile
                tail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                for ext in self.extensions:
                    name = ext.name.rsplit(".", 1)[-1]
                    if status[name] == NOT_RUN:
                        status[name] = f"build failed: {tail[-2000:]}"
                _warn(f"building the extensions failed ({tail}); retrying the CPU extension alone")
                self.extensions = [e for e in self.extensions if not e.name.endswith("_C_cuda")]
                if self.extensions and status["_C"] is not None:  # _C not built yet
                    status["_C"] = NOT_RUN
                    super().build_extensions()

        def run(self):
            super().run()
            self._write_status()

        def _write_status(self):
            text = json.dumps(status, indent=2)
            targets = [os.path.join(self.build_lib, "robustmm_fast")]
            if self.inplace or getattr(self, "editable_mode", False):
                targets.append(os.path.join(ROOT, "robustmm_fast"))
            for folder in targets:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, STATUS_FILE), "w") as f:
                    f.write(text + "\n")

    cmdclass = {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}
    return ext, cmdclass, status


ext_modules, cmdclass, _ = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    # a stale record from an in-place build must not ship; build_ext writes the real one
    exclude_package_data={"robustmm_fast": [STATUS_FILE]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
