"""Decoding and sampling on real encoded files, and every kind of bad input.

Videos are made by `pipeline.samples.make_video` (H.264 with exact millisecond PTS and known
shapes), so a sampled frame can be checked against the ground truth: the frame returned for time t
must show the shapes where they were at t, not one frame earlier or later.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import socket
import tempfile
import time
from pathlib import Path

import ffmpeg
import numpy as np
import pytest

from pipeline.decode import backends
from pipeline.errors import DecodeError
from pipeline.decode.isolation import call_isolated
from pipeline.decode.probe import demux_index, probe_file
from pipeline.decode.sampling import SampledVideo, sample_video, select_frames
from pipeline.samples import Shape, make_video

SHAPES = (
    Shape(color=(220, 40, 40), size=(30, 30), start_xy=(5, 10), velocity=(30, 12)),
    Shape(color=(40, 80, 230), size=(26, 26), start_xy=(120, 80), velocity=(-25, -10), kind="ellipse"),
)


def _ffmpeg_has_encoder(name: str) -> bool:
    try:
        out = ffmpeg.input("anullsrc", f="lavfi").output("-", f="null").global_args("-encoders").run(
            capture_stdout=True, capture_stderr=True
        )
    except ffmpeg.Error as exc:
        out = (exc.stdout, exc.stderr)
    return name.encode() in (out[0] or b"")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    cfr = make_video(folder / "cfr.mp4", fps=10, duration_s=4.0, shapes=SHAPES, gop=8, seed=1)
    vfr = make_video(folder / "vfr.mp4", fps=10, duration_s=4.0, shapes=SHAPES, vfr=True, seed=2)
    big = make_video(folder / "big.mp4", width=320, height=240, fps=5, duration_s=1.0, shapes=SHAPES, seed=3)
    return {"cfr": cfr, "vfr": vfr, "big": big, "folder": folder}


def _color_mask(frame: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.abs(frame.astype(np.int32) - np.asarray(color)).sum(axis=-1) < 90


_MASKS: dict[str, list] = {}


def _truth_masks(truth) -> list[tuple[float, list]]:
    """Every frame's shape masks, computed once per video."""
    if truth.path not in _MASKS:
        _MASKS[truth.path] = [(t, [truth.mask(i, t) for i in range(len(truth.shapes))]) for t in truth.timestamps]
    return _MASKS[truth.path]


def _shown_time(frame: np.ndarray, truth) -> float:
    """The ground-truth frame time whose shape positions best match what `frame` shows."""
    seen = [_color_mask(frame, shape.color) for shape in truth.shapes]
    best, best_t = -1.0, None
    for t, masks in _truth_masks(truth):
        score = 0.0
        for mask, visible in zip(masks, seen):
            if mask is None:
                continue
            union = (visible | mask).sum()
            score += (visible & mask).sum() / union if union else 0.0
        if score > best:
            best, best_t = score, t
    return best_t


def _nearest(times: list[float], targets) -> list[float]:
    """Independent re-statement of the rule: nearest PTS, earlier one on a tie, no duplicates."""
    times = np.asarray(times)
    picked = sorted({float(times[np.argmin(np.abs(times - t))]) for t in targets})
    return picked


def _check_content(result: SampledVideo, truth) -> None:
    for frame, t in zip(result.frames, result.timestamps):
        assert _shown_time(frame, truth) == pytest.approx(t, abs=1e-6)


# ---------------------------------------------------------------- sampling rules (pure)


