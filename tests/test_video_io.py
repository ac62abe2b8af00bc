"""runtime.video_io: every kind of video input, rotation, truncation and the error messages, on real files."""

from __future__ import annotations

import fractions
import json
import logging
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator, List

import av
import numpy as np
import pytest
from PIL import Image

import runtime
from vita_train.pretrained import demo_checkpoint
from runtime.video_io import FrameSource, TruncatedVideoWarning, VideoInputError, open_video

from .media import encode

REPO = Path(__file__).resolve().parents[1]
H, W, T = 64, 96, 8


def random_frames(n: int = T, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def smooth_frames(n: int = T, h: int = H, w: int = W) -> np.ndarray:
    # smooth content survives lossy coding closely, so a lossy decode can still be checked by value
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 2 + 8 * t) % 256, (y * 3) % 256, np.full_like(x, 40 + 10 * t)], -1) for t in range(n)]
    return np.asarray(frames, dtype=np.uint8)


def lossless_mov(path: Path, frames: np.ndarray, **kw) -> Path:
    return encode(path, frames, "png", "rgb24", **kw)


def read_all(video) -> np.ndarray:
    with open_video(video) as source:
        return np.stack(list(source))


def assert_frames(source: FrameSource, expected: np.ndarray) -> None:
    frames = list(source)
    assert len(frames) == len(expected)
    for got, want in zip(frames, expected):
        assert got.dtype == np.uint8 and got.flags.c_contiguous and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# video files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, codec, pix_fmt, options",
    [
        ("clip.mkv", "ffv1", "bgr0", None),
        ("clip.avi", "png", "rgb24", None),
        ("clip.mkv", "libx264rgb", "rgb24", {"crf": "0"}),
    ],
)
def test_lossless_file_round_trip(tmp_path, name, codec, pix_fmt, options):
    frames = random_frames()
    path = encode(tmp_path / name, frames, codec, pix_fmt, options)
    with open_video(path) as source:
        assert source.info.source == str(path)
        assert (source.info.height, source.info.width) == (H, W)
        assert source.info.fps == pytest.approx(10.0)
        assert source.info.num_frames == T
        assert source.reopenable
        assert_frames(source, frames)
        assert_frames(source, frames)  # a second pass restarts at frame 0
        assert not source.truncated


def test_lossy_mp4_shape_count_fps(tmp_path):
    frames = smooth_frames(12)
    path = encode(tmp_path / "clip.mp4", frames, "libx264", "yuv420p", {"crf": "18"}, rate=25)
    with open_video(str(path)) as source:
        assert (source.info.height, source.info.width, source.info.fps, source.info.num_frames) == (H, W, 25.0, 12)
        decoded = np.stack(list(source))
    assert decoded.shape == (12, H, W, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - frames).mean() < 6


