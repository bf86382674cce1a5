"""Bad input on object storage: wrong credentials, missing buckets, refused writes, throttling,
connections cut mid-upload, and object keys that could escape OUTPUT.

Everything runs against the real moto S3 server on loopback (`s3_endpoint`), directly or through
`FaultProxy` (tests/s3_faults.py), which answers as S3 or a bad network would. Wrong credentials
use moto's own authentication (switched on for the duration of a test through moto's
``/moto-api/reset-auth``), so the errors are those the real client code receives.

Only two tests run the whole graph (Ray, tiny models); the others fail before anything is
processed, or test the writer directly.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest
import requests

from jobs.cli import main
from pipeline.samples import DEFAULT_SHAPES, make_video
from pipeline.sink import COMMIT_MARKER, OutputError, RunWriter, read_table, recover
from pipeline.sources import list_videos
from pipeline.storage_errors import classify, redact
from s3_faults import FaultProxy

TABLES = ("videos", "objects", "captions", "qa", "runs")
FAST = ["--num-frames", "2", "--max-new-tokens", "4", "--max-objects", "2"]
#: Source keys that break naive path handling: a space, non-ASCII, a '..' segment, a leading '/'.
ODD_KEYS = ("a b.mp4", "vidéo/ü.mp4", "x/../y.mp4", "/lead.mp4")
WRONG_KEY, WRONG_SECRET = "AKIAWRONGKEY00000000", "wrong-Secret-9f3kQz"


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1")


def _keys(endpoint: str, bucket: str) -> list[str]:
    pages = _client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _options(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"}, **extra}


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def _assert_clean_error(stderr: str, *needles: str) -> None:
    """One readable line per problem: no stack trace, no credentials."""
    assert "Traceback" not in stderr and "botocore.exceptions" not in stderr, stderr
    for secret in (WRONG_KEY, WRONG_SECRET):
        assert secret not in stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)


def _nothing_committed(output: str, options: dict | None = None) -> None:
    for table in TABLES:
        assert read_table(output, table, options).num_rows == 0, table


@contextlib.contextmanager
def moto_auth(endpoint: str) -> Iterator[None]:
    """Make moto check every request's signature (its default is to accept anything)."""
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        yield
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_endpoint) as fault_proxy:
        yield fault_proxy


def _video(path: Path, seed: int) -> bytes:
    make_video(path, shapes=DEFAULT_SHAPES[:1], duration_s=0.6 + 0.2 * seed, seed=seed)
    return path.read_bytes()


# ------------------------------------------------------------------------------------------------
# Failures before anything is processed: credentials, buckets, refused writes
# ------------------------------------------------------------------------------------------------


def test_wrong_credentials_are_a_clear_error_and_nothing_is_published(s3_endpoint, s3_bucket, tmp_path, capsys):
    bucket, _ = s3_bucket
    _client(s3_endpoint).put_object(Bucket=bucket, Key="in/a.mp4", Body=b"not read")
    iam = boto3.client("iam", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                       region_name="us-east-1")
    user = f"u-{bucket}"[:64]
    iam.create_user(UserName=user)
    real_key = iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
    (tmp_path / "local").mkdir()
    unknown_key = json.dumps(_options(s3_endpoint, key=WRONG_KEY, secret=WRONG_SECRET))
    wrong_secret = json.dumps(_options(s3_endpoint, key=real_key, secret=WRONG_SECRET))
    local_out = tmp_path / "out"

    with moto_auth(s3_endpoint):
        # SOURCE on S3 with a key id the store does not know; OUTPUT a local folder
        code, err = _cli(capsys, "index", f"s3://{bucket}/in", str(local_out), "--storage-options", unknown_key, *FAST)
        assert code == 1
        _assert_clean_error(err, f"SOURCE 's3://{bucket}/in'", "credentials were rejected", "InvalidAccessKeyId")
        # OUTPUT on S3 with a known key id but the wrong secret; SOURCE a local folder
        code, err = _cli(capsys, "nightly", str(tmp_path / "local"), f"s3://{bucket}/index", "--storage-options",
                         wrong_secret, *FAST)
        assert code == 1
        _assert_clean_error(err, f"OUTPUT 's3://{bucket}/index'", "credentials were rejected", "SignatureDoesNotMatch")
        assert real_key not in err

    assert _keys(s3_endpoint, bucket) == ["in/a.mp4"]
    assert not local_out.exists() or not list(local_out.rglob("*.parquet"))


