"""`pixelrefer submit`: the command line, credential masking, and real jobs on a local multi-node cluster.

The cluster is `ray.cluster_utils.Cluster` (a head with the dashboard, which serves the Jobs API,
plus one worker node: separate raylet processes) run by a helper *subprocess* with its own
RAY_TMPDIR and temp dir, so that:
- nothing else on the machine can find it (`ray.init()` elsewhere looks up the last cluster in the
  default temp dir; this one writes its address only under its private folder);
- every process stays on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and node_ip_address);
- stopping it touches only its processes: the helper shuts its nodes down, then anything still
  running with the private folder in its command line (and its children) is killed. `ray stop`
  is never used: it stops every Ray process of the user, including other tests' instances.

`ray start --address=...` (a worker node from the CLI) refuses to run under
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and, without it, rewrites 127.0.0.1 to the machine's network
address; hence the Python API for the nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import json
import os
import shlex
import socket
import sys
import textwrap
import types
from pathlib import Path
from typing import Iterator

import pytest
from loopback_cluster import cluster_processes, helper_cluster

from jobs.masking import MASK, Masker
from jobs.submit import (
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
    _LineWriter,
    add_submit_arguments,
    build_entrypoint,
    build_runtime_env,
    connect,
    default_submission_id,
    exit_code_of,
    follow_logs,
    parse_env,
    resolve_address,
    submit_main,
    submit_when_ready,
    validate_command,
    wait_terminal,
)

SECRET_KEY = "AKIAFAKEKEY0123456789"
SECRET = "sup3r-s3cret-value/xyz"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pixelrefer submit")
    add_submit_arguments(parser)
    return parser.parse_args(argv)


def run_submit(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = submit_main(parse(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def free_ports(n: int) -> list[int]:
    """n distinct ports that nothing listens on right now (all held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port() -> int:
    return free_ports(1)[0]


# --------------------------------------------------------------------------------------------
# Command line, masking, address: no cluster needed.
# --------------------------------------------------------------------------------------------


def test_remainder_after_double_dash_becomes_a_quoted_entrypoint():
    options = json.dumps({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}})
    args = parse(["--address", "http://h:8265", "--pip", "a==1", "b", "--", "index", "s3://b/my videos", "s3://b/out",
                  "--storage-options", options, "--model", "tiny"])  # fmt: skip
    assert args.pip == ["a==1", "b"]
    argv = args.command[1:]
    entrypoint = build_entrypoint(argv)
    assert shlex.split(entrypoint) == ["python", "-m", "jobs.cli", *argv]
    assert validate_command(argv).source == "s3://b/my videos"


def test_storage_option_credentials_are_masked_everywhere():
    options = {"key": SECRET_KEY, "secret": SECRET, "endpoint_url": "http://minio:9000",
               "client_kwargs": {"region_name": "eu-1", "aws_session_token": "session-tok-42"},
               "config_kwargs": {"s3": {"addressing_style": "path"}}}  # fmt: skip
    masker = Masker()
    masked = masker.argv(["index", "s3://a", "s3://b", "--storage-options", json.dumps(options)])
    shown = json.loads(masked[-1])
    assert shown["key"] == shown["secret"] == shown["client_kwargs"]["aws_session_token"] == MASK
    assert shown["endpoint_url"] == "http://minio:9000" and shown["client_kwargs"]["region_name"] == "eu-1"
    assert shown["config_kwargs"] == {"s3": {"addressing_style": "path"}}
    # The values are remembered: a log line that repeats one is masked too, as are URL passwords.
    line = masker.text(f"connecting with {SECRET} to s3://user:pa55word@host/x, token session-tok-42")
    assert SECRET not in line and "pa55word" not in line and "session-tok-42" not in line
    assert line.count(MASK) == 3
    # The --opt=value spelling, and JSON that cannot be parsed (then all of it is hidden).
    masked = Masker().argv([f"--storage-options={json.dumps({'password': 'hunter2hunter2'})}"])
    assert "hunter2" not in masked[0] and MASK in masked[0]
    bad = Masker()
    assert bad.argv(["--storage-options", "{'secret': 'xyzzy-plugh'"])[-1] == MASK
    assert "xyzzy" not in bad.text("echo {'secret': 'xyzzy-plugh'")


