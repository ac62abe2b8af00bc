"""The benchmark suite as a user runs it: `python -m benchmarks all --quick` writes JSON that the markdown
shows faithfully, every measured figure is positive and finite, and the plots are real PNGs.

No timing assertions: the figures are checked for shape and sanity, never for speed.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.record import Column, Record, format_number, load_record, stat
from vita_train.modeling.onednn import bf16_supported
from runtime.backends import onnxruntime_kernels

REPO = Path(__file__).resolve().parents[1]
POSITIVE = ("time", "memory", "rate", "ratio", "frames")
NON_NEGATIVE = ("error", "score", "count")
SUITE = ("e2e", "detector", "tokens", "maxframes", "prune", "backends", "kernels", "memory", "threads", "precision")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "all", "--quick", "--threads", "2", "--out", str(out), "--no-progress",
         "--official-s-per-frame", "7.5"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _md_tables(md: str) -> dict[str, list[list[str]]]:
    """Markdown tables by their '### title' heading: header row then body rows, as cell text."""
    tables, title = {}, None
    for line in md.splitlines():
        if line.startswith("### "):
            title = line[4:].strip()
            tables[title] = []
        elif title is not None and line.startswith("|") and not line.startswith("|---"):
            tables[title].append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return tables


def _numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def _check_cell(cell, text: str, where: str) -> None:
    if cell is None:
        assert text == "—", where
    elif isinstance(cell, dict):
        want = [cell["median"]] if cell["n"] == 1 else [cell["median"], cell["min"], cell["max"]]
        got = _numbers(text)
        assert len(got) == len(want), (where, text)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, rel=1e-3, abs=1e-12), (where, text)
    elif isinstance(cell, bool):
        assert text == ("yes" if cell else "no"), where
    elif isinstance(cell, (int, float)):
        assert float(text) == pytest.approx(cell, rel=1e-3, abs=1e-12), (where, text)
    else:
        assert text == str(cell).replace("|", "\\|"), where


def _check_value(kind: str, v: float, where: str) -> None:
    assert math.isfinite(v), where
    if kind in POSITIVE:
        assert v > 0, where
    elif kind in NON_NEGATIVE:
        assert v >= 0, where


def test_quick_suite_writes_every_benchmark(quick_run: Path):
    for name in SUITE:
        data = json.loads((quick_run / f"{name}.json").read_text())
        assert data["status"] == "complete", (name, data["notes"])
        env = data["environment"]
        assert env["cpu"]["model"] and env["threads"] == 2 and env["versions"]["torch"]
        assert env["git"]["commit"] and "bf16" in env["cpu"] and "amx" in env["cpu"]
        # the machine's state around each benchmark: a slow spell shows in the file itself
        rates = env["matmul_gflops"]
        assert rates["before"]["fp32"] > 1 and rates["after"]["fp32"] > 1, name
        assert ("bf16" in rates["before"]) == bf16_supported()
        assert "Machine state, 2048^3 matmul GFLOP/s" in (quick_run / f"{name}.md").read_text()
        assert data["model"]["preset"] == "vita_tiny" and len(data["model"]["sha256"]) == 64
        assert "random init" in data["model"]["weights"]
        if name != "kernels":
            assert data["tables"] and all(t["rows"] for t in data["tables"]), name
    assert (quick_run / "report.md").exists()
    report = (quick_run / "report.md").read_text()
    for name in SUITE:
        assert load_record(quick_run / f"{name}.json")["title"] in report


def test_the_kernel_benchmark_times_winograd_against_the_direct_convolution(quick_run: Path):
    from kernels import native

    if not native.available():
        pytest.skip("the compiled CPU kernels are not built here")
    rows = [r for t in json.loads((quick_run / "kernels.json").read_text())["tables"] for r in t["rows"]]
    winograd = [r for r in rows if r["name"] == "conv3x3 (Winograd)"]
    assert len(winograd) == 2 and all(r["kernel_s"] > 0 and r["reference_s"] > 0 for r in winograd)
    # against the direct float32 convolution: within F(4x4)'s ~1e-5 of outputs of scale ~5
    assert all(r["max_abs_error"] < 5e-4 for r in winograd), winograd
    assert all("F(4x4,3x3)" in r["kernel"] and "by default" in r["kernel"] for r in winograd)
    # and the same shapes in ONNX Runtime: its Conv against the rewritten graph
    ort_rows = [r for r in rows if r["name"] == "conv3x3 (ONNX Runtime Winograd)"]
    assert [r["shape"] for r in ort_rows] == [r["shape"] for r in winograd]
    assert all(r["kernel_s"] > 0 and r["max_abs_error"] < 5e-4 and r["kernel"].startswith("onnxruntime F(4x4,3x3)")
               for r in ort_rows), ort_rows
    # the compiled masked attention against SDPA, float32 within its noise
    attention = [r for r in rows if r["name"] == "masked attention (frame decoder)"]
    assert attention and all(r["kernel_s"] > 0 for r in attention)
    assert all(r["max_abs_error"] < 1e-5 for r in attention if r["shape"].endswith("float32")), attention
    # these rows run with one detector call's threads (half the run's: two calls at once), the others with all
    call_rows = [r for r in rows if r["name"].startswith(("conv3x3", "masked attention"))]
    run_threads = {r["threads"] for r in rows if r not in call_rows}
    assert len(run_threads) == 1 and {r["threads"] for r in call_rows} == {max(1, run_threads.pop() // 2)}


def test_markdown_shows_the_json_and_figures_are_sane(quick_run: Path):
    for name in SUITE:
        data = json.loads((quick_run / f"{name}.json").read_text())
        md_tables = _md_tables((quick_run / f"{name}.md").read_text())
        for table in data["tables"]:
            lines = md_tables[table["title"]]
            columns = table["columns"]
            assert lines[0] == [c["label"] for c in columns], (name, table["id"])
            assert len(lines) - 1 == len(table["rows"]), (name, table["id"])
            for row, cells in zip(table["rows"], lines[1:]):
                for col, text in zip(columns, cells):
                    cell = row.get(col["key"])
                    where = f"{name}/{table['id']}/{col['key']}"
                    _check_cell(cell, text, where)
                    if isinstance(cell, dict):
                        for key in ("median", "min", "max"):
                            _check_value(col["kind"], cell[key], where)
                        assert cell["min"] <= cell["median"] <= cell["max"], where
                    elif isinstance(cell, (int, float)) and not isinstance(cell, bool):
                        _check_value(col["kind"], cell, where)


def test_headline_figures_are_present(quick_run: Path):
    e2e = load_record(quick_run / "e2e.json")
    rows = {(r["backend"], r["precision"], r["kernels"]): r for r in e2e["tables"][0]["rows"]}
    # the onnxruntime row names the compiled deformable-attention operator where it builds (a C++ compiler)
    ort_kernels = "graph + compiled op" if onnxruntime_kernels.library() is not None else "graph"
    assert set(rows) == {("torch", "fp32", "reference"), ("torch", "fp32", "auto"), ("onnxruntime", "fp32", ort_kernels)}
    assert rows[("torch", "fp32", "reference")]["speedup_vs_reference"] == pytest.approx(1.0)
    for row in rows.values():
        assert all(row[k] is not None for k in ("s_per_frame", "fps", "stage_detector", "stage_token_engine", "peak_rss_gb"))
        # the official time is for the full-size R-50 on 36 frames 360x640, not vita_tiny on 4 frames
        assert row["speedup_vs_official"] is None
    assert any(n.startswith("speed-up vs the official code: left empty") and "vita_tiny" in n for n in e2e["notes"])
    tokens = load_record(quick_run / "tokens.json")
    fit = next(t for t in tokens["tables"] if t["id"] == "tokens_fit")
    assert {(r["quantity"], r["over"]) for r in fit["rows"]} >= {("token engine time", "all T"), ("token engine memory", "all T")}
    maxframes = load_record(quick_run / "maxframes.json")
    rows = maxframes["tables"][0]["rows"]
    assert {r["part"] for r in rows} == {"token engine", "whole runtime"}
    assert all(r["max_frames"] for r in rows)
    assert all(r["paper"] is None for r in rows) and any("paper column left empty" in n for n in maxframes["notes"])
    assert all(r["paper_ap"] is None for r in load_record(quick_run / "prune.json")["tables"][0]["rows"])
    memory = load_record(quick_run / "memory.json")
    rows = {(r["backend"], r["precision"]): r for r in memory["tables"][0]["rows"]}
    assert set(rows) == {("torch", "fp32"), ("onnxruntime", "fp32")}
    for row in rows.values():
        assert row["peak_rss_gb_4"] and row["peak_rss_gb_8"] and row["growth"]
    # each figure is a fresh process: one running an export never imports torch, so it peaks far lower
    assert rows[("onnxruntime", "fp32")]["peak_rss_gb_4"] < rows[("torch", "fp32")]["peak_rss_gb_4"] / 2
    threads = load_record(quick_run / "threads.json")
    rows = {(r["backend"], r["precision"]): r for r in threads["tables"][0]["rows"]}
    assert set(rows) == {("torch", "fp32"), ("onnxruntime", "fp32")}
    assert all(r["s_per_frame_main"] and r["s_per_frame_worker"] and r["worker_vs_main"] for r in rows.values())
    precision = load_record(quick_run / "precision.json")
    compared = [r["compared"] for r in precision["tables"][0]["rows"]]
    # a bf16 row (emulated on plain ops where the CPU has no bf16 instructions, and a note says so), then fp32
    # under 2 noise levels x 3 seeds
    assert len(compared) == 1 + 2 * 3 and compared[0].startswith("bf16 (the precision policy)")
    assert compared[0].endswith(", emulated") != bf16_supported()
    assert any(n.startswith("bf16 emulated") for n in precision["notes"]) != bf16_supported(), precision["notes"]
    assert all(0 <= r["min_iou"] <= r["mean_iou"] <= 1 for r in precision["tables"][0]["rows"])
    kernels = load_record(quick_run / "kernels.json")
    if not kernels["tables"]:
        assert any("kernels/ not present yet" in n for n in kernels["notes"])


def test_plots_exist_and_open(quick_run: Path):
    from PIL import Image

    expected = {"e2e_stages.png", "detector.png", "tokens.png", "prune.png"}
    listed = {p for name in SUITE for p in load_record(quick_run / f"{name}.json")["plots"]}
    assert expected <= listed
    for name in listed:
        with Image.open(quick_run / name) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_compare_flags_regressions_over_ten_percent(quick_run: Path, tmp_path: Path):
    """--compare: a figure 25% slower than the old directory's is flagged; one 5% slower is not."""
    from benchmarks.compare import changes

    old = load_record(quick_run / "e2e.json")
    new = json.loads(json.dumps(old))
    rows = new["tables"][0]["rows"]
    rows[0]["s_per_frame"]["median"] *= 1.25
    rows[1]["s_per_frame"]["median"] *= 1.05
    found = {(c["row"], c["figure"]): c for c in changes(new, old)}
    # rows named by their keys: backend / precision / kernels / detector calls at once (two with two threads)
    assert found[("torch / fp32 / reference / 2", "s/frame")]["regression"]
    assert not found[("torch / fp32 / auto / 2", "s/frame")]["regression"]
    assert found[("torch / fp32 / reference / 2", "s/frame")]["worse_pct"] == pytest.approx(25.0)


