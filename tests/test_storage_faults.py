"""Bad input on object storage: wrong credentials, missing buckets, refused writes, throttling,
and object keys that could escape OUTPUT.

Everything runs against the real moto S3 server on loopback (`s3_endpoint`), directly or through
`ProcessFaultProxy` (tests/s3_faults.py), which answers as S3 or a bad network would. The proxy
runs in a process of its own: delta-rs holds the GIL through some calls, so a proxy thread in this
process could not relay the request such a call waits for. Wrong credentials use moto's own
authentication (switched on for the duration of a test through moto's ``/moto-api/reset-auth``),
so the errors are those the real client code receives.

On the Delta tables a commit is the `runs` append (`pipeline.store.commit`): the guarantee the old
layout's marker, publish and roll-back served is now "a failed commit leaves nothing visible",
tested here with the store refusing a table's writes. Nothing runs the whole graph: every test
fails before anything is processed, or drives the store directly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest
import requests

from jobs.cli import main
from pipeline.sources import list_videos
from pipeline.storage_errors import classify, redact
from pipeline.store import OutputError, TableStore
from pipeline.store.commit import RunWriter, visible_rows, visible_videos
from s3_faults import ProcessFaultProxy

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


def _nothing_visible(output: str, options: dict | None = None) -> None:
    store = TableStore(output, options)
    assert visible_videos(store).num_rows == 0
    for table in TABLES:
        if table not in ("videos", "runs"):
            assert visible_rows(store, table).num_rows == 0, table


@contextlib.contextmanager
def moto_auth(endpoint: str) -> Iterator[None]:
    """Make moto check every request's signature (its default is to accept anything)."""
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        yield
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[ProcessFaultProxy]:
    with ProcessFaultProxy(s3_endpoint) as fault_proxy:
        yield fault_proxy


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
    assert not local_out.exists() or not list(local_out.rglob("*.parquet"))  # nothing of a run was written


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
    _assert_clean_error(err, f"OUTPUT '{output}'", "AccessDenied")
    assert proxy.injected("deny")
    assert not any(key.endswith(".parquet") or "/runs/" in key for key in _keys(proxy.url, bucket))
    _nothing_visible(output, options)


def _commit(store: TableStore, run_id: str) -> RunWriter:
    """One commit of three videos with a caption and an answer each, `runs` last."""
    writer = RunWriter(store, run_id)
    for i in range(3):
        video_id = f"v{i}"
        writer.add("videos", [{
            "video_id": video_id, "uri": f"s3://src/{video_id}.mp4", "size_bytes": 10, "etag": None,
            "duration_s": 1.0, "fps": 10.0, "width": 16, "height": 8, "num_frames": 10, "sampled_ts": [0.0],
            "status": "ok", "error": None, "model": "tiny-lite", "tracker": "tiny-sam2", "run_id": run_id,
        }])
        writer.add("captions", [{"video_id": video_id, "object_id": 0, "ts_start": 0.0, "ts_end": 0.5,
                                 "caption": "a box", "mode": "lite", "model": "tiny-lite", "num_tokens": 2,
                                 "run_id": run_id}])
        writer.add("qa", [{"video_id": video_id, "object_ids": [0], "question": "what?", "answer": "a box",
                           "mode": "lite", "model": "tiny-lite", "run_id": run_id}])
    writer.add("runs", [{"run_id": run_id, "commit_index": 0, "command": "index", "model": "tiny-lite",
                         "tracker": "tiny-sam2", "status": "committed", "retry_video_ids": []}])
    writer.commit(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    return writer


@pytest.mark.parametrize("refused", ["videos", "runs"])
def test_refused_commit_shows_nothing(s3_bucket, proxy, refused):
    """On an OUTPUT with an earlier commit, the store refuses the writes of `videos` (after
    captions and qa were appended) or of `runs` itself (after everything else was): the commit
    fails with one clear error and no reader sees any of its rows, though they are in the tables,
    so the videos are indexed afresh by the next run, which commits. (A short name: `s3_bucket`
    names the bucket after the first 50 characters of the test's.)"""
    bucket, _ = s3_bucket
    output, options = f"s3://{bucket}/out", _options(proxy.url)
    _commit(TableStore(output, options), "r0")
    proxy.add("deny", methods=("PUT", "POST"), prefix=f"/{bucket}/out/{refused}/")

    with pytest.raises(OutputError) as info:
        _commit(TableStore(output, options), "r1")
    message = str(info.value)
    assert f"OUTPUT '{output}'" in message and f"table '{refused}'" in message, message
    assert "AccessDenied" in message or "necessary privileges" in message, message
    assert "damaged" not in message, message  # a refused write is not a damaged log
    assert "testing" not in message.replace("test-", "")  # no credentials (the bucket is named after the test)
    assert proxy.injected("deny")
    store = TableStore(output, options)
    assert store.read("captions", ["run_id"]).column("run_id").to_pylist().count("r1") == 3  # appended: half-way
    assert set(visible_videos(store, ["run_id"]).column("run_id").to_pylist()) == {"r0"}
    assert set(visible_rows(store, "captions", ["run_id"]).column("run_id").to_pylist()) == {"r0"}

    proxy.clear()  # the next run goes through
    _commit(TableStore(output, options), "r2")
    store = TableStore(output, options)
    assert set(visible_videos(store, ["run_id"]).column("run_id").to_pylist()) == {"r0", "r2"}
    assert set(visible_rows(store, "qa", ["run_id"]).column("run_id").to_pylist()) == {"r0", "r2"}


def test_transient_throttling_of_delta_commits_is_retried(s3_bucket, proxy):
    """delta-rs (object_store) retries 503 SlowDown itself: a commit throttled a few times lands."""
    bucket, _ = s3_bucket
    output, options = f"s3://{bucket}/out", _options(proxy.url)
    faults = [proxy.add("slowdown", methods=("PUT",), prefix=f"/{bucket}/out/videos/", times=2),
              proxy.add("slowdown", methods=("PUT",), prefix=f"/{bucket}/out/runs/_delta_log/", times=2)]
    _commit(TableStore(output, options), "r1")
    assert [f.fired for f in faults] == [2, 2]
    assert visible_videos(TableStore(output, options)).num_rows == 3


def test_throttling_that_outlasts_the_retries_is_a_clear_error(s3_bucket, proxy, monkeypatch):
    """Throttling that never stops, on the requests that check OUTPUT before a run (s3fs's, with
    fewer retries than the defaults so that giving up takes a second). Limited to the fsspec path:
    delta-rs retries for up to 3 minutes, and its retry options are not ones users can give."""
    import s3fs

    bucket, _ = s3_bucket
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)
    output = f"s3://{bucket}/out"
    options = _options(proxy.url, key=WRONG_KEY, secret=WRONG_SECRET,
                       config_kwargs={"retries": {"mode": "standard", "max_attempts": 2}})
    slow = proxy.add("slowdown", methods=("GET", "HEAD"), prefix=f"/{bucket}")
    with pytest.raises(OutputError) as info:
        TableStore(output, options).require_location()
    message = str(info.value)
    assert f"OUTPUT '{output}'" in message and "kept throttling requests (HTTP 503)" in message, message
    assert WRONG_KEY not in message and WRONG_SECRET not in message
    assert slow.fired >= 2  # retried before giving up


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
            TableStore(output, options)
    for run_id in ("../r1", "a/b", "", ".."):
        with pytest.raises(OutputError, match="invalid run id"):
            RunWriter(TableStore(str(tmp_path / "out")), run_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
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
