"""A fault-injecting HTTP proxy on loopback, in front of the moto S3 server.

Clients (s3fs, boto3, the decoder's child process) talk to `FaultProxy.url` exactly as they would
talk to S3; every request is relayed to the real moto server unless a `Fault` matches it, in which
case the proxy answers the way a real S3 endpoint or a bad network would:

* ``"slowdown"``: ``503 SlowDown`` with S3's XML error body (throttling),
* ``"deny"``: ``403 AccessDenied`` with S3's XML error body (a bucket policy refusing the write),
* ``"reset"``: the connection is cut (TCP RST) after half of the request body arrived, before
  anything reaches moto (a network error mid-upload),
* ``"drop_response"``: the request reaches moto and is applied, then the connection is cut before
  the response (the client cannot know whether its write happened).

Faults match on method and on the decoded path (``/bucket/key``) by prefix and/or suffix, and fire
for the first `times` matching requests (``None``: for ever). Every request is recorded in
`FaultProxy.requests` as ``(method, path, what_happened)`` so a test can assert that a fault was
really injected, not merely configured.

Plain sockets and threads (one thread per client connection, HTTP/1.1 keep-alive, the upstream
side through `http.client`): the proxy must control the connection byte by byte to cut it mid-body,
which higher-level servers do not allow.

`ProcessFaultProxy` runs the same proxy in a process of its own: what any test must use whose
requests come from delta-rs (see its docstring).
"""

from __future__ import annotations

import dataclasses
import http.client
import multiprocessing
import socket
import socketserver
import struct
import threading
import urllib.parse
import uuid
from multiprocessing.managers import BaseManager
from typing import Iterable

#: Hop-by-hop headers that the proxy consumes instead of relaying.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}

_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "deny": (403, "Forbidden", "AccessDenied", "Access Denied"),
}