def test_compare_matches_rows_of_an_older_record_without_a_newer_key_column(quick_run: Path):
    """A results directory written before e2e's detector-calls column still meets the same rows."""
    from benchmarks.compare import changes

    new = load_record(quick_run / "e2e.json")
    old = json.loads(json.dumps(new))
    old["tables"][0]["keys"].remove("detector_streams")
    for row in old["tables"][0]["rows"]:
        del row["detector_streams"]
    rows = {c["row"] for c in changes(new, old) if c["figure"] == "s/frame"}
    assert len(rows) == len(new["tables"][0]["rows"]) == 3, rows


def test_e2e_rows_at_each_count_of_detector_calls_at_once(tmp_path: Path):
    """--detector-streams 1,2: a CPU torch row for each count, the column saying what ran; 0 is refused."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "e2e", "--quick", "--threads", "2", "--backend", "torch",
                           "--detector-streams", "1,2", "--repeats", "1", "--out", str(tmp_path), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = load_record(tmp_path / "e2e.json")["tables"][0]["rows"]
    # the reference row keeps the backend's choice (2 calls at once with two threads)
    assert [(r["kernels"], r["detector_streams"]) for r in rows] == [("reference", 2), ("auto", 1), ("auto", 2)]
    assert all(r["s_per_frame"]["median"] > 0 for r in rows)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "e2e", "--quick", "--detector-streams", "0",
                           "--out", str(tmp_path / "bad")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--detector-streams: counts of detector calls at once must be >= 1" in proc.stderr


def test_report_renders_a_directory(quick_run: Path, tmp_path: Path):
    out = tmp_path / "page.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "report", str(quick_run), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "![" in text and "tokens.png" in text and "Longest video under" in text


def test_interrupted_run_leaves_what_was_measured(tmp_path: Path):
    """A record is on disk after every row, so a Ctrl-C keeps the rows measured so far, marked interrupted."""
    rec = Record("e2e", "End to end", tmp_path, {"threads": 1}, {})
    table = rec.table("t", "A table", [Column("backend", "backend"), Column("s", "s/frame", "time")], keys=("backend",))
    rec.add(table, {"backend": "torch", "s": stat([0.5, 0.4, 0.6])})
    assert load_record(tmp_path / "e2e.json")["tables"][0]["rows"][0]["s"]["median"] == 0.5
    rec.finish("interrupted")
    data = load_record(tmp_path / "e2e.json")
    assert data["status"] == "interrupted" and data["tables"][0]["rows"]
    assert "interrupted" in (tmp_path / "e2e.md").read_text()
    assert format_number(0.123456) == "0.1235"


def test_official_figure_belongs_to_one_cpu_kind():
    """A recorded official time applies only to CPUs with the instructions it was measured with."""
    from benchmarks.references import official_cpu_figure

    assert official_cpu_figure({"model": "Intel(R) Xeon(R) Processor", "bf16": "amx_bf16, avx512_bf16",
                                "amx": "amx_bf16, amx_int8, amx_tile"})[0] == 1.935
    assert official_cpu_figure({"model": "AMD EPYC 9454", "bf16": "avx512_bf16", "amx": "no"})[0] == 2.79
    # the Zen 4 measured beside ours has its own figure
    zen4 = {"model": "AMD EPYC", "bf16": "avx512_bf16", "amx": "no", "vector": "avx512", "family": "family 25 model 17"}
    assert official_cpu_figure(zen4)[0] == 2.190
    # an AVX2-only EPYC is another kind: its own figure for the Zen 2 measured, none borrowed for another family
    zen2 = {"model": "AMD EPYC", "bf16": "no", "amx": "no", "vector": "avx2", "family": "family 23 model 49"}
    assert official_cpu_figure(zen2)[0] == 2.156
    assert official_cpu_figure({**zen2, "family": "family 25 model 1"}) is None
    assert official_cpu_figure({"model": "AMD EPYC", "bf16": "no", "amx": "no"}) is None
    assert official_cpu_figure({"model": "Intel(R) Xeon(R) CPU E5-2680", "bf16": "no", "amx": "no"}) is None


def test_bad_official_time_is_refused(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "e2e", "--quick", "--official-s-per-frame", "0",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--official-s-per-frame must be a positive" in proc.stderr


def test_bad_arguments_exit_with_a_message(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "report", str(tmp_path / "nothing")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not a directory of benchmark results" in proc.stderr


def test_ctrl_c_keeps_the_rows_measured_so_far(tmp_path: Path):
    """SIGINT during a long tokens run: exit status 130, the JSON holds the finished rows, marked interrupted."""
    import signal
    import time

    out = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "tokens", "--quick", "--threads", "1", "--repeats", "1",
         "--max-frames", "100000", "--points", "40", "--out", str(out), "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            path = out / "tokens.json"
            if path.exists() and load_record(path)["tables"] and load_record(path)["tables"][0]["rows"]:
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    data = load_record(out / "tokens.json")
    assert data["status"] == "interrupted" and data["tables"][0]["rows"]
    assert "Status: interrupted" in (out / "tokens.md").read_text()


def test_maxframes_search_finds_the_threshold():
    """The bracket search on a known linear memory model lands within the tolerance below the threshold."""
    from benchmarks.maxframes import search

    budget, base, per_frame = 12 * 2**30, 2**30, 2.2 * 2**20  # threshold T = 5120

    def run(t: int) -> dict:
        peak = int(base + per_frame * t)
        return {"ok": peak <= budget, "reason": "over budget", "peak_bytes": peak, "seconds": 1.0}

    found = search(run, 24, budget, 100000, 0.02)
    assert 0.98 * 5120 <= found["max_frames"] <= 5120 < found["first_failing"]
    assert found["probes"] <= 10
    capped = search(run, 24, budget, 1000, 0.02)
    assert capped["max_frames"] == 1000 and capped["limited_by"] == "frame cap"


def test_gpu_script_refuses_a_machine_without_cuda(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu.sh would run the whole suite")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), str(tmp_path / "g")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_cpu_script_measures_the_cpu_list_into_one_directory(tmp_path: Path):
    """benchmarks/cpu.sh (QUICK=1): e2e per backend at 1 and 2 detector calls at once, bf16 rows only where the
    CPU has bf16, fresh-process memory, the kernels, precision, and the report over them. Its OUT and --model are
    the caller's relative paths (they were taken relative to the repository)."""
    import torch

    from vita_train import VitaModel, save_checkpoint
    from vita_train.presets import preset

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "tiny.pth", VitaModel(preset("vita_tiny")).eval())
    out = tmp_path / "c"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "cpu.sh"), "c", "--model", "tiny.pth"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "PYTHON": sys.executable, "QUICK": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {out}/report.md" in proc.stderr
    assert load_record(out / "e2e.json")["model"]["weights"].endswith("tiny.pth")
    precisions = {"fp32", "bf16"} if bf16_supported() else {"fp32"}
    rows = load_record(out / "e2e.json")["tables"][0]["rows"]
    assert {(r["backend"], r["precision"], r["detector_streams"]) for r in rows if r["kernels"] != "reference"} == {
        (b, p, n) for b in ("torch", "onnxruntime") for p in precisions for n in (1, 2)
        if not (b == "onnxruntime" and p == "bf16")}
    memory = load_record(out / "memory.json")["tables"][0]["rows"]
    assert {(r["backend"], r["precision"]) for r in memory} == {
        (b, p) for b in ("torch", "onnxruntime") for p in precisions if not (b == "onnxruntime" and p == "bf16")}
    # each fresh child process found the relative checkpoint (it runs in the repository)
    assert all(r["peak_rss_gb_4"] and r["peak_rss_gb_8"] for r in memory), memory
    assert load_record(out / "precision.json")["tables"][0]["rows"][0]["compared"].startswith("bf16")
    assert (out / "kernels.json").exists()
    assert "End to end" in (out / "report.md").read_text()


