"""`pixelrefer export`: what readers we did not write make of each format (pycocotools for YTVIS,
Datumaro for CVAT and MOTS), streaming over a long video, an S3 target, and the bad-input errors.

The session's `local_index` holds videos "a" (default view: RUN2; RUN1 older, a staged run never
committed) and "b" (RUN1, object 2 missed at 1.2 s): an export must hold exactly the default
view's masks."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from jobs.cli import main as cli
from pipeline.export import select_videos
from pipeline.store import TableStore
from pipeline.store.commit import read_visible

DATUMARO = Path(__file__).resolve().parents[2] / ".venv-datumaro" / "bin" / "python"


def default_view_masks(index: Any) -> dict[tuple[str, int, int], dict]:
    """(video_id, object_id, frame_index) -> rle of the masks a default-view reader sees."""
    store = TableStore(index.output, index.storage_options)
    runs = {v.video_id: v.run_id for v in select_videos(store)}
    rows = read_visible(index.output, "masks", index.storage_options)
    return {(r["video_id"], r["object_id"], r["frame_index"]): r["rle"] for r in rows.to_pylist()
            if runs.get(r["video_id"]) == r["run_id"]}


def export(index: Any, fmt: str, out: Path | str, *extra: str) -> int:
    return cli(["export", *index.cli(), "--format", fmt, "--out", str(out), *extra])


def test_ytvis_masks_decode_to_the_masks_table(local_index: Any, tmp_path: Path) -> None:
    out = tmp_path / "ytvis.json"
    assert export(local_index, "ytvis", out) == 0
    data = json.loads(out.read_text())
    expected = default_view_masks(local_index)
    videos = {v["id"]: v for v in data["videos"]}
    seen = {}
    for ann in data["annotations"]:
        video = videos[ann["video_id"]]
        assert len(ann["segmentations"]) == video["length"] == len(video["pixelrefer"]["timestamps"])
        for k, segmentation in enumerate(ann["segmentations"]):
            if segmentation is None:
                assert ann["bboxes"][k] is None and ann["areas"][k] is None
                continue
            key = (video["pixelrefer"]["video_id"], ann["pixelrefer"]["object_id"], k)
            decoded = mask_utils.decode(segmentation)
            table = mask_utils.decode({**expected[key], "counts": expected[key]["counts"].encode()})
            assert decoded.shape == (video["height"], video["width"])
            assert np.array_equal(decoded, table) and int(decoded.sum()) == ann["areas"][k]
            x, y, w, h = ann["bboxes"][k]
            assert mask_utils.toBbox(segmentation).tolist() == pytest.approx([x, y, w, h])
            seen[key] = True
    assert set(seen) == set(expected)  # every default-view mask, nothing of older or uncommitted runs
    b = next(a for a in data["annotations"] if a["pixelrefer"]["object_id"] == 2
             and videos[a["video_id"]]["pixelrefer"]["video_id"] == local_index.video_ids["b"])
    assert b["segmentations"][6] is None  # the tracker's miss at 1.2 s (sampled frame 6)
    assert any(c["clip_index"] is None for c in b["pixelrefer"]["captions"]) and b["pixelrefer"]["label"] == "ball"


def datumaro_counts(fmt: str, path: Path) -> tuple[int, int]:
    """(tracks, frames) as Datumaro imports them: distinct track ids and items with a visible shape."""
    if not DATUMARO.exists():
        pytest.skip(f"Datumaro's venv is missing ({DATUMARO}): scripts/setup.sh makes it from "
                    "requirements/datumaro.lock")
    script = textwrap.dedent("""
        import sys, datumaro
        ds = datumaro.Dataset.import_from(sys.argv[2], sys.argv[1])
        tracks, frames = set(), set()
        for item in ds:
            shown = [a for a in item.annotations if not a.attributes.get("outside")]
            frames.update([(item.subset, item.id)] if shown else [])
            tracks.update((item.subset, a.attributes["track_id"]) for a in shown)
        print(len(tracks), len(frames))
    """)
    done = subprocess.run([str(DATUMARO), "-c", script, fmt, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    tracks, frames = done.stdout.split()
    return int(tracks), int(frames)


@pytest.mark.parametrize("fmt", ["cvat", "mots"])
def test_datumaro_imports_the_same_tracks_and_frames(local_index: Any, tmp_path: Path, fmt: str) -> None:
    assert export(local_index, fmt, tmp_path / fmt) == 0
    expected = default_view_masks(local_index)
    tracks = {(v, o) for v, o, _ in expected}
    frames = {(v, f) for v, _, f in expected}
    assert datumaro_counts(fmt, tmp_path / fmt) == (len(tracks), len(frames)) == (5, 20)


def test_cvat_track_leaves_at_a_miss_and_comes_back(local_index: Any, tmp_path: Path) -> None:
    assert export(local_index, "cvat", tmp_path / "cvat", "--video", local_index.video_ids["b"]) == 0
    xml = (tmp_path / "cvat" / f"{local_index.video_ids['b']}.xml").read_text()
    track = xml.split('<track id="2"')[1].split("</track>")[0]
    # sampled every second source frame; the miss at 1.2 s is source frame 12
    assert '<box frame="12" outside="1"' in track and '<box frame="14" outside="0"' in track
    assert "<size>20</size>" in xml and "0-based frames at 10 fps" in xml


def test_mots_and_mot_number_source_frames_from_one(local_index: Any, tmp_path: Path) -> None:
    b = local_index.video_ids["b"]
    assert export(local_index, "mots", tmp_path / "mots", "--video", b) == 0
    assert export(local_index, "mot", tmp_path / "mot", "--video", b, "--label", "ball") == 0
    lines = (tmp_path / "mots" / f"{b}.txt").read_text().splitlines()
    frames = [int(line.split()[0]) for line in lines]
    assert frames == sorted(frames) and set(frames) == set(range(1, 20, 2))
    assert {int(line.split()[1]) % 1000 for line in lines} == {1, 2}
    pngs = sorted((tmp_path / "mots" / b / "instances").glob("frame_*.png"))
    assert len(pngs) == 10
    classes = (tmp_path / "mots" / b / "instances" / "labels.txt").read_text().split()
    expected = default_view_masks(local_index)
    for k, png in enumerate(pngs):  # the shapes of "b" never overlap: each PNG holds every mask whole
        image = np.asarray(Image.open(png))
        assert png.name == f"frame_{2 * k:06d}.png"
        for object_id, label in ((1, "truck"), (2, "ball")):
            rle = expected.get((b, object_id, k))
            value = (classes.index(label) + 1) * 1000 + object_id
            truth = mask_utils.decode({**rle, "counts": rle["counts"].encode()}) if rle else 0
            assert np.array_equal(image == value, np.asarray(truth, bool) | np.zeros(image.shape, bool))
    boxes = (tmp_path / "mot" / f"{b}.txt").read_text().splitlines()
    assert len(boxes) == 9 and {line.split(",")[1] for line in boxes} == {"2"}  # the ball, missed once
    assert "frameRate=10" in (tmp_path / "mot" / b / "seqinfo.ini").read_text()


def test_long_video_streams_in_bounded_passes(long_index: Any, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """The 2-hour video's 50k masks pass through `masks.grouped` a range of frames at a time."""
    from pipeline.export import masks

    passes: list[int] = []
    real = TableStore.batches

    def counted(self: TableStore, table: str, columns: list[str] | None = None, **kwargs: Any) -> Any:
        rows = 0
        for batch in real(self, table, columns, **kwargs):
            rows += batch.num_rows
            yield batch
        if table == "masks" and columns and "rle" in columns:
            passes.append(rows)

    monkeypatch.setattr(masks, "BUDGET_ROWS", 8_000)
    monkeypatch.setattr(TableStore, "batches", counted)
    assert cli(["export", long_index.output, "--format", "mot", "--out", str(tmp_path / "mot")]) == 0
    lines = (tmp_path / "mot" / f"{long_index.video_ids['long']}.txt").read_text().count("\n")
    assert lines == sum(passes) > 40_000 and max(passes) <= 8_000 and len(passes) > 5


def test_export_to_s3(s3_index: Any) -> None:
    out = f"s3://{s3_index.root.split('/')[0]}/exports/ytvis.json"
    assert export(s3_index, "ytvis", out) == 0
    with s3_index.fs.open(out, "r") as f:
        assert len(json.load(f)["annotations"]) == 5


@pytest.mark.parametrize("argv, words", [
    (["--label", "zebra"], "no selected video"),
    (["--video", "no-such-video"], "--video 'no-such-video'"),
])
def test_bad_selection_exits_2(local_index: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               argv: list[str], words: str) -> None:
    assert export(local_index, "ytvis", tmp_path / "x.json", *argv) == 2
    assert words in capsys.readouterr().err


def test_unknown_format_exits_2(local_index: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        export(local_index, "coco", tmp_path / "x")
    assert exited.value.code == 2 and "invalid choice: 'coco'" in capsys.readouterr().err
