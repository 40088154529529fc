#!/usr/bin/env bash
# The GPU validation of issue 14, as one command of at most 8 minutes on a machine with a GPU:
#
#   bash benches/gpu_check.sh             # on the GPU machine, from a copy of the repository
#   bash benches/gpu_check.sh --dry-run   # anywhere: print every command, run the CPU parts on CPU
#
# Steps, each timed and limited with `timeout` (a hung step is killed and the next one runs):
#   env     device, capability, driver, python/torch/triton/CUDA/nvcc versions, date, git commit
#   build   pip install --no-build-isolation --no-deps -e . with TORCH_CUDA_ARCH_LIST of this GPU
#           and MAX_JOBS = cores; then both extensions must import (robustmm info is saved)
#   smoke   benches/gpu_smoke.py: every op x backend x dtype against the reference, values and
#           gradients (a PASS/FAIL table)
#   pytest  the gpu tier: ROBUSTMM_REQUIRE_EXT=1 pytest -m gpu -x -q
#   bench-* robustmm bench reparam_kl / cycle_loss at (256, 50, 1024) and masked_attention at the
#           issue's cases (B64 H8 Lq50 Lk3x50 d64, 0 and 2 of 3 absent), bf16 then fp32, each
#           against eager, torch.compile and the peers (SDPA, FlexAttention with a block mask)
# Everything is written under benches/results/gpu-<device>-<date>/ (header.md, one log per step,
# smoke.md, bench-*.md, summary.md). The exit status is 1 if any step failed or did not run.
#
# Options: --dry-run; --out DIR (results folder; a dry run defaults to a temporary one).
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's capability),
# MAX_JOBS (default: the online cores), GPU_CHECK_BUDGET_S (total seconds, default 465).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
RES=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) RES=${2:?--out needs a folder}; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
START=$SECONDS
TOTAL=${GPU_CHECK_BUDGET_S:-465}   # 8 minutes less a margin for the kill grace and the summary
DEADLINE=$((START + TOTAL))
GRACE=5                            # seconds between timeout's TERM and its KILL
# Budgets (seconds): the fixed steps sum to 380, so the benchmarks always keep >= 85 s; what
# the earlier steps leave unused goes to the benchmarks, each capped as below.
B_ENV=20 B_BUILD=120 B_SMOKE=90 B_PYTEST=150
B_BENCH_ATT=100 B_BENCH_REPARAM=45 B_BENCH_CYCLE=50
FAILED=0
SUMMARY=()

# ---- device name and the results folder ----
if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    SLUG=dry-run
else
    read -r SLUG CAP < <(timeout 60 "$PY" -c "
import re, torch
if torch.cuda.is_available():
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    print(re.sub('[^a-z0-9]+', '-', name.lower()).strip('-'), f'{major}.{minor}')
else:
    print('no-cuda', '-')
" 2>/dev/null || echo "unknown -")
    DEVICE=cuda
fi
DATE=$(date -u +%Y-%m-%d)
if [ -z "$RES" ]; then
    if [ "$DRY" = 1 ]; then
        RES=$(mktemp -d /tmp/gpu-check-dry-run.XXXXXX)
    else
        RES="$ROOT/benches/results/gpu-${SLUG}-${DATE}"
        n=2
        while [ -e "$RES" ]; do RES="$ROOT/benches/results/gpu-${SLUG}-${DATE}-$n"; n=$((n + 1)); done
    fi
fi
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
ARCH=${TORCH_CUDA_ARCH_LIST:-${CAP:-}}
[ "$ARCH" = "-" ] && ARCH=""
JOBS=${MAX_JOBS:-$(getconf _NPROCESSORS_ONLN)}
TMP=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

say() { echo "[$((SECONDS - START))s] $*"; }

# step NAME BUDGET MODE CMD...: run CMD under `timeout`, its output in $RES/NAME.log (MODE show:
# also on the console; tail: only its last lines), and record the outcome in the summary.
step() {
    local name=$1 budget=$2 mode=$3
    shift 3
    local left=$((DEADLINE - SECONDS - GRACE))
    local limit=$((budget < left ? budget : left))
    echo
    say "=== $name (budget ${budget}s, limit ${limit}s)"
    echo "\$ $*"
    if [ "$limit" -lt 5 ]; then
        say "--- $name: NOT RUN (no time left)"
        SUMMARY+=("| $name | $budget | 0 | NOT RUN (no time left) |")
        FAILED=1
        return 0
    fi
    local t0=$SECONDS rc
    if [ "$mode" = show ]; then
        timeout -k "$GRACE" "$limit" "$@" 2>&1 | tee "$RES/$name.log"
        rc=${PIPESTATUS[0]}
    else
        timeout -k "$GRACE" "$limit" "$@" >"$RES/$name.log" 2>&1
        rc=$?
        tail -n 15 "$RES/$name.log"
    fi
    local took=$((SECONDS - t0)) status
    case $rc in
        0) status=PASS ;;
        124|137) status="TIMEOUT after ${limit}s"; FAILED=1 ;;
        *) status="FAIL (exit $rc)"; FAILED=1 ;;
    esac
    say "--- $name: $status in ${took}s (log: $RES/$name.log)"
    SUMMARY+=("| $name | $budget | $took | $status |")
}

