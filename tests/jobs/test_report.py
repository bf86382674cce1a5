"""`pixelrefer report`: the page's content, its overlays (in the file and as Chromium draws them)."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from index_builders import (RUN2, clip_rows, empty_run, object_and_mask_rows, run_rows, video_id_for, video_row,
                            write_index)
from jobs import report as r
from jobs import report_frames as rf
from pipeline.samples import GroundTruth, Shape, make_video

IndexInfo = Any  # tests/jobs/conftest.py: IndexInfo
RUN1, RUN2 = "1700000000", "run-2024-02"  # as in tests/jobs/conftest.py

pytestmark = pytest.mark.timeout(120)

IMG_RE = re.compile(r'<figure data-ts="([0-9.]+)"><img src="data:image/(jpeg|png);base64,([^"]+)"')


def run_report(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = r.main(list(argv))
    return code, capsys.readouterr().err


def embedded_frames(page: str) -> list[tuple[float, np.ndarray]]:
    return [
        (float(ts), np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")))
        for ts, _fmt, data in IMG_RE.findall(page)
    ]


def expected_overlay(shape_color: tuple[int, int, int], object_id: int) -> np.ndarray:
    """What a mask pixel over a solid shape must look like: the documented alpha blend."""
    color = np.array(rf.object_color(object_id), float)
    return (1 - rf.MASK_ALPHA) * np.array(shape_color, float) + rf.MASK_ALPHA * color


def overlapped(truth: Any, i: int, ts: float) -> bool:
    """Whether shape i's mask touches another shape's mask at ts (its pixels are then not solid)."""
    mask = truth.mask(i, ts)
    others = (truth.mask(j, ts) for j in range(len(truth.shapes)) if j != i)
    return any(other is not None and (other & mask).any() for other in others)


def interior(mask: np.ndarray, scale: int, margin: int = 4) -> np.ndarray:
    """The mask at display scale, shrunk so box outlines, labels and codec edges stay out of it."""
    big = cv2.resize(mask.astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    return cv2.erode(big, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)).astype(bool)


@pytest.fixture(scope="module")
def local_report(local_index: IndexInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "a.html"
    assert r.main([local_index.output, "--video", local_index.video_ids["a"], "--out", str(out)]) == 0
    return out


def test_report_is_one_self_contained_page(local_report: Path) -> None:
    page = local_report.read_text()
    assert page.startswith("<!doctype html>")
    # No fetch of anything: every image is inline and no attribute points elsewhere.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<script" not in page and "@import" not in page and "url(" not in page
    assert len(IMG_RE.findall(page)) == 10  # every sampled frame that holds an object (<= max frames)
    assert "Showing 10 of 10 sampled frames (0 left out): every sampled frame with a mask" in page
    # The clip row: both clips in order, each with its own captions.
    clips = re.findall(r'<div class="clip" data-clip-index="(\d+)" data-status="ok"><h3>([^<]*)</h3>(.*?)</div>', page)
    assert [(int(i), h) for i, h, _ in clips] == [(0, "clip 0 · 0.00–1.00 s · window"), (1, "clip 1 · 1.00–2.00 s · end")]
    assert "a blue sphere moving left" in clips[0][2] and "a blue sphere drifting up" in clips[1][2]
    assert "a yellow square falling slowly" in clips[1][2] and "yellow" not in clips[0][2]
    assert "Whole track: a red truck that drives from the left edge to the middle" in page
    # The latest ok run (RUN2): its captions, its answers, its model.
    for text in ("a red truck with a red cabin moving right", "a yellow square falling slowly",
                 "the red truck is faster than the blue ball", "What color is the truck?", "tiny-b"):  # fmt: skip
        assert text in page
    assert "a small yellow box" not in page  # RUN1's caption
    # Timeline: object 3 (yellow) enters at 1.0 s, the others are there throughout.
    spans = re.findall(r'data-object-id="(\d+)" data-start="([0-9.]+)" data-end="([0-9.]+)"', page)
    assert [(int(o), float(a), float(b)) for o, a, b in spans] == [(1, 0.0, 1.8), (2, 0.0, 1.8), (3, 1.0, 1.8)]
    for oid in (1, 2, 3):
        assert rf.hex_color(rf.object_color(oid)) in page


def test_embedded_frames_carry_masks_at_ground_truth_positions(local_report: Path, local_index: IndexInfo) -> None:
    truth = local_index.truths["a"]
    frames = embedded_frames(local_report.read_text())
    for ts, image in frames[::3]:
        scale = image.shape[1] // truth.width
        assert image.shape[:2] == (truth.height * scale, truth.width * scale)
        for i, shape in enumerate(truth.shapes):
            mask = truth.mask(i, ts)
            if mask is None or overlapped(truth, i, ts):
                continue
            inside = interior(mask, scale)
            got = np.median(image[inside].astype(float), axis=0)
            assert np.abs(got - expected_overlay(shape.color, i + 1)).max() < 20, (ts, i, got)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def screenshot(page: Path, png: Path, profile: Path, size: tuple[int, int] = (1400, 1000)) -> np.ndarray:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium not found (Debian: apt-get install -y chromium); cannot render the report")
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={size[0]},{size[1]}",
        "--force-device-scale-factor=1", "--force-color-profile=srgb", "--hide-scrollbars",
        page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert png.exists(), done.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB"))


def test_chromium_shows_overlay_colours_where_the_masks_are(
    local_report: Path, local_index: IndexInfo, tmp_path: Path
) -> None:
    shot = screenshot(local_report, tmp_path / "report.png", tmp_path / "profile")
    truth = local_index.truths["a"]
    ts, first = embedded_frames(local_report.read_text())[0]
    # Where did Chromium draw the first frame? Exact template match (drawn 1:1, no scaling).
    result = cv2.matchTemplate(shot, first, cv2.TM_SQDIFF_NORMED)
    _, _, (x, y), _ = cv2.minMaxLoc(result)
    assert result[y, x] < 0.01
    drawn = shot[y : y + first.shape[0], x : x + first.shape[1]].astype(float)
    scale = first.shape[1] // truth.width
    checked = 0
    for i, shape in enumerate(truth.shapes):
        mask = truth.mask(i, ts)
        if mask is None or overlapped(truth, i, ts):
            continue
        checked += 1
        inside = interior(mask, scale)
        got = np.median(drawn[inside], axis=0)
        assert np.abs(got - expected_overlay(shape.color, i + 1)).max() < 20, (i, got)
        # ... and only there: the background around the shape has no such colour.
        ring = interior(~mask, scale, margin=6) & cv2.dilate(inside.astype(np.uint8), np.ones((41, 41))).astype(bool)
        far = np.abs(drawn[ring] - expected_overlay(shape.color, i + 1)).max(axis=1) < 20
        assert far.mean() < 0.02
    assert checked == 2


def test_report_from_s3(s3_index: IndexInfo, tmp_path: Path, capsys) -> None:
    out = tmp_path / "b.html"
    code, err = run_report(capsys, *s3_index.cli(), "--video", s3_index.uris["b"], "--out", str(out),
                           "--image-format", "png", "--max-frames", "3")  # fmt: skip
    assert code == 0, err
    page = out.read_text()
    frames = embedded_frames(page)
    # Both objects are first seen at 0.0; then the best frame of each clip (both objects, mid-clip).
    times = [ts for ts, _ in frames]
    assert len(times) == 3 and times[0] == 0.0 and 0.2 <= times[1] <= 0.8 and 1.0 <= times[2] <= 1.8
    assert times[2] != 1.2 and "data:image/png" in page  # at 1.2 s object 2 has no mask
    assert "Showing 3 of 10 sampled frames (7 left out): the first sighting of each of 2 objects" in page
    truth = s3_index.truths["b"]
    ts, image = frames[1]
    scale = image.shape[1] // truth.width
    inside = interior(truth.mask(0, ts), scale)
    got = np.median(image[inside].astype(float), axis=0)
    assert np.abs(got - expected_overlay(truth.shapes[0].color, 1)).max() < 12
    assert "a green car parked by the road" in page and s3_index.uris["b"] in page


def test_older_run_and_failed_video(local_index: IndexInfo, tmp_path: Path, capsys) -> None:
    out = tmp_path / "old.html"
    code, err = run_report(capsys, local_index.output, "--video", local_index.video_ids["a"], "--run", RUN1,
                           "--out", str(out), "--max-frames", "2")  # fmt: skip
    assert code == 0, err
    assert "a small yellow box" in out.read_text()
    # A video that never indexed: no frames to decode, the page says why.
    out = tmp_path / "c.html"
    code, err = run_report(capsys, local_index.output, "--video", local_index.uris["c"], "--out", str(out))
    assert code == 0, err
    assert "moov atom not found" in out.read_text()


def test_missing_source_video(private_local_index: IndexInfo, tmp_path: Path, capsys) -> None:
    Path(private_local_index.uris["a"]).unlink()
    out = tmp_path / "a.html"
    code, err = run_report(capsys, private_local_index.output, "--video", private_local_index.video_ids["a"],
                           "--out", str(out))  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert "source video" in err and "gone" in err and private_local_index.uris["a"] in err
    assert not out.exists()


def test_unreadable_source_video(private_local_index: IndexInfo, tmp_path: Path, capsys) -> None:
    Path(private_local_index.uris["a"]).write_bytes(b"\x00" * 4096)
    code, err = run_report(capsys, private_local_index.output, "--video", private_local_index.video_ids["a"],
                           "--out", str(tmp_path / "a.html"))  # fmt: skip
    assert code == 1 and "Traceback" not in err and "cannot decode" in err


def test_unknown_video_and_bad_out(local_index: IndexInfo, tmp_path: Path, capsys) -> None:
    code, err = run_report(capsys, local_index.output, "--video", "nope", "--out", str(tmp_path / "x.html"))
    assert code == 1 and "no video 'nope'" in err and "Traceback" not in err
    code, err = run_report(capsys, local_index.output, "--video", local_index.video_ids["b"],
                           "--out", str(tmp_path / "missing-dir" / "x.html"), "--max-frames", "1")  # fmt: skip
    assert code == 2 and "does not exist" in err


def test_subparser_wiring(local_index: IndexInfo, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="pixelrefer")
    r.add_report_arguments(parser.add_subparsers(dest="command").add_parser("report"))
    out = tmp_path / "b.html"
    args = parser.parse_args(["report", local_index.output, "--video", local_index.video_ids["b"],
                              "--out", str(out), "--max-frames", "1"])  # fmt: skip
    assert r.report_main(args) == 0 and out.stat().st_mode & 0o044  # readable by others, like any page
    with pytest.raises(SystemExit):
        parser.parse_args(["report", local_index.output, "--out", str(out)])  # --video is required


def test_object_colours_are_stable_and_distinct() -> None:
    colours = [rf.object_color(i) for i in range(12)]
    assert colours == [rf.object_color(i) for i in range(12)]
    assert len(set(colours)) == 12
    for a in range(12):
        for b in range(a + 1, a + 3):  # neighbours in id are far apart in colour
            assert np.abs(np.subtract(colours[a], rf.object_color(b))).max() > 60


def test_decoder_picks_nearest_presentation_time(tmp_path: Path) -> None:
    """On a variable frame rate clip, a time between frames gets the nearest frame, not index/fps."""
    truth = make_video(tmp_path / "vfr.mp4", duration_s=2.0, vfr=True, gop=5)
    wanted = [0.0, 0.31, 0.94, 1.2, 1.29, 1.51, 1.8, 5.0]
    got = rf.decode_frames(truth.path, wanted, {})
    nearest = {t: min(truth.timestamps, key=lambda f: abs(f - t)) for t in wanted if t < 5.0}
    assert {t: round(v[0], 3) for t, v in got.items()} == nearest  # 5.0 lies past the end: no frame
    assert all(v[1].shape == (truth.height, truth.width, 3) for v in got.values())
    for t in wanted[1:-1:3]:  # one time alone (its own seek) gets the same frame
        assert np.array_equal(rf.decode_frames(truth.path, [t], {})[t][1], got[t][1])


def test_long_video_report_inlines_a_bounded_set_of_frames(long_index: IndexInfo, data, tmp_path: Path, capsys,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A 2-hour video (7,200 sampled frames, 240 clips): at most 60 frames decoded and inlined, and the page says so."""
    import time

    decoded: list[int] = []
    real_decode = r.decode_frames

    def counting_decode(uri: str, times: list[float], options: dict, **kwargs: Any) -> dict:
        decoded.append(len(times))
        return real_decode(uri, times, options, **kwargs)

    monkeypatch.setattr(r, "decode_frames", counting_decode)
    out = tmp_path / "long.html"
    started = time.monotonic()
    code, err = run_report(capsys, long_index.output, "--video", long_index.video_ids["long"], "--out", str(out))
    elapsed = time.monotonic() - started
    assert code == 0, err
    page = out.read_text()
    frames = embedded_frames(page)
    assert len(frames) == r.DEFAULT_MAX_FRAMES == 60 and decoded == [60]
    assert elapsed < 60 and len(page) < 5_000_000, (elapsed, len(page))
    assert ("Showing 60 of 7200 sampled frames (7140 left out): the first sighting of each of 8 objects and one "
            "frame from 52 of 239 clips with masks, evenly spread") in page  # fmt: skip
    shown = {ts for ts, _ in frames}
    firsts = {float(t if t // 30 != data.LONG_FAILED_CLIP else 30 * (data.LONG_FAILED_CLIP + 1))
              for t in data.LONG_FIRST.values()}  # object 6 enters in the failed clip: seen after it
    assert firsts <= shown
    assert re.findall(r"<figcaption>([^<]*)</figcaption>", page)[0].endswith("first sighting of 1")
    clips = re.findall(r'<div class="clip( failed)?" data-clip-index="(\d+)"', page)
    assert [int(i) for _, i in clips] == list(range(240))
    assert [int(i) for failed, i in clips if failed] == [data.LONG_FAILED_CLIP] and "invalid NAL unit" in page
    # Every inlined frame shows the objects stored for its time, drawn from the masks table.
    for ts, image in frames[:: len(frames) // 6]:
        present = [k for k, first in data.LONG_FIRST.items() if first <= ts]
        assert re.search(rf'<figure data-ts="{ts:.6f}">.*?objects {", ".join(map(str, present))}[ <]', page)
        assert image.shape[0] >= 48


def test_report_of_an_index_written_before_delta_tables(tmp_path: Path, sample_videos, local_report: Path,
                                                        local_index: IndexInfo, data, capsys) -> None:  # fmt: skip
    """Refused, naming `pixelrefer migrate`, until it is migrated; then the same page as the Delta index's."""
    from jobs.cli import main

    old = data.local_index_at(tmp_path, sample_videos, pre_delta=True)
    assert old.video_ids["a"] == local_index.video_ids["a"]
    out = tmp_path / "old.html"
    code, err = run_report(capsys, old.output, "--video", old.video_ids["a"], "--out", str(out))
    assert code == 1 and f"pixelrefer migrate {old.output}" in err and "Traceback" not in err, err
    assert not out.exists()
    assert main(["migrate", old.output]) == 0
    code, err = run_report(capsys, old.output, "--video", old.video_ids["a"], "--out", str(out))
    assert code == 0, err
    def comparable(page: str, output: str) -> str:
        return re.sub(r"report at [0-9T:+-]+\.", "report at T.", page.replace(output, "OUTPUT"))

    page = out.read_text()
    assert len(IMG_RE.findall(page)) == 10
    assert comparable(page, old.output) == comparable(local_report.read_text(), local_index.output)


def test_max_frames_is_bounded(local_index: IndexInfo, tmp_path: Path, capsys) -> None:
    code, err = run_report(capsys, local_index.output, "--video", local_index.video_ids["a"],
                           "--out", str(tmp_path / "x.html"), "--max-frames", str(r.MAX_FRAMES_LIMIT + 1))  # fmt: skip
    assert code == 2 and "--max-frames must be 1 to" in err and not (tmp_path / "x.html").exists()


def test_spread_keeps_ends_and_count() -> None:
    items = list(range(240))
    for k in (1, 2, 7, 52, 239, 240, 300):
        got = r.spread(items, k)
        assert len(got) == min(k, 240) and len(set(got)) == len(got) and got == sorted(got)
        assert got[0] == 0 and (k == 1 or got[-1] == 239)
    assert r.spread(items, 0) == []


class UprightTruth:
    """A landscape ground truth as a phone shows it: the stored frames turned a quarter (`turns`, rot90's k).

    What indexing sees (it decodes upright frames), so its masks are in this frame's pixel space.
    """

    def __init__(self, stored: GroundTruth, path: str, turns: int) -> None:
        self.stored, self.path, self.turns = stored, path, turns
        self.width, self.height = stored.height, stored.width
        self.timestamps, self.shapes = stored.timestamps, stored.shapes

    def mask(self, shape_index: int, t: float) -> np.ndarray | None:
        mask = self.stored.mask(shape_index, t)
        return None if mask is None else np.ascontiguousarray(np.rot90(mask, k=self.turns))


def test_portrait_phone_video_is_drawn_upright_under_its_masks(tmp_path: Path) -> None:
    """Rotation metadata is honoured: the frame is the upright one and each mask lies on its object."""
    import ffmpeg

    shapes = (Shape(color=(230, 40, 40), size=(24, 30), start_xy=(12, 10)),  # near the stored top-left corner
              Shape(color=(40, 80, 230), size=(20, 20), start_xy=(110, 60), velocity=(-20, 0), kind="ellipse"))
    stored = make_video(tmp_path / "landscape.mp4", width=160, height=96, fps=10, duration_s=1.0, shapes=shapes)
    phone = str(tmp_path / "phone.mp4")
    ffmpeg.input(stored.path).output(phone, c="copy", **{"metadata:s:v:0": "rotate=90"}).overwrite_output().run(
        quiet=True
    )
    raw, _ = ffmpeg.input(phone).output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=1).run(
        capture_stdout=True, quiet=True
    )  # the ffmpeg CLI turns frames upright itself: the independent check of which way is up
    cli = np.frombuffer(raw, np.uint8).reshape(160, 96, 3)
    stored_first = np.frombuffer(
        ffmpeg.input(stored.path).output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=1)
        .run(capture_stdout=True, quiet=True)[0], np.uint8
    ).reshape(96, 160, 3)
    turns = [k for k in (1, 3) if np.abs(cli.astype(int) - np.rot90(stored_first, k=k)).mean() < 2.0]
    assert len(turns) == 1  # a quarter turn one way or the other: portrait

    truth = UprightTruth(stored, phone, turns[0])
    uri, when = os.path.abspath(phone), dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
    tables = empty_run()
    tables["videos"].append(video_row("phone", uri, RUN2, truth, when, "tiny"))  # type: ignore[arg-type]
    tables["clips"] += clip_rows(truth, video_id_for(uri), RUN2)  # type: ignore[arg-type]
    objects, masks = object_and_mask_rows(truth, "phone", video_id_for(uri), RUN2)  # type: ignore[arg-type]
    tables["objects"], tables["masks"] = objects, masks
    tables["runs"] = run_rows(RUN2, 1, when, tables)
    write_index(str(tmp_path / "index"), {RUN2: tables})

    out = tmp_path / "phone.html"
    assert r.main([str(tmp_path / "index"), "--video", video_id_for(uri), "--out", str(out)]) == 0
    frames = embedded_frames(out.read_text())
    assert len(frames) == 5
    for ts, image in frames:
        scale = image.shape[1] // truth.width
        assert image.shape[:2] == (truth.height * scale, truth.width * scale) and image.shape[0] > image.shape[1]
        for i, shape in enumerate(shapes):
            if overlapped(truth, i, ts):
                continue
            inside = interior(truth.mask(i, ts), scale)
            got = np.median(image[inside].astype(float), axis=0)
            assert np.abs(got - expected_overlay(shape.color, i + 1)).max() < 20, (ts, i, got)
