"""infra/: the manifests, the container build and the cron example agree with KubeRay, with each
other and with the project's own command line.

No Kubernetes here: the checks are structural. Field names are checked against the KubeRay v1 API
(ray-operator/apis/ray/v1/*_types.go, KubeRay 1.7), so a misspelt field, which `kubectl apply`
would drop or reject only on a real cluster, fails here. Every `pixelrefer ...` command in the
manifests and the cron example is parsed by the project's own parser.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MANIFESTS = {
    "raycluster.yaml": "RayCluster",
    "rayjob-index.yaml": "RayJob",
    "raycronjob-nightly.yaml": "RayCronJob",
}

# The v1 fields this project may use (json names in KubeRay's Go types).
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                   "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions", "upgradeStrategy",
                   "authOptions", "networkPolicy", "tlsOptions", "historyServerOptions"}  # fmt: skip
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                      "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args"}  # fmt: skip
HEAD_GROUP = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels", "rayStartParams",
              "serviceType"}  # fmt: skip
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "priority",
                "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}  # fmt: skip
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "preRunningDeadlineSeconds", "shutdownAfterJobFinishes",
               "suspend"}  # fmt: skip
RAYCRONJOB_SPEC = {"jobTemplate", "schedule", "timeZone", "suspend"}
SECRET_ENV = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
SHELL_OPERATORS = set("();<>|&")


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def load(name: str) -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]
    assert len(documents) == 1, f"{name}: expected one document"
    return documents[0]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayCronJob": lambda: spec["jobTemplate"]["rayClusterSpec"]}[doc["kind"]]()  # fmt: skip


def job_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, pod spec, container) for every container of the head and the worker groups."""
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            yield name, pod, container