def test_missing_bucket_is_named_and_never_created(s3_endpoint, s3_bucket, tmp_path, capsys):
    _, options = s3_bucket
    missing = "no-such-bucket-7c1e"
    (tmp_path / "local").mkdir()
    storage = json.dumps(options)

    code, err = _cli(capsys, "index", f"s3://{missing}/in", str(tmp_path / "out"), "--storage-options", storage, *FAST)
    assert code == 1
    _assert_clean_error(err, f"SOURCE 's3://{missing}/in'", f"bucket '{missing}' does not exist")

    for output in (f"s3://{missing}/index", f"s3://{missing}"):
        code, err = _cli(capsys, "index", str(tmp_path / "local"), output, "--storage-options", storage, *FAST)
        assert code == 1
        _assert_clean_error(err, f"OUTPUT '{output}'", f"bucket '{missing}' does not exist")

    buckets = [b["Name"] for b in _client(s3_endpoint).list_buckets()["Buckets"]]
    assert missing not in buckets  # s3fs's makedirs would have created it


def test_denied_write_on_output_is_a_clear_error_and_nothing_is_published(s3_bucket, proxy, tmp_path, capsys):
    bucket, _ = s3_bucket
    (tmp_path / "local").mkdir()
    output = f"s3://{bucket}/index"
    options = _options(proxy.url)
    proxy.add("deny", methods=("PUT", "POST", "DELETE"), prefix=f"/{bucket}/index/")

    storage = json.dumps(options)
    code, err = _cli(capsys, "nightly", str(tmp_path / "local"), output, "--storage-options", storage, *FAST)
    assert code == 1
    _assert_clean_error(err, f"OUTPUT '{output}' is not writable", "access denied", "AccessDenied")
    assert proxy.injected("deny")
    assert _keys(proxy.url, bucket) == []
    _nothing_committed(output, options)


def _rows(writer: RunWriter, run_id: str) -> None:
    import datetime as dt

    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for i in range(3):
        video_id = f"v{i}"
        writer.add("videos", [{
            "video_id": video_id, "uri": f"s3://src/{video_id}.mp4", "size_bytes": 10, "etag": None,
            "duration_s": 1.0, "fps": 10.0, "width": 16, "height": 8, "num_frames": 10, "sampled_ts": [0.0],
            "status": "ok", "error": None, "model": "tiny-lite", "tracker": "tiny-sam2", "run_id": run_id,
            "indexed_at": now,
        }])
        writer.add("captions", [{"video_id": video_id, "object_id": 0, "ts_start": 0.0, "ts_end": 0.5,
                                 "caption": "a box", "mode": "lite", "model": "tiny-lite", "num_tokens": 2,
                                 "run_id": run_id}])
        writer.add("qa", [{"video_id": video_id, "object_ids": [0], "question": "what?", "answer": "a box",
                           "mode": "lite", "model": "tiny-lite", "run_id": run_id}])


def test_write_refused_half_way_through_publishing_is_taken_back(s3_bucket, proxy):
    """The rows of captions and qa are published before `videos` is refused: they are taken back."""
    bucket, _ = s3_bucket
    output, options = f"s3://{bucket}/out", _options(proxy.url)
    writer = RunWriter(output, "r1", options, rows_per_file=2)
    _rows(writer, "r1")
    proxy.add("deny", methods=("PUT", "POST"), prefix=f"/{bucket}/out/videos/")

    with pytest.raises(OutputError) as info:
        writer.commit()
    writer.abort()  # what run_index does when commit raises
    message = str(info.value)
    assert f"OUTPUT '{output}'" in message and "AccessDenied" in message
    assert "nothing of this run was published" in message
    published = {path.split("/")[3] for _, path, what in proxy.requests if what == "200" and "/run_id=r1/" in path}
    assert {"captions", "qa"} <= published  # the roll-back had work to do
    assert _keys(proxy.url, bucket) == []  # no parquet, no _COMMIT, no staging left
    _nothing_committed(output, options)

    proxy.clear()  # the next run goes through
    writer = RunWriter(output, "r2", options, rows_per_file=2)
    _rows(writer, "r2")
    assert writer.commit()["videos"] == 3
    assert read_table(output, "videos", options).num_rows == 3
    assert not any(key.endswith(COMMIT_MARKER) or "/_staging/" in key for key in _keys(proxy.url, bucket))