def test_select_frames_rules():
    times = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 1.0, 2.0, 2.9])
    assert select_frames(times, fps=1.0).tolist() == [0, 5, 6]  # targets 0, 1, 2 (3 > 2.9)
    assert select_frames(times, fps=20.0, max_frames=100).tolist() == list(range(8))  # duplicates dropped
    assert select_frames(times, num_frames=1).tolist() == [0]
    assert select_frames(times, num_frames=2).tolist() == [0, 7]
    # tie between 0.0 and 0.1 for 0.05: the earlier frame
    assert select_frames(np.array([0.0, 0.1]), fps=20.0).tolist() == [0, 1]
    assert select_frames(np.array([0.0, 0.1, 0.2]), num_frames=5, max_frames=2).tolist() == [0, 2]
    # more fps points than max_frames: spread over the whole video, not its beginning
    long = np.arange(0, 100.0, 0.5)
    capped = select_frames(long, fps=1.0, max_frames=4)
    assert long[capped].tolist() == [0.0, 33.0, 66.5, 99.5]


def test_bad_arguments_raise_value_error(videos):
    path = videos["cfr"].path
    with pytest.raises(ValueError):
        sample_video(path, fps=0)
    with pytest.raises(ValueError):
        sample_video(path, fps=None)
    with pytest.raises(ValueError):
        sample_video(path, num_frames=0)
    with pytest.raises(ValueError):
        sample_video(path, max_frames=0)


# ---------------------------------------------------------------- good files


def test_fps_sampling_matches_pts_and_content(videos):
    truth = videos["cfr"]
    result = sample_video(truth.path, fps=1.0)
    assert result.error is None
    assert result.frames.dtype == np.uint8 and result.frames.shape == (4, 120, 160, 3)
    assert result.timestamps.dtype == np.float64
    np.testing.assert_allclose(result.timestamps, [0.0, 1.0, 2.0, 3.0], atol=1e-9)
    _check_content(result, truth)
    assert result.width == 160 and result.height == 120
    assert result.num_frames == len(truth.timestamps) == 40
    assert result.fps == pytest.approx(10.0)
    assert result.duration_s == pytest.approx(4.0, abs=0.11)


def test_variable_frame_rate_uses_presentation_timestamps(videos):
    truth = videos["vfr"]
    result = sample_video(truth.path, fps=2.0)
    expected = _nearest(truth.timestamps, np.arange(0, truth.timestamps[-1] + 1e-9, 0.5))
    np.testing.assert_allclose(result.timestamps, expected, atol=1e-9)
    _check_content(result, truth)
    # frames of the slow second half are 0.3 s apart: index / average fps would be wrong there
    positions = [truth.timestamps.index(pytest.approx(t, abs=1e-9)) for t in result.timestamps]
    assert not np.allclose(np.asarray(positions) / result.fps, result.timestamps, atol=0.05)


def test_num_frames_uniform_by_pts(videos):
    truth = videos["vfr"]
    result = sample_video(truth.path, num_frames=4)
    first, last = truth.timestamps[0], truth.timestamps[-1]
    expected = _nearest(truth.timestamps, np.linspace(first, last, 4))  # 0, 1.27, 2.53, 3.8: no ties
    np.testing.assert_allclose(result.timestamps, expected, atol=1e-9)
    assert len(result.timestamps) == 4 and result.timestamps[-1] == pytest.approx(last)
    _check_content(result, truth)


def test_max_frames_caps_and_spreads(videos):
    truth = videos["cfr"]
    result = sample_video(truth.path, fps=10.0, max_frames=4)
    expected = _nearest(truth.timestamps, np.linspace(0.0, truth.timestamps[-1], 4))
    np.testing.assert_allclose(result.timestamps, expected, atol=1e-9)
    assert sample_video(truth.path, num_frames=30, max_frames=3).frames.shape[0] == 3


def test_max_side_downscales_keeping_aspect(videos):
    truth = videos["big"]
    small = sample_video(truth.path, fps=5.0, max_side=160)
    assert small.frames.shape[1:] == (120, 160, 3)
    assert (small.width, small.height) == (320, 240)  # metadata stays the stream's
    same = sample_video(truth.path, fps=5.0, max_side=1000)
    assert same.frames.shape[1:] == (240, 320, 3)


