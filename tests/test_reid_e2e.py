"""Re-identification end to end: a test-made video edited A | B | A with hard cuts, indexed with the
real tiny models on local Ray, and `query --similar-to` over it and a second video of shot A alone.

What random tiny weights can show: the tower is random, so every region looks alike to it (cosines
of 0.95 between different shapes), and the threshold for real weights (`pipeline.reid.DEFAULT_THRESHOLD`)
would merge anything. Tiny runs therefore merge at `TINY_THRESHOLD` (near 1: the same pixels), and
shots 1 and 3 are encoded losslessly from the same frames: the third shot's objects then have the
first's pixels, masks and vectors, while B's have other pixels. So this checks the plumbing (vectors
pooled by the referrer, carried to the driver, merged across two cuts, B left alone, stored, ranked)
and nothing about how well real features tell objects apart: `bench/reid.py pairs` measures that.

Cost: one module-scoped run (Ray, TransNetV2 over 9 s of video, the tiny models on 5 clips) serves
every check: about 20 s of CPU, several minutes of wall time when the 2 cores are shared.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import ffmpeg
import pytest

from jobs.cli import main
from pipeline.config import IndexConfig
from pipeline.reid import TINY_THRESHOLD
from pipeline.run import run_index
from pipeline.samples import DEFAULT_SHAPES, Shape, make_video
from pipeline.store.commit import read_visible

SHOT_S = 3.0


def _lossless(parts: list[str], out: Path) -> None:
    """The parts one after the other, re-encoded losslessly: equal source frames stay equal pixels."""
    out.parent.mkdir(parents=True, exist_ok=True)
    (
        ffmpeg.concat(*[ffmpeg.input(p) for p in parts])
        .output(str(out), vcodec="libx264", qp=0, preset="ultrafast", pix_fmt="yuv420p")
        .global_args("-loglevel", "error")
        .overwrite_output()
        .run()
    )


@pytest.fixture(scope="module")
def aba(tmp_path_factory, ray_local) -> dict:
    root = tmp_path_factory.mktemp("reid")
    a = make_video(root / "a_src.mp4", duration_s=SHOT_S, seed=1, shapes=DEFAULT_SHAPES[:2])
    b = make_video(root / "b_src.mp4", duration_s=SHOT_S, seed=9,
                   shapes=(Shape(color=(30, 200, 60), size=(40, 24), start_xy=(60, 40), velocity=(-10, 10)),))
    _lossless([a.path, b.path, a.path], root / "videos" / "aba.mp4")
    _lossless([a.path], root / "videos" / "a.mp4")
    output = root / "index"
    # Discovery on every keyframe: the random tiny tracker's masks are what "changed" would decide on,
    # and the checks below need both shapes of shot A found, whichever keyframe finds them.
    cfg = IndexConfig(source=str(root / "videos"), output=str(output), fps=2.0, max_objects=2, max_new_tokens=2,
                      object_frames=2, embedder="none", discovery="every")
    assert cfg.reid_threshold == TINY_THRESHOLD
    with contextlib.redirect_stderr(io.StringIO()):
        summary = run_index(cfg)
    def rows(table: str) -> list[dict]:
        return read_visible(str(output), table).to_pylist()

    videos = {Path(r["uri"]).name: r["video_id"] for r in rows("videos")}
    tracklets = [r for r in rows("tracklets") if r["video_id"] == videos["aba.mp4"]]
    return {"output": output, "summary": summary, "videos": videos, "tracklets": tracklets,
            "objects": [r for r in rows("objects") if r["video_id"] == videos["aba.mp4"]]}


def _shot(row: dict) -> int:
    return int(row["first_ts"] // SHOT_S)


def test_the_third_shot_gets_the_first_shots_ids_and_b_its_own(aba):
    assert aba["summary"].videos_ok == 2
    by_shot: dict[int, set[int]] = {}
    for row in aba["tracklets"]:
        by_shot.setdefault(_shot(row), set()).add(row["object_id"])
    assert set(by_shot) == {0, 1, 2}, aba["tracklets"]
    assert by_shot[2] == by_shot[0]
    assert not by_shot[1] & by_shot[0]
    for row in aba["tracklets"]:
        assert row["dim"] == len(row["vector"]) > 0
        if _shot(row) == 2:  # merged into shot 1's object: its own track id, the score that merged it
            assert row["track_id"] != row["object_id"] and row["reid_score"] >= TINY_THRESHOLD
        else:
            assert row["track_id"] == row["object_id"] and row["reid_score"] is None
    assert {o["object_id"] for o in aba["objects"]} == by_shot[0] | by_shot[1]


def test_objects_visible_together_keep_two_ids(aba):
    first = [r for r in aba["tracklets"] if _shot(r) == 0]
    assert len(first) == len({r["object_id"] for r in first}) >= 2


def test_similar_to_ranks_the_same_object_in_another_video_first(aba, capsys):
    obj = min(r["object_id"] for r in aba["tracklets"] if _shot(r) == 0)
    code = main(["query", str(aba["output"]), "--similar-to", f"{aba['videos']['aba.mp4']}:{obj}", "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0, out
    import json

    rows = json.loads(out)
    assert rows[0]["video_id"] == aba["videos"]["a.mp4"] and rows[0]["similarity"] > 0.999
    assert all((r["video_id"], r["object_id"]) != (aba["videos"]["aba.mp4"], obj) for r in rows)


def test_similar_to_an_unknown_object_exits_2(aba, capsys):
    assert main(["query", str(aba["output"]), "--similar-to", f"{aba['videos']['aba.mp4']}:999"]) == 2
    assert "999" in capsys.readouterr().err