# dry_step NAME CMD...: print what the real run would run
dry_step() {
    local name=$1
    shift
    echo
    say "=== $name (dry run: not run here)"
    echo "\$ $*"
    SUMMARY+=("| $name | - | 0 | DRY RUN (printed) |")
}

# ---- step bodies (run through `bash -c` so that `timeout` can limit them) ----

env_report() {  # the header: versions, device, date, commit
    local commit dirty
    commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "${ROBUSTMM_GIT_COMMIT:-unknown (no git)}")
    dirty=$(git -C "$ROOT" status --porcelain 2>/dev/null | head -n 20 | tr '\n' ' ')
    {
        echo "# GPU check: $SLUG, $DATE"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "- git commit: $commit${dirty:+ (uncommitted changes: $dirty)}"
        echo "- host: $(uname -srm), $(getconf _NPROCESSORS_ONLN) cores"
        echo "- TORCH_CUDA_ARCH_LIST: ${ARCH:-none (no CUDA device)}, MAX_JOBS: $JOBS"
        if command -v nvidia-smi >/dev/null; then
            echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4 | tr '\n' ';')"
        fi
        if command -v nvcc >/dev/null; then
            echo "- nvcc: $(nvcc --version | tail -n 2 | tr '\n' ' ')"
        else
            echo "- nvcc: not on PATH"
        fi
        "$PY" - "$DEVICE" <<'PYEOF'
import importlib.metadata as md, platform, sys
import torch
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"
print(f"- python: {platform.python_version()} ({sys.executable})")
print(f"- torch: {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else '-'}")
print(f"- triton: {version('triton')}; numpy {version('numpy')}; pytest {version('pytest')}; "
      f"scikit-learn {version('scikit-learn')}; tqdm {version('tqdm')}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible")
elif sys.argv[1] == "cuda":
    print("- device: NO CUDA DEVICE VISIBLE to this torch. This check needs a CUDA build of torch "
          "(e.g. `pip install torch==2.14.1`, PyPI's CUDA wheel) and a GPU.")
    sys.exit(1)
else:
    print("- device: cpu (dry run)")
PYEOF
    } | tee "$RES/header.md"
    return "${PIPESTATUS[0]}"
}

build() {  # the extensions for this GPU, then both must import
    TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS" \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e "$ROOT" || return 1
    "$PY" -m robustmm_fast.cli info | tee "$RES/info.txt"
    "$PY" - <<'PYEOF'
import sys
from robustmm_fast import _backend as b
missing = [f"{name}: {why}" for name, mod, why in (("_C", b._C, b._C_reason),
                                                   ("_C_cuda", b._C_cuda, b._C_cuda_reason)) if mod is None]
if missing:
    sys.exit("extension(s) missing after the build: " + "; ".join(missing))
print("both extensions import")
PYEOF
}

gpu_tier() {  # the gpu pytest tier; parallel where pytest-xdist is installed (Triton compiles)
    local extra=()
    "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 8)
    "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
    ROBUSTMM_REQUIRE_EXT=1 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider \
        --junitxml "$RES/pytest-gpu.xml" "${extra[@]}"
}

ATTENTION_BENCH="$TMP/attention_bench.py"
cat >"$ATTENTION_BENCH" <<'PYEOF'
"""masked_attention at issue 14's cases (the CLI's `robustmm bench masked_attention` has no shape
option and its nine default cases, each compiled twice for torch.compile and FlexAttention, do
not fit the 8 minutes), with robustmm_fast.bench's cases, implementations and runner."""
import argparse, sys
from datetime import datetime, timezone
import torch
from robustmm_fast.bench import format_table, run_cases
from robustmm_fast.bench import masked_attention as m
from robustmm_fast.bench.runner import peak_bandwidth, timing_method
from robustmm_fast.cli import _versions

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda")
p.add_argument("--dtype", default="bfloat16")
p.add_argument("--output")
p.add_argument("--check", action="store_true", help="list the cases and implementations only")
args = p.parse_args()
device, dtype = torch.device(args.device), getattr(torch, args.dtype)
cases = m.cases(shapes=((64, 8, 50, (50, 50, 50), 64),), absent=(0, 2), dtype=dtype)
impls, ours, peers = m.implementations(device)
print("cases:", "; ".join(c.name for c in cases))
print("implementations:", ", ".join(i.name for i in impls), "| ours:", ours, "| peers:", ", ".join(peers))
if args.check:
    sys.exit(0)
