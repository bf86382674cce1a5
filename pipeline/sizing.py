"""What each stage asks Ray for, from the cluster at hand and what the stages cost, and a check that
it can all be placed before the graph starts.

Ray Data places tasks and actors by their resource requests and backpressures when they do not fit:
a request that can never be met (a 1-CPU decode task on nodes whose CPU is half taken by actors)
stalls the stream forever with no error. So requests are sized to pack on the nodes present, and a
plan that still cannot be placed fails at once with what to change.

GPU clusters: the tracker and the referrer share each GPU (fractional `num_gpus`, by their share of
the GPU time a clip costs), so a clip's frames go from one actor to the other on the same node and
both models stay resident; each pool autoscales (Ray Data's actor-pool autoscaler) between one
actor and as many as the GPUs allow, counting GPUs an autoscaler may still add (`max_gpus`), so
nodes that join after start-up are used. CPU-only clusters: one actor per stage, each given the
largest node's cores less one kept for decoding (torch uses as many threads as its actor has CPUs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

#: Each model stage's share of the GPU time of one clip (1 fps, 30-s clip, SAM 2.1-tiny + Lite-2B),
#: which sets its fraction of a shared GPU. A first estimate from the CPU phase figures of
#: `bench.pipeline` (tracker ~70% of model time); `bench/gpu.sh` measures the GPU ones
#: (`busy_share_tracker`, `busy_share_referrer`): update these from its figures.
STAGE_GPU_SHARE = {"tracker": 0.5, "referrer": 0.5}
#: Clips per referrer call: its prompts share LLM batches across clips (`actors.referrer`).
REFERRER_ROWS_PER_BATCH = 16
#: Heap of one decode task: a 30-s clip at 1 fps and 1080p is ~190 MB of frames, plus the decoder.
#: Declaring it also keeps Ray Data from fusing decoding into the planning task: fused, one task
#: decoded every clip of a video in a row, however far ahead of the tracker.
DECODE_MEMORY_BYTES = 256 * 2**20


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


def size_stages(cluster: Cluster, clips_per_call: int = REFERRER_ROWS_PER_BATCH) -> Sizing:
    """Per-stage requests for `cluster` (see the module docstring for the rules); the referrer takes
    `clips_per_call` clips a call."""
    gpu_nodes = [n for n in cluster.nodes if n.gpus >= 1]
    if gpu_nodes:
        gpus = max(cluster.gpus, cluster.max_gpus or 0.0)
        per_actor = min(2.0, max(0.5, (min(n.cpus for n in gpu_nodes) - 1) / 2))
        share = STAGE_GPU_SHARE
        track = StageResources(per_actor, share["tracker"], 1, (1, pool_max(gpus, share["tracker"], share["referrer"])))
        refer = StageResources(per_actor, share["referrer"], clips_per_call,
                               (1, pool_max(gpus, share["referrer"], share["tracker"])))
    else:
        largest = max(n.cpus for n in cluster.nodes)
        per_actor = max(0.5, float(int((largest - 1) // 2)))
        track = StageResources(per_actor, 0.0, 1, (1, 1))
        refer = StageResources(per_actor, 0.0, clips_per_call, (1, 1))
    decode = StageResources(num_cpus=decode_cpus(cluster, track, refer), memory=DECODE_MEMORY_BYTES)
    return Sizing(decode=decode, track=track, refer=refer)


def pool_max(gpus: float, own: float, other: float) -> int:
    """A pool's largest size: every GPU slot left once the other pool has its one actor."""
    return max(1, int((gpus - other) / own + 1e-9))


def decode_cpus(cluster: Cluster, track: StageResources, refer: StageResources) -> float:
    """The largest CPU request (at most 1, in quarters) that a decode task can always get, wherever
    Ray puts the two actors: on two 1-CPU nodes the actors may land one on each, leaving half a CPU
    on both, so a task asking for one whole CPU would wait forever."""
    free_worst = math.inf
    for a in range(len(cluster.nodes)):
        for b in range(len(cluster.nodes)):
            free = [[n.cpus, n.gpus] for n in cluster.nodes]
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
        return 1.0  # the actors fit nowhere: `check_placement` says so
    return max(0.0, min(1.0, math.floor(free_worst * 4 + 1e-9) / 4))


def check_placement(sizing: Sizing, cluster: Cluster) -> None:
    """Raise `PlacementError` unless one actor of each pool and one decode task fit on the nodes at once.

    First-fit decreasing over (CPU, GPU) per node, which is how far Ray's scheduler is guaranteed to
    get; the message names the request that does not fit and what to change.
    """
    free = [[n.cpus, n.gpus] for n in cluster.nodes]
    wants: list[tuple[str, float, float]] = [
        ("tracker actor", sizing.track.num_cpus, sizing.track.num_gpus),
        ("referrer actor", sizing.refer.num_cpus, sizing.refer.num_gpus),
        ("decode task", sizing.decode.num_cpus, 0.0),
    ]
    if sizing.decode.num_cpus <= 0:
        raise PlacementError(
            "no CPU is left for decoding once the tracker and referrer actors are placed "
            f"(nodes: {', '.join(f'{n.cpus:g} CPU/{n.gpus:g} GPU' for n in cluster.nodes)}); "
            "add a node with at least 2 CPUs"
        )
    for name, cpus, gpus in sorted(wants, key=lambda w: (-w[2], -w[1])):
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
        pool = f", pool {s.concurrency[0]}-{s.concurrency[1]}" if name != "decode" else ""
        return f"{name} {s.num_cpus:g} CPU{gpu}{pool}"

    return "resources: " + "; ".join(one(n, s) for n, s in (("decode", sizing.decode), ("tracker", sizing.track),
                                                              ("referrer", sizing.refer)))


def as_dict(sizing: Sizing) -> dict[str, Any]:
    return dataclasses.asdict(sizing)


def nodes(spec: Sequence[tuple[float, float]]) -> tuple[Node, ...]:
    """Nodes from (cpus, gpus) pairs: for tests and the bench's described clusters."""
    return tuple(Node(float(c), float(g)) for c, g in spec)
