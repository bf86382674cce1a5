"""A small committed index, written the way the index job lays it out, locally and on loopback S3.

Layout: OUTPUT/<table>/run_id=<run>/part-00000.parquet, plus junk under OUTPUT/_staging/ that no
query may ever see. Source videos are real H.264 files from pipeline.samples with known masks, and
the `objects` rows are built from those ground-truth masks (COCO RLE), so a report's overlays can
be checked pixel by pixel.

The index holds:
- video "a" indexed by three runs: RUN1 (ok, model tiny), RUN2 (ok, newer, model tiny-b) and RUN3
  (newest, failed). The default view of "a" must be RUN2.
- video "b" indexed once (RUN1, ok); video "c" failed in RUN1 (its file never existed).
RUN1's id is all digits, which is what makes DuckDB guess a numeric hive partition type.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import shutil
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from pipeline.samples import GroundTruth, Shape, make_video
from schemas.tables import to_table

RUN1, RUN2, RUN3 = "1700000000", "run-2024-02", "run-2024-03"
STAGED_RUN = "run-2024-04"
BUCKET = "pixelrefer-test"

SHAPES_B = (
    Shape(color=(30, 200, 60), size=(24, 40), start_xy=(100, 80), velocity=(-25, 0)),
    Shape(color=(200, 40, 200), size=(26, 26), start_xy=(20, 20), velocity=(10, 10), kind="ellipse"),
)

CAPTIONS = {
    (RUN1, "a"): {
        1: "a red truck driving to the right",
        2: "a blue ball rolling to the left",
        3: "a small yellow box that appears after one second",
    },
    (RUN2, "a"): {
        1: "a red truck with a red cabin moving right",
        2: "a blue sphere moving left",
        3: "a yellow square falling slowly",
    },
    (RUN1, "b"): {1: "a green car parked by the road", 2: "a purple ball bouncing"},
}
QA = {
    (RUN1, "a"): [([1], "What vehicle is this?", "a red truck"), ([2, 3], "Do they touch?", "no")],
    (RUN2, "a"): [
        ([1], "What color is the truck?", "red"),
        ([1, 2], "Which one is faster?", "the red truck is faster than the blue ball"),
    ],
    (RUN1, "b"): [([1], "What is it?", "a green car"), ([], "Is it daytime?", "yes")],
}


@dataclasses.dataclass
class IndexInfo:
    """What a test needs to know about an index it did not build itself."""

    output: str
    storage_options: dict[str, Any] | None
    uris: dict[str, str]
    video_ids: dict[str, str]
    truths: dict[str, GroundTruth]
    fs: Any
    root: str  # path inside fs

    def cli(self) -> list[str]:
        """OUTPUT plus --storage-options, ready for argv."""
        import json

        args = [self.output]
        if self.storage_options:
            args += ["--storage-options", json.dumps(self.storage_options)]
        return args


def video_id_for(uri: str) -> str:
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def rle_of(mask: np.ndarray) -> dict[str, Any]:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def bbox_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def sampled_times(truth: GroundTruth) -> list[float]:
    """Every second decoded frame, like an index run at half the frame rate."""
    return truth.timestamps[::2]


def object_rows(truth: GroundTruth, video_id: str, run_id: str) -> list[dict[str, Any]]:
    """One row per shape, object_id = shape index + 1, frames from the ground-truth masks."""
    rows = []
    for i in range(len(truth.shapes)):
        frames = []
        for t in sampled_times(truth):
            mask = truth.mask(i, t)
            if mask is None:
                continue
            frames.append(
                {"frame_index": truth.timestamps.index(t), "ts": t, "bbox": bbox_of(mask),
                 "area": int(mask.sum()), "score": 0.9, "rle": rle_of(mask)}
            )  # fmt: skip
        rows.append(
            {"video_id": video_id, "object_id": i + 1, "source": "auto", "first_ts": frames[0]["ts"],
             "last_ts": frames[-1]["ts"], "frames": frames, "run_id": run_id}
        )  # fmt: skip
    return rows


def video_row(name: str, uri: str, run_id: str, truth: GroundTruth | None, when: dt.datetime, model: str,
              status: str = "ok", error: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "video_id": video_id_for(uri), "uri": uri, "size_bytes": 1000, "etag": f"etag-{name}",
        "duration_s": truth.timestamps[-1] + 0.1 if truth else None, "fps": 10.0 if truth else None,
        "width": truth.width if truth else None, "height": truth.height if truth else None,
        "num_frames": len(truth.timestamps) if truth else None,
        "sampled_ts": sampled_times(truth) if truth else [], "status": status, "error": error,
        "model": model, "tracker": "tiny", "run_id": run_id, "indexed_at": when,
    }  # fmt: skip


def caption_rows(run_id: str, name: str, video_id: str, truth: GroundTruth, model: str) -> list[dict[str, Any]]:
    rows = []
    for object_id, text in CAPTIONS.get((run_id, name), {}).items():
        obj = [t for t in sampled_times(truth) if truth.mask(object_id - 1, t) is not None]
        rows.append(
            {"video_id": video_id, "object_id": object_id, "ts_start": obj[0], "ts_end": obj[-1], "caption": text,
             "mode": "lite", "model": model, "num_tokens": len(text.split()), "run_id": run_id}
        )  # fmt: skip
    return rows


def qa_rows(run_id: str, name: str, video_id: str, model: str) -> list[dict[str, Any]]:
    return [
        {"video_id": video_id, "object_ids": ids, "question": q, "answer": a, "mode": "lite", "model": model,
         "run_id": run_id}
        for ids, q, a in QA.get((run_id, name), [])
    ]  # fmt: skip


def index_tables(uris: dict[str, str], truths: dict[str, GroundTruth]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{run_id: {table: rows}} for the whole index described in the module docstring."""
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        r: {"videos": [], "objects": [], "captions": [], "qa": [], "runs": []} for r in (RUN1, RUN2, RUN3)
    }
    plan = [(RUN1, "a", "tiny", t0), (RUN1, "b", "tiny", t0), (RUN2, "a", "tiny-b", t0 + dt.timedelta(days=31))]
    for run_id, name, model, when in plan:
        vid = video_id_for(uris[name])
        runs[run_id]["videos"].append(video_row(name, uris[name], run_id, truths[name], when, model))
        runs[run_id]["objects"] += object_rows(truths[name], vid, run_id)
        runs[run_id]["captions"] += caption_rows(run_id, name, vid, truths[name], model)
        runs[run_id]["qa"] += qa_rows(run_id, name, vid, model)
    runs[RUN1]["videos"].append(
        video_row("c", uris["c"], RUN1, None, t0, "tiny", status="failed", error="moov atom not found")
    )
    runs[RUN3]["videos"].append(
        video_row("a", uris["a"], RUN3, truths["a"], t0 + dt.timedelta(days=60), "tiny-c", "failed", "out of memory")
    )
    return runs


