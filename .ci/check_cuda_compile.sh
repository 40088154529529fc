#!/usr/bin/env bash
# Proves that the CUDA sources compile with nvcc for sm_80 and sm_90 against the headers of a
# CUDA build of torch, on a machine without a GPU and without installing that torch.
#
#   bash .ci/check_cuda_compile.sh            (from the repository root)
#
# Only torch/include/** of the torch wheel is extracted, into a cache outside the repository
# (reused by later runs):  ${ROBUSTMM_CACHE:-$HOME/.cache/robustmm_fast}/torch-<ver>-include
# Every csrc/cuda/*.cu is compiled with nvcc -c (both archs in one call, nvcc --threads 2) and
# every csrc/cuda/*.cpp with the host compiler, with the flags setup.py gives the CUDA
# extension (its `nvcc = [...]` list is read from setup.py) plus the ones that
# torch.utils.cpp_extension adds. Objects go to a temporary folder that is removed at exit.
#
# Exit status: 0 when everything compiled (or when nvcc is not installed at all: skipped, with
# a message); non-zero on any compile or set-up error.
#
# Environment:
#   ROBUSTMM_CACHE          cache root (default $HOME/.cache/robustmm_fast)
#   ROBUSTMM_TORCH_VERSION  torch wheel whose headers are used (default 2.14.1)
#   ROBUSTMM_CXX11_ABI      _GLIBCXX_USE_CXX11_ABI (default 1, as every torch>=2.7 wheel)
#   ROBUSTMM_CUDA_ARCHS     space-separated compute capabilities (default "80 90")
#   ROBUSTMM_CXX_STD        force the C++ standard (default: setup.py's, raised to the headers' minimum)
#   ROBUSTMM_PTXAS_VERBOSE  1 = print ptxas register/spill reports
#   PYTHON                  python used for set-up (default python3)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

# ---- nvcc ----
NVCC=""
if command -v nvcc >/dev/null 2>&1; then
  NVCC=$(command -v nvcc)
else
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [[ -n "$home" && -x "$home/bin/nvcc" ]]; then NVCC="$home/bin/nvcc"; break; fi
  done
fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: SKIPPED -- nvcc is not installed (not on PATH, not in \$CUDA_HOME," \
       "not in /usr/local/cuda); nothing was compiled."
  exit 0
fi

PY=${PYTHON:-python3}
TORCH_VERSION=${ROBUSTMM_TORCH_VERSION:-2.14.1}
CACHE_ROOT=${ROBUSTMM_CACHE:-$HOME/.cache/robustmm_fast}
TORCH_INC_ROOT="$CACHE_ROOT/torch-$TORCH_VERSION-include"
ABI=${ROBUSTMM_CXX11_ABI:-1}
read -r -a ARCHS <<<"${ROBUSTMM_CUDA_ARCHS:-80 90}"

case "$(realpath -m "$CACHE_ROOT")/" in
  "$(pwd -P)/"*) echo "check_cuda_compile: the cache ($CACHE_ROOT) must be outside the repository" >&2; exit 2 ;;
esac

echo "check_cuda_compile: nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') ($NVCC)"

# ---- torch headers, extracted once from the wheel ----
if [[ ! -f "$TORCH_INC_ROOT/.complete" ]]; then
  echo "check_cuda_compile: extracting torch $TORCH_VERSION headers into $TORCH_INC_ROOT"
  mkdir -p "$CACHE_ROOT"
  WHEELS=$(mktemp -d "$CACHE_ROOT/wheel.XXXXXX")
  STAGE=$(mktemp -d "$CACHE_ROOT/include.XXXXXX")
  trap 'rm -rf "$WHEELS" "$STAGE"' EXIT
  "$PY" -m pip download --quiet "torch==$TORCH_VERSION" --no-deps -d "$WHEELS"
  "$PY" - "$WHEELS" "$STAGE" <<'EOF'
