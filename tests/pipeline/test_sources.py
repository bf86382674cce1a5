"""Listing videos from local folders, single files, and S3 through s3fs (moto server on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.sources import VIDEO_EXTENSIONS, SourceError, VideoFile, list_videos, open_file


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "bucket"
    for name in ["b.mp4", "a.MOV", "nested/deeper/c.mkv", "nested/d.Webm", "z.ts", "nested/e.M4V"]:
        _touch(root / name, b"video:" + name.encode())
    for name in ["notes.txt", "thumb.jpg", "nested/clip.mp4.part", "noext", "nested/deeper/.hidden.mp4"]:
        _touch(root / name)
    _touch(root / "._b.mp4")  # macOS AppleDouble companion
    _touch(root / ".Trash/old.mp4")
    return root


def test_lists_nested_videos_filtered_and_sorted(tree):
    videos = list_videos(str(tree))
    names = [os.path.relpath(v.uri, tree) for v in videos]
    assert names == ["a.MOV", "b.mp4", "nested/d.Webm", "nested/deeper/c.mkv", "nested/e.M4V", "z.ts"]
    assert [v.uri for v in videos] == sorted(v.uri for v in videos)
    for video in videos:
        assert os.path.isabs(video.uri)
        assert video.size_bytes == os.path.getsize(video.uri)
        assert video.etag is None
        assert video.mtime == pytest.approx(os.path.getmtime(video.uri))


def test_every_listed_extension_is_recognised(tmp_path):
    for ext in VIDEO_EXTENSIONS:
        _touch(tmp_path / f"clip{ext.upper()}")
    assert len(list_videos(str(tmp_path))) == len(VIDEO_EXTENSIONS)


def test_relative_and_file_url_sources_give_absolute_paths(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    relative = list_videos("bucket")
    assert relative == list_videos(str(tree)) == list_videos(f"file://{tree}")
    assert all(v.uri.startswith(str(tree)) for v in relative)


def test_single_file_source(tree):
    [video] = list_videos(str(tree / "nested" / "deeper" / "c.mkv"))
    assert video.uri == str(tree / "nested" / "deeper" / "c.mkv")
    assert video.size_bytes == len(b"video:nested/deeper/c.mkv")
    # named explicitly, so kept whatever its extension: the decoder will say what is wrong with it
    assert [v.uri for v in list_videos(str(tree / "notes.txt"))] == [str(tree / "notes.txt")]


def test_missing_source_raises_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SourceError, match="not found") as info:
        list_videos(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(SourceError):
        list_videos("")
    with pytest.raises(SourceError, match="nosuchproto"):
        list_videos("nosuchproto://bucket/x")


def test_empty_source_lists_nothing(tmp_path):
    assert list_videos(str(tmp_path)) == []
    _touch(tmp_path / "readme.md")
    assert list_videos(str(tmp_path)) == []


def test_video_id_is_stable_and_follows_content(tree):
    path = tree / "b.mp4"
    first = list_videos(str(path))[0]
    assert first.video_id == list_videos(str(path))[0].video_id
    assert len(first.video_id) == 16 and int(first.video_id, 16) >= 0
    os.utime(path, (first.mtime + 10, first.mtime + 10))
    touched = list_videos(str(path))[0]
    assert touched.video_id != first.video_id
    same_tag_a = VideoFile(uri="s3://b/k.mp4", size_bytes=1, etag="abc", mtime=1.0)
    same_tag_b = VideoFile(uri="s3://b/k.mp4", size_bytes=1, etag="abc", mtime=2.0)
    other_tag = VideoFile(uri="s3://b/k.mp4", size_bytes=1, etag="abd", mtime=1.0)
    other_uri = VideoFile(uri="s3://b/j.mp4", size_bytes=1, etag="abc", mtime=1.0)
    assert same_tag_a.video_id == same_tag_b.video_id  # the etag is the version when present
    assert len({same_tag_a.video_id, other_tag.video_id, other_uri.video_id}) == 3


def test_open_file_reads_bytes(tree):
    with open_file(str(tree / "b.mp4")) as handle:
        assert handle.read() == b"video:b.mp4"


@pytest.fixture(scope="module")
def s3():
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "endpoint_url": f"http://{host}:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("media")
    fs.mkdir("empty-bucket")
    for key in ["cams/b.mp4", "cams/a.MKV", "cams/2026/01/c.mov", "cams/notes.txt", "other/x.mp4", "cams/._a.mp4"]:
        fs.pipe_file(f"media/{key}", b"data:" + key.encode())
    yield fs, options
    server.stop()


def test_s3_listing(s3):
    fs, options = s3
    videos = list_videos("s3://media/cams", storage_options=options)
    assert [v.uri for v in videos] == ["s3://media/cams/2026/01/c.mov", "s3://media/cams/a.MKV", "s3://media/cams/b.mp4"]
    for video in videos:
        assert video.etag and not video.etag.startswith('"')
        assert video.size_bytes == len(b"data:" + video.uri.removeprefix("s3://media/").encode())
        assert isinstance(video.mtime, float) and video.mtime > 1e9
    assert list_videos("s3://media/cams/", storage_options=options) == videos
    [single] = list_videos("s3://media/cams/b.mp4", storage_options=options)
    assert single == videos[-1]
    with open_file(single.uri, options) as handle:
        assert handle.read() == b"data:cams/b.mp4"
    assert list_videos("s3://empty-bucket", storage_options=options) == []
    with pytest.raises(SourceError, match="not found"):
        list_videos("s3://media/nothing-here", storage_options=options)
