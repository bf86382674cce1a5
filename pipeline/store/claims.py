"""Claims: two runs over the same OUTPUT at once never index the same video.

Before indexing, a run claims its videos in `OUTPUT/_claims` (a small Delta table, one row per
claimed video and model) with one MERGE: a video nobody holds, or whose claim has expired, becomes
this run's. Two runs that merge at the same moment conflict in Delta's optimistic concurrency
(both read the table, the second commit finds rows added that its read should have seen); the loser
retries on the new version and so sees the winner's claims. So each video ends up claimed by
exactly one run, on a local folder and on S3 alike (delta-rs commits with conditional writes).

Claims expire (`ttl`, `PIXELREFER_CLAIM_TTL_S`), and a live run renews its own from a background
thread, so a crashed run's videos are picked up by a later run once their claims lapse, while a
slow one keeps them. A claim also names its holder's host and process: a run on the same host
takes over the claims of a process that is gone at once (a killed run rerun by hand), without
waiting for the expiry. A run releases its claims when it ends; the committed `videos` rows are
what says "indexed" after that.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import threading
import time
from typing import Iterable

import pyarrow as pa

from pipeline.store.location import OutputError
from pipeline.store.tables import TableError, TableStore, _deltalake

log = logging.getLogger(__name__)

CLAIMS = "_claims"
SCHEMA = pa.schema([
    pa.field("claim", pa.string(), nullable=False),  # video_id | model | tracker
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("claimed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("expires_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("holder", pa.string(), nullable=False),  # host:pid of the claiming process
])
#: How long a claim lasts without renewal; a live run renews every third of it.
DEFAULT_TTL = dt.timedelta(seconds=float(os.environ.get("PIXELREFER_CLAIM_TTL_S", 600)))


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _gone(holder: str) -> bool:
    """True when `holder` is a process of this host that no longer runs."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
MAX_ATTEMPTS = 40


def claim_key(video_id: str, model: str, tracker: str) -> str:
    return f"{video_id}|{model}|{tracker}"


