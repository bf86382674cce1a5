"""Fixtures of `tests/jobs`: the test indexes of `index_builders` (which says what they hold),
written locally and on the loopback S3, and a runner for `pixelrefer query`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import types
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from index_builders import (BUCKET, CAPTIONS, LABELS, LONG_CLIP_SECONDS, LONG_FAILED_CLIP, LONG_FIRST, LONG_OBJECTS,
                            LONG_RUN, LONG_SECONDS, LONG_ZEBRA, MISSED, QA, RUN1, RUN2, RUN3, SHAPES_B, STAGED_RUN,
                            IndexInfo, build_index, index_tables, long_tables, video_id_for, write_index)
from pipeline.samples import GroundTruth, Shape, make_video

@pytest.fixture(scope="session")
def long_index(tmp_path_factory: pytest.TempPathFactory) -> IndexInfo:
    """A local index of one 2-hour video (64x48, 1 fps, a keyframe every 30 s), built in a few seconds."""
    import fsspec

    folder = tmp_path_factory.mktemp("long")
    shape = Shape(color=(220, 40, 40), size=(10, 12), start_xy=(5, 20), velocity=(0.005, 0.0))
    truth = make_video(folder / "long.mp4", width=64, height=48, fps=1.0, duration_s=LONG_SECONDS, shapes=(shape,),
                       gop=30)  # fmt: skip
    uri = os.path.abspath(truth.path)
    root = str(folder / "index")
    fs = fsspec.filesystem("file")
    write_index(root, long_tables(uri, truth.width, truth.height))
    return IndexInfo(output=root, storage_options=None, uris={"long": uri}, video_ids={"long": video_id_for(uri)},
                     truths={"long": truth}, fs=fs, root=root)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data() -> types.SimpleNamespace:
    """This module's constants and builders, for tests (importing a conftest is ambiguous in pytest)."""
    return types.SimpleNamespace(
        RUN1=RUN1, RUN2=RUN2, RUN3=RUN3, STAGED_RUN=STAGED_RUN, CAPTIONS=CAPTIONS, QA=QA, MISSED=MISSED, LABELS=LABELS,
        index_tables=index_tables, write_index=write_index, local_index_at=local_index_at,
        LONG_SECONDS=LONG_SECONDS, LONG_CLIP_SECONDS=LONG_CLIP_SECONDS, LONG_OBJECTS=LONG_OBJECTS,
        LONG_FAILED_CLIP=LONG_FAILED_CLIP, LONG_FIRST=LONG_FIRST, LONG_RUN=LONG_RUN, LONG_ZEBRA=LONG_ZEBRA,
    )  # fmt: skip


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GroundTruth]:
    folder = tmp_path_factory.mktemp("sources")
    return {
        "a": make_video(folder / "a.mp4", duration_s=2.0, seed=1),
        "b": make_video(folder / "b.mp4", duration_s=2.0, seed=2, shapes=SHAPES_B),
    }


def local_index_at(folder: Path, sample_videos: dict[str, GroundTruth], copy_sources: bool = False,
                   pre_delta: bool = False) -> IndexInfo:  # fmt: skip
    """A local index in `folder`; with copy_sources the videos are private copies (tests delete them);
    with pre_delta it is in the layout before Delta tables (`pixelrefer migrate` converts it)."""
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
    return build_index(fsspec.filesystem("file"), root, root, uris, truths, pre_delta=pre_delta)


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
def pre_delta_index(request: pytest.FixtureRequest, tmp_path: Path, sample_videos: dict[str, GroundTruth]) -> IndexInfo:
    """The index in the layout before Delta tables, private to the test (migrate converts it in place),
    locally and on S3 (s3fs lists folders differently from the local fs)."""
    if request.param == "local":
        return local_index_at(tmp_path, sample_videos, pre_delta=True)
    s3 = request.getfixturevalue("s3_index")
    root = f"{BUCKET}/pre-delta-{uuid.uuid4().hex[:12]}"
    return build_index(s3.fs, root, f"s3://{root}", s3.uris, s3.truths, storage_options=s3.storage_options,
                       pre_delta=True)


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
