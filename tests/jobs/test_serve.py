"""`pixelrefer serve`: the JSON API and its security (Starlette's TestClient, local and S3 OUTPUT),
and the pages in a real headless Chromium (Playwright driving Debian's `chromium`).

The module's index is the tests' usual one (`index_builders`) with private copies of the sources
(video "b" converted to a format browsers do not play) and a caption of object 3 that holds markup
(`SCRIPT_CAPTION`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from index_builders import RUN2, IndexInfo, bbox_of, index_tables, video_id_for, write_index
from jobs.report_frames import object_color
from jobs.serve.api import ServeIndex
from jobs.serve.app import CSP, build_app
from jobs.serve.command import exposure_note
from pipeline.samples import GroundTruth

pytestmark = pytest.mark.timeout(180)

SCRIPT_CAPTION = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> a yellow square falling'
DOCS = Path(__file__).resolve().parents[2] / "docs"


def screenshot_path(tmp_path: Path, name: str) -> str:
    """Where a page's picture goes: docs/ (the README's) with PIXELREFER_SCREENSHOTS=1, else the test's folder."""
    return str((DOCS if os.environ.get("PIXELREFER_SCREENSHOTS") == "1" else tmp_path) / name)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sample_videos: dict[str, GroundTruth]) -> IndexInfo:
    folder = tmp_path_factory.mktemp("serve")
    (folder / "src").mkdir()
    shutil.copy(sample_videos["a"].path, folder / "src" / "a.mp4")
    # "b" in a format browsers do not play (MPEG-4 Part 2 in AVI; the indexer's decoder does): its page shows stills.
    subprocess.run(["ffmpeg", "-v", "error", "-i", sample_videos["b"].path, "-c:v", "mpeg4", "-q:v", "2",
                    str(folder / "src" / "b.avi")], check=True, timeout=60)
    truths = dict(sample_videos)
    uris = {"a": str(folder / "src" / "a.mp4"), "b": str(folder / "src" / "b.avi")}
    uris["c"] = str(folder / "src" / "c-never-existed.mp4")
    tables = index_tables(uris, truths)
    for row in tables[RUN2]["captions"]:
        if row["object_id"] == 3 and row["clip_index"] == 1:
            row["caption"] = SCRIPT_CAPTION
    output = str(folder / "index")
    write_index(output, tables)
    return IndexInfo(output=output, storage_options=None, uris=uris,
                     video_ids={k: video_id_for(v) for k, v in uris.items()}, truths=truths, fs=None, root=output)


@pytest.fixture(scope="module")
def client(served: IndexInfo) -> Iterator[Any]:
    from starlette.testclient import TestClient

    data = ServeIndex(served.output)
    with TestClient(build_app(data), base_url="http://127.0.0.1") as test_client:
        yield test_client
    data.close()


