"""Search by meaning: `pixelrefer embed` backfills vectors, `pixelrefer query --like` ranks with them.

The index is written here, as an index run lays it out (the project's schemas and the conftest's
writer), with a handful of everyday scenes and no embeddings, as `--embedder none` leaves it. The
real WordLlama weights embed it; the queries are paraphrases sharing no word with the caption they
should find, so only the meaning can find it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from jobs.cli import main as cli_main
from jobs.query_like import RRF_K
from models.embedders import WORDLLAMA_NAME
from pipeline.search.embeddings import RunEmbedder, text_rows
from pipeline.store import TableStore
from pipeline.store.commit import visible_rows

from index_builders import write_index

RUN = "run-scenes"
T0 = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)
# video -> [(object_id, label, clip_index or None for the whole track, caption)]
SCENES: dict[str, list[tuple[int, str, int | None, str]]] = {
    "street": [
        (1, "person", 0, "a man carrying a ladder across the street"),
        (1, "person", 1, "the man leans the ladder against a brick wall"),
        (1, "person", None, "a worker with a ladder walking past shops"),
        (2, "car", 0, "a red car waiting at the traffic light"),
    ],
    "park": [
        (1, "dog", 0, "a dog running on the grass after a ball"),
        (2, "person", 0, "a woman riding a bicycle along the path"),
        (3, "person", 1, "a child eating an ice cream on a bench"),
    ],
    "home": [
        (1, "cat", 0, "a cat sleeping on the sofa"),
        (2, "person", 1, "an old man reading a newspaper by the window"),
    ],
}
# video -> [(object_ids, question, answer, clip_index)]
ANSWERS = {
    "park": [([2], "What is <region> doing?", "cycling to work", 0)],
    "home": [([1, 2], "Where are they?", "together in the living room", None)],
}
# A paraphrase sharing no word with its caption (nor with any other text or label) -> the object it must find.
PARAPHRASES = {
    "someone hauling a stepladder": ("street", 1),
    "puppy sprinting": ("park", 1),
    "kitten napping on a couch": ("home", 1),
    "automobile stopped at the signal": ("street", 2),
    "lady pedalling a bike": ("park", 2),
}


def read_table(output: Path, table: str) -> Any:
    """Every row of one Delta table of OUTPUT (committed or not: what the files hold)."""
    return TableStore(str(output)).read(table)


def video_id(name: str) -> str:
    return f"vid-{name}"


def scene_tables() -> dict[str, list[dict[str, Any]]]:
    """Every table of one committed run over the three scenes (two 5-s clips each)."""
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in
                                               ("videos", "clips", "objects", "masks", "captions", "qa", "runs")}
    base = lambda name: {"video_id": video_id(name), "run_id": RUN}  # noqa: E731
    for name, captions in SCENES.items():
        tables["videos"].append({
            **base(name), "uri": f"/videos/{name}.mp4", "size_bytes": 1000, "etag": name, "duration_s": 10.0,
            "fps": 25.0, "width": 64, "height": 48, "num_frames": 250, "sampled_ts": [0.0, 5.0], "sampled_fps": 0.2,
            "clips": 2, "status": "ok", "error": None, "model": "tiny-lite", "tracker": "tiny-sam2", "indexed_at": T0,
        })
        for clip in (0, 1):
            tables["clips"].append({**base(name), "clip_index": clip, "ts_start": 5.0 * clip, "ts_end": 5.0 * clip + 5,
                                    "boundary": "window" if clip == 0 else "end", "num_sampled": 1, "status": "ok",
                                    "error": None})
        for object_id, label in sorted({(o, label) for o, label, _, _ in captions}):
            tables["objects"].append({**base(name), "object_id": object_id, "source": "auto", "label": label,
                                      "first_ts": 0.0, "last_ts": 5.0, "num_frames": 2})
        for object_id, _, clip, text in captions:
            start = 0.0 if clip is None else 5.0 * clip
            tables["captions"].append({**base(name), "object_id": object_id, "clip_index": clip, "ts_start": start,
                                       "ts_end": start + (10.0 if clip is None else 4.0), "caption": text,
                                       "mode": "lite", "model": "tiny-lite", "num_tokens": len(text.split())})
        for ids, question, answer, clip in ANSWERS.get(name, []):
            start = 0.0 if clip is None else 5.0 * clip
            tables["qa"].append({**base(name), "object_ids": ids, "clip_index": clip, "ts_start": start,
                                 "ts_end": start + 5.0, "question": question, "answer": answer, "mode": "lite",
                                 "model": "tiny-lite"})
    tables["runs"].append({
        "run_id": RUN, "commit_index": 0, "command": "index", "source": "/videos", "model": "tiny-lite",
        "tracker": "tiny-sam2", "mode": "lite", "started_at": T0, "ended_at": T0, "status": "committed",
        "videos_listed": 3, "videos_skipped": 0, "videos_ok": 3, "videos_failed": 0, "videos_quarantined": 0,
        "clips": 6, "video_seconds": 30.0, "objects": len(tables["objects"]), "captions": len(tables["captions"]),
        "answers": len(tables["qa"]), "retry_video_ids": [],
    })
    return tables


@pytest.fixture(scope="module")
def bare_index(tmp_path_factory: pytest.TempPathFactory, data) -> Path:
    """The scenes index without embeddings (as `--embedder none` or an older pixelrefer left it)."""
    root = tmp_path_factory.mktemp("scenes") / "index"
    data.write_index(str(root), {RUN: scene_tables()})
    return root


def copy_of(index: Path, folder: Path) -> Path:
    target = folder / "index"
    shutil.copytree(index, target)
    return target


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def embedded_index(bare_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scenes index after `pixelrefer embed` (module-scoped: the tests below only read it)."""
    output = copy_of(bare_index, tmp_path_factory.mktemp("embedded"))
    assert cli_main(["embed", str(output)]) == 0
    return output