def write_index(fs: Any, root: str, runs: dict[str, dict[str, list[dict[str, Any]]]], prefix: str = "") -> None:
    """Write each run's non-empty tables as OUTPUT/[prefix]<table>/run_id=<run>/part-00000.parquet."""
    for run_id, tables in runs.items():
        for name, rows in tables.items():
            if not rows:
                continue
            folder = f"{root}/{prefix}{name}/run_id={run_id}"
            fs.makedirs(folder, exist_ok=True)
            pq.write_table(to_table(name, rows), f"{folder}/part-00000.parquet", filesystem=fs)


def write_staging(fs: Any, root: str, truth: GroundTruth, uri: str) -> None:
    """An uncommitted run (newer than all): visible to nobody. Two plausible staging layouts."""
    when = dt.datetime(2024, 4, 1, tzinfo=dt.timezone.utc)
    staged = {STAGED_RUN: {
        "videos": [video_row("staged", uri + "#staged", STAGED_RUN, truth, when, "staged-model")],
        "objects": object_rows(truth, video_id_for(uri + "#staged"), STAGED_RUN),
        "captions": [], "qa": [],
    }}  # fmt: skip
    write_index(fs, root, staged, prefix=f"_staging/{STAGED_RUN}/")
    write_index(fs, f"{root}/_staging", staged)