import glob, os, sys, zipfile
wheels, stage = sys.argv[1], sys.argv[2]
found = glob.glob(os.path.join(wheels, "torch-*.whl"))
if len(found) != 1:
    sys.exit(f"check_cuda_compile: expected one torch wheel in {wheels}, found {found}")
count = 0
with zipfile.ZipFile(found[0]) as z:
    for info in z.infolist():
        if info.filename.startswith("torch/include/") and not info.is_dir():
            z.extract(info, stage)
            count += 1
    version = z.read("torch/version.py").decode()
if count == 0:
    sys.exit("check_cuda_compile: the wheel has no torch/include")
cuda = [l for l in version.splitlines() if l.startswith("cuda")]
if not cuda or "None" in cuda[0]:
    sys.exit(f"check_cuda_compile: {os.path.basename(found[0])} is not a CUDA build ({cuda})")
with open(os.path.join(stage, "torch", "version.py"), "w") as f:
    f.write(version)
print(f"check_cuda_compile: {count} header files from {os.path.basename(found[0])} ({cuda[0]})")
EOF
  rm -rf "$TORCH_INC_ROOT"
  mv "$STAGE/torch" "$TORCH_INC_ROOT"
  touch "$TORCH_INC_ROOT/.complete"
  rm -rf "$WHEELS" "$STAGE"
  trap - EXIT
else
  echo "check_cuda_compile: reusing torch $TORCH_VERSION headers from $TORCH_INC_ROOT"
fi
TORCH_INC="$TORCH_INC_ROOT/include"

PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')

# ---- flags: setup.py's nvcc list + what torch.utils.cpp_extension adds ----
mapfile -t SETUP_NVCC < <("$PY" - "$ROOT/setup.py" <<'EOF'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
for node in ast.walk(tree):
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "nvcc"):
        for flag in ast.literal_eval(node.value):
            print(flag)
        break
else:
    sys.exit("check_cuda_compile: no `nvcc = [...]` flag list found in setup.py")
EOF
)
# The C++ standard: the one setup.py pins, unless the torch headers need a newer one (torch 2.14's
# ATen.h requires C++20); then the headers' minimum, with a warning: setup.py must follow.
HEADER_STD=c++17
if grep -q "__cplusplus < 202002L" "$TORCH_INC/ATen/ATen.h"; then HEADER_STD=c++20; fi
SETUP_STD=""
FILTERED=()
for flag in "${SETUP_NVCC[@]}"; do
  if [[ "$flag" == -std=* ]]; then SETUP_STD=${flag#-std=}; else FILTERED+=("$flag"); fi
done
SETUP_NVCC=("${FILTERED[@]}")
STD=${ROBUSTMM_CXX_STD:-${SETUP_STD:-$HEADER_STD}}
if [[ "${STD#c++}" -lt "${HEADER_STD#c++}" ]]; then
  echo "check_cuda_compile: WARNING: setup.py compiles with -std=$STD but the torch $TORCH_VERSION" \
       "headers require -std=$HEADER_STD (ATen.h #error); compiling with -std=$HEADER_STD." \
       "A real build against this torch fails until setup.py stops pinning -std=$STD." >&2
  STD=$HEADER_STD
fi

DEFINES=(-DTORCH_EXTENSION_NAME=_C_cuda -DTORCH_API_INCLUDE_EXTENSION_H "-D_GLIBCXX_USE_CXX11_ABI=$ABI")
INCLUDES=(-I "$ROOT/csrc/include" -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include"
          -isystem "$PY_INC")
# torch.utils.cpp_extension's COMMON_NVCC_FLAGS come first, setup.py's flags after (as there).
COMMON_NVCC=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
             -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
             --expt-relaxed-constexpr --compiler-options -fPIC)