def pyproject_value(pattern: str) -> str:
    """One value from pyproject.toml (a regex: tomllib is Python 3.11+, the project supports 3.10)."""
    match = re.search(pattern, (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, pattern
    return match.group(1)


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile(), re.MULTILINE)
    assert match, f"Dockerfile: no ARG {name}=..."
    return match.group(1).strip('"')


def image_name() -> str:
    match = re.search(r"^# image: (\S+)$", dockerfile(), re.MULTILINE)
    assert match, "Dockerfile: no '# image: NAME:TAG' line"
    return match.group(1)


def project_parser() -> argparse.ArgumentParser:
    from jobs.cli import build_parser

    return build_parser()


def parse_pixelrefer(command: str) -> tuple[str, argparse.Namespace]:
    """Parse a `pixelrefer ...` command line the way the console script would."""
    argv = shlex.split(command)
    assert argv[0] == "pixelrefer", command
    args = argv[1:]
    if args[:1] == ["submit"]:
        # `submit` may not be wired into jobs.cli yet: its own options, then the command it sends.
        from jobs.submit import add_submit_arguments, split_command, validate_command

        parser = argparse.ArgumentParser(prog="pixelrefer submit")
        add_submit_arguments(parser)
        submit = parser.parse_args(args[1:])
        inner = validate_command(split_command(submit.command))
        inner.submit = submit
        return "submit", inner
    return args[0], project_parser().parse_args(args)


def cron_fields_valid(fields: list[str]) -> bool:
    bounds = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    item = re.compile(r"^(\*|(\d+)(-(\d+))?)(/(\d+))?$")
    for field, (low, high) in zip(fields, bounds, strict=True):
        for part in field.split(","):
            m = item.match(part)
            if not m:
                return False
            for number in (m.group(2), m.group(4)):
                if number is not None and not low <= int(number) <= high:
                    return False
    return True


def pixelrefer_in_shell(line: str) -> str:
    """The `pixelrefer ...` command inside a shell line, up to its first redirection or operator."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    start = tokens.index("pixelrefer")
    end = next((i for i in range(start, len(tokens)) if set(tokens[i]) <= SHELL_OPERATORS), len(tokens))
    return shlex.join(tokens[start:end])


def cron_entries() -> list[tuple[list[str], str, bool]]:
    """(schedule fields, command, active) for each crontab entry; commented entries are alternatives."""
    entries = []
    for raw in (INFRA / "cron.example").read_text().splitlines():
        active = not raw.startswith("#")
        line = raw.lstrip("#").strip()
        fields = line.split(None, 5)
        if len(fields) == 6 and cron_fields_valid(fields[:5]) and "pixelrefer" in fields[5]:
            entries.append((fields[:5], fields[5], active))
    return entries


# --------------------------------------------------------------------------------------------
# Manifests.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", MANIFESTS.items())
def test_manifest_is_a_kuberay_v1_object_with_known_fields(name, kind):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert isinstance(doc["spec"], dict)
    if kind == "RayCronJob":
        assert set(doc["spec"]) <= RAYCRONJOB_SPEC
    if kind in ("RayJob", "RayCronJob"):
        assert set(job_spec(doc)) <= RAYJOB_SPEC
    spec = cluster_spec(doc)
    assert set(spec) <= RAYCLUSTER_SPEC
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP and "rayStartParams" in spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP
        assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)


@pytest.mark.parametrize("name", MANIFESTS)
def test_gpu_worker_group_with_autoscaling_bounds(name):
    spec = cluster_spec(load(name))
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            limits = container["resources"]["limits"]
            if "nvidia.com/gpu" in limits:
                assert isinstance(limits["nvidia.com/gpu"], int) and limits["nvidia.com/gpu"] >= 1
                assert container["resources"].get("requests", {}).get("nvidia.com/gpu", limits["nvidia.com/gpu"]) \
                    == limits["nvidia.com/gpu"]  # fmt: skip
                gpu_groups.append(group)
    assert gpu_groups, f"{name}: no worker group with an nvidia.com/gpu limit"
    for group in gpu_groups:
        assert group["maxReplicas"] > group["minReplicas"] >= 1  # autoscales, and never starts a run without GPUs
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})


@pytest.mark.parametrize("name", MANIFESTS)
def test_one_image_and_one_ray_version_everywhere(name):
    spec = cluster_spec(load(name))
    assert spec["rayVersion"] == dockerfile_arg("RAY_VERSION")
    for group, _, container in containers(spec):
        assert container["image"] == image_name(), f"{name}: {group}"


def test_image_tag_is_the_project_version():
    version = pyproject_value(r'^version = "([^"]+)"')
    assert image_name().rsplit(":", 1)[1] == version


@pytest.mark.parametrize("name", MANIFESTS)
def test_credentials_come_from_secrets_only(name):
    spec = cluster_spec(load(name))
    for group, pod, container in containers(spec):
        env = {e["name"]: e for e in container.get("env", [])}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[var]["valueFrom"], f"{name}: {group}: {var}"
        for var, entry in env.items():
            if SECRET_ENV.search(var):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], f"{name}: {group}: {var}"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{name}: {group}: Ray's object store needs a real /dev/shm"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{name}: {group}"
    if "entrypoint" in job_spec(load(name)):
        assert "--storage-options" not in job_spec(load(name))["entrypoint"]


def test_rayjob_runs_a_one_off_index_and_cleans_up():
    spec = load("rayjob-index.yaml")["spec"]
    command, args = parse_pixelrefer(spec["entrypoint"])
    assert command == "index"
    assert args.source.startswith("s3://") and args.output.startswith("s3://")
    assert args.model == "Alibaba-DAMO-Academy/PixelRefer-Lite-2B"
    assert args.tracker == "facebook/sam2.1-hiera-large"
    assert args.address is None  # inside the job, pixelrefer joins the cluster it runs on
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


def test_raycronjob_runs_nightly_and_cannot_overlap_itself():
    doc = load("raycronjob-nightly.yaml")
    fields = doc["spec"]["schedule"].split()
    assert len(fields) == 5 and cron_fields_valid(fields)
    assert fields[2:] == ["*", "*", "*"] and fields[1].isdigit()  # once a day
    job = doc["spec"]["jobTemplate"]
    command, args = parse_pixelrefer(job["entrypoint"])
    assert command == "nightly" and args.address is None
    assert args.source.startswith("s3://") and args.output.startswith("s3://")
    assert (args.model, args.tracker) == ("Alibaba-DAMO-Academy/PixelRefer-Lite-2B", "facebook/sam2.1-hiera-large")
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert 0 < job["activeDeadlineSeconds"] < 24 * 3600


def test_manifest_and_cli_agree_on_the_nightly_and_index_options():
    # Same model, tracker and data for the one-off and the nightly run: a nightly run with another
    # model would not count the one-off's rows as indexed and would index everything again.
    _, one_off = parse_pixelrefer(load("rayjob-index.yaml")["spec"]["entrypoint"])
    _, nightly = parse_pixelrefer(load("raycronjob-nightly.yaml")["spec"]["jobTemplate"]["entrypoint"])
    for option in ("source", "output", "model", "tracker", "mode"):
        assert getattr(one_off, option) == getattr(nightly, option), option


# --------------------------------------------------------------------------------------------
# Cron example.
# --------------------------------------------------------------------------------------------


def test_cron_example_entries_parse_and_are_locked_and_logged():
    entries = cron_entries()
    assert [active for *_, active in entries].count(True) == 1, "one active entry"
    for fields, line, active in entries:
        assert fields[2:] == ["*", "*", "*"]
        tokens = shlex.split(line.split(";")[0])
        assert tokens[0] == "flock" and ("--nonblock" in tokens or "-n" in tokens)  # never two runs at once
        assert ">>" in tokens and "2>&1" in tokens  # both streams appended to a log
        command, args = parse_pixelrefer(pixelrefer_in_shell(line))
        assert args.source.startswith("s3://") and args.output.startswith("s3://")
        assert "--storage-options" not in line
        if active:
            assert command == "nightly" and args.address  # a standing cluster: its address
        else:
            assert command == "submit" and args.submit.address.startswith("http")
            assert args.address is None


def test_cron_example_keeps_secrets_out_and_escapes_percent():
    text = (INFRA / "cron.example").read_text()
    assert not re.search(r"^\s*AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)\s*=", text, re.MULTILINE)
    for _, line, _ in cron_entries():
        assert not re.search(r"(?<!\\)%", line), "cron turns an unescaped % into a newline"


# --------------------------------------------------------------------------------------------
# Dockerfile.
# --------------------------------------------------------------------------------------------


def test_dockerfile_pins_what_setup_pins_and_installs_the_gpu_stack():
    text = dockerfile()
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert froms and all(f.startswith("nvidia/cuda:") for f in froms)
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (ROOT / "requirements" / "constraints.in").read_text(), re.MULTILINE))
    assert dockerfile_arg("TORCH_VERSION") == pins["torch"]
    assert dockerfile_arg("TORCHVISION_VERSION") == pins["torchvision"]
    assert '"torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"' in text
    assert re.search(r"flash-attn==\$\{FLASH_ATTN_VERSION\}", text)
    assert re.search(r"apt-get install[^\n]*\bffmpeg\b", text) and re.search(r"apt-get install[^\n]*\bwget\b", text)
    assert "pip install --require-hashes -r requirements.lock" in text and '--no-deps ".[gpu]"' in text
    assert re.search(r'^ENTRYPOINT \["pixelrefer"\]$', text, re.MULTILINE)


def test_the_lock_agrees_with_the_pins_and_holds_every_dependency():
    """setup.sh, the Dockerfile and the lock name one torch and one Ray; every pyproject dependency is locked."""
    lock = (ROOT / "requirements.lock").read_text()
    locked = {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.MULTILINE)}
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (ROOT / "requirements" / "constraints.in").read_text(), re.MULTILINE))
    assert locked["torch"] == pins["torch"] and locked["torchvision"] == pins["torchvision"]
    assert locked["ray"] == dockerfile_arg("RAY_VERSION")
    assert "--hash=sha256:" in lock
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
        assert name in locked, f"{name} is in pyproject.toml but not in requirements.lock: run `make lock`"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "--require-hashes --no-deps -r" in setup and "requirements/constraints.in" in setup
    assert "--override requirements/overrides.txt" in (ROOT / "Makefile").read_text()


def test_dockerfile_context_holds_exactly_what_it_copies():
    allowed = {
        line.strip().lstrip("!").rstrip("/")
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = set()
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile(), re.MULTILINE):
        *sources, _ = line.split()
        copied.update(s.rstrip("/") for s in sources)
    assert copied == allowed
    for source in copied:
        assert (ROOT / source).exists(), source
    packages = re.findall(r'"(\w+)\*"', pyproject_value(r"^include = \[(.*)\]"))
    assert packages and set(packages) <= copied