results = run_cases(cases, impls, device, log=lambda s: print(s, flush=True))
# the runner names robustmm[cuda] as ours on CUDA, but attention has no CUDA C++ kernel: take
# the first of our backends that ran
ran = [i.name for i in impls if i.name.startswith("robustmm[") and any(r.impl == i.name for r in results)]
ours = ran[0] if ran else ours
peak = peak_bandwidth(device)
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
header = (f"masked_attention (issue 14 cases) --dtype {args.dtype} on {device} ({name}); {_versions()}; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {timing_method(device, 7)}")
text = f"{header}\n\n{format_table(results, ours, peers, peak)}\n"
print("\n" + text)
if args.output:
    open(args.output, "w").write(text)
PYEOF

export -f env_report build gpu_tier
export ROOT RES PY DEVICE SLUG DATE ARCH JOBS

say "gpu_check: results in $RES (total budget ${TOTAL}s)"

# ---- env ----
step env "$B_ENV" show bash -c env_report

# ---- build ----
if [ "$DRY" = 1 ]; then
    dry_step build env TORCH_CUDA_ARCH_LIST="<capability, e.g. 9.0>" MAX_JOBS="$JOBS" \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e "$ROOT" "&&" "$PY" -m robustmm_fast.cli info
else
    step build "$B_BUILD" tail bash -c build
fi

# ---- smoke ----
if [ "$DRY" = 1 ]; then
    echo
    echo "(dry run: the GPU run is: $PY benches/gpu_smoke.py --device cuda --require --output $RES/smoke.md)"
    step smoke "$B_SMOKE" show "$PY" benches/gpu_smoke.py --device cpu --size tiny --output "$RES/smoke.md"
else
    step smoke "$B_SMOKE" show "$PY" benches/gpu_smoke.py --device cuda --require --output "$RES/smoke.md"
fi

# ---- gpu tier ----
if [ "$DRY" = 1 ]; then
    dry_step pytest env ROBUSTMM_REQUIRE_EXT=1 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider \
        --junitxml "$RES/pytest-gpu.xml" "[-n 8 with pytest-xdist] [--timeout 120 with pytest-timeout]"
    step pytest-collect "$B_PYTEST" tail "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider
else
    step pytest "$B_PYTEST" tail bash -c gpu_tier
fi

# ---- benchmarks: bf16 first (the issue's goals), then fp32 ----
BENCHES=()
for dtype in bfloat16 float32; do
    BENCHES+=("bench-masked_attention-$dtype|$B_BENCH_ATT|$PY $ATTENTION_BENCH --device cuda --dtype $dtype --output $RES/bench-masked_attention-$dtype.md")
    BENCHES+=("bench-reparam_kl-$dtype|$B_BENCH_REPARAM|$PY -m robustmm_fast.cli bench reparam_kl --device cuda --dtype $dtype --shape 256x50x1024 --output $RES/bench-reparam_kl-$dtype.md")
    BENCHES+=("bench-cycle_loss-$dtype|$B_BENCH_CYCLE|$PY -m robustmm_fast.cli bench cycle_loss --device cuda --dtype $dtype --shape 256x50x1024 --distance mse --output $RES/bench-cycle_loss-$dtype.md")
done
for entry in "${BENCHES[@]}"; do
    IFS='|' read -r name budget cmd <<<"$entry"
    read -r -a argv <<<"$cmd"
    if [ "$DRY" = 1 ]; then
        dry_step "$name" "${argv[@]}"
    else
        step "$name" "$budget" show "${argv[@]}"
    fi
done
if [ "$DRY" = 1 ]; then
    # the benchmark commands' logic on CPU: the flags exist, the attention cases and peers build
    step bench-flags 30 show bash -c "set -e
        help=\$(\"$PY\" -m robustmm_fast.cli bench --help)
        for flag in --device --dtype --shape --distance --output; do
            grep -q -- \"\$flag\" <<<\"\$help\" || { echo \"robustmm bench lacks \$flag\"; exit 1; }
        done
        echo 'robustmm bench has --device --dtype --shape --distance --output'
        \"$PY\" \"$ATTENTION_BENCH\" --device cpu --dtype bfloat16 --check"
fi

# ---- summary ----
{
    echo "# GPU check summary ($SLUG, $DATE)"
    echo
    echo "| step | budget s | took s | status |"
    echo "|---|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "total: $((SECONDS - START)) s; $([ "$FAILED" = 0 ] && echo "all steps passed" || echo "SOME STEPS FAILED")"
} >"$RES/summary.md"
echo
cat "$RES/summary.md"
echo "results: $RES"
exit "$FAILED"