def test_a_publish_that_cannot_be_taken_back_is_finished_by_the_next_run(s3_bucket, proxy):
    """Writes to `videos` and all deletes refused: the published captions and qa cannot be taken
    back, so the commit marker must survive the writer's abort and `recover` completes the run."""
    bucket, _ = s3_bucket
    output, options = f"s3://{bucket}/out", _options(proxy.url)
    writer = RunWriter(output, "r1", options)
    _rows(writer, "r1")
    proxy.add("deny", methods=("PUT", "POST"), prefix=f"/{bucket}/out/videos/")
    proxy.add("deny", methods=("DELETE",), prefix=f"/{bucket}/")
    proxy.add("deny", methods=("POST",), prefix=f"/{bucket}", suffix=f"/{bucket}")  # bulk delete: POST /bucket?delete

    with pytest.raises(OutputError, match="next run finishes publishing this run"):
        writer.commit()
    writer.abort()
    assert f"out/_staging/r1/{COMMIT_MARKER}" in _keys(proxy.url, bucket)
    assert read_table(output, "videos", options).num_rows == 0  # `videos` goes last: no video is visible

    proxy.clear()
    assert recover(output, options) == ["r1"]
    assert [read_table(output, t, options).num_rows for t in ("videos", "captions", "qa")] == [3, 3, 3]
    assert not any("/_staging/" in key for key in _keys(proxy.url, bucket))


def test_an_interrupt_mid_publish_keeps_the_marker_through_abort(tmp_path, monkeypatch):
    """^C while publishing: `run_index` calls `abort`, which must not delete what `recover` needs."""
    import pipeline.sink as sink

    writer = RunWriter(str(tmp_path), "r1")
    _rows(writer, "r1")

    def interrupted(fs, staging, moves):
        src, dst = moves[0]
        fs.makedirs(os.path.dirname(dst), exist_ok=True)
        fs.mv(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(sink, "_publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.commit()
    writer.abort()
    monkeypatch.undo()
    assert (tmp_path / "_staging" / "r1" / COMMIT_MARKER).exists()
    assert recover(str(tmp_path)) == ["r1"]
    assert [read_table(str(tmp_path), t).num_rows for t in ("videos", "captions", "qa")] == [3, 3, 3]


def test_an_upload_that_keeps_failing_is_a_clear_error_and_the_next_run_commits(
    s3_bucket, proxy, tmp_path, capsys, monkeypatch
):
    import s3fs

    bucket, _ = s3_bucket
    (tmp_path / "local").mkdir()
    output = f"s3://{bucket}/index"
    # fewer retries than the defaults, so that giving up takes a second instead of a minute
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)
    options = _options(proxy.url, config_kwargs={"retries": {"mode": "standard", "max_attempts": 2}})
    cut = proxy.add("reset", methods=("PUT",), prefix=f"/{bucket}/index/_staging/", suffix=".parquet")
    argv = ["nightly", str(tmp_path / "local"), output, "--storage-options", json.dumps(options), *FAST]

    code, err = _cli(capsys, *argv)
    assert code == 1
    _assert_clean_error(err, f"OUTPUT '{output}'", "network error", "after retries")
    assert cut.fired >= 2  # retried before giving up
    assert _keys(proxy.url, bucket) == []
    _nothing_committed(output, options)

    proxy.clear()
    code, err = _cli(capsys, *argv)
    assert code == 0, err
    assert read_table(output, "runs", options).num_rows == 1


# ------------------------------------------------------------------------------------------------
# Whole runs: transient faults are retried; odd keys are indexed and never escape OUTPUT
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def odd_source(s3_endpoint, s3_bucket, tmp_path) -> tuple[str, dict[str, int]]:
    """A bucket whose videos have the keys in `ODD_KEYS` (and no object named plain ``y.mp4``)."""
    bucket, _ = s3_bucket
    client = _client(s3_endpoint)
    sizes = {}
    for seed, key in enumerate(ODD_KEYS):
        data = _video(tmp_path / f"src{seed}.mp4", seed)
        client.put_object(Bucket=bucket, Key=key, Body=data)
        sizes[key] = len(data)
    assert sorted(_keys(s3_endpoint, bucket)) == sorted(ODD_KEYS)
    return bucket, sizes


def test_throttling_and_cut_connections_are_retried_and_odd_keys_stay_inside_output(
    ray_local, odd_source, proxy, capsys
):
    from jobs.query_sql import open_index

    bucket, sizes = odd_source
    prefix = "index dir/ü"
    output, options = f"s3://{bucket}/{prefix}", _options(proxy.url)
    out = f"/{bucket}/{prefix}/"
    faults = [
        proxy.add("slowdown", methods=("PUT",), prefix=out, times=3),  # the first writes (write probe)
        proxy.add("reset", methods=("PUT",), prefix=out + "_staging/", suffix=".parquet", times=2),  # mid-upload
        proxy.add("drop_response", methods=("PUT",), prefix=out + "videos/", times=1),  # publish copy, answer lost
        proxy.add("slowdown", methods=("DELETE",), prefix=out, times=1),
        proxy.add("slowdown", methods=("GET",), suffix=".mp4", times=2),  # the decoder's download
    ]

    code, err = _cli(capsys, "index", f"s3://{bucket}", output, "--storage-options", json.dumps(options), *FAST)
    assert code == 0, err
    assert [fault.fired for fault in faults] == [fault.times for fault in faults], proxy.injected()

    videos = {row["uri"]: row for row in read_table(output, "videos", options).to_pylist()}
    expected = {f"s3://{bucket}/{key}" for key in ODD_KEYS}  # "/lead.mp4" -> s3://bucket//lead.mp4
    assert set(videos) == expected
    for key in ODD_KEYS:
        row = videos[f"s3://{bucket}/{key}"]
        assert row["status"] == "ok", (key, row["error"])
        assert row["size_bytes"] == sizes[key]  # its own object, not a normalised neighbour
    (run,) = read_table(output, "runs", options).to_pylist()
    assert run["videos_ok"] == len(ODD_KEYS) and run["objects"] == read_table(output, "objects", options).num_rows
    assert read_table(output, "captions", options).num_rows == run["captions"] > 0

    written = [key for key in _keys(proxy.url, bucket) if key not in ODD_KEYS]
    assert written and all(key.startswith(prefix + "/") for key in written), written
    assert not any("/_staging/" in key for key in written)
    with open_index(output, storage_options=options) as index:  # DuckDB sees exactly the committed rows
        assert index.sql("SELECT count(*) AS n FROM videos").column("n").to_pylist() == [len(ODD_KEYS)]


def test_odd_keys_never_escape_a_local_output(ray_local, odd_source, s3_endpoint, tmp_path, capsys):
    bucket, _ = odd_source
    before = {p for p in tmp_path.rglob("*")}
    output = tmp_path / "index out"

    code, err = _cli(capsys, "index", f"s3://{bucket}", str(output), "--storage-options",
                     json.dumps(_options(s3_endpoint)), *FAST)
    assert code == 0, err
    assert read_table(str(output), "videos").num_rows == len(ODD_KEYS)
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p == output or output in p.parents for p in new), sorted(map(str, new))
    assert sorted(_keys(s3_endpoint, bucket)) == sorted(ODD_KEYS)  # the source is only read