@dataclasses.dataclass
class Fault:
    """One rule: what to do to which requests, and how often."""

    action: str  # "slowdown" | "deny" | "reset" | "drop_response"
    methods: tuple[str, ...] = ("PUT", "POST")
    prefix: str = "/"
    suffix: str = ""
    times: int | None = None
    fired: int = 0

    def __post_init__(self) -> None:
        if self.action not in ("slowdown", "deny", "reset", "drop_response"):
            raise ValueError(f"unknown fault action {self.action!r}")

    def matches(self, method: str, path: str) -> bool:
        if method not in self.methods or not path.startswith(self.prefix) or not path.endswith(self.suffix):
            return False
        return self.times is None or self.fired < self.times


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FaultProxy"


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        proxy = self.server.proxy
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            while self._one_request(proxy, upstream):
                pass
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            upstream.close()

    def _one_request(self, proxy: "FaultProxy", upstream: http.client.HTTPConnection) -> bool:
        line = self.rfile.readline(65537)
        while line in (b"\r\n", b"\n"):
            line = self.rfile.readline(65537)
        if not line:
            return False
        method, target, _version = line.decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            raw = self.rfile.readline(65537)
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        lower = {name.lower(): value for name, value in headers}
        path = urllib.parse.unquote(urllib.parse.urlsplit(target).path)
        fault = proxy._match(method, path)

        if lower.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        length = int(lower.get("content-length", "0") or 0)
        chunked = "chunked" in lower.get("transfer-encoding", "").lower()

        if fault is not None and fault.action == "reset":
            if length:
                self.rfile.read(length // 2)
            proxy._record(method, path, "reset")
            self._reset()
            return False

        body = self._read_chunked() if chunked else (self.rfile.read(length) if length else b"")
        if fault is not None and fault.action in _ERRORS:
            proxy._record(method, path, fault.action)
            self._error(method, path, *_ERRORS[fault.action])
            return "close" not in lower.get("connection", "").lower()

        response, data = self._forward(upstream, method, target, headers, body, length)
        if fault is not None and fault.action == "drop_response":
            proxy._record(method, path, "drop_response")
            self._reset()
            return False
        proxy._record(method, path, str(response.status))
        out = [f"HTTP/1.1 {response.status} {response.reason}\r\n".encode("latin-1")]
        for name, value in response.getheaders():
            if name.lower() in _HOP or (name.lower() == "content-length" and method != "HEAD"):
                continue
            out.append(f"{name}: {value}\r\n".encode("latin-1"))
        if method != "HEAD":
            out.append(f"Content-Length: {len(data)}\r\n".encode())
        out.append(b"Connection: keep-alive\r\n\r\n")
        self.wfile.write(b"".join(out) + (b"" if method == "HEAD" else data))
        self.wfile.flush()
        return "close" not in lower.get("connection", "").lower()

    @staticmethod
    def _forward(
        upstream: http.client.HTTPConnection, method: str, target: str, headers: list[tuple[str, str]],
        body: bytes, length: int,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """Relay one request; a kept-alive upstream connection that moto closed meanwhile is reopened once."""
        for attempt in (1, 2):
            try:
                upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    if name.lower() not in _HOP and name.lower() != "content-length":
                        upstream.putheader(name, value)
                if body or method in ("PUT", "POST") or length:
                    upstream.putheader("Content-Length", str(len(body)))
                upstream.endheaders(body or None)
                response = upstream.getresponse()
                return response, response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                upstream.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _error(self, method: str, path: str, status: int, reason: str, code: str, message: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nx-amz-request-id: {request_id}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
        ).encode()
        self.wfile.write(head + (b"" if method == "HEAD" else body))
        self.wfile.flush()

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0), as a middlebox or a crashed peer does."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        for stream in (self.rfile, self.wfile):  # the socket closes only once its file objects do
            try:
                stream.close()
            except OSError:
                pass
        self.connection.close()


class FaultProxy:
    """Relay to `upstream` (``http://host:port``), injecting the faults added with `add`.

    Use as a context manager; `url` is the endpoint to give clients (``endpoint_url``).
    """

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, action: str, **match) -> Fault:
        fault = Fault(action, **match)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def injected(self, action: str | None = None) -> list[tuple[str, str, str]]:
        """Requests that a fault answered (all faults, or those of one action)."""
        faults = {"slowdown", "deny", "reset", "drop_response"} if action is None else {action}
        with self._lock:
            return [r for r in self.requests if r[2] in faults]

    def _match(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.fired += 1
                    return fault
        return None

    def _record(self, method: str, path: str, what: str) -> None:
        with self._lock:
            self.requests.append((method, path, what))

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def paths(requests: Iterable[tuple[str, str, str]]) -> list[str]:
    return [path for _, path, _ in requests]


# ------------------------------------------------------------------------------------------------
# The same proxy in a process of its own
# ------------------------------------------------------------------------------------------------


class _Hosted(FaultProxy):
    """`FaultProxy` as served from the manager's process: plain methods only (what a manager exposes)."""

    def start(self) -> str:
        self.__enter__()
        return self.url

    def stop(self) -> None:
        self.__exit__()

    def add_fault(self, action: str, match: dict) -> int:
        self.add(action, **match)
        return len(self.faults) - 1

    def fired(self, index: int) -> int:
        with self._lock:
            return self.faults[index].fired

    def all_requests(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return list(self.requests)


class _Manager(BaseManager):
    pass


_Manager.register("FaultProxy", _Hosted,
                  exposed=("start", "stop", "add_fault", "fired", "all_requests", "clear", "injected"))


@dataclasses.dataclass
class RemoteFault:
    """A fault of a `ProcessFaultProxy`: `fired` asks the proxy's process."""

    _proxy: object
    _index: int
    times: int | None

    @property
    def fired(self) -> int:
        return self._proxy.fired(self._index)  # type: ignore[attr-defined]


class ProcessFaultProxy:
    """`FaultProxy` run in a separate process (a `multiprocessing` manager, spawned).

    delta-rs holds the GIL through some calls (reading a table's history, listing its log); a proxy
    thread in the test's own process then cannot relay the very request that call waits for, and
    both hang until the client's timeout (3 min). In its own process the proxy never waits on the
    test's GIL. Same interface as `FaultProxy` (`url`, `add`, `clear`, `injected`, `requests`)."""

    def __init__(self, upstream: str) -> None:
        self._manager = _Manager(ctx=multiprocessing.get_context("spawn"))
        self._upstream = upstream
        self._remote: object = None
        self.url = ""

    def __enter__(self) -> "ProcessFaultProxy":
        self._manager.start()
        self._remote = self._manager.FaultProxy(self._upstream)  # type: ignore[attr-defined]
        self.url = self._remote.start()  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._remote.stop()  # type: ignore[attr-defined]
        finally:
            self._manager.shutdown()

    def add(self, action: str, **match) -> RemoteFault:
        Fault(action, **match)  # validate here, where the mistake is made
        return RemoteFault(self._remote, self._remote.add_fault(action, match), match.get("times"))  # type: ignore[attr-defined]

    def clear(self) -> None:
        self._remote.clear()  # type: ignore[attr-defined]

    def injected(self, action: str | None = None) -> list[tuple[str, str, str]]:
        return list(self._remote.injected(action))  # type: ignore[attr-defined]

    @property
    def requests(self) -> list[tuple[str, str, str]]:
        return list(self._remote.all_requests())  # type: ignore[attr-defined]
