#!/usr/bin/env bash
# The one-shot GPU check (docs/gpu.md). Run from the repository root on the
# GPU machine, with `.gpu/gpu-check` built and carried there:
#
#   bash benches/gpu_run.sh            # results under $OUT (default ./gpu-out)
#
# Steps, each under its own timeout (about 7 minutes at most in all; about 2
# minutes expected on an H100): the machine's facts, `.gpu/gpu-check --out
# $OUT`, then `python3 benches/gpu_reference.py > $OUT/reference.txt`. The
# table and the reference lines are printed last. Extra arguments go to
# gpu-check (e.g. `--model DIR`).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

TL=$(timeout 30 "$PY" -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
export LD_LIBRARY_PATH="$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

{
  echo "## machine"
  timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  echo "torch lib: $TL"
  echo "## ldd .gpu/gpu-check (libtorch_cuda must be listed)"
  ldd .gpu/gpu-check 2>&1 | grep -E 'libtorch_cuda|not found'
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "## gpu-check (timeout 240 s)"
timeout -k 5 240 .gpu/gpu-check --out "$OUT" "$@" > "$OUT/gpu-check.log" 2>&1
rc_check=$?
echo "gpu-check exit status $rc_check (0 all pass, 1 a FAIL/ERROR row, 2 no CUDA, 124 timeout)" | tee -a "$OUT/gpu-check.log"
if [ ! -s "$OUT/gpu-check.md" ]; then
  echo "-- no table written; last lines of the log:"
  tail -n 40 "$OUT/gpu-check.log"
fi

echo "## gpu_reference.py (timeout 150 s)"
timeout -k 5 150 "$PY" benches/gpu_reference.py > "$OUT/reference.txt" 2> "$OUT/reference.err"
rc_ref=$?
echo "gpu_reference.py exit status $rc_ref" | tee -a "$OUT/reference.txt"
if [ "$rc_ref" != 0 ]; then
  tail -n 5 "$OUT/reference.err"
fi

echo
echo "================ gpu-check table ($OUT/gpu-check.md) ================"
cat "$OUT/gpu-check.md" 2>/dev/null || echo "(no table)"
echo
echo "================ PyTorch reference ($OUT/reference.txt) ================"
cat "$OUT/reference.txt"
