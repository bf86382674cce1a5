"""End to end with a SAM 3 tracker: `--find` concepts become labelled objects that keep their id and
label across clips, and `query --label` finds them; SAM 2 objects get PixelRefer's category.

The video is test-made (moving shapes, 40 s at 1 fps in 10-s windows: 4 clips) and the models are
the real tiny ones on local Ray (`tiny-sam3`, `tiny`). Random weights decide what the labels of
SAM 2 objects say, so that test checks their form, not their words.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from jobs.cli import main
from pipeline.samples import make_long_video
from test_long_video import rows

CONCEPTS = ("person", "car")


def _index(root: Path, *extra: str) -> tuple[int, str, Path]:
    output = root / "index"
    argv = ["index", str(root / "videos"), str(output), "--fps", "1", "--cuts", "none", "--clip-seconds", "10",
            "--max-new-tokens", "4", "--object-frames", "2", "--max-objects", "2", *extra]
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        code = main(argv)
    return code, log.getvalue(), output


@pytest.fixture(scope="module")
def concept_run(tmp_path_factory, ray_local) -> dict:
    root = tmp_path_factory.mktemp("concepts")
    (root / "videos").mkdir()
    make_long_video(root / "videos" / "street.mp4", 40.0, segment_s=20.0, width=160, height=120, fps=5.0)
    code, log, output = _index(root, "--tracker", "tiny-sam3", "--find", ", ".join(CONCEPTS))
    return {"code": code, "log": log, "output": output}


def test_concepts_become_labelled_objects_that_keep_their_id(concept_run):
    assert concept_run["code"] == 0, concept_run["log"]
    out = concept_run["output"]
    objects = rows(out, "SELECT object_id, source, label, num_frames FROM objects ORDER BY object_id")
    assert objects and all(o["source"] == "concept" and o["label"] in CONCEPTS for o in objects), objects
    assert {o["label"] for o in objects} == set(CONCEPTS)  # tiny-sam3 finds every concept it is given
    clips = rows(out, "SELECT count(*) AS n FROM clips WHERE status = 'ok'")[0]["n"]
    assert clips == 4
    # Every object's masks carry the label's object id in each clip it is seen in; the tracker
    # labels per clip, so an id spanning clips shows that linking kept one label for it.
    spans = rows(out, "SELECT m.object_id, count(DISTINCT m.clip_index) AS clips, o.label FROM masks m "
                      "JOIN objects o USING (video_id, object_id) GROUP BY ALL")
    assert all(s["label"] in CONCEPTS for s in spans)
    assert max(s["clips"] for s in spans) >= 2, spans  # linked across a window boundary (all 4, when measured)
    videos = rows(out, "SELECT tracker, status FROM videos")
    assert videos == [{"tracker": "tiny-sam3", "status": "ok"}]


def test_query_label_lists_the_objects_of_a_concept(concept_run, capsys):
    out = concept_run["output"]
    for concept in CONCEPTS:
        capsys.readouterr()
        assert main(["query", str(out), "--label", concept.upper(), "--format", "json"]) == 0
        found = json.loads(capsys.readouterr().out)
        want = rows(out, f"SELECT object_id FROM objects WHERE label = '{concept}'")
        assert sorted(r["object_id"] for r in found) == sorted(w["object_id"] for w in want) and found
        assert all(r["label"] == concept and r["first_ts"] is not None for r in found)


def test_sam2_objects_get_a_category_label(tmp_path, ray_local):
    (tmp_path / "videos").mkdir()
    make_long_video(tmp_path / "videos" / "yard.mp4", 20.0, segment_s=20.0, width=160, height=120, fps=5.0)
    code, log, out = _index(tmp_path)
    assert code == 0, log
    objects = rows(out, "SELECT source, label FROM objects")
    assert objects and all(o["source"] == "auto" for o in objects)
    # Tiny answers are random words; whatever they are, labels are normalised noun phrases.
    for o in objects:
        assert o["label"] is None or re.fullmatch(r"[a-z0-9\- ]{1,80}", o["label"]) and len(o["label"].split()) <= 3


def test_find_with_sam2_and_conflicting_concepts_are_usage_errors(tmp_path, ray_local):
    (tmp_path / "videos").mkdir()
    code, log, _ = _index(tmp_path, "--find", "person")
    assert code == 2 and "needs a SAM 3 tracker" in log and "Traceback" not in log
    make_long_video(tmp_path / "videos" / "a.mp4", 4.0, segment_s=4.0, width=64, height=48, fps=5.0)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.mp4": {"concepts": ["dog"]}}))
    code, log, _ = _index(tmp_path, "--tracker", "tiny-sam3", "--find", "person", "--prompts", str(prompts))
    assert code != 0 and "a.mp4" in log and "one place only" in log and "Traceback" not in log


def test_a_concept_over_the_text_budget_is_refused_before_any_video_work(tmp_path, ray_local):
    (tmp_path / "videos").mkdir()
    make_long_video(tmp_path / "videos" / "a.mp4", 4.0, segment_s=4.0, width=64, height=48, fps=5.0)
    long = " ".join(["red"] * 40)
    code, log, out = _index(tmp_path, "--tracker", "tiny-sam3", "--find", f"person, {long}")
    assert code != 0 and "tokens long" in log and "red red" in log and "Traceback" not in log
    assert not (out / "videos").exists()
