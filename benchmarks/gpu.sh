#!/usr/bin/env bash
# The whole benchmark suite on a CUDA machine, into one results directory:
# every backend the machine has (torch; onnxruntime with its CUDA provider; TensorRT when importable),
# fp32 / fp16 / bf16, then the TensorRT check and the one-page report.
#
#   benchmarks/gpu.sh [OUT_DIR] [extra options for every benchmark, e.g. --preset vita_swinl_ytvis19]
#
# Environment: PYTHON (default python), QUICK=1 (vita_tiny and small sizes: a smoke test of a few
# minutes), MAXFRAMES_ARGS (default: token engine and the host/recompute runtime policies, T <= 4000,
# 180 s per probe), TOKENS_ARGS (default: T up to 10000).
# Exit status 1 when any step failed; every step still runs and writes what it measured.
set -uo pipefail

OUT=${1:-bench_results_gpu_$(date -u +%Y%m%dT%H%M%SZ)}
shift $(( $# > 0 ? 1 : 0 ))
PY=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd) || exit 2
# OUT and the options' paths (--model, --video, --compare) are the caller's, so this runs in the caller's folder;
# the repository goes first on the module path instead of the folder (which may have a benchmarks/ of its own)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
module() { "$PY" -c 'import importlib, sys; sys.path[0] = sys.argv.pop(1); sys.exit(importlib.import_module(sys.argv.pop(1)).main(sys.argv[1:]))' "$REPO" "$@"; }
bench() { module benchmarks.__main__ "$@"; }

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: torch sees no CUDA device; run the suite on CPU with: $PY -m benchmarks all" >&2
    exit 2
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)

BACKENDS=(--backend torch)
if "$PY" -c 'import onnxruntime as o, sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)' 2>/dev/null; then
    BACKENDS+=(--backend onnxruntime)
else
    echo "gpu.sh: onnxruntime has no CUDA provider here (pip install onnxruntime-gpu): onnxruntime rows skipped" >&2
fi
HAVE_TRT=0
if "$PY" -c 'import tensorrt' 2>/dev/null; then
    BACKENDS+=(--backend tensorrt)
    HAVE_TRT=1
else
    echo "gpu.sh: tensorrt is not importable: TensorRT rows skipped" >&2
fi
PRECISIONS=(--precision fp32 --precision fp16 --precision bf16)
COMMON=(--device cuda --out "$OUT" --no-progress "$@")
MAXFRAMES_DEFAULT="--policies host,recompute --frame-cap 4000 --runtime-frame-cap 4000 --probe-timeout 180"
TOKENS_DEFAULT="--max-frames 10000 --probe-timeout 600"
if [[ "${QUICK:-0}" == 1 ]]; then
    COMMON+=(--quick)
    MAXFRAMES_DEFAULT="" TOKENS_DEFAULT=""
fi
read -r -a MAXFRAMES <<< "${MAXFRAMES_ARGS-$MAXFRAMES_DEFAULT}"
read -r -a TOKENS <<< "${TOKENS_ARGS-$TOKENS_DEFAULT}"

status=0
step() {
    echo "== gpu.sh: $*" >&2
    "$@" || { echo "gpu.sh: step failed: $*" >&2; status=1; }
}

step bench e2e "${BACKENDS[@]}" "${PRECISIONS[@]}" "${COMMON[@]}"
step bench detector "${BACKENDS[@]}" "${PRECISIONS[@]}" "${COMMON[@]}"
step bench tokens "${TOKENS[@]}" "${COMMON[@]}"
step bench maxframes "${MAXFRAMES[@]}" "${COMMON[@]}"
step bench prune "${COMMON[@]}"
step bench backends "${COMMON[@]}"
step bench kernels "${COMMON[@]}"
step bench memory "${BACKENDS[@]}" "${PRECISIONS[@]}" "${COMMON[@]}"
step bench threads "${BACKENDS[@]}" "${PRECISIONS[@]}" "${COMMON[@]}"
step bench precision "${COMMON[@]}"
if [[ $HAVE_TRT == 1 ]]; then
    if [[ -f "$REPO/benchmarks/trt_check.py" ]]; then
        step module benchmarks.trt_check --out "$OUT"
    else
        echo "gpu.sh: benchmarks.trt_check is not present yet: TensorRT check skipped" >&2
    fi
fi
# a report.md of an earlier run in OUT is not this run's: named only when this run's report step wrote it
if bench report "$OUT"; then
    echo "gpu.sh: results in $OUT (report: $OUT/report.md)" >&2
else
    echo "gpu.sh: step failed: report; no report written, results (if any) in $OUT" >&2
    status=1
fi
[[ $status == 0 ]] || echo "gpu.sh: some steps failed (see above); exit status 1" >&2
exit $status
