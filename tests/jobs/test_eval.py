"""`pixelrefer eval`: an export scored against itself, a scripted ground truth of sample video "b"
scored by hand, and the bad-input errors.

Video "b" (`index_builders`): 2 shapes over 2 s at 10 fps (source frames 0-19), indexed at every
second frame (10 sampled frames), object 2 missed at 1.2 s. A MOTS ground truth at every source
frame has 40 masks; 20 of them fall on sampled frames (the other 20 are between samples and are
not scored), and the index has 19 of those 20.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from index_builders import rle_of
from jobs.cli import main as cli


def run_eval(index: Any, gt: Path | str, fmt: str | None, capsys: pytest.CaptureFixture[str],
             *extra: str) -> tuple[int, Any, str]:
    """`eval` with JSON scores; `fmt` None leaves the format to the ground truth's name."""
    capsys.readouterr()
    given = ["--format", fmt] if fmt else []
    code = cli(["eval", *index.cli(), "--gt", str(gt), *given, "--scores-format", "json", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


@pytest.mark.parametrize("fmt, out", [("ytvis", "gt.json"), ("mots", "gt"), ("cvat", "gt")])
def test_an_export_scores_perfectly_against_itself(local_index: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   fmt: str, out: str) -> None:
    assert cli(["export", *local_index.cli(), "--format", fmt, "--out", str(tmp_path / out)]) == 0
    code, scores, err = run_eval(local_index, tmp_path / out, None, capsys)  # the format told by the names
    assert code == 0, err
    assert len(scores["videos"]) == 2 and scores["overall"]["frames"] == 20
    for row in [*scores["videos"], scores["overall"]]:
        assert row["HOTA"] == pytest.approx(1.0) and row["IDSW"] == 0 and row["MOTA"] == pytest.approx(1.0)


def write_mots_gt(path: Path, truth: Any, ids: Any) -> None:
    """One line per shape per source frame; `ids(shape, t)` gives its ground-truth id."""
    with open(path, "w") as f:
        for n, t in enumerate(truth.timestamps):
            for shape in range(len(truth.shapes)):
                mask = truth.mask(shape, t)
                if mask is not None:
                    rle = rle_of(mask)
                    f.write(f"{n + 1} {ids(shape, t)} 2 {rle['size'][0]} {rle['size'][1]} {rle['counts']}\n")


def test_scripted_ground_truth_gives_the_hand_count(local_index: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    truth = local_index.truths["b"]
    gt = tmp_path / f"{Path(truth.path).stem}.txt"  # named by the source file, not the video id
    write_mots_gt(gt, truth, lambda shape, t: 2001 + shape)
    code, scores, err = run_eval(local_index, gt, "mots", capsys)
    assert code == 0, err
    row = scores["videos"][0]
    assert row["video"] == local_index.video_ids["b"] and (row["frames"], row["gt_frames"]) == (10, 20)
    # 20 ground-truth masks on sampled frames, 19 found (IoU 1), 1 missed, no false positive.
    assert row["MOTA"] == pytest.approx(1 - 1 / 20) and row["IDSW"] == 0
    assert row["IDF1"] == pytest.approx(2 * 19 / (2 * 19 + 1))
    det, ass = 19 / 20, (10 * 1 + 9 * 9 / 10) / 19  # AssA: object 1's 10 matches are whole, object 2's 9 are 9/10
    assert (row["DetA"], row["AssA"]) == (pytest.approx(det), pytest.approx(ass))
    assert row["HOTA"] == pytest.approx((det * ass) ** 0.5)


def test_swapped_ground_truth_ids_count_two_switches(local_index: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Ground truth that swaps the shapes' ids at 1.0 s: both ids switch tracks once."""
    truth = local_index.truths["b"]
    gt = tmp_path / f"{local_index.video_ids['b']}.txt"
    write_mots_gt(gt, truth, lambda shape, t: 2007 + (shape if t < 1.0 else 1 - shape))
    code, scores, err = run_eval(local_index, gt, "mots", capsys)
    assert code == 0, err
    row = scores["overall"]
    assert row["IDSW"] == 2 and row["MOTA"] == pytest.approx(1 - (1 + 2) / 20)
    # best one-to-one id matching: 5 + 5 frames; 10 of 20 truths and 9 of 19 detections unmatched
    assert row["IDF1"] == pytest.approx(2 * 10 / (2 * 10 + 10 + 9))


def test_table_output(local_index: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["export", *local_index.cli(), "--format", "ytvis", "--out", str(tmp_path / "gt.json")]) == 0
    capsys.readouterr()
    assert cli(["eval", *local_index.cli(), "--gt", str(tmp_path / "gt.json"), "--format", "ytvis",
                "--video", local_index.video_ids["a"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["video", "frames"] and lines[1].startswith(local_index.video_ids["a"])
    assert lines[-1].startswith("overall") and len(lines) == 3


@pytest.mark.parametrize("name, text, fmt, words", [
    ("other.txt", "1 2001 2 120 160 abc\n", "mots", "video 'other' (other.txt) is not in the index"),
    ("b.txt", "1 2001 2 120 160 abc\n3 2001 2 120\n", "mots", "b.txt line 2: a MOTS line has 6 fields"),
    ("gt.json", '{"videos": [', "ytvis", "is not a JSON file"),
    ("b.xml", '<annotations><track id="1"><box frame="x"/></track></annotations>', "cvat", "track '1' has a box"),
    ("b.xml", "<annotations><track", "cvat", "not CVAT XML"),
    ("b.txt", "900 2001 2 120 160 abc\n", "mots", "b.txt: none of its 1 frames falls on one of the index's sampled"),
    ("gt.json", json.dumps({"videos": [{"id": 1, "file_names": [f"b/{k}.jpg" for k in range(11)]}],
                            "annotations": []}), "ytvis", "beyond the index's 10 sampled frames"),
    ("gt.json", '{"videos": []}', "ytvis", "needs top-level 'videos' and 'annotations'"),
    ("gt.dat", "1 2001 2 120 160 abc\n", None, "has no .json, .txt or .xml name: give its format with --format"),
    ("gt.json", json.dumps({"videos": [{"id": 1, "file_names": ["b/0.jpg"], "length": 1}],
                            "annotations": [{"video_id": 1, "segmentations": [None, None]}]}),
     "ytvis", "annotations[0]: 'segmentations' must list one entry"),
])
def test_bad_ground_truth_exits_2_naming_file_and_problem(local_index: Any, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str], name: str, text: str,
                                                          fmt: str | None, words: str) -> None:
    (tmp_path / name).write_text(text)
    code, _, err = run_eval(local_index, tmp_path / name, fmt, capsys)
    assert code == 2 and words in err and name in err


def test_ground_truth_from_s3(s3_index: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = f"s3://{s3_index.root.split('/')[0]}/exports/gt-self.json"
    assert cli(["export", *s3_index.cli(), "--format", "ytvis", "--out", out]) == 0
    code, scores, err = run_eval(s3_index, out, "ytvis", capsys)
    assert code == 0 and scores["overall"]["HOTA"] == pytest.approx(1.0), err
