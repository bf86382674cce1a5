"""Decoding clips from their own byte range: `sample_clip` and `sample_at` on real encoded files.

What must hold: the frame for a time is the nearest decoder PTS whatever task decodes it, so
adjacent clips share exactly one frame and the clips of a video together give what sampling the
whole video gives; a remote clip reads a small part of the object; a damaged stretch fails only
the clip it is in.
"""

from __future__ import annotations

from pathlib import Path

import av
import ffmpeg
import numpy as np
import pytest

from pipeline.decode import range_decode
from pipeline.clips import plan_video
from pipeline.errors import DecodeError
from pipeline.decode.media import REMOTE_BLOCK_SIZE
from pipeline.samples import Shape, make_video
from pipeline.decode.sampling import sample_at, sample_clip, sample_video

SHAPES = (
    Shape(color=(220, 40, 40), size=(30, 30), start_xy=(5, 10), velocity=(7, 3)),
    Shape(color=(40, 80, 230), size=(26, 26), start_xy=(120, 80), velocity=(-5, -2), kind="ellipse"),
)


def _lavfi_video(path: str, source: str, *, noise: int = 0, **options) -> str:
    stream = ffmpeg.input(source, f="lavfi")
    if noise:
        stream = stream.filter("noise", alls=noise, allf="t")
    (
        stream.output(path, vcodec="libx264", pix_fmt="yuv420p", preset="ultrafast", **options)
        .global_args("-loglevel", "error")
        .overwrite_output()
        .run()
    )
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    """A 20 s shapes video (key frame every 1.5 s) as MP4, MPEG-TS (clock starting at 1.4 s, seeks
    that land late) and Matroska."""
    folder = tmp_path_factory.mktemp("range")
    mp4 = make_video(folder / "shapes.mp4", fps=10, duration_s=20.0, shapes=SHAPES, gop=15, seed=4).path
    out = {"mp4": mp4}
    for name in ("ts", "mkv"):
        out[name] = str(folder / f"shapes.{name}")
        ffmpeg.input(mp4).output(out[name], c="copy").overwrite_output().run(quiet=True)
    return out


def _clip_args(clip) -> dict:
    shared = clip.shared_time is not None
    return dict(ts_start=clip.ts_start, ts_end=clip.ts_end, shared=shared,
                grid_times=list(clip.grid_times) + ([clip.shared_time] if shared else []))


@pytest.mark.parametrize("container", ["mp4", "ts", "mkv"])
def test_clips_share_one_frame_and_together_equal_the_whole_video(videos, container):
    path = videos[container]
    plan = plan_video(path, fps=2.0, clip_seconds=4.3, cuts="none")
    assert len(plan.clips) == 5 and plan.num_sampled == 40
    clips = [sample_clip(path, **_clip_args(clip)) for clip in plan.clips]
    half_frame = 0.05 + 1e-9
    for clip, got in zip(plan.clips, clips):
        assert got.error is None
        assert got.shared == (clip.shared_time is not None)
        np.testing.assert_array_equal(got.grid_times, _clip_args(clip)["grid_times"])
        owned = got.timestamps[:-1] if got.shared else got.timestamps
        assert np.all(owned >= clip.ts_start - half_frame) and np.all(owned < clip.ts_end + half_frame)
        assert got.frames.shape[1:] == (120, 160, 3) and got.frames.dtype == np.uint8
    for before, after in zip(clips, clips[1:]):
        assert before.timestamps[-1] == after.timestamps[0]
        np.testing.assert_array_equal(before.frames[-1], after.frames[0])

    frames = np.concatenate([got.frames[:-1] if got.shared else got.frames for got in clips])
    stamps = np.concatenate([got.timestamps[:-1] if got.shared else got.timestamps for got in clips])
    whole = sample_at(path, [t for clip in plan.clips for t in clip.grid_times])
    np.testing.assert_array_equal(stamps, whole.timestamps)
    np.testing.assert_array_equal(frames, whole.frames)
    # the whole-file sampler (demux index, decord or PyAV) picks the same frames at 2 fps
    reference = sample_video(path, fps=2.0, max_frames=1000)
    np.testing.assert_array_equal(stamps, reference.timestamps)
    assert np.abs(frames.astype(int) - reference.frames.astype(int)).mean() < 3.0