def json_error(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


def test_api_answers_search_video_masks_and_ranges(client: Any, served: IndexInfo) -> None:
    vid = served.video_ids["a"]
    found = client.get("/api/search", params={"q": "yellow square"}).json()
    assert found["mode"] == "text"  # no embeddings in this index: BM25, as `query --text`
    top = found["results"][0]
    assert (top["video_id"], top["object_id"], top["text"]) == (vid, 3, SCRIPT_CAPTION)  # stored as is, as data
    assert {r["object_id"] for r in client.get("/api/search", params={"q": "ball", "label": "BALL"}).json()["results"]} == {2}
    only_b = client.get("/api/search", params={"q": "ball", "video": served.video_ids["b"]}).json()["results"]
    assert {r["video_id"] for r in only_b} == {served.video_ids["b"]}

    doc = client.get(f"/api/videos/{vid}").json()
    assert [o["object_id"] for o in doc["objects"]] == [1, 2, 3] and "uri" not in doc["video"]
    assert [c["caption"] for c in doc["clips"][1]["captions"] if c["object_id"] == 3] == [SCRIPT_CAPTION]
    assert client.get(f"/api/videos/{vid}").content == client.get(f"/api/videos/{vid}").content  # cached
    window = client.get(f"/api/videos/{vid}/masks", params={"start": 1.0, "end": 1.2}).json()
    assert window["times"] == [1.0, 1.2]
    truth = served.truths["a"]
    for m in window["masks"]:
        assert m["bbox"] == bbox_of(truth.mask(m["object_id"] - 1, m["ts"]))
    assert {(m["object_id"], m["ts"]) for m in window["masks"]} == {(o, t) for o in (1, 2, 3) for t in (1.0, 1.2)}
    thumb = client.get(f"/api/videos/{vid}/frame", params={"t": 0.1, "object": 3})
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"

    source = Path(served.uris["a"]).read_bytes()
    part = client.get(f"/media/{vid}", headers={"Range": "bytes=100-299"})
    assert part.status_code == 206 and part.content == source[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(source)}"
    tail = client.get(f"/media/{vid}", headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == source[-50:]
    whole = client.get(f"/media/{vid}")
    assert whole.status_code == 200 and whole.content == source and whole.headers["accept-ranges"] == "bytes"
    beyond = client.get(f"/media/{vid}", headers={"Range": f"bytes={len(source)}-"})
    assert json_error(beyond, 416) and beyond.headers["content-range"] == f"bytes */{len(source)}"


def test_api_refuses_bad_requests_with_json_errors_and_sends_security_headers(client: Any, served: IndexInfo) -> None:
    vid = served.video_ids["a"]
    for url in ("/", f"/video/{vid}", "/api/videos", f"/media/{vid}", "/static/video.js", "/nowhere"):
        headers = client.get(url).headers
        assert headers["content-security-policy"] == CSP and headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in CSP and "unsafe" not in CSP
    assert "no video" in json_error(client.get("/api/videos/0123456789abcdef"), 404)
    assert "no video" in json_error(client.get(f"/video/{served.video_ids['c']}"), 404)  # failed: nothing to show
    assert "bad video id" in json_error(client.get("/api/videos/..%5Cetc/masks?t=1"), 400)
    json_error(client.get("/api/videos/..%2F..%2Fetc%2Fpasswd/masks?t=1"), 404)  # no such route
    assert "bad video id" in json_error(client.get("/media/a%20b"), 400)
    json_error(client.get("/media/../../etc/passwd"), 404)  # no such route: a path never names a file
    assert "not a number" in json_error(client.get(f"/api/videos/{vid}/masks", params={"start": "x", "end": 1}), 400)
    assert "at most" in json_error(client.get(f"/api/videos/{vid}/masks", params={"start": 0, "end": 7200}), 400)
    assert "empty" in json_error(client.get("/api/search", params={"q": " "}), 400)
    assert "mode" in json_error(client.get("/api/search", params={"q": "x", "mode": "sql"}), 400)
    assert "no mask of object 9" in json_error(client.get(f"/api/videos/{vid}/frame", params={"object": 9}), 404)
    assert "bytes=" in json_error(client.get(f"/media/{vid}", headers={"Range": "bytes=1-2,5-6"}), 400)
    json_error(client.post("/api/search", params={"q": "truck"}), 405)  # read-only
    moved = served.uris["b"] + ".moved"
    os.rename(served.uris["b"], moved)  # gone after indexing
    try:
        gone = json_error(client.get(f"/media/{served.video_ids['b']}"), 404)
        assert "b.avi is gone" in gone and str(Path(served.uris["b"]).parent) not in gone
        assert "is gone" in json_error(client.get(f"/api/videos/{served.video_ids['b']}/frame?t=0.3"), 404)
    finally:
        os.rename(moved, served.uris["b"])
    assert client.get("/api/videos", headers={"host": "attacker.example"}).status_code == 400  # DNS rebinding
    assert exposure_note("127.0.0.1", 8765) is None and exposure_note("::1", 8765) is None
    assert "can now search this index" in exposure_note("0.0.0.0", 8765)


def test_serve_command_refuses_bad_arguments(served: IndexInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.cli import main as cli_main

    assert cli_main(["serve", served.output, "--port", "70000"]) == 2
    assert "--port 70000 is not a port" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path / "nothing-here")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_search_by_meaning_when_the_index_has_embeddings(served: IndexInfo, tmp_path: Path) -> None:
    """After `pixelrefer embed`, the box runs `query --like` (hybrid, through the search index)."""
    from starlette.testclient import TestClient

    from jobs.cli import main as cli_main

    output = tmp_path / "index"
    shutil.copytree(served.output, output)
    assert cli_main(["embed", str(output)]) == 0
    data = ServeIndex(str(output))
    try:
        client = TestClient(build_app(data), base_url="http://127.0.0.1")
        found = client.get("/api/search", params={"q": "a yellow square falling"}).json()
        assert found["mode"] == "like" and found["notes"] == []
        assert (found["results"][0]["video_id"], found["results"][0]["object_id"]) == (served.video_ids["a"], 3)
        words = client.get("/api/search", params={"q": "a yellow square falling", "mode": "text"}).json()
        assert words["mode"] == "text" and words["results"][0]["object_id"] == 3
    finally:
        data.close()


def test_api_over_s3_output(s3_index: IndexInfo) -> None:
    """An OUTPUT and sources on (loopback) S3: masks, thumbnails and ranges through fsspec (search is
    `query --text`'s SQL, tested on S3 in test_query_search). Over 10 s: opening the index reads
    every table's Delta log from moto, a few seconds on a loaded machine, as the query tests' S3 cases."""
    from starlette.testclient import TestClient

    data = ServeIndex(s3_index.output, s3_index.storage_options)
    try:
        client = TestClient(build_app(data), base_url="http://127.0.0.1")
        vid = s3_index.video_ids["b"]
        masks = client.get(f"/api/videos/{vid}/masks", params={"t": 1.0}).json()["masks"]
        assert {m["object_id"] for m in masks} == {1, 2}
        assert client.get(f"/api/videos/{vid}/frame", params={"t": 0.4, "object": 2}).content[:2] == b"\xff\xd8"
        source = Path(s3_index.truths["b"].path).read_bytes()
        part = client.get(f"/media/{vid}", headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == source[1000:2000]
    finally:
        data.close()


# --------------------------------------------------------------------------------------------
# In the browser.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(served: IndexInfo) -> Iterator[str]:
    import uvicorn

    data = ServeIndex(served.output)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    instance = uvicorn.Server(uvicorn.Config(build_app(data), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instance.started, "the app did not start"
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(10)
    data.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium not found (Debian: apt-get install -y chromium); cannot drive the app's pages")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield instance
        instance.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield tab
    context.close()
    assert not errors, errors  # a CSP violation or a script error shows up here


def test_search_page_finds_an_object_by_its_caption_and_keeps_markup_as_text(page: Any, server: str, served: IndexInfo,
                                                                             tmp_path: Path) -> None:
    page.goto(f"{server}/?q=yellow+square")
    card = page.locator(f'section[data-video="{served.video_ids["a"]}"] a.result[data-object="3"]')
    card.wait_for()
    assert SCRIPT_CAPTION in card.locator(".text").text_content()
    assert page.evaluate("() => window.__pwned") is None
    page.wait_for_function("() => [...document.images].every((i) => i.complete)")
    assert card.locator("img").evaluate("(img) => img.naturalWidth") == 320  # its frame, masked
    assert card.get_attribute("href") == f"/video/{served.video_ids['a']}?t=1&object=3"
    page.goto(f"{server}/?q=truck+ball&label=truck")  # a shareable address: the filters come back from it
    page.locator("a.result").first.wait_for()
    assert page.locator("#label").input_value() == "truck"
    assert set(page.locator("a.result").evaluate_all("(cards) => cards.map((c) => c.dataset.object)")) == {"1"}
    page.goto(f"{server}/?q=red+truck")
    page.locator("a.result").first.wait_for()
    page.wait_for_function("() => [...document.images].every((i) => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=screenshot_path(tmp_path, "serve-search.png"))


def canvas_object_box(page: Any, object_id: int) -> tuple[list[int] | None, int]:
    """The bounding box of the canvas pixels painted in the object's colour, and their count."""
    return page.evaluate(
        """([r, g, b]) => {
            const c = document.getElementById("masks");
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let box = null, n = 0;
            for (let y = 0; y < c.height; y += 1) for (let x = 0; x < c.width; x += 1) {
                const o = (y * c.width + x) * 4;
                // 50 % of the object's colour (a canvas stores premultiplied alpha: +-2 after the round trip)
                if (d[o + 3] === 128 && Math.abs(d[o] - r) <= 2 && Math.abs(d[o + 1] - g) <= 2 && Math.abs(d[o + 2] - b) <= 2) {
                    n += 1;
                    box = box ? [Math.min(box[0], x), Math.min(box[1], y), Math.max(box[2], x + 1), Math.max(box[3], y + 1)]
                              : [x, y, x + 1, y + 1];
                }
            }
            return [box, n];
        }""",
        list(object_color(object_id)),
    )


def wait_drawn(page: Any, ts: float) -> None:
    page.wait_for_function(f"() => Math.abs(Number(document.getElementById('masks').dataset.ts) - {ts}) < 1e-6 "
                           "&& document.getElementById('masks').dataset.ts !== ''")


def test_video_page_draws_masks_in_step_and_the_timeline_seeks(page: Any, server: str, served: IndexInfo,
                                                                tmp_path: Path) -> None:
    vid, truth = served.video_ids["a"], served.truths["a"]
    page.goto(f"{server}/video/{vid}?t=1.2&object=3")
    wait_drawn(page, 1.2)
    page.uncheck("#all")  # only the selected object, so its pixels are its own
    page.wait_for_function("() => document.getElementById('masks').dataset.objects === '3'")
    box, count = canvas_object_box(page, 3)
    mask = truth.mask(2, 1.2)
    assert box == bbox_of(mask) and count == int(mask.sum())
    assert abs(float(page.locator("#player").get_attribute("data-time")) - 1.2) < 1e-3
    assert SCRIPT_CAPTION in page.locator("#panel .captions").text_content()  # the model's text, as text
    assert page.evaluate("() => window.__pwned") is None

    # Click the middle of object 1's bar: the player lands at that time, the canvas on its frame.
    bar = page.locator('.seg[data-object="1"]').first
    lo, hi = float(bar.get_attribute("data-lo")), float(bar.get_attribute("data-hi"))
    bar.click()
    expected = lo + (hi - lo) / 2
    page.wait_for_function(f"() => Math.abs(Number(document.getElementById('player').dataset.time) - {expected}) < 0.02")
    # The canvas shows the indexed frame nearest the frame on screen (indexed every 0.2 s).
    page.wait_for_function(f"() => Math.abs(Number(document.getElementById('masks').dataset.ts) - {expected}) <= 0.1 + 1e-6"
                           " && document.getElementById('masks').dataset.objects === '1'")
    drawn = float(page.locator("#masks").get_attribute("data-ts"))
    box, count = canvas_object_box(page, 1)
    assert box == bbox_of(truth.mask(0, drawn)) and count == int(truth.mask(0, drawn).sum())
    assert "#1 truck" in page.locator("#panel h2").text_content()
    page.check("#all")
    page.wait_for_function("() => document.getElementById('video').readyState >= 2 || "
                           "!document.getElementById('still').hidden")  # the frame is painted, for the picture
    page.screenshot(path=screenshot_path(tmp_path, "serve-video.png"), full_page=True)


def test_video_page_falls_back_to_indexed_stills(page: Any, server: str, served: IndexInfo) -> None:
    vid = served.video_ids["b"]  # an AVI: Chromium cannot play it, the page says so and steps through stills
    page.goto(f"{server}/video/{vid}?t=0.4")
    page.locator("#notice").wait_for()
    assert "cannot play this video" in page.locator("#notice").text_content()
    wait_drawn(page, 0.4)
    page.wait_for_function("() => document.getElementById('still').complete && "
                           "document.getElementById('still').naturalWidth === 160")
    page.click("#next")
    wait_drawn(page, 0.6)
    box, _ = canvas_object_box(page, 1)
    assert box is not None
