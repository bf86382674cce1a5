"""`pixelrefer submit`: run a pixelrefer job on a Ray cluster through the Ray Jobs API.

    pixelrefer submit [--address http://HEAD:8265] [--working-dir DIR] [--no-wait]
                      [--entrypoint-num-gpus N] [--entrypoint-num-cpus N] [--pip REQ ...]
                      [--env KEY[=VALUE] ...] -- index SOURCE OUTPUT [index options]

Why the Jobs API rather than `pixelrefer index --address ray://...` (Ray Client): the driver then
runs inside the cluster, next to the data and the GCS, and a laptop that sleeps or loses its
network does not kill a nightly run. The job's entrypoint is `python -m jobs.cli <subcommand
args>`, so the cluster runs exactly the command a user would type locally: the same parser, the
same exit status.

Address: `--address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (an explicit flag wins over
the environment, like `index --address`). `http://HEAD:8265` (the dashboard), `ray://HEAD:10001`
(translated by Ray) and a GCS address `HEAD:6379` all work.

Exit status: 0 when the job SUCCEEDED (or, with `--no-wait`, was accepted); the job driver's own
exit status when it FAILED (so `index`'s 1 "not committed" and 2 "usage" come through), 1 when it
failed without one or was STOPPED; 2 for a usage error found before anything was sent; 3 when the
cluster could not be reached or refused the job; 130 when interrupted while following the logs
(the job keeps running).

Secrets: `--storage-options` may carry object-store credentials. They must reach the job, but they
are never printed: every command line, log line and error message this module echoes goes through
`jobs.masking.Masker`, which replaces credential values (and `user:password@` parts of URLs) with `***`.
The storage options echoed in the "submitted job" line are shown field by field, credentials masked
by `pipeline.storage_errors.is_secret_option` (s3fs `key`/`secret`/`token`, gcsfs `token`, adlfs
`connection_string`/`account_key`/`sas_token`/`client_secret`, an `Authorization` header in
`client_kwargs`), so the line still says which endpoint and options the job got.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import os
import re
import secrets as _random
import shlex
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, TextIO

from jobs.masking import Masker, mask_storage_options

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # in Ray's own order of preference
SUBMITTABLE = ("index", "nightly", "query", "report", "embed")
# Never shipped with --working-dir: virtual environments and caches are large and machine-specific
# (Ray also honours .gitignore / .rayignore inside the folder; these cover folders without one).
WORKING_DIR_EXCLUDES = (".git/", ".venv/", "venv/", "__pycache__/", "*.pyc", ".pytest_cache/", "*.egg-info/",
                        "demo-output/", ".cache/")  # fmt: skip
_POLL_S = 1.0
# A cluster that has just started answers "No available agent to submit job" until a node's job
# agent has registered; KubeRay submits right after the head is ready, so this is common there.
_NOT_READY = "No available agent"
_READY_TIMEOUT_S = 120.0


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pixelrefer submit`; everything after `--` is the pixelrefer command to run."""
    parser.add_argument(
        "--address", default=None,
        help="Ray dashboard / Jobs API address, e.g. http://HEAD:8265 (also ray://HEAD:10001 or HEAD:6379); "
             "default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS",
    )  # fmt: skip
    parser.add_argument(
        "--working-dir", default=None,
        help="local folder uploaded as the job's working directory (e.g. '.' to run this checkout's code); "
             "default: run the pixelrefer installed on the cluster (the container image)",
    )  # fmt: skip
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return; do not follow the logs")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=None,
                        help="GPUs reserved for the driver process (default: none)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=None,
                        help="CPUs reserved for the driver process (default: none)")
    parser.add_argument("--pip", action="extend", nargs="+", default=None, metavar="REQ",
                        help="extra pip requirements installed for the job (runtime_env)")
    parser.add_argument("--env", action="append", default=None, metavar="KEY[=VALUE]",
                        help="environment variable for the job; KEY alone copies this shell's value (repeatable)")
    parser.add_argument("--submission-id", default=None,
                        help="job id to use (default: pixelrefer-<command>-<UTC time>-<random>); Ray refuses a "
                             "second job with the same id, which makes retried submissions safe")  # fmt: skip
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the pixelrefer command to run on the cluster, e.g. -- index SOURCE OUTPUT --model M")


