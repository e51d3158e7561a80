#!/usr/bin/env bash
# On the GPU machine: install the carried wheels offline (no network there), then run scripts/gpu_check.py under a
# timeout. Results in $OUT (the run tool's output folder; out/gpu_check when unset): gpu_check.json (written after
# every section, so a timeout keeps what was measured), gpu_check.stdout, gpu_check.log, gsplat_build.log.
#
# Here first:   scripts/gpu_wheels.sh                      (fills .gpu_wheels/, ~19 MiB)
# Then, with the run tool:  command "bash scripts/gpu_check.sh", carry [".gpu_wheels"], timeout_s 570
# Extra arguments go to gpu_check.py (e.g. --quick, --sections video,gaussians).
#   GPU_CHECK_TIMEOUT   seconds for gpu_check.py (default 480; the script's own --time-limit is 40 s less)
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_WHEELS:-.gpu_wheels}
OUT=${OUT:-out/gpu_check}
SITE=${GPU_SITE:-/tmp/reconx_site}
PY=${PYTHON:-python3}
LIMIT=${GPU_CHECK_TIMEOUT:-480}
mkdir -p "$OUT"

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    t0=$(date +%s)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "gpu_check.sh: installing the wheels from $WHEELS failed" >&2; exit 3; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check.sh: installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - t0 )) s"
else
    echo "gpu_check.sh: no wheels in $WHEELS (run scripts/gpu_wheels.sh here and carry .gpu_wheels); using what is installed"
fi
# gsplat JIT-compiles with nvcc: CUDA_HOME must be the toolkit folder (bin/nvcc and include/cuda_runtime.h). An
# nvcc on PATH may be a wrapper script (as /usr/local/bin/nvcc on the build machines), so check candidates.
if [ -z "${CUDA_HOME:-}" ]; then
    NVCC_DIR=""
    if command -v nvcc >/dev/null 2>&1; then NVCC_DIR="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; fi
    for cand in "$NVCC_DIR" /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13 /opt/cuda; do
        if [ -n "$cand" ] && [ -x "$cand/bin/nvcc" ] && [ -f "$cand/include/cuda_runtime.h" ]; then
            export CUDA_HOME="$cand"
            break
        fi
    done
fi
echo "gpu_check.sh: CUDA_HOME=${CUDA_HOME:-unset}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2

timeout --signal=TERM --kill-after=20 "$LIMIT" "$PY" scripts/gpu_check.py --output "$OUT/gpu_check.json" \
    --time-limit $((LIMIT - 40)) "$@" > "$OUT/gpu_check.stdout" 2> "$OUT/gpu_check.log"
rc=$?
echo "gpu_check.sh: gpu_check.py exit status $rc (124 = killed by the timeout)"
tail -n 25 "$OUT/gpu_check.log"
# A compact summary for the run tool's output tail; the whole JSON is in $OUT/gpu_check.json.
"$PY" - "$OUT/gpu_check.json" <<'PYSUMMARY'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except Exception as exc:
    sys.exit(f"no readable report: {exc}")
print("machine:", json.dumps({k: report["machine"].get(k) for k in ("gpu", "gpu_memory_mib", "torch", "driver",
                                                                     "nvcc", "gsplat", "gsplat_build")}))
for name, section in report["sections"].items():
    print(f"== {name}: {section.get('status')} {section.get('reason') or ''}")
    print(json.dumps({k: v for k, v in section.items() if k not in ("traceback_tail",)})[:1500])
    if section.get("traceback_tail"):
        print(section["traceback_tail"][-800:])
print("finished:", report.get("finished"), "elapsed_s:", report.get("elapsed_s"))
PYSUMMARY
exit 0