class Claims:
    """One run's claims on one OUTPUT."""

    def __init__(self, store: TableStore, run_id: str, model: str, tracker: str,
                 ttl: dt.timedelta = DEFAULT_TTL) -> None:
        self.store, self.run_id, self.model, self.tracker, self.ttl = store, run_id, model, tracker, ttl
        self.held: set[str] = set()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.store.uri(CLAIMS)

    def _table(self) -> object:
        deltalake = _deltalake()
        with self.store.guard("opening the claims table", CLAIMS):
            if not self.store.fs.exists(self.store.path(CLAIMS, "_delta_log")):
                try:
                    deltalake.DeltaTable.create(self.uri, schema=SCHEMA, mode="ignore",
                                                storage_options=self.store.rust_options or None)
                except deltalake.exceptions.DeltaError:
                    if not self.store.fs.exists(self.store.path(CLAIMS, "_delta_log")):
                        raise
            return deltalake.DeltaTable(self.uri, storage_options=self.store.rust_options or None)

    def _merge(self, video_ids: list[str], action: str) -> None:
        """One MERGE, retried on conflicts with a jittered backoff (see the module docstring)."""
        deltalake = _deltalake()
        now = dt.datetime.now(dt.timezone.utc)
        source = pa.table({
            "claim": [claim_key(v, self.model, self.tracker) for v in video_ids], "video_id": video_ids,
            "run_id": [self.run_id] * len(video_ids), "claimed_at": [now] * len(video_ids),
            "expires_at": [now + self.ttl] * len(video_ids), "holder": [_holder()] * len(video_ids),
        }, schema=SCHEMA)
        for attempt in range(MAX_ATTEMPTS):
            table = self._table()
            try:
                with self.store.guard(action, CLAIMS):
                    merge = table.merge(source, "t.claim = s.claim", source_alias="s", target_alias="t")
                    merge = merge.when_matched_update_all(predicate="t.run_id = s.run_id OR t.expires_at < s.claimed_at")
                    merge.when_not_matched_insert_all().execute()
                return
            except TableError as exc:
                if not isinstance(exc.__cause__, deltalake.exceptions.CommitFailedError):
                    raise
                time.sleep(min(2.0, 0.05 * (attempt + 1)) * random.uniform(0.5, 1.5))
        raise OutputError(f"OUTPUT {self.store.shown!r}: could not claim videos after {MAX_ATTEMPTS} attempts; "
                          "other runs keep claiming at the same moment: run the command again")

    def holders(self, video_ids: Iterable[str]) -> dict[str, str]:
        """video_id -> the run holding its live claim (for this model and tracker)."""
        wanted = {claim_key(v, self.model, self.tracker): v for v in video_ids}
        if not wanted:
            return {}
        now = dt.datetime.now(dt.timezone.utc)
        with self.store.guard("reading the claims table", CLAIMS):
            rows = pa.table(self._table().to_pyarrow_table()).to_pylist()
        return {wanted[r["claim"]]: r["run_id"] for r in rows if r["claim"] in wanted and r["expires_at"] > now}

    def _drop_gone(self, video_ids: list[str]) -> None:
        """Delete the claims of processes of this host that are gone (see the module docstring)."""
        wanted = {claim_key(v, self.model, self.tracker) for v in video_ids}
        with self.store.guard("reading the claims table", CLAIMS):
            rows = pa.table(self._table().to_pyarrow_table()).to_pylist()
        dead = sorted({r["run_id"] for r in rows if r["claim"] in wanted and r["run_id"] != self.run_id
                       and _gone(r["holder"])})
        if dead:
            log.warning("taking over the claims of run(s) %s, whose process on this host is gone", ", ".join(dead))
            self._delete(" OR ".join(f"run_id = '{r}'" for r in dead))

    def _delete(self, predicate: str) -> None:
        deltalake = _deltalake()
        for attempt in range(MAX_ATTEMPTS):
            try:
                with self.store.guard("updating the claims table", CLAIMS):
                    self._table().delete(predicate)
                return
            except TableError as exc:
                if not isinstance(exc.__cause__, deltalake.exceptions.CommitFailedError):
                    raise
                time.sleep(min(2.0, 0.05 * (attempt + 1)) * random.uniform(0.5, 1.5))

    def claim(self, video_ids: list[str]) -> tuple[list[str], dict[str, str]]:
        """Claim what is free; returns (ids now held by this run, {id: run} held by others)."""
        if not video_ids:
            return [], {}
        self._drop_gone(video_ids)
        self._merge(video_ids, "claiming videos")
        holders = self.holders(video_ids)
        mine = [v for v in video_ids if holders.get(v) == self.run_id]
        others = {v: r for v, r in holders.items() if r != self.run_id}
        self.held |= set(mine)
        if mine and self._renewer is None:
            self._renewer = threading.Thread(target=self._renew_loop, name="pixelrefer-claims", daemon=True)
            self._renewer.start()
        return mine, others

    def _renew_loop(self) -> None:
        every = max(1.0, self.ttl.total_seconds() / 3)
        while not self._stop.wait(every):
            try:
                if self.held:
                    self._merge(sorted(self.held), "renewing claims")
            except Exception as exc:  # noqa: BLE001 - a missed renewal only shortens the claim
                log.warning("could not renew this run's claims: %s", exc)

    def release(self) -> None:
        """Drop this run's claims (its committed rows now say what is indexed)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        if not self.held:
            return
        try:
            self._delete(f"run_id = '{self.run_id}'")
        except OutputError as exc:
            log.warning("could not release this run's claims (they expire in %s): %s", self.ttl, exc)
        self.held = set()


class SyncLock:
    """One holder at a time of a job per OUTPUT (`key`: ``search-index`` for syncs, ``embed`` for
    backfills): a claim in the same table, with the same expiry, so a crashed holder frees it. A
    second one waits up to `wait_s`."""

    def __init__(self, store: TableStore, wait_s: float = 600.0, ttl: dt.timedelta = dt.timedelta(minutes=15),
                 key: str = "search-index") -> None:
        import secrets

        self.claims = Claims(store, f"{key}-{secrets.token_hex(6)}", "-", "-", ttl=ttl)
        self.wait_s, self.KEY = wait_s, key

    def __enter__(self) -> "SyncLock":
        deadline = time.monotonic() + self.wait_s
        while True:
            mine, others = self.claims.claim([self.KEY])
            if mine:
                return self
            if time.monotonic() >= deadline:
                raise OutputError(f"OUTPUT {self.claims.store.shown!r}: another {self.KEY} job "
                                  f"({', '.join(sorted(set(others.values())))}) held it for {self.wait_s:.0f} s; "
                                  "run the command again later")
            time.sleep(1.0)

    def __exit__(self, *exc: object) -> None:
        self.claims.release()
