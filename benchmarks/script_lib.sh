# Sourced by benchmarks/cpu.sh and benchmarks/gpu.sh: the interpreter and module path, the step runner and the
# closing report that both scripts share. Expects PY and sets REPO, NAME and status.

NAME=$(basename "$0")
REPO=$(cd "$(dirname "$0")/.." && pwd) || exit 2
# OUT and the options' paths (--model, --video, --compare) are the caller's, so this runs in the caller's folder;
# the repository goes first on the module path instead of the folder (which may have a benchmarks/ of its own)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
module() { "$PY" -c 'import importlib, sys; sys.path[0] = sys.argv.pop(1); sys.exit(importlib.import_module(sys.argv.pop(1)).main(sys.argv[1:]))' "$REPO" "$@"; }
bench() { module benchmarks.__main__ "$@"; }

# the results folder, created, as an absolute path
make_out() { mkdir -p "$1" && (cd "$1" && pwd); }

status=0
# run one step; a failed step is reported and remembered, and the next one still runs
step() {
    echo "== $NAME: $*" >&2
    "$@" || { echo "$NAME: step failed: $*" >&2; status=1; }
}

# the one-page report of OUT, then exit 1 if any step failed
finish() {
    # a report.md of an earlier run in OUT is not this run's: named only when this run's report step wrote it
    if bench report "$1"; then
        echo "$NAME: results in $1 (report: $1/report.md)" >&2
    else
        echo "$NAME: step failed: report; no report written, results (if any) in $1" >&2
        status=1
    fi
    [[ $status == 0 ]] || echo "$NAME: some steps failed (see above); exit status 1" >&2
    exit $status
}