@pytest.fixture
def with_decord(monkeypatch):
    """decord chosen in this process, as `PIXELREFER_DECODER=decord` chooses it in a decode child."""
    pytest.importorskip("decord")
    monkeypatch.setenv(backends.DECODER_ENV, "decord")
    assert "decord" in backends.load_decoders()
    yield
    monkeypatch.delenv(backends.DECODER_ENV)
    backends.load_decoders()


def test_pyav_path_matches_decord(videos, with_decord):
    """The two decoders, run directly, return the same frames at the same times."""
    for key in ("cfr", "vfr"):
        truth = videos[key]
        probe = probe_file(truth.path, truth.path)
        index = demux_index(truth.path, probe, truth.path)
        positions = select_frames(index.times, num_frames=7)
        via_pyav = backends.decode_pyav(truth.path, probe, index, positions, probe.width, probe.height)
        assert via_pyav.positions == positions.tolist() and not via_pyav.notes
        via_decord = backends.decode_decord(truth.path, probe, index, positions, probe.width, probe.height)
        for a, b, t in zip(via_pyav.frames, via_decord, index.times[positions]):
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 3.0
            assert _shown_time(a, truth) == pytest.approx(t, abs=1e-6)


def test_rotation_metadata_gives_upright_frames(videos, tmp_path):
    truth = videos["big"]
    rotated = str(tmp_path / "rotated.mp4")
    ffmpeg.input(truth.path).output(rotated, c="copy", **{"metadata:s:v:0": "rotate=90"}).overwrite_output().run(
        quiet=True
    )
    raw, _ = (
        ffmpeg.input(rotated)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=1)
        .run(capture_stdout=True, quiet=True)
    )
    upright = np.frombuffer(raw, np.uint8).reshape(320, 240, 3)  # the ffmpeg CLI applies rotation
    result = sample_video(rotated, num_frames=1)
    assert (result.width, result.height) == (240, 320)
    assert result.frames.shape == (1, 320, 240, 3)
    assert np.abs(result.frames[0].astype(int) - upright).mean() < 2.0
    scaled = sample_video(rotated, num_frames=1, max_side=160)
    assert scaled.frames.shape == (1, 160, 120, 3)
    # the PyAV path rotates the same way
    backends.load_decoders()
    probe = probe_file(rotated, rotated)
    index = demux_index(rotated, probe, rotated)
    via_pyav = backends.decode_pyav(rotated, probe, index, np.array([0]), probe.width, probe.height)
    assert np.abs(via_pyav.frames[0].astype(int) - upright).mean() < 2.0


def _decode_directly(path: str, count: int) -> backends.Decoded:
    """`backends.decode_frames` in this process (with whatever `load_decoders` chose), `count` frames."""
    probe = probe_file(path, path)
    index = demux_index(path, probe, path)
    positions = select_frames(index.times, num_frames=count)
    return backends.decode_frames(path, probe, index, positions, probe.width, probe.height, path)


def test_av1_file(videos, tmp_path):
    if not _ffmpeg_has_encoder("libsvtav1"):
        pytest.skip("this ffmpeg has no AV1 encoder")
    truth = videos["cfr"]
    av1 = str(tmp_path / "clip.mkv")
    ffmpeg.input(truth.path).output(av1, vcodec="libsvtav1", preset=12).overwrite_output().run(quiet=True)
    result = sample_video(av1, fps=1.0)
    np.testing.assert_allclose(result.timestamps, [0.0, 1.0, 2.0, 3.0], atol=1e-9)
    assert result.error is None
    _check_content(result, truth)


def test_file_decord_cannot_open_falls_back_to_pyav(videos, tmp_path, with_decord):
    if not _ffmpeg_has_encoder("libsvtav1"):
        pytest.skip("this ffmpeg has no AV1 encoder")
    av1 = str(tmp_path / "clip.mkv")
    ffmpeg.input(videos["cfr"].path).output(av1, vcodec="libsvtav1", preset=12).overwrite_output().run(quiet=True)
    decoded = _decode_directly(av1, 4)
    assert len(decoded.frames) == 4 and "decoded with PyAV" in decoded.notes[0]