@pytest.fixture(params=["search-index", "exact"])
def like(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str], embedded_index: Path) -> Callable[..., Any]:
    """`pixelrefer query INDEX --like WORDS ... --format json`, parsed: through the search index that
    `embed` built, and ranking every vector (`--exact`); every --like test holds for both."""
    exact = ["--exact"] if request.param == "exact" else []

    def run(words: str, *options: str) -> list[dict[str, Any]]:
        code, out, err = run_cli(capsys, "query", str(embedded_index), "--like", words, "--format", "json",
                                 *options, *exact)
        assert code == 0, err
        assert err == "", err  # the search index is up to date: no note
        return json.loads(out)

    return run


# --------------------------------------------------------------------------------------------
# pixelrefer embed
# --------------------------------------------------------------------------------------------


def test_embed_backfills_every_caption_and_answer_once(bare_index: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    output = copy_of(bare_index, tmp_path)
    code, _, err = run_cli(capsys, "embed", str(output))
    assert code == 0, err
    assert "embedded 9 captions and 2 answers" in err
    rows = read_table(output, "embeddings").to_pylist()
    captions = read_table(output, "captions").to_pylist()
    assert len(rows) == len(captions) + 2
    assert {(r["embedder"], r["dim"], len(r["vector"])) for r in rows} == {(WORDLLAMA_NAME, 256, 256)}
    assert {r["text_run_id"] for r in rows} == {RUN}
    [run_id] = {r["run_id"] for r in rows}
    assert run_id != RUN  # the backfill is a run of its own ...
    runs = {r["run_id"]: r for r in read_table(output, "runs").to_pylist()}
    assert runs[run_id]["command"] == "embed" and runs[run_id]["model"] == WORDLLAMA_NAME  # ... with its runs row
    assert (runs[run_id]["captions"], runs[run_id]["answers"]) == (9, 2)
    by_text = {r["text"]: r for r in rows}
    assert by_text["cycling to work"]["kind"] == "answer" and by_text["cycling to work"]["object_ids"] == [2]
    assert by_text["a cat sleeping on the sofa"]["object_id"] == 1 and by_text["a cat sleeping on the sofa"]["object_ids"] is None
    assert visible_rows(TableStore(str(output)), "embeddings").num_rows == len(rows)  # committed: all visible
    code, out, err = run_cli(capsys, "query", str(output), "--format", "json")  # the run list shows it
    listed = {r["run_id"]: r for r in json.loads(out)}
    assert code == 0 and listed[run_id]["command"] == "embed" and listed[run_id]["videos_ok"] == 0, err
    assert listed[RUN]["command"] == "index" and listed[RUN]["videos_ok"] == 3

    code, _, err = run_cli(capsys, "embed", str(output))  # again: nothing is missing, nothing is added
    assert code == 0 and "nothing to embed" in err
    assert read_table(output, "embeddings").num_rows == len(rows)
    assert len(read_table(output, "runs").to_pylist()) == len(runs)


def test_embed_adds_only_what_is_missing(bare_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A later run without embeddings (or a partial backfill) gets vectors; the earlier ones stay."""
    output = copy_of(bare_index, tmp_path)
    assert run_cli(capsys, "embed", str(output))[0] == 0
    later = scene_tables()
    for table in later.values():
        for row in table:
            row["run_id"] = "run-later"
    later["videos"] = [v for v in later["videos"] if v["video_id"] == video_id("home")]
    later["captions"] = [c for c in later["captions"] if c["video_id"] == video_id("home")]
    later["captions"][0]["caption"] = "a grey cat asleep"
    later["qa"] = []
    write_index(str(output), {"run-later": later})
    code, _, err = run_cli(capsys, "embed", str(output))
    assert code == 0 and "embedded 2 captions and 0 answers" in err, err
    assert read_table(output, "embeddings").num_rows == 11 + 2


def test_embed_refuses_an_index_of_another_embedder(bare_index: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    output = other_embedder_index(bare_index, tmp_path)
    code, _, err = run_cli(capsys, "embed", str(output))
    assert code == 1 and "Traceback" not in err
    assert "other-embedder (4-d)" in err and WORDLLAMA_NAME in err and "one embedder" in err
    assert read_table(output, "embeddings").num_rows == 1  # nothing added


def test_embed_none_and_a_missing_index_are_refused(tmp_path: Path, bare_index: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "embed", str(bare_index), "--embedder", "none")
    assert code == 2 and "adds no embeddings" in err
    code, _, err = run_cli(capsys, "embed", str(tmp_path / "nowhere"))
    assert code == 1 and "Traceback" not in err


def test_a_run_with_embedder_none_embeds_nothing() -> None:
    captions = scene_tables()["captions"]
    assert RunEmbedder("none").table(captions, [], RUN) is None
    assert len(text_rows(captions + [{**captions[0], "caption": ""}], [])) == len(captions)  # empty text: no vector


def other_embedder_index(bare_index: Path, tmp_path: Path) -> Path:
    """The scenes index holding one committed vector of a made-up 4-d embedder."""
    output = copy_of(bare_index, tmp_path)
    row = {**text_rows(scene_tables()["captions"][:1], [])[0], "embedder": "other-embedder", "dim": 4,
           "vector": [0.5, 0.5, 0.5, 0.5], "run_id": "run-other"}
    run = {**scene_tables()["runs"][0], "run_id": "run-other", "command": "embed", "model": "other-embedder"}
    write_index(str(output), {"run-other": {"embeddings": [row], "runs": [run]}})
    return output


# --------------------------------------------------------------------------------------------
# pixelrefer query --like
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("words", sorted(PARAPHRASES))
def test_paraphrases_find_the_intended_object_first(like: Callable[..., Any], words: str) -> None:
    rows = like(words)
    want_video, want_object = PARAPHRASES[words]
    assert (rows[0]["video_id"], rows[0]["object_id"]) == (video_id(want_video), want_object), rows[:3]
    assert all(r["bm25"] is None for r in rows), "the paraphrase was meant to share no word with any text"


def test_rows_show_the_best_passage_and_the_fused_score(like: Callable[..., Any]) -> None:
    rows = like("a ladder", "--top", "3")
    assert len(rows) == 3
    top = rows[0]
    assert (top["video_id"], top["object_id"], top["label"], top["kind"]) == (video_id("street"), 1, "person", "caption")
    assert "ladder" in top["text"] and top["uri"] == "/videos/street.mp4" and top["run_id"] == RUN
    assert top["dense_rank"] == 1 and top["bm25_rank"] == 1  # found both ways: the word and the meaning
    for row in rows:
        expected = sum(1 / (RRF_K + row[k]) for k in ("dense_rank", "bm25_rank") if row[k] is not None)
        assert row["score"] == pytest.approx(expected)
        assert -1.0 <= row["similarity"] <= 1.0
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert list(top)[:7] == ["video_id", "object_id", "clip_index", "ts_start", "ts_end", "score", "text"]


def test_label_and_video_narrow_the_results(like: Callable[..., Any]) -> None:
    people = like("somebody outdoors", "--label", "person", "--top", "20")
    assert people and {r["label"] for r in people} == {"person"}
    assert {(r["video_id"], r["object_id"]) for r in people} == {
        (video_id("street"), 1), (video_id("park"), 2), (video_id("park"), 3), (video_id("home"), 2)}
    assert like("an animal resting", "--label", "cat")[0]["object_id"] == 1
    assert like("an animal resting", "--label", " Cat ") == like("an animal resting", "--label", "cat")  # as --label
    assert like("anything", "--label", "giraffe") == []
    home = like("a pet", "--video", video_id("home"), "--top", "20")
    assert {r["video_id"] for r in home} == {video_id("home")} and len(home) == 2
    assert like("a pet", "--video", "/videos/park.mp4")[0]["video_id"] == video_id("park")  # by uri too


def test_formats(capsys: pytest.CaptureFixture[str], embedded_index: Path) -> None:
    def query(fmt: str) -> str:
        code, out, err = run_cli(capsys, "query", str(embedded_index), "--like", "puppy sprinting", "--top", "4",
                                 "--format", fmt)
        assert code == 0, err
        return out

    document = json.loads(query("json"))
    assert isinstance(document, list) and len(document) == 4
    lines = [json.loads(line) for line in query("jsonl").splitlines()]
    assert lines == document
    table = list(csv.DictReader(io.StringIO(query("csv"))))
    assert [(r["video_id"], int(r["object_id"])) for r in table] == [(r["video_id"], r["object_id"]) for r in document]
    text = query("table")
    assert text.splitlines()[0].split()[:7] == ["video_id", "object_id", "clip_index", "ts_start", "ts_end", "score",
                                                "text"]
    assert "dog running" in text and "(4 rows)" in text


def test_bad_input_is_one_clear_line(capsys: pytest.CaptureFixture[str], bare_index: Path, embedded_index: Path,
                                     tmp_path: Path) -> None:
    def fails(code: int, *argv: str) -> str:
        got, out, err = run_cli(capsys, "query", *argv)
        assert got == code and out == "" and "Traceback" not in err, (got, err)
        return err

    assert "--like is empty" in fails(2, str(embedded_index), "--like", "  ")
    assert "--top must be at least 1" in fails(2, str(embedded_index), "--like", "dog", "--top", "0")
    assert "cannot be combined" in fails(2, str(embedded_index), "--like", "dog", "--text", "dog")
    assert "goes with --like" in fails(2, str(embedded_index), "--text", "dog", "--embedder", "wordllama")
    err = fails(1, str(bare_index), "--like", "a dog")
    assert "no caption embeddings" in err and f"pixelrefer embed {bare_index}" in err
    other = other_embedder_index(bare_index, tmp_path)
    assert "made by other-embedder (4-d)" in fails(2, str(other), "--like", "a dog")
    err = fails(2, str(other), "--like", "a dog", "--embedder", "wordllama")
    assert WORDLLAMA_NAME in err and "other-embedder (4-d)" in err and "the embedder that made them" in err
    assert "--exact goes with --like" in fails(2, str(embedded_index), "--text", "dog", "--exact")


def test_a_search_index_behind_the_tables_is_not_used_until_embed_updates_it(
        capsys: pytest.CaptureFixture[str], embedded_index: Path, tmp_path: Path) -> None:
    """A commit the search index has not seen (a run stopped before its last commit): --like ranks
    every vector, says so once on stderr, and `pixelrefer embed` brings the index up to date."""
    output = copy_of(embedded_index, tmp_path)
    runs = read_table(output, "runs").to_pylist()
    extra = {**runs[0], "run_id": "run-later", "commit_index": 0, "embeddings_version": None}
    write_index(str(output), {"run-later": {"runs": [extra]}})  # a commit that added no vector

    def like(*extra_args: str) -> tuple[list[dict[str, Any]], str]:
        code, out, err = run_cli(capsys, "query", str(output), "--like", "puppy sprinting", "--format", "json",
                                 *extra_args)
        assert code == 0, err
        return json.loads(out), err

    stale, err = like()
    assert "the search index is behind the tables by 1 commit(s)" in err and f"pixelrefer embed {output}" in err
    assert stale == like("--exact")[0]
    code, _, err = run_cli(capsys, "embed", str(output))
    assert code == 0 and "search index:" in err, err
    fresh, err = like()
    assert err == "" and fresh[0]["object_id"] == stale[0]["object_id"] == 1
    shutil.rmtree(output / "_search")  # derived: losing it loses nothing
    gone, err = like()
    assert "OUTPUT has no search index" in err and gone == stale  # ranked exactly again
