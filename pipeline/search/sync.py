"""The search index (passages, appearance vectors) kept up to date beside an index run, off the hot path.

A sync after each commit reads only that commit's vectors, but once the passages have grown 4x
the IVF lists are trained again (about a minute at a million passages): done on the driver's
thread, that would stall the graph, and so the GPUs, while it runs. `BackgroundSync` runs syncs on
one thread of its own: a commit asks for a sync and returns at once; requests that arrive while a
sync runs are folded into one more sync after it (each sync catches up with every commit there
is). Across processes, `pipeline.store.claims.SyncLock` keeps one sync per OUTPUT.

A failed sync never fails the run: its rows are committed already, and `--like` ranks exactly,
with a note, while the index is behind; `pixelrefer embed OUTPUT` retries it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

from pipeline import storage_errors
from pipeline.search.appearance import sync_search
from pipeline.search.index import SearchIndexUnsupported
from pipeline.storage_errors import redact_url

log = logging.getLogger(__name__)


def update_search_index(output: str, storage_options: Mapping[str, Any] | None,
                        progress: Callable[[str], None]) -> None:
    """One sync, its failures logged (see the module docstring)."""
    try:
        result = sync_search(output, storage_options, progress=progress)
    except SearchIndexUnsupported as exc:
        log.info("no search index for %s: %s", redact_url(output), exc)
        return
    except Exception as exc:  # noqa: BLE001 - see the module docstring
        log.warning("the search index of %s was not updated (%s); `pixelrefer embed` updates it",
                    redact_url(output), storage_errors.redact(str(exc), storage_options))
        return
    if result.added or result.removed:
        progress(f"search index: {result.rows} passages (+{result.added}, -{result.removed}) in {result.seconds:.1f} s")
    looks = result.then
    if looks is not None and (looks.added or looks.removed):
        progress(f"search index: {looks.rows} appearance vectors (+{looks.added}, -{looks.removed})")


class BackgroundSync:
    """Syncs on a thread of their own; `request` after a commit, `close` at the end of the run."""

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None,
                 progress: Callable[[str], None]) -> None:
        self.output, self.storage_options, self.progress = output, storage_options, progress
        self._wanted = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.syncs = 0

    def request(self) -> None:
        self._wanted.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pixelrefer-search-sync", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wanted.wait(timeout=1.0)
            if self._wanted.is_set():
                self._wanted.clear()
                update_search_index(self.output, self.storage_options, self.progress)
                self.syncs += 1
            elif self._closing.is_set():
                return

    def close(self, timeout_s: float | None = None) -> None:
        """Wait for the last requested sync (the run's final commit should be searchable)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
