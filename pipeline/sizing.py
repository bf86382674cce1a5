"""What each stage asks Ray for, from the cluster at hand and what the stages cost, and a check that
it can all be placed before the graph starts.

Ray Data places tasks and actors by their resource requests and backpressures when they do not fit:
a request that can never be met (a 1-CPU decode task on nodes whose CPU is half taken by actors)
stalls the stream forever with no error. So requests are sized to pack on the nodes present, and a
plan that still cannot be placed fails at once with what to change.

GPU clusters: the tracker and the referrer share each GPU (fractional `num_gpus`, by what a clip
costs each on a GPU: `STAGE_GPU_COST`), so a clip's frames go from one actor to the other on the
same node and both models stay resident; each actor gets a GPU node's CPUs less one for decoding,
split over the actors its GPUs can hold. Each pool autoscales (Ray Data's actor-pool autoscaler,
within Ray Data's resource budget) between one actor and as many as the GPUs allow: with
`max_gpus` (`--max-gpus`), counting GPUs an autoscaler may still add, so the pools grow onto nodes
that join while a wave runs; without it, the GPUs present, and the run sizes again before every
wave (`pipeline.run`), so GPUs that joined are used from the next wave on (a wave is about
`--commit-every` minutes). CPU-only clusters: one actor per stage, each given the largest node's
cores less one kept for decoding (torch uses as many threads as its actor has CPUs).

Shot detection (`pipeline.shots`, a long video's segments as tasks of their own: `pipeline.segments`)
runs where it is cheap. With GPUs, each segment task asks for a CPU-sized decode slot and a
`SHOTS_GPU_SHARE` slice of a GPU, so TransNetV2 runs batched on the GPU beside the tracker while the
48x27 decode stays on the task's CPU: the model actors' GPU fractions are scaled down by
`SHOTS_GPU_SLICE` to leave room for `SHOTS_GPU_SLICE / SHOTS_GPU_SHARE` (4) segment tasks per GPU.
Planning's CPU cost is then the decode alone (about 1.2 ms a frame here, against 31 ms for the model
on a CPU). Without GPUs the segment task asks for what a decode task does and runs the model on it.

Decode tasks spend their time waiting on a decoder child process (`pipeline.decode.isolation`), so their
CPU request is a scheduling token more than a measure of work: it is sized to what every placement
of the actors leaves, and actors' requests shrink (down to a quarter CPU) before a plan is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

#: Relative GPU-seconds one clip costs each model stage (1 fps, 30-s clip, SAM 2.1 + Lite-2B); they
#: set each stage's fraction of a shared GPU (`gpu_shares`). Equal until measured on a GPU: no GPU
#: was at hand when this was written, and CPU figures do not carry over (on CPU, with tiny models, the
#: tracker takes most of the model time). `bench/gpu.sh` (`busy_share_tracker` /
#: `busy_share_referrer` of its stage loop) and `bench.pipeline`'s per-phase seconds on a GPU
#: cluster (`phase_s_tracker_*`, `phase_s_referrer_*`) give the figures to put here.
STAGE_GPU_COST = {"tracker": 1.0, "referrer": 1.0}
#: A shot-detection task's slice of a GPU (Ray accounts fractions; the model holds ~0.4 GB there), and
#: the part of every GPU kept for such tasks (the model actors share the rest).
SHOTS_GPU_SHARE = 0.01
SHOTS_GPU_SLICE = 0.04
#: Heap of a shot-detection task's decode child (PyTorch and TransNetV2 on a CPU: ~0.9 GB, `pipeline.shots`).
SHOTS_MEMORY_BYTES = 1 << 30
#: The smallest CPU request of a model actor or a decode task: below it, sizing refuses the plan.
MIN_CPUS = 0.25
#: Clips per referrer call: its prompts share LLM batches across clips (`actors.referrer`).
REFERRER_ROWS_PER_BATCH = 16
#: Heap of one decode task: a 30-s clip at 1 fps and 1080p is ~190 MB of frames, plus the decoder.
#: Declaring it also keeps Ray Data from fusing decoding into the planning task.
DECODE_MEMORY_BYTES = 256 * 2**20
#: Object-store bytes of decoded frames Ray Data may hold per tracker actor (`frames_budget_bytes`).
FRAMES_BUDGET_PER_TRACKER = 512 * 2**20


class PlacementError(ValueError):
    """The stages' resource requests cannot all be placed on the cluster: the run would stall."""