def build_index(fs: Any, root: str, output: str, uris: dict[str, str], truths: dict[str, GroundTruth],
                storage_options: dict[str, Any] | None = None) -> IndexInfo:  # fmt: skip
    write_index(fs, root, index_tables(uris, truths))
    write_staging(fs, root, truths["a"], uris["a"])
    return IndexInfo(
        output=output, storage_options=storage_options, uris=uris,
        video_ids={k: video_id_for(v) for k, v in uris.items()}, truths=truths, fs=fs, root=root,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data() -> types.SimpleNamespace:
    """This module's constants and builders, for tests (importing a conftest is ambiguous in pytest)."""
    return types.SimpleNamespace(
        RUN1=RUN1, RUN2=RUN2, RUN3=RUN3, STAGED_RUN=STAGED_RUN, CAPTIONS=CAPTIONS, QA=QA,
        index_tables=index_tables, write_index=write_index, local_index_at=local_index_at,
    )  # fmt: skip


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GroundTruth]:
    folder = tmp_path_factory.mktemp("sources")
    return {
        "a": make_video(folder / "a.mp4", duration_s=2.0, seed=1),
        "b": make_video(folder / "b.mp4", duration_s=2.0, seed=2, shapes=SHAPES_B),
    }


def local_index_at(folder: Path, sample_videos: dict[str, GroundTruth], copy_sources: bool = False) -> IndexInfo:
    """A local index in `folder`; with copy_sources the videos are private copies (tests delete them)."""
    import fsspec

    truths = dict(sample_videos)
    if copy_sources:
        (folder / "src").mkdir(parents=True)
        for name, truth in sample_videos.items():
            shutil.copy(truth.path, folder / "src" / f"{name}.mp4")
            truths[name] = dataclasses.replace(truth, path=str(folder / "src" / f"{name}.mp4"))
    uris = {
        "a": os.path.abspath(truths["a"].path),  # a plain path ...
        "b": "file://" + os.path.abspath(truths["b"].path),  # ... and a file:// URL: both occur
        "c": os.path.abspath(str(folder / "src" / "c-never-existed.mp4")),
    }
    root = str(folder / "index")
    return build_index(fsspec.filesystem("file"), root, root, uris, truths)


@pytest.fixture(scope="session")
def local_index(tmp_path_factory: pytest.TempPathFactory, sample_videos: dict[str, GroundTruth]) -> IndexInfo:
    return local_index_at(tmp_path_factory.mktemp("local"), sample_videos)


@pytest.fixture
def private_local_index(tmp_path: Path, sample_videos: dict[str, GroundTruth]) -> IndexInfo:
    """A local index (and source copies) that the test may damage."""
    return local_index_at(tmp_path, sample_videos, copy_sources=True)


@pytest.fixture(scope="session")
def s3_storage_options(s3_endpoint: str) -> dict[str, Any]:
    import boto3

    boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)  # fmt: skip
    return {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint,
            "client_kwargs": {"region_name": "us-east-1"}}  # fmt: skip


@pytest.fixture(scope="session")
def s3_index(s3_storage_options: dict[str, Any], sample_videos: dict[str, GroundTruth]) -> IndexInfo:
    """The same index on S3, sources on S3 too (their uris are s3:// URLs)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    uris = {}
    for name, truth in sample_videos.items():
        fs.put(truth.path, f"{BUCKET}/src/{name}.mp4")
        uris[name] = f"s3://{BUCKET}/src/{name}.mp4"
    uris["c"] = f"s3://{BUCKET}/src/c-never-existed.mp4"
    root = f"{BUCKET}/index"
    return build_index(fs, root, f"s3://{root}", uris, sample_videos, storage_options=s3_storage_options)


@pytest.fixture(params=["local", "s3"])
def index(request: pytest.FixtureRequest) -> IndexInfo:
    """Each query test runs on both storages."""
    return request.getfixturevalue(f"{request.param}_index")


@pytest.fixture
def run_query(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `pixelrefer query` through its argparse options; returns (exit code, stdout, stderr)."""
    from jobs.query import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
