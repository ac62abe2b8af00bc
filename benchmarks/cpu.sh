#!/usr/bin/env bash
# The CPU speed, memory and precision measurements in one results directory, as one command for a machine
# of a kind not measured before: end to end with torch and onnxruntime in fp32 (and bf16 where the CPU has
# bf16 instructions), each at 1 and at 2 detector calls at once (the default); a fresh process's peak memory
# at 36 and 360 frames; the fast kernels against their references; bf16 against fp32 beside fp32 against
# itself (emulated on plain ops where the CPU has no bf16); then the one-page report.
#
#   benchmarks/cpu.sh [OUT_DIR] [extra options for every benchmark, e.g. --model vita_r50.pth]
#
# Environment: PYTHON (default python), THREADS (default 2, the setting of the README's figures), QUICK=1
# (vita_tiny and small sizes: a smoke test of a minute). 31 minutes for the full-size R-50 on a 2-core AMD
# EPYC Zen 2, 11 of them the precision step's emulated bf16.
# Exit status 1 when any step failed; every step still runs and writes what it measured.
set -uo pipefail

OUT=${1:-bench_results_cpu_$(date -u +%Y%m%dT%H%M%SZ)}
shift $(( $# > 0 ? 1 : 0 ))
PY=${PYTHON:-python}
# shellcheck source=benchmarks/script_lib.sh
. "$(dirname "$0")/script_lib.sh"
OUT=$(make_out "$OUT") || exit 2

PRECISIONS=(--precision fp32)
if "$PY" -c 'import sys; sys.path[0] = sys.argv[1]; from vita_train.modeling.onednn import bf16_supported; sys.exit(0 if bf16_supported() else 1)' "$REPO"; then
    PRECISIONS+=(--precision bf16)
else
    echo "cpu.sh: this CPU has neither AVX-512-BF16 nor AMX: fp32 rows only (precision emulates bf16)" >&2
fi
BACKENDS=(--backend torch --backend onnxruntime)
COMMON=(--device cpu --threads "${THREADS:-2}" --out "$OUT" --no-progress "$@")
[[ "${QUICK:-0}" == 1 ]] && COMMON+=(--quick)

step bench e2e "${BACKENDS[@]}" "${PRECISIONS[@]}" --detector-streams 1,2 "${COMMON[@]}"
step bench memory "${BACKENDS[@]}" "${PRECISIONS[@]}" "${COMMON[@]}"
step bench kernels "${COMMON[@]}"
step bench precision "${COMMON[@]}"
finish "$OUT"