def test_address_flag_beats_environment_and_api_server_address_beats_ray_address():
    env = {"RAY_ADDRESS": "ray://a:10001", "RAY_API_SERVER_ADDRESS": "http://b:8265"}
    assert resolve_address("http://c:8265", env) == "http://c:8265"
    assert resolve_address(None, env) == "http://b:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "ray://a:10001"}) == "ray://a:10001"
    with pytest.raises(UsageError, match="--address"):
        resolve_address(None, {})


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no command"),
        (["demo"], "cannot submit 'demo'"),
        (["submit", "--", "index", "a", "b"], "cannot submit 'submit'"),
        (["index", "a", "b", "--address", "ray://x:10001"], "before `--`"),
        (["index", "a", "b", "--fps", "fast"], "--fps"),
        (["index", "a"], "OUTPUT"),
        (["nightly", "a", "b", "--storage-options", "[1, 2]"], "JSON object"),
    ],
)
def test_bad_commands_are_refused_before_anything_is_sent(argv, message):
    code, out, err = run_submit(["--address", "http://127.0.0.1:1", "--", *argv])
    assert code == EXIT_USAGE and out == ""
    assert message in err


def test_usage_errors_never_show_credentials():
    options = json.dumps({"secret": SECRET})
    code, out, err = run_submit(["--address", f"http://u:{SECRET}@127.0.0.1:1", "--", "index", "a", "b",
                                 "--storage-options", options, "--fps", SECRET])  # fmt: skip
    assert code == EXIT_USAGE and SECRET not in err + out


def test_submit_checks_each_command_with_the_options_the_cluster_will_parse(capsys):
    """submit builds its parser from the subcommands' own options; it must match the CLI's."""
    from jobs.cli import build_parser
    from jobs.submit import SUBMITTABLE, _project_parser

    def help_of(parser: argparse.ArgumentParser, name: str) -> str:
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        return capsys.readouterr().out

    for name in SUBMITTABLE:
        assert help_of(_project_parser(), name) == help_of(build_parser(), name), name
    assert validate_command(["query", "s3://b/out", "--sql", "SELECT 1", "--format", "jsonl"]).format == "jsonl"
    assert validate_command(["report", "s3://b/out", "--video", "abc", "--out", "r.html"]).video == "abc"
    assert validate_command(["embed", "s3://b/out", "--rebuild-search"]).rebuild_search is True
    with pytest.raises(UsageError, match="--format"):
        validate_command(["query", "s3://b/out", "--format", "yaml"])


def test_help_of_the_submitted_command_submits_nothing(capsys):
    code, out, err = run_submit(["--address", "http://127.0.0.1:1", "--", "index", "--help"])
    assert code == 0 and out == "" and "SOURCE" in capsys.readouterr().out


def test_env_and_runtime_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FROM_SHELL", "v1")
    assert parse_env(["A=1", "B=x=y", "FROM_SHELL"]) == {"A": "1", "B": "x=y", "FROM_SHELL": "v1"}
    for bad in (["NOT_SET_ANYWHERE_42"], ["1X=2"], ["=v"]):
        with pytest.raises(UsageError):
            parse_env(bad, environ={})
    runtime_env = build_runtime_env(str(tmp_path), ["numpy"], {"A": "1"})
    assert runtime_env["working_dir"] == str(tmp_path) and ".venv/" in runtime_env["excludes"]
    assert runtime_env["pip"] == ["numpy"] and runtime_env["env_vars"] == {"A": "1"}
    assert build_runtime_env(None, None, {}) == {}
    with pytest.raises(UsageError, match="not a folder"):
        build_runtime_env(str(tmp_path / "missing"), None, {})