def test_memory_child_failure_is_a_note_not_a_crash(tmp_path: Path):
    """A child that cannot segment (here: the video is not a video) gives no figure and says why."""
    from benchmarks.clip import Clip
    from benchmarks.memory import child_peak
    from benchmarks.settings import Settings
    from benchmarks.workspace import TORCH, Workspace

    bad = tmp_path / "not_a_video.mp4"
    bad.write_bytes(b"plain text, not a video")
    ws = Workspace("vita_tiny", None, "cpu", 1)
    try:
        peak, why = child_peak(Settings(threads=1), ws, TORCH, Clip(bad, 4, 128, 228, "bad"))
    finally:
        ws.close()
    assert peak is None
    assert "torch fp32, 4 frames: the child process failed" in why and "not_a_video.mp4" in why


def test_a_skipped_row_says_why_for_its_own_backend_and_precision():
    from benchmarks.workspace import BackendSpec, available_specs, skipped_note

    specs, missing = available_specs("cpu")
    note = skipped_note(BackendSpec("onnxruntime", "bf16"), missing)
    assert note.startswith("onnxruntime bf16 skipped") and "no bf16 or fp16 Conv / MatMul" in note
    assert "TensorRT needs a CUDA device" not in note  # another row's reason
    assert "TensorRT needs a CUDA device" in skipped_note(BackendSpec("tensorrt", "fp16"), missing)


