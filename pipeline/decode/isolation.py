"""The long-lived child processes in which all native decoding runs, and the calls into them.

Every decoder (ffprobe, PyAV, decord, the shot detector) runs in a child process, never in the Ray
worker. A decoder that hangs is killed when its call's `timeout_s` runs out, one that segfaults or
runs out of memory dies alone; both become a `DecodeError` for that video (or clip) and the next
call gets a fresh child. The child is reused across calls because starting one costs about 0.9 s
(Python, numpy, PyAV, decord imports), more than sampling a short clip, while a call to a warm
child costs about 0.3 ms plus the transfer of the frames through a pipe (0.6-0.8 GB/s here: 64
full-HD frames in about half a second). ``bench/decode.py`` measures these figures.

This module knows nothing about video: a child imports the decoders once at start through
`WARMUP` (a ``module:function`` name, so that no import cycle ties this module to the decoders).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import DecodeError

log = logging.getLogger(__name__)

#: A child process serves at most this many calls, then a fresh one replaces it, which bounds
#: what native decoders may leak (decord is known to leak per VideoReader).
WORKER_MAX_CALLS = 200
#: How long a new child may take to import its decoders before the environment is declared broken.
WORKER_START_TIMEOUT_S = 120.0
#: Extra time the child grants itself past the caller's timeout before its own alarm kills it; the
#: caller normally kills it first, this only stops a child whose caller vanished.
_CHILD_ALARM_GRACE_S = 30
#: Run once by every child before it takes work: imports the decoders, so that no call pays for
#: them inside its deadline. Returns the versions it loaded (``name -> version``).
WARMUP = "pipeline.decode.backends:load_decoders"


def call_isolated(
    fn: Callable[..., Any], *args: Any, timeout_s: float, label: str, retire: bool = False, **kwargs: Any
) -> Any:
    """Run ``fn(*args, **kwargs)`` in a decode child process and return its result.

    `fn` must be importable by name (a module-level function). A `DecodeError` raised by `fn` is
    raised again here; a hang past `timeout_s` or the death of the child becomes a `DecodeError`
    that starts with `label`; any other exception in `fn` becomes a `DecodeError` too (a bad file
    must not fail the whole job), with its traceback logged. `retire` ends the child after the
    call instead of keeping it for the next one: for calls that leave much memory behind (the shot
    detector's PyTorch, about 1 GB), where a fresh child's start (about 1 s) costs less.
    """
    for attempt in range(2):
        worker = _pool().acquire()
        try:
            return worker.call(fn, args, kwargs, timeout_s=timeout_s, label=label)
        except _WorkerGone:
            if attempt:
                raise RuntimeError("decode processes keep dying before they receive work") from None
        finally:
            if retire:
                worker.close()
            else:
                _pool().release(worker)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# The child process and the pool of them
# --------------------------------------------------------------------------------------------

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_CHILD_CODE = (
    "import sys; sys.path.insert(0, sys.argv[3]); "
    "from pipeline.decode.isolation import _worker_main; _worker_main(int(sys.argv[1]), int(sys.argv[2]))"
)


class _Worker:
    """One decode child process and the two pipes to it.

    A plain ``subprocess.Popen`` of ``python -c`` rather than `multiprocessing`: forking a Ray
    worker (threads, gRPC) is unsafe, and `multiprocessing`'s spawn re-imports the parent's
    ``__main__``, which in a Ray worker is Ray's own worker script. The child gets its own session
    (process group) so that a kill also reaches the ffprobe it may be running.
    """

    def __init__(self) -> None:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        _widen_pipe(resp_w)
        try:
            stdout = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            stdout = subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, str(req_r), str(resp_w), _PACKAGE_ROOT],
                pass_fds=(req_r, resp_w),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                start_new_session=True,
            )
        finally:
            os.close(req_r)
            os.close(resp_w)
        self._send = Connection(req_w, readable=False)
        self._recv = Connection(resp_r, writable=False)
        self.calls = 0
        self.broken = False
        self.busy = False  # a call was sent and its answer not fully read: never reuse then
        self.owner = os.getpid()
        _ALL_WORKERS.add(self)
        if not self._recv.poll(WORKER_START_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"the decode process did not start within {WORKER_START_TIMEOUT_S:g} s")
        try:
            hello = self._recv.recv()
        except (EOFError, OSError):
            self.kill()
            raise RuntimeError(
                f"the decode process exited at start ({_exit_reason(self.proc)}); see its stderr above"
            ) from None
        self.decoders: dict[str, str] = hello[1]

    def alive(self) -> bool:
        return not self.broken and self.proc.poll() is None

    def kill(self) -> None:
        """Kill the child and everything it started (its process group), then reap it."""
        self.broken = True
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a zombie that SIGKILL cannot reap
            pass
        for conn in (self._send, self._recv):
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        """Ask the child to exit by closing its request pipe; kill it if it does not."""
        self.broken = True
        try:
            self._send.close()
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def call(self, fn: Callable, args: tuple, kwargs: dict, *, timeout_s: float, label: str) -> Any:
        """Send one call and wait for its result until the deadline; kill the child on a hang."""
        deadline = time.monotonic() + timeout_s
        self.calls += 1
        alarm = int(math.ceil(timeout_s)) + _CHILD_ALARM_GRACE_S
        try:
            self._send.send((fn, args, kwargs, alarm))
        except (BrokenPipeError, ConnectionResetError):
            self.kill()  # died while idle: not this video's fault
            raise _WorkerGone() from None
        self.busy = True
        try:
            if not self._recv.poll(max(0.0, deadline - time.monotonic())):
                self.kill()
                raise DecodeError(
                    f"{label}: decoding did not finish within {timeout_s:g} s; the decoder was stopped"
                )
            status, payload, sizes = self._recv.recv()
            buffers = []
            for size in sizes:
                buffer = np.empty(size, dtype=np.uint8)
                if not _read_into(self._recv.fileno(), memoryview(buffer), deadline):
                    self.kill()
                    raise DecodeError(f"{label}: decoding did not finish within {timeout_s:g} s")
                buffers.append(buffer)
        except (EOFError, OSError):
            self.kill()
            raise DecodeError(f"{label}: the decoder process died ({_exit_reason(self.proc)})") from None
        self.busy = False
        if status == "ok":
            return pickle.loads(payload, buffers=buffers)
        if status == "decode_error":
            raise DecodeError(payload)
        kind, message, text = payload
        log.warning("unexpected error while decoding %s:\n%s", label, text)
        raise DecodeError(f"{label}: unexpected {kind} while decoding: {message}")


def _widen_pipe(fd: int) -> None:
    """Grow a pipe's kernel buffer from 64 KiB to 1 MiB (Linux): 16 times fewer syscalls per frame batch."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError):
        pass


def _write_all(fd: int, view: memoryview) -> None:
    """Write a whole buffer to a pipe, straight from the frames' memory."""
    view = view.cast("B")
    while view.nbytes:
        written = os.write(fd, view[: 1 << 20])
        view = view[written:]


def _read_into(fd: int, view: memoryview, deadline: float) -> bool:
    """Fill `view` from a pipe until full; False when the deadline passes first.

    Raw reads straight into the destination: `Connection.recv_bytes_into` reads 64 KiB chunks into
    an intermediate BytesIO and copies again, which measured 0.1-0.2 GB/s here, a second or more
    for 64 full-HD frames.
    """
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    view = view.cast("B")
    filled = 0
    while filled < view.nbytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            return False
        count = os.readv(fd, [view[filled:]])
        if count == 0:
            raise EOFError("decode process closed its pipe")
        filled += count
    return True


def _exit_reason(proc: subprocess.Popen) -> str:
    code = proc.poll()
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", possibly out of memory" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


class _WorkerGone(Exception):
    """The idle child had died before it received the call (e.g. killed by the OOM killer)."""


_ALL_WORKERS: "weakref.WeakSet[_Worker]" = weakref.WeakSet()


class _WorkerPool:
    """Idle decode children of this process, reused across videos, one per concurrent caller."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []

    def acquire(self) -> _Worker:
        with self.lock:
            while self.idle:
                worker = self.idle.pop()
                if worker.alive():
                    return worker
                worker.kill()
        return _Worker()

    def release(self, worker: _Worker) -> None:
        if worker.busy or not worker.alive():  # interrupted mid-call (e.g. KeyboardInterrupt) or dead
            worker.kill()
            return
        if worker.calls >= WORKER_MAX_CALLS:
            worker.close()
            return
        with self.lock:
            self.idle.append(worker)

    def shutdown(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for worker in idle:
            worker.close()


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _WorkerPool:
    """The pool of this process; a forked process starts its own instead of sharing the parent's pipes."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _WorkerPool()
        return _POOL


def shutdown_workers() -> None:
    """Stop every decode child that this process started (also done at interpreter exit)."""
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.shutdown()
    for worker in list(_ALL_WORKERS):
        if worker.owner == os.getpid() and worker.proc.poll() is None:
            worker.kill()


atexit.register(shutdown_workers)


def _worker_main(request_fd: int, response_fd: int) -> None:
    """Loop of the child: receive (function, args, kwargs, alarm), send back the outcome.

    Results go back as a protocol-5 pickle whose large buffers (the frames) travel out of band as
    raw messages, received by the parent straight into its own buffers: no pickled copy of the
    frames is ever built. The alarm kills the child (SIGALRM's default action, which also works
    inside native code) if its caller vanished while it hung.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    requests = Connection(request_fd, writable=False)
    responses = Connection(response_fd, readable=False)
    responses.send(("ready", _warm_up()))
    while True:
        try:
            fn, args, kwargs, alarm = requests.recv()
        except (EOFError, OSError):
            return
        signal.alarm(alarm)
        try:
            result = fn(*args, **kwargs)
            buffers: list[pickle.PickleBuffer] = []
            payload = pickle.dumps(result, protocol=5, buffer_callback=buffers.append)
            views = [buffer.raw() for buffer in buffers]
            responses.send(("ok", payload, [view.nbytes for view in views]))
            for view in views:
                _write_all(response_fd, view)
        except DecodeError as exc:
            responses.send(("decode_error", str(exc), []))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
            responses.send(("exception", (type(exc).__name__, str(exc), traceback.format_exc()), []))
        finally:
            signal.alarm(0)


def _warm_up() -> dict[str, str]:
    module, _, name = WARMUP.partition(":")
    return getattr(importlib.import_module(module), name)()