@pytest.mark.parametrize(
    "name, options",
    [
        ("clip.ts", {"c": "copy"}),  # clock starts at 1.4 s; decord returns frames a GOP late here
        ("clip.avi", {"c": "copy"}),  # AVI stores no PTS while H.264 B-frames are reordered
        ("open_gop.mp4", {"vcodec": "libx264", "preset": "veryfast", "x264-params": "keyint=8:open-gop=1"}),
    ],
)
def test_containers_and_gops_where_decord_miscounts(videos, tmp_path, name, options):
    """Frames shown at each sampled time, not a GOP or a B-frame off, and times from the first frame."""
    truth = videos["cfr"]
    path = str(tmp_path / name)
    ffmpeg.input(truth.path).output(path, **options).overwrite_output().run(quiet=True)
    for kwargs, targets in ((dict(fps=3.0), np.arange(0, 3.91, 1 / 3)), (dict(num_frames=4), [0, 1.3, 2.6, 3.9])):
        result = sample_video(path, **kwargs)
        assert result.error is None
        np.testing.assert_allclose(result.timestamps, _nearest(truth.timestamps, targets), atol=1e-6)
        _check_content(result, truth)


# ---------------------------------------------------------------- bad input


def _assert_decode_error(path, *words, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        sample_video(str(path), **kwargs)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message
    return message


def test_zero_length_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    _assert_decode_error(path, "empty")


def test_corrupt_file(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    _assert_decode_error(path, "not a video")


def test_audio_only_file(tmp_path):
    path = str(tmp_path / "speech.mp4")
    ffmpeg.input("sine=duration=0.5", f="lavfi").output(path, acodec="aac").overwrite_output().run(quiet=True)
    _assert_decode_error(path, "no video stream", "audio")


def test_huge_resolution_is_refused(tmp_path):
    path = str(tmp_path / "wide.mp4")
    ffmpeg.input("color=size=9000x16:rate=5:duration=0.4", f="lavfi").output(
        path, vcodec="libx264", preset="ultrafast"
    ).overwrite_output().run(quiet=True)
    _assert_decode_error(path, "9000x16", "8192")


def test_missing_file_and_non_files(tmp_path, videos):
    gone = tmp_path / "gone.mp4"
    gone.write_bytes(Path(videos["cfr"].path).read_bytes())
    gone.unlink()  # listed, then deleted before the task read it
    _assert_decode_error(gone, "not found")
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    _assert_decode_error(folder, "folder")
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    _assert_decode_error(fifo, "not a regular file")


def _truncate(source: str, target: Path, fraction: float = 0.5) -> str:
    data = Path(source).read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return str(target)


def test_stream_cut_midstream_keeps_what_decodes(videos, tmp_path):
    truth = videos["cfr"]
    mkv = str(tmp_path / "whole.mkv")
    ffmpeg.input(truth.path).output(mkv, c="copy").overwrite_output().run(quiet=True)
    cut = _truncate(mkv, tmp_path / "cut.mkv")
    result = sample_video(cut, fps=1.0)
    assert "truncated" in result.error
    assert 1 <= len(result.timestamps) < 4
    assert result.duration_s == pytest.approx(4.0, abs=0.11)  # what the header announced
    _check_content(result, truth)


def test_faststart_mp4_cut_midstream_falls_back(videos, tmp_path, monkeypatch):
    truth = videos["cfr"]
    faststart = str(tmp_path / "faststart.mp4")
    ffmpeg.input(truth.path).output(faststart, c="copy", movflags="+faststart").overwrite_output().run(quiet=True)
    cut = _truncate(faststart, tmp_path / "cut.mp4")
    result = sample_video(cut, fps=1.0)
    assert "truncated" in result.error
    assert 1 <= len(result.timestamps) < 4
    _check_content(result, truth)
    if importlib.util.find_spec("decord") is not None:  # decord fails midway: PyAV decodes instead
        monkeypatch.setenv(backends.DECODER_ENV, "decord")
        backends.load_decoders()
        try:
            decoded = _decode_directly(cut, 40)
        finally:
            monkeypatch.delenv(backends.DECODER_ENV)
            backends.load_decoders()
        assert "decoded with PyAV" in decoded.notes[0] and 1 <= len(decoded.frames) < 40


def test_mp4_cut_before_its_index_is_a_decode_error(videos, tmp_path):
    cut = _truncate(videos["cfr"].path, tmp_path / "cut.mp4")  # moov atom is at the end
    _assert_decode_error(cut, "moov")


def test_damaged_bytes_inside_never_hang_or_crash(videos, tmp_path):
    data = bytearray(Path(videos["cfr"].path).read_bytes())
    rng = np.random.default_rng(1)
    for start in range(len(data) // 5, len(data) * 4 // 5, 997):
        data[start : start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    path = tmp_path / "damaged.mp4"
    path.write_bytes(bytes(data))
    try:
        result = sample_video(str(path), fps=2.0, timeout_s=30)
    except DecodeError as exc:
        assert str(path) in str(exc)
    else:
        assert len(result.frames) == len(result.timestamps) >= 1


# ---------------------------------------------------------------- hang and crash guard


def test_hanging_decoder_is_stopped_and_replaced(videos):
    start = time.monotonic()
    with pytest.raises(DecodeError, match="did not finish within 0.5 s"):
        call_isolated(time.sleep, 60, timeout_s=0.5, label="sleepy.mp4")
    assert time.monotonic() - start < 10
    assert sample_video(videos["cfr"].path, num_frames=2).frames.shape[0] == 2


def test_crashing_decoder_is_reported_and_replaced(videos):
    with pytest.raises(DecodeError, match=r"crash\.mp4: the decoder process died \(killed by SIGSEGV\)"):
        call_isolated(ctypes.string_at, 0, timeout_s=10, label="crash.mp4")
    assert sample_video(videos["cfr"].path, num_frames=2).frames.shape[0] == 2


def test_remote_file_that_never_answers_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # connections complete in the backlog and are never answered
    try:
        uri = f"http://127.0.0.1:{server.getsockname()[1]}/stalled.mp4"
        with pytest.raises(DecodeError, match="did not finish within 1 s") as info:
            sample_video(uri, timeout_s=1.0)
        assert uri in str(info.value)
    finally:
        server.close()
    assert not list(tmp_path.glob("pixelrefer-decode-*"))  # the download folder is gone


# ---------------------------------------------------------------- S3 (moto server on loopback)


@pytest.fixture(scope="module")
def s3(videos):
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "endpoint_url": f"http://{host}:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("clips")
    fs.put_file(videos["cfr"].path, "clips/in/cfr.mp4")
    fs.put_file(videos["cfr"].path, "clips/in/doomed.mp4")
    yield fs, options
    server.stop()


def test_s3_video_is_downloaded_sampled_and_cleaned_up(s3, videos, tmp_path, monkeypatch):
    fs, options = s3
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    remote = sample_video("s3://clips/in/cfr.mp4", fps=1.0, storage_options=options)
    local = sample_video(videos["cfr"].path, fps=1.0)
    np.testing.assert_array_equal(remote.timestamps, local.timestamps)
    np.testing.assert_array_equal(remote.frames, local.frames)
    assert not list(tmp_path.glob("pixelrefer-decode-*"))


def test_s3_object_deleted_after_listing(s3):
    fs, options = s3
    fs.rm("clips/in/doomed.mp4")
    with pytest.raises(DecodeError, match=r"s3://clips/in/doomed\.mp4: file not found"):
        sample_video("s3://clips/in/doomed.mp4", storage_options=options)