def test_stage_timer_counts_overlapping_detector_calls_once():
    """A backend that runs two detector calls at once: the detector stage is the wall time while any call runs,
    not the sum of the calls (which would exceed the run itself)."""
    import threading
    import time

    from benchmarks.stages import StageTimer

    class Slow:
        def detect(self, frames, prune_ratio):
            time.sleep(0.2)
            return frames

        def track(self, tokens, query_index, window, owned=False):
            return None

    timer = StageTimer(Slow(), sync=lambda: None)

    def segment():
        calls = [threading.Thread(target=timer.detect, args=(i, 1.0)) for i in range(2)]
        for c in calls:
            c.start()
        for c in calls:
            c.join()
        timer.track(None, None, None)

    _, wall = timer.run(segment)
    assert 0.19 <= timer.stages["detector"] <= wall < 0.35  # summed, the two calls would give 0.4


def _bench(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m benchmarks ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


# the smallest real e2e run: vita_tiny, 2 frames, torch only, one timed run
TINY_E2E = ("e2e", "--quick", "--frames", "2", "--repeats", "1", "--backend", "torch", "--threads", "2", "--device",
            "cpu", "--no-progress")


def test_compare_with_the_out_folder_itself_is_refused(tmp_path: Path):
    """--out and --compare naming one folder: refused up front, the record there untouched (it was overwritten
    by the new run's first row and the run then compared with itself)."""
    old = tmp_path / "r"
    old.mkdir()
    (old / "e2e.json").write_text('{"benchmark": "e2e", "tables": [], "status": "complete"}')
    proc = _bench(*TINY_E2E, "--out", str(old), "--compare", str(tmp_path / "." / "r"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: --compare") and "is the --out folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (old / "e2e.json").read_text() == '{"benchmark": "e2e", "tables": [], "status": "complete"}'


def test_a_new_run_sets_an_earlier_complete_record_aside(tmp_path: Path):
    """A new run into a folder that holds a complete record keeps that record (JSON, markdown, plots) as
    <name>.previous.*, so a new run that fails after one row costs nothing; an incomplete one is replaced."""
    from benchmarks.report import write_report

    def run(status: str, seconds: list[float], plot: bool) -> None:
        rec = Record("e2e", "End to end", tmp_path, {"threads": 1}, {})
        table = rec.table("t", "A table", [Column("backend", "backend"), Column("s", "s/frame", "time")], keys=("backend",))
        rec.add(table, {"backend": "torch", "s": stat(seconds)})
        if plot:
            (tmp_path / "e2e_stages.png").write_bytes(b"png of run " + status.encode())
            rec.plots.append("e2e_stages.png")
        rec.finish(status)

    run("complete", [0.5], plot=True)
    run("failed", [0.9], plot=False)
    assert load_record(tmp_path / "e2e.json")["status"] == "failed"
    kept = load_record(tmp_path / "e2e.previous.json")
    assert kept["status"] == "complete" and kept["tables"][0]["rows"][0]["s"]["median"] == 0.5
    # the earlier run's plot went with its record, not left beside the new one as if it were its own
    assert kept["plots"] == ["e2e_stages.previous.png"] and not (tmp_path / "e2e_stages.png").exists()
    assert (tmp_path / "e2e_stages.previous.png").read_bytes() == b"png of run complete"
    assert "e2e_stages.previous.png" in (tmp_path / "e2e.previous.md").read_text()
    # a failed record is replaced, the complete one set aside stays
    run("complete", [0.6], plot=False)
    assert load_record(tmp_path / "e2e.json")["tables"][0]["rows"][0]["s"]["median"] == 0.6
    assert load_record(tmp_path / "e2e.previous.json")["tables"][0]["rows"][0]["s"]["median"] == 0.5
    # the report renders the current records only
    assert write_report(tmp_path).read_text().count("# End to end") == 1


def test_official_and_paper_figures_only_beside_the_setting_they_were_measured_in():
    """The official code's time (recorded, or given with --official-s-per-frame) is for the full-size R-50 on the
    36-frame 360x640 clip: another model, length or size gets no speed-up against it, and says why (vita_tiny on
    2 frames was shown "41x faster than the official code")."""
    from benchmarks.clip import Clip
    from benchmarks.e2e import official_figure
    from benchmarks.references import reference_mismatch
    from benchmarks.settings import Settings
    from vita_train.presets import preset

    zen2 = {"model": "AMD EPYC", "bf16": "no", "amx": "no", "vector": "avx2", "family": "family 23 model 49"}
    r50, clip = preset("vita_r50_ytvis19"), Clip("clip.mp4", 36, 360, 640, "the reference clip")
    assert official_figure(Settings(), r50, clip, "cpu", zen2)[0] == 2.156
    # another dataset's R-50 has the same layers (its class count aside)
    assert official_figure(Settings(), preset("vita_r50_ovis"), clip, "cpu", zen2)[0] == 2.156
    assert official_figure(Settings(official_s_per_frame=3.0), r50, clip, "cpu", {})[0] == 3.0
    for config, other in ((preset("vita_tiny"), clip), (preset("vita_r101_ytvis19"), clip),
                          (r50, Clip("c", 2, 360, 640, "")), (r50, Clip("c", 36, 480, 854, ""))):
        for s in (Settings(), Settings(official_s_per_frame=3.0)):
            value, why = official_figure(s, config, other, "cpu", zen2)
            assert value is None and why.startswith("left empty") and "36-frame 360x640" in why, why
    assert "the clip has 2 frames, not 36" in official_figure(Settings(), r50, Clip("c", 2, 360, 640, ""), "cpu", zen2)[1]
    # maxframes' and prune's paper columns: the architecture alone decides
    assert reference_mismatch(r50) == [] and reference_mismatch(preset("vita_tiny"))


def test_compare_refuses_a_record_of_other_settings(tmp_path: Path):
    """--compare against a record of another model / clip / thread count: no regression table (vita_tiny on 2
    frames against 4 frames read as "247% worse"), a warning and a note naming what differs."""
    old = tmp_path / "old"
    proc = _bench(*TINY_E2E, "--out", str(old))
    assert proc.returncode == 0, proc.stderr[-3000:]
    same = _bench(*TINY_E2E, "--out", str(tmp_path / "same"), "--compare", str(old))
    assert same.returncode == 0, same.stderr[-3000:]
    compared = load_record(tmp_path / "same" / "e2e.json")
    assert any(t["id"] == "comparison" and t["rows"] for t in compared["tables"])
    other = _bench(*TINY_E2E, "--frames", "3", "--threads", "1", "--out", str(tmp_path / "other"), "--compare", str(old))
    assert other.returncode == 0, other.stderr[-3000:]
    data = load_record(tmp_path / "other" / "e2e.json")
    assert data["status"] == "complete" and not any(t["id"] == "comparison" for t in data["tables"])
    note = next(n for n in data["notes"] if n.startswith("--compare"))
    assert "not compared" in note and "frames 2 -> 3" in note and "threads 2 -> 1" in note
    assert "WARNING" in other.stderr and "frames 2 -> 3" in other.stderr
    assert "frames 2 -> 3" in (tmp_path / "other" / "e2e.md").read_text()


def _refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2 with one ``error: ...`` line naming ``words``, no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and all(w in errors[0] for w in words), errors


def test_compare_is_checked_before_measuring(tmp_path: Path):
    """--compare: a missing folder, one without this benchmark's record, or a malformed record is refused before
    anything runs (a missing folder ran and exited 0; a malformed file failed the finished run with a traceback)."""
    out = tmp_path / "new"
    _refused(_bench(*TINY_E2E, "--out", str(out), "--compare", str(tmp_path / "nowhere")), "nowhere", "not a directory")
    old = tmp_path / "old"
    old.mkdir()
    _refused(_bench(*TINY_E2E, "--out", str(out), "--compare", str(old)), "holds no e2e.json")
    (old / "e2e.json").write_text("{not json")
    _refused(_bench(*TINY_E2E, "--out", str(out), "--compare", str(old)), "e2e.json", "not a readable benchmark results")
    assert not out.exists()


def test_bad_model_preset_device_or_video_is_one_clear_error(tmp_path: Path):
    """Each is checked once, up front, with the loaders' own message (each printed a long logged traceback, and
    `all` repeated it once per benchmark)."""
    import numpy as np

    (tmp_path / "config.yaml").write_text("model: {}\n")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01 not a checkpoint" * 40)
    (tmp_path / "folder").mkdir()
    out = tmp_path / "out"
    cases = [
        (("all", "--model", str(tmp_path / "missing.pth")), ("missing.pth", "does not exist")),
        (("e2e", "--model", str(tmp_path / "config.yaml")), ("--model", "config.yaml", "config file")),
        (("e2e", "--model", str(tmp_path / "array.npy")), ("--model", "array.npy", "NumPy array")),
        (("e2e", "--model", str(tmp_path / "junk.pth")), ("--model", "junk.pth", "not a PyTorch checkpoint")),
        (("e2e", "--model", str(tmp_path / "folder")), ("--model", "folder", "not an export")),
        (("all", "--preset", "nope"), ("--preset", "unknown preset 'nope'", "vita_tiny")),
        (("e2e", "--device", "gpu"), ("--device gpu", "cpu, cuda or cuda:N")),
        (("e2e", "--video", str(tmp_path / "missing.mp4")), ("--video", "missing.mp4", "does not exist")),
        (("e2e", "--video", str(tmp_path / "array.npy")), ("--video", "array.npy")),
    ]
    for args, words in cases:
        _refused(_bench(args[0], "--quick", "--no-progress", "--out", str(out), *args[1:], timeout=300), *words)
    assert not out.exists()


def test_option_values_no_benchmark_can_use_are_refused(tmp_path: Path):
    """Counts below 1, min > max, ratios outside (0, 1], a zero budget or size, a precision no backend runs on
    this device, --precision / --backend for a benchmark whose rows are fixed, and an --out that is a file:
    argparse-style errors (they ran into empty tables or tracebacks, or were ignored)."""
    out = str(tmp_path / "out")
    (tmp_path / "a_file").write_text("mine")
    cases = [
        (("e2e", "--frames", "0"), "--frames must be >= 1, got 0"),
        (("e2e", "--frames", "-3"), "--frames must be >= 1, got -3"),
        (("e2e", "--size", "0x0"), "--size must be HxW with both at least 1"),
        (("detector", "--batches", "0"), "--batches must be >= 1"),
        (("detector", "--resolutions", "0"), "--resolutions must be >= 1"),
        (("tokens", "--min-frames", "0"), "--min-frames must be >= 1"),
        (("tokens", "--points", "0"), "--points must be >= 1"),
        (("tokens", "--prune-frames", "0"), "--prune-frames must be >= 1"),
        (("tokens", "--min-frames", "100", "--max-frames", "10"), "--min-frames 100 is more than --max-frames 10"),
        (("memory", "--lengths", "0"), "--lengths must be >= 1"),
        (("maxframes", "--budget-gb", "0"), "--budget-gb must be a positive number"),
        (("prune", "--prune-ratios", "0,1.5"), "--prune-ratios: pruning ratios are the fraction of tokens kept, in (0, 1]"),
        (("e2e", "--out", str(tmp_path / "a_file")), "is a file; give a directory"),
    ]
    for args, words in cases:
        _refused(_bench(args[0], "--quick", "--device", "cpu", "--no-progress", "--out", out, *args[1:], timeout=120), words)
    _refused(_bench("memory", "--quick", "--device", "cpu", "--precision", "fp16", "--out", out, timeout=300),
             "--precision fp16 runs on none of the backends", "fp16 only on CUDA")
    # benchmarks whose rows are fixed took --precision / --backend and ignored them
    _refused(_bench("kernels", "--quick", "--device", "cpu", "--precision", "bf16", "--out", out, timeout=120),
             "--precision chooses the rows of e2e", "kernels takes neither")
    _refused(_bench("precision", "--quick", "--device", "cpu", "--backend", "onnxruntime", "--out", out, timeout=120),
             "--backend chooses the rows of", "precision takes neither")
    assert not Path(out).exists() and (tmp_path / "a_file").read_text() == "mine"


def test_cpu_script_with_failing_steps_exits_1_and_announces_no_report(tmp_path: Path):
    """Every step failing (a --model that is not there): exit status 1, each step's one-line error, and no
    "report: .../report.md" announced for a report that was not written."""
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "cpu.sh"), "c", "--model", "missing.pth"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHON": sys.executable, "QUICK": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("error: --model missing.pth does not exist") == 4
    assert "report:" not in proc.stderr and "no report written" in proc.stderr
    assert not (tmp_path / "c" / "report.md").exists() and "Traceback" not in proc.stderr


def test_report_into_an_existing_folder_writes_report_md_there(tmp_path: Path):
    """report DIR --out FOLDER: FOLDER/report.md, its plot links pointing back into DIR (an IsADirectoryError)."""
    results, pages = tmp_path / "results", tmp_path / "pages"
    pages.mkdir()
    rec = Record("e2e", "End to end", results, {"threads": 1}, {})
    rec.plots.append("e2e_stages.png")
    rec.finish("complete")
    proc = _bench("report", str(results), "--out", str(pages), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(pages / "report.md")
    assert f"({results.resolve()}/e2e_stages.png)" in (pages / "report.md").read_text()