def test_exit_status_follows_the_job():
    def info(status, code=None):
        return types.SimpleNamespace(status=status, driver_exit_code=code)

    assert exit_code_of(info("SUCCEEDED", 0)) == 0
    assert exit_code_of(info("FAILED", 2)) == 2
    assert exit_code_of(info("FAILED", None)) == 1
    assert exit_code_of(info("STOPPED", None)) == 1
    assert default_submission_id("nightly").startswith("pixelrefer-nightly-")


def test_submission_waits_for_a_starting_cluster_but_not_for_other_errors(monkeypatch):
    monkeypatch.setattr("jobs.submit.time.sleep", lambda s: None)

    class Client:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def submit_job(self, **job):
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
            return job["submission_id"]

    starting = RuntimeError("Request failed with status code 500: No available agent to submit job, try again later.")
    client, err = Client([starting, starting]), io.StringIO()
    assert submit_when_ready(client, err, submission_id="x") == "x" and client.calls == 3
    assert "retrying" in err.getvalue()
    client = Client([RuntimeError("Job with submission_id x already exists.")])
    with pytest.raises(RuntimeError, match="already exists"):
        submit_when_ready(client, io.StringIO(), submission_id="x")
    with pytest.raises(RuntimeError, match="No available agent"):
        submit_when_ready(Client([starting] * 100), io.StringIO(), timeout_s=3.0, submission_id="x")


def test_unreachable_cluster_is_exit_3_and_hides_url_passwords():
    for password in ("pa55-w0rd-1234", SECRET):  # a plain one, and one a URL parser splits at its '/'
        address = f"http://ops:{password}@127.0.0.1:{free_port()}"
        code, out, err = run_submit(["--address", address, "--", "index", "s3://a", "s3://b"])
        assert code == EXIT_UNREACHABLE and out == ""
        assert "could not submit" in err and password not in err


# --------------------------------------------------------------------------------------------
# A real cluster: head (dashboard, Jobs API) + one worker node, on loopback.
# --------------------------------------------------------------------------------------------