# --------------------------------------------------------------------------------------------
# Building the job.
# --------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A problem with the command line, found before anything was sent to the cluster."""


def split_command(command: list[str]) -> list[str]:
    """The pixelrefer argv after `--` (argparse keeps the separator in a REMAINDER)."""
    return command[1:] if command[:1] == ["--"] else list(command)


def _subcommand(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _project_parser() -> argparse.ArgumentParser:
    """The submittable part of the `pixelrefer` parser, built from each subcommand's own options.

    The cluster runs `python -m jobs.cli`, whose parser adds the same functions, so a command that
    passes here is one the cluster accepts. Built here rather than taken from jobs.cli, which
    imports this module.
    """
    from jobs.embed import add_embed_arguments
    from jobs.index import add_index_arguments
    from jobs.query import add_query_arguments
    from jobs.report import add_report_arguments

    parser = argparse.ArgumentParser(prog="pixelrefer")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    adders = {"index": add_index_arguments, "nightly": add_index_arguments,
              "query": add_query_arguments, "report": add_report_arguments,
              "embed": add_embed_arguments}  # fmt: skip
    for name in SUBMITTABLE:
        adders[name](sub.add_parser(name))
    return parser


def validate_command(argv: list[str], masker: Masker | None = None) -> argparse.Namespace:
    """Parse `argv` with the project's CLI and check that it makes sense to run it on a cluster.

    Raises `UsageError`; `SystemExit(0)` when argv asked for `--help` (the help was printed).
    argparse's own error message can quote arguments (`unrecognized arguments: ...`), so it is
    captured and passed on through `masker`.
    """
    masker = masker or Masker()
    if not argv:
        raise UsageError("no command to run: give one after `--`, e.g. `pixelrefer submit -- index SOURCE OUTPUT`")
    sub = _subcommand(argv)
    if sub not in SUBMITTABLE:
        raise UsageError(f"cannot submit {sub!r}: the command after `--` must be one of {', '.join(SUBMITTABLE)}")
    if any(a == "--address" or a.startswith("--address=") for a in argv):
        raise UsageError(
            "--address after `--` would make the job connect to another cluster; inside a job, pixelrefer joins "
            "the cluster it runs on. Put the cluster's address before `--`: "
            "pixelrefer submit --address http://HEAD:8265 -- ..."
        )
    parser = _project_parser()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        reason = captured.getvalue().strip().splitlines()[-1:] or ["invalid arguments"]
        raise UsageError(f"the command after `--` is not valid: {masker.text(reason[0])}") from None
    if getattr(args, "storage_options", None):
        from pipeline.config import IndexConfig

        try:
            IndexConfig.parse_storage_options(args.storage_options)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return args


def build_entrypoint(argv: list[str]) -> str:
    """The shell command the cluster runs: the project's own CLI module, arguments quoted."""
    return "python -m jobs.cli " + shlex.join(argv)


def parse_env(items: list[str] | None, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`KEY=VALUE` pairs; a bare `KEY` takes this shell's value (so it never appears in shell history)."""
    env: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UsageError(f"--env {key or item!r}: expected KEY=VALUE or KEY (a valid variable name)")
        if not sep:
            if key not in environ:
                raise UsageError(f"--env {key}: not set in this environment")
            value = environ[key]
        env[key] = value
    return env


def build_runtime_env(working_dir: str | None, pip: list[str] | None, env: dict[str, str]) -> dict[str, Any]:
    """The job's runtime_env: code to ship, extra packages, environment variables."""
    runtime_env: dict[str, Any] = {}
    if working_dir:
        path = os.path.abspath(os.path.expanduser(working_dir))
        if not os.path.isdir(path):
            raise UsageError(f"--working-dir {working_dir!r} is not a folder")
        runtime_env["working_dir"] = path
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if pip:
        runtime_env["pip"] = list(pip)
    if env:
        runtime_env["env_vars"] = dict(env)
    return runtime_env


def resolve_address(explicit: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """`--address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS; raises UsageError when none is set."""
    if explicit:
        return explicit
    for name in ADDRESS_ENV_VARS:
        if environ.get(name):
            return environ[name]
    raise UsageError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")


def default_submission_id(subcommand: str, now: dt.datetime | None = None) -> str:
    """Readable, unique job ids: what ran, when (UTC), and a random suffix against collisions."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"pixelrefer-{subcommand}-{now:%Y%m%d-%H%M%S}-{_random.token_hex(3)}"


@contextlib.contextmanager
def _without_env(names: Iterable[str]) -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override the address it is given; hide it so an explicit one wins."""
    saved = {n: os.environ.pop(n) for n in list(names) if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str) -> Any:
    """A JobSubmissionClient for exactly `address` (the environment cannot redirect it)."""
    from ray.job_submission import JobSubmissionClient

    with _without_env(ADDRESS_ENV_VARS):
        return JobSubmissionClient(address)


def submit_when_ready(client: Any, err: TextIO, timeout_s: float = _READY_TIMEOUT_S, **job: Any) -> str:
    """`client.submit_job(**job)`, retried while the cluster is still starting its job agents."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if _NOT_READY not in str(exc) or time.monotonic() + delay > deadline:
                raise
            if delay == 0.5:
                err.write("the cluster has no job agent ready yet (it is starting); retrying\n")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# --------------------------------------------------------------------------------------------
# Following the job.
# --------------------------------------------------------------------------------------------


class _LineWriter:
    """Writes log chunks line by line through the masker (a secret split across chunks stays hidden)."""

    def __init__(self, out: TextIO, masker: Masker) -> None:
        self.out, self.masker, self.pending, self.chars = out, masker, "", 0

    def write(self, chunk: str) -> None:
        self.chars += len(chunk)
        self.pending += chunk
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.out.write(self.masker.text(line) + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.pending:
            self.out.write(self.masker.text(self.pending) + "\n")
            self.pending = ""
        self.out.flush()


async def _tail(client: Any, job_id: str, writer: _LineWriter) -> None:
    async for chunk in client.tail_job_logs(job_id):
        writer.write(chunk)


async def _stream_until_done(client: Any, job_id: str, writer: _LineWriter) -> None:
    """Stream the logs until the stream ends or the job is over, whichever comes first.

    The server keeps the stream open for a few seconds after the job ended (it waits for late
    lines); the caller reads those from the full log instead, which is final by then.
    """
    loop = asyncio.get_running_loop()
    tail = asyncio.ensure_future(_tail(client, job_id, writer))
    try:
        while True:
            done, _ = await asyncio.wait({tail}, timeout=_POLL_S)
            if done:
                tail.result()  # raises if the stream broke
                return
            status = await loop.run_in_executor(None, client.get_job_status, job_id)
            if status.is_terminal():
                return
    finally:
        if not tail.done():
            tail.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tail


def _catch_up(client: Any, job_id: str, writer: _LineWriter) -> None:
    """Print the part of the job's log that the stream has not printed (the stream starts at byte 0)."""
    logs = client.get_job_logs(job_id)
    if len(logs) > writer.chars:
        writer.write(logs[writer.chars :])


def follow_logs(client: Any, job_id: str, writer: _LineWriter, err: TextIO) -> None:
    """Print the job's logs as it runs, and all of them once it has ended.

    The log stream is a websocket; some proxies in front of a dashboard do not carry websockets, and
    a long job can outlive a connection. Then this falls back to polling the full log and printing
    what was not printed yet, so the user still sees every line once.
    """
    try:
        asyncio.run(_stream_until_done(client, job_id, writer))
    except Exception as exc:  # RuntimeError from Ray, aiohttp's ClientError, OSError: all mean "no stream"
        reason = writer.masker.text(f"{type(exc).__name__}: {exc}")
        err.write(f"log stream lost ({reason}); polling the job instead\n")
        while not client.get_job_status(job_id).is_terminal():
            _catch_up(client, job_id, writer)
            time.sleep(_POLL_S)
    _catch_up(client, job_id, writer)


def wait_terminal(client: Any, job_id: str) -> Any:
    """The job's final JobInfo (the log stream can close a moment before the status is final)."""
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        time.sleep(_POLL_S)


def exit_code_of(info: Any) -> int:
    """0 for SUCCEEDED; the driver's exit status for FAILED when it has one; 1 otherwise."""
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return EXIT_OK
    code = getattr(info, "driver_exit_code", None)
    if status == "FAILED" and isinstance(code, int) and 0 < code < 256:
        return code
    return EXIT_JOB_FAILED


# --------------------------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------------------------


def _warn_about(args: argparse.Namespace, storage_secrets: bool, err: TextIO) -> None:
    """Hints for the mistakes that only show up later, on the cluster."""
    if storage_secrets:
        err.write(
            "warning: --storage-options holds credentials; the job's command line is stored by the cluster and "
            "shown to anyone who can list its jobs. Prefer credentials from the cluster's environment (infra/: "
            "a Kubernetes Secret) or --env AWS_SECRET_ACCESS_KEY (copied from this shell).\n"
        )
    for name in ("source", "output"):
        value = getattr(args, name, None)
        if value and "://" not in value:
            err.write(f"note: {name.upper()} {value!r} is a local path: it must exist on the cluster's nodes\n")


def submit_main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Submit the command after `--` as a Ray job, print its id, follow its logs, return its status."""
    out = out or sys.stdout
    err = err or sys.stderr
    masker = Masker()
    argv = split_command(args.command or [])
    masked_argv = masker.argv(argv)  # first: it learns the secret values, for everything printed below
    storage_secrets = bool(masker.secrets)
    try:
        command_args = validate_command(argv, masker)
        env = parse_env(args.env)
        masker.add(mask_storage_options(env)[1])  # secret-named variables, and the AccountKey of a connection string
        runtime_env = build_runtime_env(args.working_dir, args.pip, env)
        address = resolve_address(args.address)
        masker.add_url(address)
    except UsageError as exc:
        err.write(f"error: {masker.text(str(exc))}\n")
        return EXIT_USAGE
    except SystemExit as exc:  # `-- index --help`: the help was printed, nothing to submit
        return int(exc.code or 0)
    _warn_about(command_args, storage_secrets, err)

    entrypoint = build_entrypoint(argv)
    submission_id = args.submission_id or default_submission_id(_subcommand(argv) or "job")
    try:
        client = connect(address)
        job_id = submit_when_ready(
            client,
            err,
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=runtime_env or None,
            entrypoint_num_cpus=args.entrypoint_num_cpus,
            entrypoint_num_gpus=args.entrypoint_num_gpus,
            metadata={"pixelrefer_command": _subcommand(argv) or ""},
        )
    except KeyboardInterrupt:
        err.write("interrupted before the job was submitted\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # requests' ConnectionError, Ray's RuntimeError for a refused job, ...
        err.write(f"error: could not submit to {masker.text(address)}: {masker.text(str(exc))}\n")
        return EXIT_UNREACHABLE

    out.write(f"{job_id}\n")
    out.flush()
    env_note = f" env {', '.join(sorted(env))}" if env else ""
    err.write(f"submitted job {job_id} to {masker.text(address)}: {build_entrypoint(masked_argv)}{env_note}\n")
    if args.no_wait:
        err.write(f"follow it with: ray job logs --follow --address {masker.text(address)} {job_id}\n")
        return EXIT_OK

    writer = _LineWriter(out, masker)
    try:
        follow_logs(client, job_id, writer, err)
        writer.close()
        info = wait_terminal(client, job_id)
    except KeyboardInterrupt:
        writer.close()
        err.write(
            f"\nstopped following job {job_id}; it keeps running on the cluster. Stop it with: "
            f"ray job stop --address {masker.text(address)} {job_id}\n"
        )
        return EXIT_INTERRUPTED
    except Exception as exc:
        writer.close()
        err.write(f"error: lost track of job {job_id}: {masker.text(str(exc))}\n")
        return EXIT_UNREACHABLE
    status = str(getattr(info.status, "value", info.status))
    # Ray's failure message repeats the log's tail, which was just printed: keep its first clause.
    reason = (info.message or "").split("\n", 1)[0].split(", last available logs", 1)[0].strip()
    message = f": {masker.text(reason)}" if status != "SUCCEEDED" and reason else ""
    err.write(f"job {job_id} {status}{message}\n")
    return exit_code_of(info)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.submit ...`: the same command without the umbrella CLI."""
    parser = argparse.ArgumentParser(prog="pixelrefer submit", description=__doc__.split("\n\n")[0])
    add_submit_arguments(parser)
    return submit_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
