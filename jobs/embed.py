"""`pixelrefer embed OUTPUT [--embedder E]`: add embeddings to the captions and answers that have none.

For an index made with `--embedder none`, or before embeddings existed: no video model runs, only
the embedder, on the driver, with the same rows as an index run writes (`pipeline.search.embeddings`).
It is committed like a run, through the same commit (`pipeline.store.commit.RunWriter`): it
gets a run id, its vectors land under `embeddings/run_id=<id>/` with a `runs` row (`command`
'embed', `model` the embedder, `captions`/`answers` the vectors added), and a crash leaves nothing
half-written. Running it again adds nothing: a caption or answer whose key (video, run, object(s),
clip, text) already has a vector is skipped, and with nothing to add nothing is committed.

An OUTPUT keeps one embedder's vectors, so an index that holds another's is refused.

Then it brings the search index (`pipeline.search.index`) up to date, also when no vector was
missing: that is how an index whose run stopped before its last commit, or one made before the
search index existed, gets one (`--rebuild-search` starts it again from the tables).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from typing import Any, Callable, Mapping

from models.embedders import DEFAULT_EMBEDDER, EmbedderError, load_embedder

#: Texts embedded and buffered at a time: bounded memory for a backfill of millions, one commit still.
EMBED_BATCH = 50_000


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="index folder or fsspec URL (s3://bucket/index)")
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER, metavar="E",
                        help="wordllama (default, ships in its wheel) or a transformers model folder or hub id")
    parser.add_argument("--storage-options", default=None, metavar="JSON", help="JSON object passed to fsspec for OUTPUT")
    parser.add_argument("--rebuild-search", action="store_true",
                        help="rebuild the search index from the tables instead of updating it")
    parser.add_argument("--run-id", default=None, help=argparse.SUPPRESS)


def embed_main(args: argparse.Namespace) -> int:
    """Exit 0 when committed (or nothing was missing), 1 when it could not commit, 2 for bad input."""
    from jobs.store_command import run_on_output

    def work(storage_options: dict[str, Any]) -> None:
        backfill(args.output, args.embedder, storage_options, run_id=args.run_id)
        update_search(args.output, storage_options, rebuild=args.rebuild_search)

    return run_on_output(args.storage_options, work, "nothing was committed", usage_errors=(EmbedderError,))


def update_search(output: str, storage_options: Mapping[str, Any], *, rebuild: bool = False,
                  progress: Callable[[str], None] | None = None) -> None:
    """Bring the search index (`pipeline.search.index`) up to date with the committed tables; on a
    store it cannot live on, say so: `--like` then ranks every vector."""
    from pipeline.search.appearance import sync_search
    from pipeline.search.index import SearchIndexUnsupported
    from pipeline.storage_errors import redact_url

    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        result = sync_search(output, storage_options, rebuild=rebuild, progress=progress)
    except SearchIndexUnsupported as exc:
        progress(f"note: {exc}; --like ranks every vector of {redact_url(output)}")
        return
    if result.up_to_date:
        progress(f"search index: up to date ({result.rows} passages)")
    else:
        progress(f"search index: {result.rows} passages (+{result.added}, -{result.removed}), "
                 f"{'ANN' if result.ann else 'exact'} vector search, in {result.seconds:.1f} s")
    looks = result.then
    if looks is not None and not looks.up_to_date:
        progress(f"search index: {looks.rows} appearance vectors (+{looks.added}, -{looks.removed}), "
                 f"{'ANN' if looks.ann else 'exact'} --similar-to, in {looks.seconds:.1f} s")


def _open_index(output: str, storage_options: Mapping[str, Any]) -> Any:
    """OUTPUT's tables, refusing one that holds no index or the pre-Delta layout (`pixelrefer migrate`)."""
    from pipeline.store import OutputError, TableStore

    store = TableStore(output, storage_options)
    store.check_layout()
    if not store.exists("videos"):
        raise OutputError(f"OUTPUT {store.shown!r} holds no index (no videos table): run `pixelrefer index` first")
    return store


def backfill(output: str, spec: str = DEFAULT_EMBEDDER, storage_options: Mapping[str, Any] | None = None,
             run_id: str | None = None, progress: Callable[[str], None] | None = None) -> dict[str, int] | None:
    """Embed what has no vector yet and commit it as one run; returns the vectors added per kind."""
    from pipeline.store.claims import SyncLock

    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started, started_at = time.monotonic(), dt.datetime.now(dt.timezone.utc)
    options = dict(storage_options or {})
    store = _open_index(output, options)
    with SyncLock(store, key="embed"):  # two backfills at once would embed the same rows twice
        return _backfill(store, spec, options, run_id, progress, started, started_at)


def _backfill(store: Any, spec: str, options: dict[str, Any], run_id: str | None, progress: Callable[[str], None],
              started: float, started_at: dt.datetime) -> dict[str, int] | None:
    from pipeline.search.embeddings import KEY_COLUMNS, check_embedder, embedding_table, key_of, text_rows
    from pipeline.run import new_run_id
    from pipeline.storage_errors import redact_url
    from pipeline.store.commit import RunWriter, Visible

    output = store.output
    embedder = load_embedder(spec)
    if embedder is None:
        raise EmbedderError("--embedder none adds no embeddings: give 'wordllama' or a model folder or hub id")
    check_embedder(output, embedder.name, options, embedder.dim)
    visible = Visible(store)
    captions = visible.rows("captions", ["video_id", "run_id", "object_id", "clip_index", "ts_start", "ts_end",
                                         "caption"])
    qa = visible.rows("qa", ["video_id", "run_id", "object_ids", "clip_index", "ts_start", "ts_end", "answer"])
    have = {key_of(r) for r in visible.rows("embeddings", list(KEY_COLUMNS)).to_pylist()}
    rows = [r for r in text_rows(captions.to_pylist(), qa.to_pylist()) if key_of(r) not in have]
    added = {"caption": sum(r["kind"] == "caption" for r in rows), "answer": sum(r["kind"] == "answer" for r in rows)}
    if not rows:
        progress(f"nothing to embed: every caption and answer in {redact_url(output)} has a {embedder.name} vector")
        return added
    run_id = run_id or new_run_id()
    writer = RunWriter(store, run_id)
    try:
        for start in range(0, len(rows), EMBED_BATCH):
            writer.add("embeddings", embedding_table(embedder, rows[start:start + EMBED_BATCH], run_id))
        writer.add("runs", [{
            "run_id": run_id, "commit_index": 0, "command": "embed", "source": None, "model": embedder.name,
            "tracker": None, "mode": None, "started_at": started_at, "ended_at": dt.datetime.now(dt.timezone.utc),
            "status": "committed", "videos_listed": 0, "videos_skipped": 0, "videos_ok": 0, "videos_failed": 0,
            "videos_quarantined": 0, "clips": 0, "video_seconds": 0.0, "objects": 0,
            "captions": added["caption"], "answers": added["answer"], "retry_video_ids": [],
            "embeddings_version": None,
        }])
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    progress(f"run {run_id}: embedded {added['caption']} captions and {added['answer']} answers with "
             f"{embedder.name} ({embedder.dim}-d) in {time.monotonic() - started:.1f} s; committed")
    return added
