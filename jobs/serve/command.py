"""`pixelrefer serve OUTPUT [--host 127.0.0.1] [--port 8765] [--storage-options JSON]`."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from typing import Sequence

from jobs.query import run_cli
from jobs.query_errors import UsageError
from jobs.query_sql import parse_storage_options

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="index folder or fsspec URL (s3://bucket/index)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens it to "
                             "the network, and the server says so)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--storage-options", metavar="JSON", default=None,
                        help='fsspec options for OUTPUT and remote source videos, e.g. \'{"profile": "prod"}\'')


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_note(host: str, port: int) -> str | None:
    """The warning for an address other machines can reach (None for loopback)."""
    if is_loopback(host):
        return None
    who = ("every machine that can reach this one on any of its network interfaces"
           if host in ("0.0.0.0", "::", "[::]") else f"every machine that can reach {host}")
    return (f"warning: listening on {host}:{port}: {who} can now search this index and watch its source videos "
            f"(read-only, no login); use --host 127.0.0.1 to keep it to this machine "
            f"({socket.gethostname()})")


def serve_main(args: argparse.Namespace) -> int:
    return run_cli("serve", lambda: _serve(args))


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from jobs.serve.api import ServeIndex
    from jobs.serve.app import build_app

    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a port (1 to 65535)")
    data = ServeIndex(args.output, parse_storage_options(args.storage_options))
    note = exposure_note(args.host, args.port)
    if note:
        print(note, file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    print(f"pixelrefer serve: http://{shown}:{args.port}/ ({'search by meaning' if data.has_embeddings else 'word search'}"
          f", {len(data.videos())} videos); Ctrl-C stops it", file=sys.stderr)
    try:
        app = build_app(data, host="127.0.0.1" if is_loopback(args.host) else args.host)
        uvicorn.run(app, host=args.host.strip("[]"), port=args.port, log_level="warning", server_header=False)
    finally:
        data.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelrefer serve", description=__doc__.split("\n\n")[0])
    add_serve_arguments(parser)
    return serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
