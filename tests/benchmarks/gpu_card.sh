#!/usr/bin/env bash
# Everything only a GPU shows, in one run: the card, check_cuda.py (cuDNN exactness, fp16 with a
# GradScaler, 16-mixed, reductions on the device), bench_replay.py (replay against cuDNN's forward+backward,
# and the fused path's parts: extended pass, gates, the rest), bench_overhead.py (whole-run wall time
# of the three workloads, 2 pairs each) and bench_idle.py (the callback's hooks on the steps it does not
# record). Most important first, each under its own time limit, each log written as it goes, so that a run
# cut short still returns what it measured. The limits add up to 9 minutes (as of 2026-12-08 it has not met
# a GPU).
#
# On a lent GPU machine (the development tools' `device`), whose image has torch, Lightning, TensorBoard,
# numpy, Pillow and matplotlib but not google-crc32c: fetch that wheel here first, in the repository root
# (`.whl/` is git-ignored, so it travels only when carried),
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl google-crc32c
#
# then run `bash tests/benchmarks/gpu_card.sh` there with `.whl` carried. The logs land in $OUT (or
# ./gpu-card): card.txt, check_cuda.log, bench_replay.log, bench_overhead.log, bench_idle.log, and a
# status line per part
# in parts.txt. `GPU_CARD_DRY=1` rehearses the script on the CPU with small sizes (1.5 minutes on 2 CPU cores).
set -u -o pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu-card}"
mkdir -p "$out"
: > "$out/parts.txt"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"  # the interpreter that holds torch (python3 on the device)
dry="${GPU_CARD_DRY:-0}"
# The carried wheels are for the device's Python; a rehearsal uses the environment it runs in.
if [ "$dry" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout, not installed

if [ "$dry" = 1 ]; then
    device=cpu
    check=("$py" tests/benchmarks/check_cuda.py --dry-run)
    replay=("$py" tests/benchmarks/bench_replay.py --device cpu --repeats 3 --only gru-1x64-T64-B32 --parts)
    overhead=("$py" tests/benchmarks/bench_overhead.py --device cpu --pairs 1 --workload fast-step --steps 60)
    idle=("$py" tests/benchmarks/bench_idle.py --device cpu --rounds 1 --steps 60)
else
    device=cuda
    check=("$py" tests/benchmarks/check_cuda.py)
    replay=("$py" tests/benchmarks/bench_replay.py --device cuda --parts)
    overhead=("$py" tests/benchmarks/bench_overhead.py --device cuda --pairs 2)
    idle=("$py" tests/benchmarks/bench_idle.py --device cuda --rounds 2 --steps 200)
fi

# The limits budget a GPU run; a rehearsal shares a CPU with whatever else runs (the test suite's other
# worker, its nested runs), so it gets four times as long: its limits only catch a hang.
[ "$dry" = 1 ] && stretch=4 || stretch=1

part() {  # name, time limit in seconds (on the GPU), command...
    local name=$1 limit=$(($2 * stretch)) started=$SECONDS rc
    shift 2
    echo "== $name: $*" | tee "$out/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && rc="124 (stopped at its limit of $limit s)"
    echo "$name rc=$rc in $((SECONDS - started)) s" | tee -a "$out/parts.txt"
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    "$py" - "$device" <<'EOF'
import os, sys
import torch
device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if device == "cuda":
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}")
print(f"host: {os.cpu_count()} cores, torch {torch.get_num_threads()} intra-op threads")
print(f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
EOF
} 2>&1 | tee "$out/card.txt"

part check_cuda 150 "${check[@]}"
part bench_replay 90 "${replay[@]}"
part bench_overhead 240 "${overhead[@]}"
part bench_idle 60 "${idle[@]}"
cat "$out/parts.txt"
! grep -qv "rc=0 " "$out/parts.txt"