GENCODE=()
for arch in "${ARCHS[@]}"; do GENCODE+=(-gencode "arch=compute_$arch,code=sm_$arch"); done
NVCC_FLAGS=("${COMMON_NVCC[@]}" "${SETUP_NVCC[@]}" "-std=$STD" "${GENCODE[@]}" --threads "${#ARCHS[@]}")
if [[ "${ROBUSTMM_PTXAS_VERBOSE:-0}" == 1 ]]; then NVCC_FLAGS+=(-Xptxas -v); fi
CXX=${CXX:-c++}
# nvcc may be a wrapper script: ask it where its toolkit headers are.
CUDA_INC=$("$NVCC" -dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^" ]*\).*/\1/p' | head -n 1 || true)
[[ -n "$CUDA_INC" ]] || CUDA_INC=$(cd "$(dirname "$NVCC")/.." && pwd)/include
CXX_FLAGS=("-std=$STD" -O3 -fPIC -isystem "$CUDA_INC")

echo "check_cuda_compile: archs ${ARCHS[*]}; nvcc flags: ${NVCC_FLAGS[*]}"

OBJ=$(mktemp -d)
trap 'rm -rf "$OBJ"' EXIT
shopt -s nullglob
CU=(csrc/cuda/*.cu)
CPP=(csrc/cuda/*.cpp)
if [[ ${#CU[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu to compile" >&2
  exit 1
fi

status=0
total_start=$SECONDS
for src in "${CU[@]}" "${CPP[@]}"; do
  obj="$OBJ/$(basename "$src").o"
  start=$SECONDS
  if [[ "$src" == *.cu ]]; then
    cmd=("$NVCC" "${NVCC_FLAGS[@]}" "${DEFINES[@]}" "${INCLUDES[@]}" -c "$src" -o "$obj")
  else
    cmd=("$CXX" "${CXX_FLAGS[@]}" "${DEFINES[@]}" "${INCLUDES[@]}" -c "$src" -o "$obj")
  fi
  if "${cmd[@]}"; then
    echo "check_cuda_compile: OK    $src ($((SECONDS - start)) s, $(du -k "$obj" | cut -f1) KiB object)"
  else
    echo "check_cuda_compile: FAIL  $src ($((SECONDS - start)) s)" >&2
    echo "  command: ${cmd[*]}" >&2
    status=1
  fi
done

# The CPU extension's sources against the same (newer) torch headers: syntax and templates only.
for src in csrc/ops.cpp csrc/cpu/*.cpp; do
  start=$SECONDS
  cmd=("$CXX" "${CXX_FLAGS[@]}" -fopenmp -fno-math-errno -fno-trapping-math "${DEFINES[@]}"
       "${INCLUDES[@]}" -fsyntax-only "$src")
  if "${cmd[@]}"; then
    echo "check_cuda_compile: OK    $src against torch $TORCH_VERSION headers ($((SECONDS - start)) s, syntax only)"
  else
    echo "check_cuda_compile: FAIL  $src against torch $TORCH_VERSION headers" >&2
    echo "  command: ${cmd[*]}" >&2
    status=1
  fi
done

# Each .cu object must hold device code for every requested arch.
if command -v cuobjdump >/dev/null 2>&1 || [[ -x "$(dirname "$NVCC")/cuobjdump" ]]; then
  CUOBJDUMP=$(command -v cuobjdump || echo "$(dirname "$NVCC")/cuobjdump")
  for src in "${CU[@]}"; do
    obj="$OBJ/$(basename "$src").o"
    [[ -f "$obj" ]] || continue
    for arch in "${ARCHS[@]}"; do
      if ! "$CUOBJDUMP" --list-elf "$obj" | grep -q "sm_$arch"; then
        echo "check_cuda_compile: FAIL  $src has no sm_$arch code" >&2
        status=1
      fi
    done
  done
fi

if [[ $status -ne 0 ]]; then
  echo "check_cuda_compile: FAILED ($((SECONDS - total_start)) s)" >&2
  exit $status
fi
echo "check_cuda_compile: all ${#CU[@]} .cu and ${#CPP[@]} .cpp file(s) compiled for sm_${ARCHS[*]} in $((SECONDS - total_start)) s"
