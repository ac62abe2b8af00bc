"""runtime.stream: clip-wise VITA on live input, with instances linked across clips into tracks.

Live input is real: a thread muxes MPEG-TS with PyAV into a loopback TCP socket, and the runtime reads
``tcp://127.0.0.1:PORT`` through FFmpeg. (The thread accepts the connection with Python's socket module
and muxes into it: PyAV holds the GIL while FFmpeg's own ``?listen`` waits, which would block the reader.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

import av
import numpy as np
import pytest
from pycocotools import mask as mask_utils

import runtime
from runtime.streaming.association import mask_iou, match
from runtime.streaming.options import StreamOptions
from runtime.streaming.tracks import TrackSet
from vita_train.data.synthetic_render import render_clip
from vita_train.pretrained import demo_checkpoint

from .conftest import assert_imports_without

REPO = Path(__file__).resolve().parents[1]


class Sender(threading.Thread):
    """Serves frames as a live MPEG-TS stream on a loopback port; bounded in time whatever the reader does."""

    def __init__(self, frames: Iterable[np.ndarray], fps: int = 25, pace_s: float = 0.0, hold_s: float = 0.0,
                 limit_s: float = 60.0, pause_after: Optional[int] = None,
                 then: Optional[Iterable[np.ndarray]] = None) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.frames, self.fps, self.pace_s, self.hold_s, self.limit_s = frames, fps, pace_s, hold_s, limit_s
        self.then = then  # frames for a second connection (a reconnecting reader), sent after the first one
        self.pause_after = pause_after  # wait for resume.set() after this many frames (bounded by limit_s)
        self.resume = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(limit_s)
        self.url = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.sent = 0
        self.finished_at: Optional[float] = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self._serve(self.frames, self.hold_s)
            if self.then is not None:
                self._serve(self.then, 0.0)
        except (OSError, av.error.FFmpegError, ValueError) as e:  # the reader may hang up first
            self.error = e
        finally:
            self.server.close()

    def _serve(self, frames: Iterable[np.ndarray], hold_s: float) -> None:
        """Accept one reader and send it ``frames``, then keep the connection open ``hold_s`` seconds."""
        deadline = time.monotonic() + self.limit_s
        conn, _ = self.server.accept()
        conn.settimeout(self.limit_s)
        with conn, conn.makefile("wb") as sock_file:
            with av.open(sock_file, "w", format="mpegts") as container:
                stream = None
                for frame in frames:
                    if stream is None:
                        stream = container.add_stream("mpeg2video", rate=self.fps)
                        stream.height, stream.width = frame.shape[:2]
                        stream.pix_fmt, stream.bit_rate = "yuv420p", 4_000_000
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                    sock_file.flush()
                    self.sent += 1
                    if self.sent == self.pause_after:
                        self.resume.wait(max(0.0, deadline - time.monotonic()))
                    if time.monotonic() > deadline:
                        break
                    time.sleep(self.pace_s)
                container.mux(stream.encode())
            sock_file.flush()
            self.finished_at = time.monotonic()
            time.sleep(hold_s)  # connection open, nothing sent: a stalled source


def clip_with_gt(num_frames: int, seed: int, height: int = 96, width: int = 128):
    """A synthetic clip whose ground truth has at least one object in view in every frame."""
    while True:
        clip = render_clip(num_frames, height, width, np.random.default_rng([seed, 13]))
        if clip.masks.any(axis=(2, 3)).all(axis=1).any():
            return clip
        seed += 1


@pytest.fixture(scope="module")
def demo():
    return runtime.load(demo_checkpoint(), backend="torch", device="cpu")


def decode(rle: Optional[dict], shape: tuple[int, int]) -> np.ndarray:
    if rle is None:
        return np.zeros(shape, dtype=bool)
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


# --------------------------------------------------------------------------------------------
# Association
# --------------------------------------------------------------------------------------------


def rles(masks: np.ndarray) -> list[Optional[dict]]:
    out = []
    for m in masks:
        if not m.any():
            out.append(None)
            continue
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        out.append({"size": list(r["size"]), "counts": r["counts"].decode()})
    return out


def test_mask_iou_sums_over_frames_from_rles():
    a = np.zeros((2, 8, 8), bool)
    b = np.zeros((2, 8, 8), bool)
    a[0, :4], b[0, :2] = True, True  # 32 vs 16 pixels, 16 shared
    a[1, :, :4], b[1, :, :4] = True, True  # identical, 32 pixels
    iou = mask_iou([rles(a)], [rles(b), rles(np.zeros_like(b))], 64)
    np.testing.assert_allclose(iou, [[(16 + 32) / (32 + 32), 0.0]])


def test_hungarian_maximises_total_iou_where_greedy_takes_the_best_pair_first():
    iou = np.array([[0.9, 0.8], [0.8, 0.1]])
    assert match(iou, "greedy", 0.3) == [(0, 0)]  # (1, 1) is below min_iou
    assert match(iou, "hungarian", 0.3) == [(0, 1), (1, 0)]
    assert match(np.array([[0.2]]), "hungarian", 0.3) == []
    # a pair below min_iou cannot buy a larger total: (0, 0) wins over (0, 1) + (1, 0) = 0.45 + 0.2
    assert match(np.array([[0.5, 0.45], [0.2, 0.0]]), "hungarian", 0.3) == [(0, 0)]
    # equal IoU (one mask under two classes): the label decides
    assert match(np.full((2, 2), 0.7), "hungarian", 0.3, [1, 2], [2, 1]) == [(0, 1), (1, 0)]
    assert match(np.full((2, 2), 0.7), "greedy", 0.3, [1, 2], [2, 1]) == [(0, 1), (1, 0)]


def test_tracks_vote_labels_by_score_and_end_after_too_many_missed_clips():
    mask = np.zeros((1, 8, 8), bool)
    mask[0, :4] = True
    m = rles(mask)
    tracks = TrackSet(StreamOptions(clip_len=4, overlap=1, max_missed=1), 64)
    assert tracks.update([2], [0.9], [m], [m]) == ([(0, 2, True)], [])
    assert tracks.update([1], [0.5], [m], [m]) == ([(0, 2, False)], [])  # 0.5 for class 1 < 0.9 for class 2
    assert tracks.update([1], [0.6], [m], [m]) == ([(0, 1, False)], [])  # 1.1 > 0.9: the vote turns
    assert tracks.update([], [], [], []) == ([], [])  # one missed clip is allowed
    assert tracks.update([3], [0.9], [rles(~mask)], [m]) == ([(1, 3, True)], [0])  # no overlap: new track; 0 ends


def test_stream_options_round_trip_through_yaml_and_refuse_bad_values():
    opts = StreamOptions(clip_len=12, overlap=3, association="greedy", options={"video_size": "640x480"})
    assert StreamOptions.from_yaml(opts.to_yaml()) == opts
    with pytest.raises(ValueError, match="unknown stream option"):
        StreamOptions.from_yaml("clip_length: 3\n")
    with pytest.raises(ValueError, match=r"overlap \(12\) must be smaller than clip_len \(12\)"):
        StreamOptions(clip_len=12, overlap=12)
    with pytest.raises(ValueError, match="association must be one of"):
        StreamOptions(association="optimal")
    with pytest.raises(ValueError, match="min_score must be within"):  # it dropped every instance
        StreamOptions(min_score=2.0)


def test_streaming_imports_without_torch():
    assert_imports_without(["runtime.streaming", "runtime.streaming.cli"])


# --------------------------------------------------------------------------------------------
# Clip-wise results
# --------------------------------------------------------------------------------------------


def test_one_clip_covering_the_video_equals_offline(demo):
    frames = clip_with_gt(10, 5).frames
    offline = demo.segment(frames)
    clips = demo.segment(frames, mode="clips", clip_len=16, overlap=4)
    assert clips.num_frames == offline.num_frames == 10
    assert len(clips.instances) == len(offline.instances)
    for a, b in zip(offline.instances, clips.instances):
        assert a.label == b.label and a.masks == b.masks
        assert abs(a.score - b.score) < 1e-5


class CountingBackend:
    """The torch backend, counting the frames its detector sees."""

    def __init__(self, backend) -> None:
        self.inner, self.detected = backend, 0

    def detect(self, frames, prune_ratio):
        self.detected += len(frames)
        return self.inner.detect(frames, prune_ratio)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_overlap_frames_are_detected_once_and_each_frame_is_finalised_once(demo):
    clip = clip_with_gt(40, 1)
    counting = runtime.Segmenter(CountingBackend(demo.backend))
    results = list(runtime.stream(clip.frames, counting, clip_len=12, overlap=3))
    assert counting.backend.detected == 40  # 5 clips, 4 x 3 overlap frames reused
    assert [(c.start, c.first_frame, c.end) for c in results] == [(0, 0, 12), (9, 12, 21), (18, 21, 30), (27, 30, 39), (36, 39, 40)]
    for c in results:
        assert c.latency_s >= c.compute_s > 0
        assert all(len(i.masks) == c.num_frames for i in c.instances)


def test_clips_mode_gives_a_whole_video_result_with_consistent_tracks(demo):
    clip = clip_with_gt(36, 2)
    for association in ("greedy", "hungarian"):
        result = runtime.segment(clip.frames, demo, mode="clips", clip_len=12, overlap=3, association=association)
        assert result.num_frames == 36
        assert all(len(i.masks) == 36 for i in result.instances)
        scores = [i.score for i in result.instances]
        assert scores == sorted(scores, reverse=True)
    with pytest.raises(ValueError, match="mode must be"):
        demo.segment(clip.frames, mode="online")


# --------------------------------------------------------------------------------------------
# Live input over a loopback socket
# --------------------------------------------------------------------------------------------


def shown_track(clip_result, gt_masks: np.ndarray) -> tuple[int, float]:
    """(track id, video IoU) of the best-scoring instance covering one GT object (IoU > 0.5) in a clip."""
    gt = gt_masks[clip_result.first_frame : clip_result.end]
    for inst in clip_result.instances:  # best score first
        pred = np.stack([decode(r, gt.shape[1:]) for r in inst.masks])
        iou = (pred & gt).sum() / max((pred | gt).sum(), 1)
        if iou > 0.5:
            return inst.track_id, float(iou)
    return -1, 0.0


def test_live_tcp_stream_yields_clips_before_the_sender_finishes_with_persistent_track_ids(demo):
    clip = clip_with_gt(60, 9)
    # the sender stops after 36 frames until the first clip is out: no clip, no rest of the stream
    sender = Sender(clip.frames, pace_s=0.01, pause_after=36, limit_s=240)
    sender.start()
    sent_at_clip, results = [], []
    for result in runtime.stream(sender.url, demo, clip_len=12, overlap=3, timeout_s=240):
        sent_at_clip.append(sender.sent)
        sender.resume.set()
        results.append(result)
    sender.join(30)
    assert sender.error is None and sender.sent == 60
    assert sent_at_clip[0] == 36  # live: the first clip came while the sender still had 24 frames to send
    assert [(r.first_frame, r.end) for r in results][-1] == (57, 60) and results[0].fps == pytest.approx(25)
    in_view = [n for n in range(len(clip.masks)) if clip.masks[n].any(axis=(1, 2)).all()]
    followed = 0
    for n in in_view:
        matches = [shown_track(r, clip.masks[n]) for r in results]
        if all(tid >= 0 for tid, _ in matches):  # the model finds the object in every clip
            assert len({tid for tid, _ in matches}) == 1, matches  # under one track id for the whole stream
            followed += 1
    assert followed >= 2


def test_unreachable_url_is_a_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(runtime.VideoInputError, match=r"cannot open the live source tcp://127\.0\.0\.1:\d+ .*running"):
        runtime.stream(f"tcp://127.0.0.1:{port}", demo_checkpoint(), timeout_s=2)


def test_a_stream_that_ends_mid_clip_finishes_the_clip(demo):
    sender = Sender(clip_with_gt(20, 3).frames)
    sender.start()
    results = list(runtime.stream(sender.url, demo, clip_len=12, overlap=3, timeout_s=20))
    sender.join(30)
    assert [(c.first_frame, c.end) for c in results] == [(0, 12), (12, 20)]


def test_a_stalled_stream_ends_with_a_clear_message_after_yielding_what_arrived(demo):
    sender = Sender(clip_with_gt(20, 3).frames, hold_s=8)
    sender.start()
    results = []
    with pytest.raises(runtime.StreamStalledError, match=r"stalled: no data for 1 s after \d+ frame\(s\).*reconnect"):
        for result in runtime.stream(sender.url, demo, clip_len=12, overlap=3, timeout_s=1):
            results.append(result)
    # every frame sent (the decoder's last ones drained) is in the partial clip that came before the error
    assert [(c.first_frame, c.end) for c in results] == [(0, 12), (12, 20)]
    sender.join(30)


def test_a_stalled_stream_reconnects_when_asked(demo):
    first, second = clip_with_gt(20, 3).frames, clip_with_gt(16, 4).frames
    sender = Sender(first, hold_s=3, then=second)
    sender.start()
    results = list(runtime.stream(sender.url, demo, clip_len=12, overlap=3, timeout_s=2, reconnect=2,
                                  reconnect_delay_s=0.2))  # fmt: skip
    sender.join(30)
    assert sender.error is None and sender.sent == 36
    assert results[-1].end == 36  # the frames of both connections, numbered on


def test_overlap_not_below_clip_len_is_refused_before_anything_runs(demo):
    with pytest.raises(ValueError, match=r"overlap \(8\) must be smaller than clip_len \(8\)"):
        runtime.stream(np.zeros((4, 32, 32, 3), np.uint8), demo, clip_len=8, overlap=8)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.Popen([sys.executable, "-m", "runtime", "stream", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


def test_cli_writes_one_json_line_per_clip_and_an_overlay(tmp_path):
    video = tmp_path / "in.mp4"
    frames = clip_with_gt(30, 4).frames
    with av.open(str(video), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.height, s.width, s.pix_fmt = 96, 128, "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    out, overlay = tmp_path / "r.jsonl", tmp_path / "o.mkv"
    proc = _cli(str(video), "--model", str(demo_checkpoint()), "--out", str(out), "--render", str(overlay),
                "--clip", "12", "--overlap", "3", "--device", "cpu")  # fmt: skip
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(d["first_frame"], d["end"]) for d in lines] == [(0, 12), (12, 21), (21, 30)]
    assert all("track_id" in i and "latency_s" in d for d in lines for i in d["instances"])
    with av.open(str(overlay)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 30


def _default_ctrl_c() -> None:
    # a test run started as a background job ignores SIGINT, and its children would inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_cli_ctrl_c_or_sigterm_ends_cleanly_with_every_finished_clip_written(tmp_path, stop):
    """Ctrl-C, and SIGTERM as ``kill`` or ``docker stop`` send it, end the stream with every finished clip's line
    complete and the overlay video closed (killed by SIGTERM, an MP4 had no index and did not open)."""
    sender = Sender((f for _ in range(100) for f in clip_with_gt(24, 6).frames), pace_s=0.03, limit_s=90)
    sender.start()
    out, overlay = tmp_path / "r.jsonl", tmp_path / "o.mp4"
    proc = _cli(sender.url, "--model", str(demo_checkpoint()), "--out", str(out), "--render", str(overlay),
                "--clip", "12", "--overlap", "3", "--device", "cpu", "--timeout", "20",
                preexec_fn=_default_ctrl_c)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.2)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    lines = out.read_text().splitlines()
    assert len(lines) >= 2
    clips = [json.loads(line) for line in lines]  # every line complete
    assert [c["clip"] for c in clips] == list(range(len(clips)))
    with av.open(str(overlay)) as c:
        assert sum(1 for _ in c.decode(video=0)) >= clips[1]["end"] - 3  # the finalised frames of those clips


# --------------------------------------------------------------------------------------------
# Memory does not grow with the stream's length
# --------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = r"""
import resource, sys, numpy as np, torch
torch.set_num_threads(1)
import runtime
from tests.test_stream import Sender
from vita_train.data.synthetic_render import render_clip
from vita_train.pretrained import demo_checkpoint