def test_cover_picture_stream_is_not_the_video(tmp_path):
    frames = random_frames(3)
    path = tmp_path / "with_cover.mkv"
    with av.open(str(path), "w") as container:
        cover = container.add_stream("mjpeg", rate=1)  # first stream: a 1-frame 32x32 "cover"
        cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj420p"
        video = container.add_stream("ffv1", rate=10)
        video.width, video.height, video.pix_fmt = W, H, "bgr0"
        container.mux(cover.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")))
        container.mux(cover.encode())
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 1 s cover must not make the 0.3 s video look truncated
        with open_video(path) as source:
            assert (source.info.width, source.info.num_frames) == (W, 3)
            assert_frames(source, frames)
            assert not source.truncated


def test_faststart_mp4_cut_short_is_truncated(tmp_path):
    frames = random_frames(20)
    path = tmp_path / "web.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:  # moov first, as on the web
        stream = container.add_stream("png", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with open_video(path) as source:
        assert source.info.num_frames == 20
        with pytest.warns(TruncatedVideoWarning, match="header records 20 frames"):
            decoded = list(source)
        assert 0 < len(decoded) < 20 and source.truncated
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, not on every pass
            assert len(list(source)) == len(decoded)


def test_video_decoding_is_lazy_and_closes(tmp_path):
    path = lossless_mov(tmp_path / "clip.mov", random_frames())
    source = open_video(path)
    first_two = [frame for _, frame in zip(range(2), source)]
    assert len(first_two) == 2
    source.close()
    with pytest.raises(ValueError, match="closed"):
        list(source)


# ---------------------------------------------------------------------------------------------
# rotation metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("degrees", [90, 180, 270, -90])
def test_display_rotation_is_applied(tmp_path, degrees):
    # PyAV's set_display_rotation takes counter-clockwise degrees (the ffmpeg -display_rotation sense)
    frames = random_frames(3)
    path = lossless_mov(tmp_path / "rot.mov", frames, rotation=degrees)
    with open_video(path) as source:
        expected = np.rot90(frames, degrees // 90, axes=(1, 2))
        assert (source.info.height, source.info.width) == expected.shape[1:3]
        assert_frames(source, expected)


def test_quicktime_matrix_for_clockwise_90_gives_portrait(tmp_path):
    """Independent of PyAV's conventions: write the tkhd matrix a phone writes for portrait video."""
    frames = random_frames(3)
    path = lossless_mov(tmp_path / "phone.mov", frames)
    data = bytearray(path.read_bytes())
    tkhd = data.find(b"tkhd")
    # QuickTime / ISO 14496-12: x' = a x + c y, y' = b x + d y with y pointing down, so a=0, b=1,
    # c=-1, d=0 turns the +x axis into +y: a 90 degree clockwise turn (ffprobe: "rotate 90").
    matrix = (0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    data[tkhd + 44 : tkhd + 80] = struct.pack(">9i", *matrix)
    path.write_bytes(bytes(data))
    with open_video(path) as source:
        assert (source.info.height, source.info.width) == (W, H)
        out = list(source)
    np.testing.assert_array_equal(out[0], np.rot90(frames[0], -1))
    # the original top-left pixel is shown top-right after a clockwise turn
    np.testing.assert_array_equal(out[0][0, -1], frames[0][0, 0])


@pytest.mark.parametrize(
    "degrees, hflip, vflip, upright",
    [
        (0, True, False, lambda f: f[:, ::-1]),
        (0, False, True, lambda f: f[::-1]),
        (90, True, False, lambda f: np.rot90(f, 1)[:, ::-1]),
        (270, False, True, lambda f: np.rot90(f, 3)[::-1]),
    ],
)
def test_display_matrix_flips(tmp_path, degrees, hflip, vflip, upright):
    # PyAV documents the flips as applied after the counter-clockwise rotation
    frames = random_frames(2)
    path = lossless_mov(tmp_path / "flip.mov", frames, rotation=degrees, hflip=hflip, vflip=vflip)
    with open_video(path) as source:
        assert_frames(source, np.stack([upright(f) for f in frames]))


# ---------------------------------------------------------------------------------------------
# truncated and damaged files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, codec, pix_fmt", [("clip.mkv", "ffv1", "bgr0"), ("clip.avi", "png", "rgb24")])
def test_truncated_file_keeps_decoded_frames(tmp_path, caplog, name, codec, pix_fmt):
    frames = random_frames(20)
    full = encode(tmp_path / name, frames, codec, pix_fmt)
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    source = open_video(cut)
    assert not source.truncated
    with caplog.at_level(logging.WARNING, logger="runtime.video_io"):
        with pytest.warns(TruncatedVideoWarning, match=r"decoded \d+ frame"):
            decoded = list(source)
    assert 0 < len(decoded) < 20
    assert source.truncated
    for got, want in zip(decoded, frames):
        np.testing.assert_array_equal(got, want)
    records = [r for r in caplog.records if r.name == "runtime.video_io" and r.levelno == logging.WARNING]
    assert records and f"decoded {len(decoded)} frame" in records[0].getMessage()


def variable_rate_mkv(path: Path, frames: np.ndarray, cut: bool = False) -> Path:
    """An mkv with irregular timestamps (10, 33 and 150 ms apart) and a nominal 30 fps; optionally cut in half."""
    gaps = np.random.default_rng(0).choice([10, 33, 150], size=len(frames))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=30)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        stream.time_base = fractions.Fraction(1, 1000)
        for frame, pts in zip(frames, np.concatenate([[0], np.cumsum(gaps)[:-1]])):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts, vf.time_base = int(pts), fractions.Fraction(1, 1000)
            container.mux(stream.encode(vf))
        container.mux(stream.encode())
    if cut:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_variable_frame_rate_video_is_not_called_truncated(tmp_path):
    """Its duration x nominal rate (about 58) overstates the 30 frames: only timestamps or errors may say truncated."""
    frames = random_frames(30)
    path = variable_rate_mkv(tmp_path / "vfr.mkv", frames)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_video(path) as source:
            assert_frames(source, frames)
            assert not source.truncated
        result = runtime.segment(path, runtime.load(demo_checkpoint(), backend="torch", device="cpu"))
    assert result.num_frames == 30 and result.truncated is False


def test_variable_frame_rate_video_cut_short_still_warns(tmp_path):
    path = variable_rate_mkv(tmp_path / "vfr_cut.mkv", random_frames(30), cut=True)
    with open_video(path) as source:
        with pytest.warns(TruncatedVideoWarning, match=r"frames end at [\d.]+ s, the container records [\d.]+ s"):
            decoded = list(source)
        assert 0 < len(decoded) < 30 and source.truncated


def test_garbage_after_a_video_is_harmless(tmp_path):
    frames = random_frames()
    path = encode(tmp_path / "clip.mkv", frames, "ffv1", "bgr0")
    path.write_bytes(path.read_bytes() + np.random.default_rng(1).bytes(4000))
    with open_video(path) as source:
        assert_frames(source, frames)
        assert not source.truncated


def test_video_without_decodable_frames(tmp_path):
    path = encode(tmp_path / "clip.mkv", random_frames(), "ffv1", "bgr0")
    data = path.read_bytes()
    cluster = data.find(bytes.fromhex("1f43b675"))  # the header survives, every frame is zeroed
    path.write_bytes(data[: cluster + 8] + bytes(len(data) - cluster - 8))
    with pytest.raises(VideoInputError, match="no decodable frames|no frame could be decoded") as err:
        open_video(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("name, content", [("notes.mp4", "hello\n" * 50), ("meta.json", json.dumps({"a": 1}))])
def test_file_that_is_not_a_video(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(VideoInputError, match="is not a video") as err:
        open_video(path)
    assert str(path) in str(err.value)


def test_text_file_is_not_rendered_as_ansi_art(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n" * 200)  # long enough for FFmpeg's tty demuxer to claim it
    with pytest.raises(VideoInputError, match="text file, not a video"):
        open_video(path)


def test_audio_only_file(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(VideoInputError, match="no video stream .*audio"):
        open_video(path)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(VideoInputError, match="does not exist: .*nope.mp4"):
        open_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoInputError, match="path is empty"):
        open_video("")


# ---------------------------------------------------------------------------------------------
# frame folders and image files
# ---------------------------------------------------------------------------------------------


def test_frame_folder(tmp_path):
    frames = random_frames(4)
    for i, frame in enumerate(frames[:2]):
        Image.fromarray(frame).save(tmp_path / f"{i:05d}.png")
    rgba = np.concatenate([frames[2], np.full((H, W, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "00002.png")
    gray = frames[3][:, :, 0]
    Image.fromarray(gray, "L").save(tmp_path / "00003.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "meta.json").write_text("{}")
    Image.fromarray(random_frames(1, 8, 8)[0]).save(tmp_path / "._00000.png")  # macOS resource fork
    (tmp_path / "sub").mkdir()
    Image.fromarray(random_frames(1, 8, 8)[0]).save(tmp_path / "sub" / "00009.png")

    expected = frames.copy()
    expected[3] = np.repeat(gray[:, :, None], 3, axis=2)
    with open_video(tmp_path) as source:
        assert source.info == source.info.__class__(str(tmp_path), H, W, None, 4)
        assert source.reopenable
        assert_frames(source, expected)
        assert_frames(source, expected)


def test_folder_sorts_numbers_naturally_and_reads_16_bit_png(tmp_path):
    frames = random_frames(3)
    for name, frame in zip(["f_1.png", "f_2.png", "f_10.png"], frames):
        Image.fromarray(frame).save(tmp_path / name)
    deep = np.random.default_rng(3).integers(0, 65536, (H, W), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "f_11.png")
    out = read_all(tmp_path)
    np.testing.assert_array_equal(out[:3], frames)
    np.testing.assert_array_equal(out[3], np.repeat((deep >> 8).astype(np.uint8)[:, :, None], 3, axis=2))


def test_jpeg_exif_orientation_is_applied(tmp_path):
    frame = smooth_frames(1)[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(frame).save(tmp_path / "00000.jpg", quality=95, exif=exif)
    out = read_all(tmp_path)
    assert out.shape == (1, W, H, 3)
    assert np.abs(out[0].astype(int) - np.rot90(frame, -1)).mean() < 4
    # a single image file is a one-frame video read the same way
    np.testing.assert_array_equal(read_all(tmp_path / "00000.jpg"), out)


def test_folder_frame_size_change_names_the_file(tmp_path):
    Image.fromarray(random_frames(1)[0]).save(tmp_path / "00000.png")
    Image.fromarray(random_frames(1, 32, 48)[0]).save(tmp_path / "00001.png")
    source = open_video(tmp_path)  # the size change is found while iterating
    with pytest.raises(VideoInputError, match=r"frame 1 \(00001.png\) is 32x48 \(HxW\) but frame 0 is 64x96"):
        list(source)


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoInputError, match="no JPEG/PNG frames.*empty"):
        open_video(empty)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "readme.txt").write_text("x")
    with pytest.raises(VideoInputError, match="no JPEG/PNG frames.*readme.txt"):
        open_video(texts)
    videos = tmp_path / "JPEGImages"
    (videos / "0a2f").mkdir(parents=True)
    with pytest.raises(VideoInputError, match="subfolder.*'0a2f'"):
        open_video(videos)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "00000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(VideoInputError, match="could not read frame image .*00000.jpg"):
        open_video(broken)


# ---------------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["rgb", "gray", "gray1", "rgba", "bgr_view"])
def test_array_layouts(layout):
    rgb = random_frames(5)
    gray = rgb[..., 0]
    array, expected = {
        "rgb": (rgb, rgb),
        "gray": (gray, np.repeat(gray[..., None], 3, -1)),
        "gray1": (gray[..., None], np.repeat(gray[..., None], 3, -1)),
        "rgba": (np.concatenate([rgb, rgb[..., :1]], -1), rgb),
        "bgr_view": (rgb[..., ::-1], rgb[..., ::-1]),  # non-contiguous input still comes out contiguous
    }[layout]
    with open_video(array) as source:
        assert source.info == source.info.__class__(f"array {array.shape}", H, W, None, 5)
        assert source.reopenable
        assert_frames(source, expected)
        assert_frames(source, expected)


def test_rgb_array_frames_are_views():
    rgb = random_frames(2)
    assert all(np.shares_memory(frame, rgb) for frame in open_video(rgb))


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.zeros((0, H, W, 3), np.uint8), "empty"),
        (np.zeros((T, H, 0, 3), np.uint8), "empty"),
        (np.zeros((T, H, W, 3), np.float32), r"dtype float32.*\(x \* 255\)\.astype\(np\.uint8\)"),
        (np.zeros((T, H, W), np.uint16), r"dtype uint16.*>> 8"),
        (np.zeros((T, H, W, 3), bool), "dtype bool"),
        (np.zeros((T, 2, H, W, 3), np.uint8), "5 dimensions"),
        (np.zeros((H, W), np.uint8), "2 dimensions"),
        (np.zeros((T, H, W, 2), np.uint8), "2 channels"),
        (np.zeros((T, 3, H, W), np.uint8), r"transpose\(0, 2, 3, 1\)"),
        (np.zeros((H, W, 3), np.uint8), r"looks like one image.*x\[None\]"),
    ],
)
def test_array_errors(array, fragment):
    with pytest.raises(VideoInputError, match=fragment):
        open_video(array)


# ---------------------------------------------------------------------------------------------
# iterables
# ---------------------------------------------------------------------------------------------


def mixed_frames() -> List[object]:
    rgb = random_frames(6)
    return [
        rgb[0],
        rgb[1, ..., 0],
        rgb[2, ..., :1],
        np.concatenate([rgb[3], rgb[3, ..., :1]], -1),
        Image.fromarray(rgb[4]),
        Image.fromarray(rgb[5, ..., 0], "L"),
    ]


def mixed_expected() -> np.ndarray:
    rgb = random_frames(6)
    out = rgb.copy()
    for i in (1, 2, 5):
        out[i] = np.repeat(rgb[i, ..., :1], 3, -1)
    return out


def test_one_shot_iterator():
    pulled = []

    def frames() -> Iterator[object]:
        for i, frame in enumerate(mixed_frames()):
            pulled.append(i)
            yield frame

    source = open_video(frames())
    assert pulled == [0]  # only the first frame was peeked
    assert source.info == source.info.__class__("iterator", H, W, None, None)
    assert not source.reopenable
    assert_frames(source, mixed_expected())
    with pytest.raises(VideoInputError, match="one-shot iterator"):
        iter(source)


def test_list_of_frames_is_reopenable():
    with open_video(mixed_frames()) as source:
        assert source.reopenable and source.info.num_frames == 6
        assert source.info.source == "list (6 frames)"
        assert_frames(source, mixed_expected())
        assert_frames(source, mixed_expected())


def test_iterator_frame_size_change_is_raised_while_iterating():
    frames = [np.zeros((H, W, 3), np.uint8)] * 2 + [np.zeros((32, 48, 3), np.uint8)]
    source = open_video(iter(frames))
    seen = []
    with pytest.raises(VideoInputError, match=r"frame 2 is 32x48 \(HxW\) but frame 0 is 64x96"):
        for frame in source:
            seen.append(frame)
    assert len(seen) == 2


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([], "no frames"),
        ([np.zeros((H, W, 3), np.float64)], r"frame 0 .*dtype float64.*\(x \* 255\)"),
        ([np.zeros((H, W, 2), np.uint8)], r"shape \(64, 96, 2\)"),
        ([np.zeros((3, H, W), np.uint8)], r"transpose\(1, 2, 0\)"),
        ([np.zeros((0, W, 3), np.uint8)], "empty"),
        (["00000.jpg"], "pass the folder"),
        ([42], "numpy uint8 arrays .* or PIL images"),
    ],
)
def test_iterable_frame_errors(frames, fragment):
    with pytest.raises(VideoInputError, match=fragment):
        open_video(frames)


def test_bad_frame_after_the_first_is_raised_while_iterating():
    source = open_video(iter([np.zeros((H, W, 3), np.uint8), np.zeros((H, W, 3), np.float32)]))
    with pytest.raises(VideoInputError, match="frame 1 of the iterator has dtype float32"):
        list(source)


@pytest.mark.parametrize(
    "video, fragment",
    [
        (42, "unsupported video input of type builtins.int"),
        (b"\x00\x00", "path of the video file"),
        (Image.new("RGB", (W, H)), r"\[image\]"),
        ({"frames": []}, "not a dict"),
    ],
)
def test_unsupported_inputs(video, fragment):
    with pytest.raises(VideoInputError, match=fragment):
        open_video(video)


def test_torch_tensors_get_a_conversion_hint():
    torch = pytest.importorskip("torch")
    with pytest.raises(VideoInputError, match=r"x\.cpu\(\)\.numpy\(\)"):
        open_video(torch.zeros(T, H, W, 3, dtype=torch.uint8))
    with pytest.raises(VideoInputError, match=r"frame 0 .*torch\.Tensor.*t\.cpu\(\)\.numpy\(\)"):
        open_video([torch.zeros(H, W, 3, dtype=torch.uint8)])


def test_errors_are_value_errors():
    assert issubclass(VideoInputError, ValueError)


def test_imports_without_torch():
    # the module file on its own (runtime/__init__.py is not this module's to test); torch is blocked
    code = (
        "import sys, importlib.util; sys.modules['torch'] = None\n"
        "spec = importlib.util.spec_from_file_location('video_io', 'runtime/video_io.py')\n"
        "module = sys.modules['video_io'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "torch" not in result.stderr