@dataclasses.dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float = 0.0


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The alive nodes, and the most GPUs the cluster may grow to (None: what is there now)."""

    nodes: tuple[Node, ...]
    max_gpus: float | None = None

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    @classmethod
    def from_ray(cls, max_gpus: float | None = None) -> "Cluster":
        import ray

        nodes = tuple(
            Node(float(n.get("Resources", {}).get("CPU", 0.0)), float(n.get("Resources", {}).get("GPU", 0.0)))
            for n in ray.nodes() if n.get("Alive")
        )
        return cls(nodes or (Node(1.0),), max_gpus)


@dataclasses.dataclass
class StageResources:
    """What one stage asks Ray for. `concurrency` is the actor-pool size (min, max)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 1
    concurrency: tuple[int, int] = (1, 1)
    #: Heap a task may use (Ray's `memory` resource); None: not declared.
    memory: int | None = None


@dataclasses.dataclass
class Sizing:
    decode: StageResources
    track: StageResources
    refer: StageResources
    #: A shot-detection segment task (`pipeline.segments`): the decode's CPU, and a GPU slice when there are GPUs.
    shots: StageResources = dataclasses.field(default_factory=lambda: StageResources(memory=SHOTS_MEMORY_BYTES))


def size_stages(cluster: Cluster, clips_per_call: int = REFERRER_ROWS_PER_BATCH,
                costs: dict[str, float] | None = None) -> Sizing:
    """Per-stage requests for `cluster` (see the module docstring for the rules); the referrer takes
    `clips_per_call` clips a call; `costs` overrides `STAGE_GPU_COST` (e.g. with measured figures)."""
    gpu_nodes = [n for n in cluster.nodes if n.gpus >= 1]
    gpus = max(cluster.gpus, cluster.max_gpus or 0.0)
    if gpu_nodes or gpus >= 1:  # GPUs promised by `max_gpus` but none here yet: `check_placement` says so
        share = {k: v * (1 - SHOTS_GPU_SLICE) for k, v in gpu_shares(costs or STAGE_GPU_COST).items()}
        # Every GPU may hold one actor of each pool: keep a CPU per node for decoding beside them.
        room = min(((n.cpus - 1) / (2 * n.gpus) for n in gpu_nodes), default=1.0)
        per_actor = min(2.0, max(0.5, quarters(room)))
        track = StageResources(per_actor, share["tracker"], 1, (1, pool_max(gpus, share["tracker"], share["referrer"])))
        refer = StageResources(per_actor, share["referrer"], clips_per_call,
                               (1, pool_max(gpus, share["referrer"], share["tracker"])))
    else:
        largest = max(n.cpus for n in cluster.nodes)
        per_actor = max(0.5, float(int((largest - 1) // 2)))
        track = StageResources(per_actor, 0.0, 1, (1, 1))
        refer = StageResources(per_actor, 0.0, clips_per_call, (1, 1))
    # Shrink the actors' requests (halving, down to MIN_CPUS) until a decode task always fits beside them.
    room = decode_room(cluster, track, refer)
    while (room is None or room < MIN_CPUS) and track.num_cpus > MIN_CPUS and gpus_exist(cluster, track, refer):
        track.num_cpus = refer.num_cpus = max(MIN_CPUS, track.num_cpus / 2)
        room = decode_room(cluster, track, refer)
    decode = StageResources(num_cpus=1.0 if room is None else room, memory=DECODE_MEMORY_BYTES)
    return Sizing(decode=decode, track=track, refer=refer, shots=shots_resources(gpu_nodes, track, decode.num_cpus))


def shots_resources(gpu_nodes: Sequence[Node], track: StageResources, decode_cpus: float) -> StageResources:
    """A shot-detection task's request: a GPU slice and the decode's CPU where every GPU node keeps
    that CPU free with its GPUs full of model actors (two per GPU); else the decode's CPU alone (the
    model then runs on it), so that the tasks never wait for a GPU node without CPUs to spare."""
    free = min((n.cpus - 2 * n.gpus * track.num_cpus for n in gpu_nodes), default=0.0)
    cpus = min(decode_cpus, quarters(max(0.0, free)))
    if gpu_nodes and track.num_gpus and cpus >= MIN_CPUS:
        return StageResources(num_cpus=cpus, num_gpus=SHOTS_GPU_SHARE, memory=SHOTS_MEMORY_BYTES)
    return StageResources(num_cpus=decode_cpus, memory=SHOTS_MEMORY_BYTES)


def frames_budget_bytes(track: StageResources) -> int:
    """Ray Data's object-store budget for the run: `FRAMES_BUDGET_PER_TRACKER` per tracker actor.

    Ray Data's default budget is half the object store (~30% of RAM), sized for throughput; decoded
    frames are large and the tracker is the slow stage, so with it decoding ran up to ~120 clips (600
    MB at 360p, 0.25 fps) ahead of the tracker on a 2-hour video, and each page the decoder wrote
    into the shared-memory arena stays resident. A couple of 1080p clips queued per tracker keeps it
    busy; the rest only made peak memory grow with a video's length.
    """
    return FRAMES_BUDGET_PER_TRACKER * max(1, track.concurrency[1])


def gpu_shares(costs: dict[str, float]) -> dict[str, float]:
    """Each model stage's fraction of one GPU, by its cost, in quarters (so that one actor of each
    fills a GPU exactly), at least a quarter each."""
    total = costs["tracker"] + costs["referrer"]
    track = min(0.75, max(0.25, quarters(costs["tracker"] / total, nearest=True)))
    return {"tracker": track, "referrer": 1.0 - track}


def quarters(x: float, nearest: bool = False) -> float:
    """`x` in quarters: rounded down (a request must not exceed what is there), or to the nearest."""
    return (round(x * 4) if nearest else math.floor(x * 4 + 1e-9)) / 4


def gpus_exist(cluster: Cluster, *stages: StageResources) -> bool:
    """Whether some node has the GPU share of each stage (else shrinking CPU requests cannot help)."""
    return all(any(n.gpus + 1e-9 >= st.num_gpus for n in cluster.nodes) for st in stages)


def pool_max(gpus: float, own: float, other: float) -> int:
    """A pool's largest size: every GPU slot left once the other pool has its one actor."""
    return max(1, int((gpus - other) / own + 1e-9))


def decode_room(cluster: Cluster, track: StageResources, refer: StageResources) -> float | None:
    """The largest CPU request (at most 1, in quarters) that a decode task can always get, wherever
    Ray puts one actor of each pool (None: they fit nowhere). On two 1-CPU nodes the actors may land
    one on each, leaving half a CPU on both, so a task asking for one whole CPU would wait forever."""
    shapes = few_of_each(cluster.nodes)
    free_worst = math.inf
    for a in range(len(shapes)):
        for b in range(len(shapes)):
            free = [[n.cpus, n.gpus] for n in shapes]
            placed = True
            for k, stage in ((a, track), (b, refer)):
                if free[k][0] + 1e-9 < stage.num_cpus or free[k][1] + 1e-9 < stage.num_gpus:
                    placed = False
                    break
                free[k][0] -= stage.num_cpus
                free[k][1] -= stage.num_gpus
            if placed:
                free_worst = min(free_worst, max(c for c, _ in free))
    if free_worst is math.inf:
        return None
    return max(0.0, min(1.0, quarters(free_worst)))


def few_of_each(all_nodes: Sequence[Node]) -> list[Node]:
    """At most three nodes of each shape: two actors touch two nodes at most, so further nodes of a
    shape change no placement's outcome (and `decode_room` stays quick on a 1,000-node cluster)."""
    kept: list[Node] = []
    for node in all_nodes:
        if kept.count(node) < 3:
            kept.append(node)
    return kept


def decode_cpus(cluster: Cluster, track: StageResources, refer: StageResources) -> float:
    """`decode_room`, or 1 when the actors fit nowhere (`check_placement` then says which)."""
    room = decode_room(cluster, track, refer)
    return 1.0 if room is None else room


def check_placement(sizing: Sizing, cluster: Cluster) -> None:
    """Raise `PlacementError` unless one actor of each pool and one decode task fit on the nodes at once.

    First fit over (CPU, GPU) per node, the actors largest first and then the decode task, which is
    how far Ray's scheduler is guaranteed to get; the message names the request that does not fit
    and what to change.
    """
    free = [[n.cpus, n.gpus] for n in cluster.nodes]
    actors = sorted([("tracker actor", sizing.track.num_cpus, sizing.track.num_gpus),
                     ("referrer actor", sizing.refer.num_cpus, sizing.refer.num_gpus)], key=lambda w: (-w[2], -w[1]))
    wants = actors + [("decode task", sizing.decode.num_cpus, 0.0)]
    if sizing.decode.num_cpus <= 0:
        raise PlacementError(
            "no CPU is left for decoding once the tracker and referrer actors are placed "
            f"(nodes: {', '.join(f'{n.cpus:g} CPU/{n.gpus:g} GPU' for n in cluster.nodes)}); "
            "add a node with at least 2 CPUs"
        )
    for name, cpus, gpus in wants:
        if gpus and not any(n.gpus for n in cluster.nodes):
            promised = (f" (--max-gpus {cluster.max_gpus:g} counts GPUs an autoscaler may add later, but each pool "
                        "starts with one actor now)") if cluster.max_gpus else ""
            raise PlacementError(
                f"the {name} needs {gpus:g} GPU but no node has one{promised}: start the cluster with a GPU node "
                "(e.g. a GPU worker group with at least one replica), or leave out --max-gpus to run the models on CPU"
            )
        for node in free:
            if node[0] + 1e-9 >= cpus and node[1] + 1e-9 >= gpus:
                node[0] -= cpus
                node[1] -= gpus
                break
        else:
            have = ", ".join(f"{n.cpus:g} CPU/{n.gpus:g} GPU" for n in cluster.nodes)
            raise PlacementError(
                f"the {name} needs {cpus:g} CPU and {gpus:g} GPU, which no node can give once the other "
                f"stages are placed (nodes: {have}); add a node with at least {math.ceil(cpus + 1):g} CPUs"
                + (" and a GPU" if gpus else "") + ", or run on a larger machine"
            )


def describe(sizing: Sizing) -> str:
    """One line for the run's log: what each stage asked for."""
    def one(name: str, s: StageResources) -> str:
        gpu = f", {s.num_gpus:g} GPU" if s.num_gpus else ""
        pool = f", pool {s.concurrency[0]}-{s.concurrency[1]}" if name in ("tracker", "referrer") else ""
        return f"{name} {s.num_cpus:g} CPU{gpu}{pool}"

    return "resources: " + "; ".join(one(n, s) for n, s in (("decode", sizing.decode), ("tracker", sizing.track),
                                                              ("referrer", sizing.refer), ("shots", sizing.shots)))


def as_dict(sizing: Sizing) -> dict[str, Any]:
    return dataclasses.asdict(sizing)


def nodes(spec: Sequence[tuple[float, float]]) -> tuple[Node, ...]:
    """Nodes from (cpus, gpus) pairs: for tests and the bench's described clusters."""
    return tuple(Node(float(c), float(g)) for c, g in spec)