# ------------------------------------------------------------------------------------------------
# Small pieces
# ------------------------------------------------------------------------------------------------


def test_listing_keeps_keys_with_dot_segments_and_leading_slashes(s3_endpoint, s3_bucket):
    bucket, options = s3_bucket
    client = _client(s3_endpoint)
    for key in (*ODD_KEYS, "x/./z.mp4", "in/.hidden/h.mp4", "._apple.mp4"):
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    uris = [v.uri for v in list_videos(f"s3://{bucket}", options)]
    assert sorted(uris) == sorted(f"s3://{bucket}/{key}" for key in (*ODD_KEYS, "x/./z.mp4"))


def test_output_prefixes_and_run_ids_that_could_escape_are_refused(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    for output in (f"s3://{bucket}/a/../b", f"s3://{bucket}//b", f"s3://{bucket}/a/./b"):
        with pytest.raises(OutputError, match="segment"):
            RunWriter(output, "r1", options)
    for run_id in ("../r1", "a/b", "", ".."):
        with pytest.raises(OutputError, match="invalid run id"):
            RunWriter(str(tmp_path / "out"), run_id)
    assert sorted(os.listdir(tmp_path)) == []
    assert _keys(options["endpoint_url"], bucket) == []


def test_messages_never_carry_credentials():
    options = {"key": WRONG_KEY, "secret": WRONG_SECRET, "client_kwargs": {"aws_session_token": "tok-123456"}}
    text = (f"failed s3://{WRONG_KEY}:{WRONG_SECRET}@bucket/x?X-Amz-Signature=abc123&X-Amz-Credential=AKIA/x "
            f"with {WRONG_SECRET} and tok-123456")
    clean = redact(text, options)
    for secret in (WRONG_KEY, WRONG_SECRET, "tok-123456", "abc123", "AKIA/x"):
        assert secret not in clean
    assert "bucket/x" in clean


def test_error_classification_follows_the_store_code():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> OSError:
        cause = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                            "PutObject")
        err = PermissionError("m") if status == 403 else OSError(5, "m")
        err.__cause__ = cause
        return err

    assert classify(client_error("InvalidAccessKeyId", 403)).kind == "credentials"
    assert classify(client_error("AccessDenied", 403)).kind == "denied"
    assert classify(client_error("NoSuchBucket", 404)).kind == "no_bucket"
    assert classify(client_error("InternalError", 500)).kind == "server"
    slow = classify(client_error("SlowDown", 503))
    assert slow.kind == "throttled" and slow.transient
    net = classify(EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k"))
    assert net.kind == "network" and net.transient