CLUSTER_HELPER = textwrap.dedent(
    """
    import json, os, signal, sys
    from ray.cluster_utils import Cluster

    temp_dir, port, agent_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    node = dict(object_store_memory=80 * 1024 * 1024, node_ip_address="127.0.0.1", temp_dir=temp_dir)
    # The head's job agent would take Ray's fixed default port (52365), which any other Ray
    # instance on the machine (another test session's) may hold: then no job can be submitted.
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        node, num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
        dashboard_agent_listen_port=agent_port))
    # Two CPUs on the worker: the index job's decode task (1 CPU) must fit on one node beside the
    # two half-CPU model actors, wherever Ray places them.
    cluster.add_node(**node, num_cpus=2)
    cluster.wait_for_nodes()

    def stop(*_):
        cluster.shutdown()
        os._exit(0)

    # Ray's own SIGTERM handler drains the node first, which can wait forever on a busy node.
    signal.signal(signal.SIGTERM, stop)
    print(json.dumps({"dashboard": "http://" + cluster.webui_url, "gcs": cluster.address}), flush=True)
    sys.stdin.read()  # until the test closes our stdin (or dies)
    stop()
    """
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[types.SimpleNamespace]:
    bin_dir = str(Path(sys.executable).parent)  # jobs run `python -m jobs.cli`: this venv's python
    path = {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    with helper_cluster(CLUSTER_HELPER, [str(p) for p in free_ports(2)], prefix="prsub-", env=path) as (line, root, _):
        info = types.SimpleNamespace(**line, root=Path(root))
        yield info
        # Stop jobs still running (a failed test can leave one), so that no driver outlives the cluster.
        with contextlib.suppress(Exception):
            client = connect(info.dashboard)
            for job in client.list_jobs():
                if not job.status.is_terminal():
                    client.stop_job(job.submission_id or job.job_id)


@pytest.fixture
def no_ray_env(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cluster_listens_on_loopback_only(cluster):
    import psutil

    listening = set()
    for proc in cluster_processes(str(cluster.root)):
        with contextlib.suppress(psutil.Error):
            listening |= {c.laddr.ip for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)

    assert listening and all(loopback(ip) for ip in listening), listening


def test_index_job_runs_on_the_cluster_and_secrets_stay_hidden(cluster, tmp_path, no_ray_env):
    # The working dir holds the (empty) source folder under a relative name that exists nowhere
    # else: the job can only find it if the folder was shipped and the job runs inside it.
    work = tmp_path / "work"
    (work / "clips-only-in-working-dir").mkdir(parents=True)
    output = tmp_path / "index"
    # An explicit --address must win over a RAY_ADDRESS that points nowhere.
    no_ray_env.setenv("RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")
    options = json.dumps({"key": SECRET_KEY, "secret": SECRET})
    code, out, err = run_submit([
        "--address", cluster.dashboard, "--working-dir", str(work), "--env", "PIXELREFER_PROBE=42",
        "--", "index", "clips-only-in-working-dir", str(output), "--storage-options", options,
    ])  # fmt: skip
    context = f"stdout:\n{out}\nstderr:\n{err}"
    assert code == EXIT_OK, context
    job_id = out.splitlines()[0]
    assert job_id.startswith("pixelrefer-index-"), context
    assert "no videos found under clips-only-in-working-dir" in out, context  # the job's own log, streamed
    assert f"job {job_id} SUCCEEDED" in err, context
    # Ray's log starts with "Running entrypoint ...: <the command line>": it holds the credentials.
    assert "Running entrypoint for job" in out and "--storage-options" in out, context
    assert SECRET not in out + err and SECRET_KEY not in out + err
    assert "warning: --storage-options holds credentials" in err, context

    info = connect(cluster.dashboard).get_job_info(job_id)
    assert info.entrypoint.startswith("python -m jobs.cli index clips-only-in-working-dir ")
    assert info.runtime_env["env_vars"] == {"PIXELREFER_PROBE": "42"}
    assert info.metadata["pixelrefer_command"] == "index"


def test_failing_index_job_gives_its_exit_status(cluster, tmp_path, no_ray_env):
    no_ray_env.setenv("RAY_ADDRESS", cluster.dashboard)  # the environment is enough without --address
    code, out, err = run_submit(["--", "index", str(tmp_path / "no-such-source"), str(tmp_path / "out")])
    context = f"stdout:\n{out}\nstderr:\n{err}"
    assert code == 1, context  # index's own "could not commit" status, passed through
    assert "source not found" in out, context
    assert "FAILED: Job entrypoint command failed with exit code 1" in err, context
    assert "last available logs" not in err, context  # printed once, on stdout


def test_no_wait_prints_only_the_id_and_ids_are_never_reused(cluster, tmp_path, no_ray_env):
    job_id = "pixelrefer-test-nowait"
    code, out, err = run_submit(["--address", cluster.dashboard, "--no-wait", "--submission-id", job_id,
                                 "--", "nightly", str(tmp_path / "missing"), str(tmp_path / "out")])  # fmt: skip
    assert code == EXIT_OK and out == f"{job_id}\n", err
    assert "ray job logs --follow" in err, err
    client = connect(cluster.dashboard)
    try:
        # Ray refuses a second job with the same id: a retried cron submission cannot run twice.
        code, out, err = run_submit(["--address", cluster.dashboard, "--submission-id", job_id,
                                     "--", "nightly", "a", "b"])  # fmt: skip
        assert code == EXIT_UNREACHABLE and out == "" and job_id in err, err
    finally:
        client.stop_job(job_id)  # nothing to learn from its run: the tests above follow real ones
    assert str(wait_terminal(client, job_id).status.value) in ("STOPPED", "FAILED")


def test_runtime_env_reaches_the_driver_and_logs_are_masked(cluster):
    client = connect(cluster.dashboard)
    script = "import os, sys; print('probe=' + os.environ['PROBE']); print('token=' + os.environ['API_TOKEN']); sys.exit(7)"  # noqa: E501
    job_id = submit_when_ready(
        client, io.StringIO(),
        entrypoint=f"python -c {shlex.quote(script)}",
        runtime_env=build_runtime_env(None, None, {"PROBE": "hello", "API_TOKEN": "tok-0123456789"}),
        entrypoint_num_cpus=1,  # the driver may land on either node
    )
    masker = Masker()
    masker.add(["tok-0123456789"])
    out, err = io.StringIO(), io.StringIO()
    writer = _LineWriter(out, masker)
    follow_logs(client, job_id, writer, err)
    writer.close()
    assert "probe=hello" in out.getvalue() and f"token={MASK}" in out.getvalue(), out.getvalue() + err.getvalue()
    assert "tok-0123456789" not in out.getvalue()
    assert exit_code_of(wait_terminal(client, job_id)) == 7


@pytest.mark.timeout(420)
@pytest.mark.skipif(
    not os.environ.get("PIXELREFER_CLUSTER_E2E"),
    reason="a real tiny index run on the two-node cluster costs about a minute on two cores; "
    "set PIXELREFER_CLUSTER_E2E=1 to run it",
)
def test_real_tiny_index_run_through_submit(cluster, tmp_path, no_ray_env):
    import duckdb

    from pipeline.samples import make_video

    make_video(tmp_path / "videos" / "clip.mp4", duration_s=1.0, seed=3)
    output = tmp_path / "index"
    code, out, err = run_submit(["--address", cluster.dashboard, "--", "index", str(tmp_path / "videos"), str(output),
                                 "--num-frames", "2", "--max-new-tokens", "2", "--max-objects", "1"])  # fmt: skip
    assert code == EXIT_OK, f"stdout:\n{out}\nstderr:\n{err}"
    assert "committed" in out
    rows = duckdb.sql(
        f"SELECT status, model FROM read_parquet('{output}/videos/**/*.parquet', hive_partitioning=true)"
    ).fetchall()
    assert rows == [("ok", "tiny-lite")]


def test_forwarded_storage_options_are_printed_masked(monkeypatch):
    """The "submitted job" line shows the options the job got, with s3fs, gcsfs and adlfs credentials masked."""
    account_key = "Zm9vYmFyYmF6+cXV4c2VjcmV0/a2V5=="
    connection = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={account_key};EndpointSuffix=x.net"
    options = {"key": SECRET_KEY, "secret": SECRET, "connection_string": connection, "sas_token": "sv=1&sig=s1gn4ture",
               "client_secret": "cl1ent~s3cret", "credential": "cred-value-9", "account_name": "acct",
               "token": {"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\nMIIE\n"},
               "client_kwargs": {"endpoint_url": "http://minio:9000",
                                 "headers": {"Authorization": "Bearer eyJhbGciOi.e30.c2ln"}}}  # fmt: skip
    submitted: dict = {}

    class Client:
        def submit_job(self, **job):
            submitted.update(job)
            return "job-1"

    monkeypatch.setattr("jobs.submit.connect", lambda address: Client())
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection)
    code, out, err = run_submit(["--address", "http://127.0.0.1:1", "--no-wait", "--env",
                                 "AZURE_STORAGE_CONNECTION_STRING", "--", "index", "abfs://c/in", "abfs://c/out",
                                 "--storage", json.dumps(options)])  # fmt: skip
    assert code == EXIT_OK and out == "job-1\n"
    assert json.dumps(options) in submitted["entrypoint"]  # the job gets the real values ...
    for secret in (SECRET_KEY, SECRET, account_key, "s1gn4ture", "cl1ent~s3cret", "cred-value-9", "MIIE",
                   "eyJhbGciOi"):  # fmt: skip
        assert secret not in err, secret  # ... the terminal never sees them
    line = next(x for x in err.splitlines() if x.startswith("submitted job"))
    words = shlex.split(line.split(": ", 1)[1])
    shown = json.loads(words[words.index("--storage") + 1])
    assert shown["connection_string"] == shown["client_kwargs"]["headers"]["Authorization"] == MASK
    assert shown["account_name"] == "acct" and shown["client_kwargs"]["endpoint_url"] == "http://minio:9000"