def test_the_chosen_frame_does_not_depend_on_where_decoding_started(videos):
    path = videos["mp4"]
    times = np.round(np.random.default_rng(3).uniform(0, 19.9, 12), 3)
    times.sort()
    together = sample_at(path, times)
    truth = np.round(np.arange(200) / 10, 3)
    expected = [truth[np.argmin(np.abs(truth - t))] for t in times]  # nearest, the earlier on a tie
    np.testing.assert_allclose(together.timestamps, expected, atol=1e-9)
    for i, t in enumerate(times):
        alone = sample_at(path, [t])
        assert alone.timestamps.tolist() == [together.timestamps[i]]
        np.testing.assert_array_equal(alone.frames[0], together.frames[i])


def test_times_past_the_end_and_bad_arguments(videos, tmp_path):
    path = videos["mp4"]
    got = sample_at(path, [25.0, 19.0])  # any order: answered in time order
    assert got.timestamps.tolist() == [19.0] and got.grid_times.tolist() == [19.0]
    assert "1 of 2 requested times" in got.error and "stream ends at 19.90 s" in got.error
    with pytest.raises(DecodeError, match="no frame could be decoded"):
        sample_clip(path, ts_start=30.0, ts_end=40.0, grid_times=[30.0, 35.0])
    missing = str(tmp_path / "gone.mp4")
    with pytest.raises(DecodeError, match="gone.mp4: file not found"):
        sample_clip(missing, ts_start=0.0, ts_end=1.0, grid_times=[0.0])
    for kwargs in (
        dict(ts_start=0.0, ts_end=1.0, grid_times=[]),
        dict(ts_start=0.0, ts_end=1.0, grid_times=[0.5, 0.2]),
        dict(ts_start=2.0, ts_end=4.0, grid_times=[1.0, 2.0]),  # a grid time before the clip
        dict(ts_start=2.0, ts_end=4.0, grid_times=[2.0, 4.5]),  # 4.5 belongs to the next clip
        dict(ts_start=2.0, ts_end=4.0, grid_times=[2.0, 3.0], shared=True),  # shared time inside the clip
        dict(ts_start=4.0, ts_end=4.0, grid_times=[4.0]),
    ):
        with pytest.raises(ValueError):
            sample_clip(path, **kwargs)


def test_rotation_metadata_gives_upright_frames(tmp_path):
    source = _lavfi_video(str(tmp_path / "flat.mp4"), "testsrc2=size=320x240:rate=5:duration=2")
    rotated = str(tmp_path / "rotated.mp4")
    ffmpeg.input(source).output(rotated, c="copy", **{"metadata:s:v:0": "rotate=90"}).overwrite_output().run(
        quiet=True
    )
    raw, _ = ffmpeg.input(rotated).output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=1).run(
        capture_stdout=True, quiet=True
    )
    upright = np.frombuffer(raw, np.uint8).reshape(320, 240, 3)  # the ffmpeg CLI applies rotation
    got = sample_clip(rotated, ts_start=0.0, ts_end=1.0, grid_times=[0.0])
    assert got.frames.shape == (1, 320, 240, 3)
    assert np.abs(got.frames[0].astype(int) - upright).mean() < 2.0
    assert sample_at(rotated, [0.0], max_side=160).frames.shape == (1, 160, 120, 3)


# ---------------------------------------------------------------- damaged stretch


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> str:
    """40 s with a key frame every 2 s; the packets shown in [21, 22) s overwritten with noise."""
    folder = tmp_path_factory.mktemp("damaged")
    path = _lavfi_video(str(folder / "good.mp4"), "testsrc2=size=320x180:rate=25:duration=40", g=50)
    data = bytearray(Path(path).read_bytes())
    rng = np.random.default_rng(5)
    hit = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.pts is not None and 21.0 <= float(packet.pts * stream.time_base) < 22.0:
                noise = rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes()
                data[packet.pos : packet.pos + packet.size] = noise
                hit += 1
    assert hit == 25
    bad = folder / "damaged.mp4"
    bad.write_bytes(bytes(data))
    return str(bad)


