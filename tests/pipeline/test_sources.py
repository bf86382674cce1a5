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


def _link(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


@pytest.fixture
def store(tmp_path):
    """Where a linked corpus keeps the real files (outside the source folder)."""
    store = tmp_path / "store"
    _touch(store / "raw-1.mp4", b"first video")
    _touch(store / "raw-2.mov", b"second, longer video")
    _touch(store / "cams" / "north.mkv", b"north camera")
    _touch(store / "cams" / "notes.txt")
    return store


def test_folder_of_links_to_files(tmp_path, store):
    corpus = tmp_path / "corpus"
    _link(corpus / "lobby.mp4", store / "raw-1.mp4")
    _link(corpus / "yard.mov", Path("..") / "store" / "raw-2.mov")  # relative link
    _link(corpus / "again.mp4", store / "raw-1.mp4")  # the same file under a second name
    _link(corpus / "readme.txt", store / "cams" / "notes.txt")
    videos = list_videos(str(corpus))
    assert [os.path.relpath(v.uri, corpus) for v in videos] == ["again.mp4", "lobby.mp4", "yard.mov"]
    by_name = {Path(v.uri).name: v for v in videos}
    # the link's name is the URI; the content version is the target's (size and mtime)
    assert by_name["yard.mov"].size_bytes == len(b"second, longer video")
    assert by_name["lobby.mp4"].mtime == pytest.approx(os.path.getmtime(store / "raw-1.mp4"))
    assert by_name["again.mp4"].video_id != by_name["lobby.mp4"].video_id
    with open_file(by_name["lobby.mp4"].uri) as handle:
        assert handle.read() == b"first video"


def test_a_replaced_link_target_is_a_new_version(tmp_path, store):
    link = _link(tmp_path / "corpus" / "clip.mp4", store / "raw-1.mp4")
    [before] = list_videos(str(link.parent))
    (store / "raw-1.mp4").write_bytes(b"re-encoded, and longer")
    [after] = list_videos(str(link.parent))
    assert after.uri == before.uri and after.size_bytes == len(b"re-encoded, and longer")
    assert after.video_id != before.video_id


def test_linked_subfolder_and_linked_source_folder(tmp_path, store):
    corpus = tmp_path / "corpus"
    _touch(corpus / "own.mp4")
    _link(corpus / "cams", store / "cams")
    videos = list_videos(str(corpus))
    assert [v.uri for v in videos] == [str(corpus / "cams" / "north.mkv"), str(corpus / "own.mp4")]
    assert videos[0].size_bytes == len(b"north camera")
    # the source itself may be a link to a folder: URIs keep the name the user gave
    alias = _link(tmp_path / "alias", corpus)
    assert [v.uri for v in list_videos(str(alias))] == [str(alias / "cams" / "north.mkv"), str(alias / "own.mp4")]


def test_single_linked_file_as_source(tmp_path, store):
    link = _link(tmp_path / "pick.mp4", store / "raw-2.mov")
    [video] = list_videos(str(link))
    assert video.uri == str(link)
    assert video.size_bytes == len(b"second, longer video")
    assert video.mtime == pytest.approx(os.path.getmtime(store / "raw-2.mov"))
    dangling = _link(tmp_path / "gone.mp4", tmp_path / "nowhere.mp4")
    with pytest.raises(SourceError, match="symbolic link .* does not exist"):
        list_videos(str(dangling))


def test_links_back_to_an_ancestor_do_not_loop(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    _touch(corpus / "a.mp4")
    _touch(corpus / "day" / "b.mp4")
    _link(corpus / "day" / "up", Path(".."))  # the source folder, seen from below
    _link(corpus / "day" / "self", corpus / "day")
    _link(corpus / "top", corpus)
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        videos = list_videos(str(corpus))
    assert [os.path.relpath(v.uri, corpus) for v in videos] == ["a.mp4", "day/b.mp4"]
    assert sum("loop" in r.getMessage() for r in caplog.records) == 3


def test_a_folder_reached_twice_without_a_loop_is_listed_under_both_names(tmp_path, store):
    corpus = tmp_path / "corpus"
    _link(corpus / "north", store / "cams")
    _link(corpus / "also-north", store / "cams")
    assert [os.path.relpath(v.uri, corpus) for v in list_videos(str(corpus))] == [
        "also-north/north.mkv", "north/north.mkv"]


def test_dangling_links_are_skipped_with_a_warning(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    _touch(corpus / "real.mp4")
    _link(corpus / "gone.mp4", tmp_path / "deleted.mp4")
    _link(corpus / "gone-folder", tmp_path / "deleted")
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        videos = list_videos(str(corpus))
    assert [v.uri for v in videos] == [str(corpus / "real.mp4")]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(corpus / "gone.mp4") in warned and str(corpus / "gone-folder") in warned


def test_hidden_links_are_not_followed(tmp_path, store):
    corpus = tmp_path / "corpus"
    _link(corpus / ".snapshot", store)
    _link(corpus / "._clip.mp4", store / "raw-1.mp4")
    assert list_videos(str(corpus)) == []


def test_unreadable_subfolder_is_skipped_with_a_warning(tmp_path, caplog, monkeypatch):
    corpus = tmp_path / "corpus"
    _touch(corpus / "ok.mp4")
    _touch(corpus / "locked" / "not-for-us.mp4")
    scandir = os.scandir

    def refuse_locked(path):  # chmod 000 would not stop a test running as root
        if str(path).endswith("/locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr("pipeline.sources.os.scandir", refuse_locked)
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        assert [v.uri for v in list_videos(str(corpus))] == [str(corpus / "ok.mp4")]
    assert str(corpus / "locked") in caplog.text and "Permission denied" in caplog.text
    monkeypatch.setattr("pipeline.sources.os.scandir", lambda path: refuse_locked(f"{path}/locked"))
    with pytest.raises(SourceError, match="(?i)permission|denied|access"):
        list_videos(str(corpus))


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
