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
# shellcheck source=benchmarks/script_lib.sh
. "$(dirname "$0")/script_lib.sh"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: torch sees no CUDA device; run the suite on CPU with: $PY -m benchmarks all" >&2
    exit 2
fi
OUT=$(make_out "$OUT") || exit 2

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
finish "$OUT"