def test_damaged_stretch_fails_its_clip_only(damaged):
    plan = plan_video(damaged, fps=1.0, clip_seconds=10.0, cuts="none")
    assert [(c.ts_start, c.ts_end) for c in plan.clips] == [(0, 10), (10, 20), (20, 30), (30, 40)]
    results = {}
    for clip in plan.clips:
        try:
            results[clip.clip_index] = sample_clip(damaged, **_clip_args(clip))
        except DecodeError as exc:
            results[clip.clip_index] = exc
    failed = results[2]
    assert isinstance(failed, DecodeError)
    assert damaged in str(failed) and "damaged stream" in str(failed)
    for index in (0, 1, 3):
        expected = len(_clip_args(plan.clips[index])["grid_times"])
        assert results[index].error is None and len(results[index].timestamps) == expected
    # K caption frames of a track: the damaged one is left out, the others come back
    got = sample_at(damaged, [5.0, 21.5, 35.0])
    assert got.timestamps.tolist() == [5.0, 35.0]
    assert "1 requested frames skipped: damaged stream" in got.error


# ---------------------------------------------------------------- remote: range reads on S3


@pytest.fixture(scope="module")
def big_video(tmp_path_factory) -> str:
    """120 s of noisy 320x180 at 2 Mbit/s: about 30 MB, the moov index at the end (no faststart)."""
    folder = tmp_path_factory.mktemp("big")
    return _lavfi_video(
        str(folder / "big.mp4"), "testsrc2=size=320x180:rate=25:duration=120", noise=40,
        video_bitrate="2M", maxrate="2M", bufsize="1M", g=50,
    )


def _span_bytes(path: str, start: float, end: float) -> int:
    """Bytes of the packets from the key frame before `start` to `end`: what a clip must read."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        packets = [(float(p.pts * stream.time_base), p.pos, p.size, p.is_keyframe)
                   for p in container.demux(stream) if p.pts is not None]
    first = max(pos for t, pos, _, key in packets if key and t <= start)
    last = max(pos + size for t, pos, size, _ in packets if t <= end)
    return last - first


def test_s3_clip_reads_its_byte_range_only(big_video, s3_bucket, monkeypatch):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    uri = f"s3://{bucket}/videos/big.mp4"
    fs.put_file(big_video, uri)
    size = fs.size(uri)
    assert size >= 20_000_000

    plan = plan_video(uri, fps=1.0, clip_seconds=10.0, cuts="none", storage_options=options)
    assert plan.duration_s == pytest.approx(120.0) and len(plan.clips) == 12
    clip = plan.clips[6]
    assert (clip.ts_start, clip.ts_end) == (60.0, 70.0)
    remote = sample_clip(uri, storage_options=options, **_clip_args(clip))
    local = sample_clip(big_video, **_clip_args(clip))
    np.testing.assert_array_equal(remote.timestamps, local.timestamps)
    np.testing.assert_array_equal(remote.frames, local.frames)
    assert local.bytes_read is None
    span = _span_bytes(big_video, 60.0, 70.0)
    # the clip's packets, plus the header at the start, the index at the end, and read-ahead
    assert remote.bytes_read <= span + 4 * REMOTE_BLOCK_SIZE
    assert remote.bytes_read < 0.25 * size

    # the same decode in this process, counting what s3fs actually fetched over HTTP
    fetched: list[int] = []
    original = s3fs.core.S3File._fetch_range

    def counting(self, start, end):
        data = original(self, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    picked = range_decode.pick_frames(uri, _clip_args(clip)["grid_times"], max_side=None,
                                      storage_options=options, strict=True)
    assert sum(fetched) == picked.bytes_read == remote.bytes_read
    print(f"clip 60-70 s of a {size / 1e6:.1f} MB object: read {sum(fetched) / 1e6:.2f} MB in {len(fetched)} "
          f"requests ({sum(fetched) / size:.1%}); its packets span {span / 1e6:.2f} MB")