n = int(sys.argv[1])
def frames():
    for k in range(n // 40):  # new objects every 40 frames: tracks start and end all along
        yield from render_clip(40, 96, 128, np.random.default_rng([k, 13])).frames
sender = Sender(frames(), limit_s=600)
sender.start()
clips = 0
for clip in runtime.stream(sender.url, runtime.load(demo_checkpoint(), device="cpu"), clip_len=12, overlap=3, timeout_s=60):
    clips += 1
sender.join(60)
print(clips, clip.end, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kb(num_frames: int) -> tuple[int, int]:
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(num_frames)], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    clips, end, rss = map(int, proc.stdout.split())
    assert end == num_frames
    return clips, rss


def _check_memory_flat(short: int, long: int) -> None:
    clips_short, rss_short = _peak_rss_kb(short)
    clips_long, rss_long = _peak_rss_kb(long)
    assert clips_long > 3 * clips_short
    # four times the frames, the same peak (allocator noise allowed)
    assert rss_long < rss_short * 1.05 + 16 * 1024, (rss_short, rss_long)


def test_peak_memory_does_not_grow_with_stream_length_short():
    _check_memory_flat(160, 640)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_stream_length_600_vs_2400():
    _check_memory_flat(600, 2400)


@pytest.mark.slow
def test_onnxruntime_export_streams_the_same_tracks_as_torch(demo, tmp_path):
    from export import ExportOptions, export_model

    export_dir = export_model(demo_checkpoint(), ExportOptions(out=tmp_path / "export"))
    frames = clip_with_gt(30, 2).frames
    ours = demo.segment(frames, mode="clips", clip_len=12, overlap=3)
    graph = runtime.load(export_dir).segment(frames, mode="clips", clip_len=12, overlap=3)
    assert len(graph.instances) == len(ours.instances) > 0
    for a, b in zip(ours.instances, graph.instances):
        assert a.label == b.label and a.masks == b.masks
        assert abs(a.score - b.score) < 1e-3


def test_an_interrupt_a_library_turned_into_another_error_still_ends_the_stream_cleanly(tmp_path, monkeypatch):
    """Ctrl-C landing inside pycocotools' mask decoding under numpy 2 came out as a TypeError: the CLI printed a
    traceback and exited 1. Whatever surfaces after a stop signal is the stop: exit 130, lines written. The
    control: the same TypeError without a signal is a real error and propagates."""
    import runtime.streaming.cli as cli
    import runtime.streaming.engine as engine

    def clips_then(signalled: bool):
        def fake_stream(*args, **kwargs):
            yield from []
            try:
                if signalled:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)  # the handler runs here
                raise TypeError("__array__() got an unexpected keyword argument 'copy'")
            except KeyboardInterrupt:
                raise TypeError("__array__() got an unexpected keyword argument 'copy'") from None
        return fake_stream

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "load_segmenter", lambda args: None)
    video = tmp_path / "in.mp4"
    video.write_bytes(b"")
    argv = [str(video), "--model", str(demo_checkpoint()), "--out", str(tmp_path / "r.jsonl")]
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        monkeypatch.setattr(engine, "stream", clips_then(True))
        assert cli.stream_main(argv) == 130
        monkeypatch.setattr(engine, "stream", clips_then(False))
        with pytest.raises(TypeError, match="copy"):
            cli.stream_main(argv)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
