"""The index job as a streaming Ray Data graph: plan (tasks) -> decode a clip (tasks) -> SAM 2 (actor
pool) -> PixelRefer (actor pool) -> small records for the driver.

A clip is the unit of work: planning turns each video row into one row per clip, so the clips of a
2-hour video spread over the cluster like the videos of a bucket do, and memory is bounded by the
clips in flight (Ray Data's streaming executor backpressures on the object store budget), never by
a video's length. Frames exist only between the decode task and the referrer actor: the referrer
drops them, and what reaches the driver is a few kilobytes of JSON per clip.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

from pipeline.config import IndexConfig
from pipeline.sizing import frames_budget_bytes
from pipeline.tasks import decode_row, plan_rows


def tracker_kwargs(cfg: IndexConfig) -> dict[str, Any]:
    """`TrackerStage`'s arguments for this run (the graph and `bench.pipeline`'s plain loop share them)."""
    return {
        "model": cfg.tracker, "max_objects": cfg.max_objects, "keyframe_interval_s": cfg.keyframe_interval_s,
        "discovery_schedule": cfg.discovery,
        # Lite sees only each object's K frames: the others stop at the tracker.
        "ship_frames": "shown" if cfg.mode == "lite" else "all", "object_frames": cfg.object_frames,
    }


def referrer_kwargs(cfg: IndexConfig) -> dict[str, Any]:
    """`ReferrerStage`'s arguments for this run."""
    return {
        "model": cfg.model, "mode": cfg.mode, "max_new_tokens": cfg.max_new_tokens,
        "upstream_local_crop": cfg.upstream_local_crop, "object_frames": cfg.object_frames,
    }


def build_dataset(cfg: IndexConfig, rows: list[dict[str, Any]]):
    """The graph over `rows` (`pipeline.tasks`: video rows to plan, track rows to caption)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from actors.referrer import ReferrerStage
    from actors.tracker import TrackerStage

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    # A block that keeps failing (a worker crash, not a bad video or clip: those become rows) must
    # not stop the others; the driver notices the missing clips and records their videos for the
    # next run. Set before `from_items`: a Dataset snapshots the current DataContext when created.
    ctx.max_errored_blocks = 1 << 30
    # A block per row: a video's clips leave planning as one list, and a map task takes a whole block,
    # so with Ray's 128 MiB blocks one task decoded all 240 clips of a 2-hour video in a row, beyond
    # backpressure's reach. (`repartition` would do it too, as one more operator whose tasks ask for
    # a whole CPU: on 1-CPU nodes beside the actors they would never be placed.)
    ctx.target_max_block_size = 1
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=frames_budget_bytes(cfg.track))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    # Ray Data retries crashed tasks and actors forever by default; a clip that kills its worker
    # every time must stop after `task_retries`. Ray 2.60 takes the bound only through the
    # deprecated `**ray_remote_args` (no named parameter yet): ray is pinned <2.64.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.flat_map(plan_rows, fn_kwargs={"cfg": cfg}, num_cpus=cfg.decode.num_cpus, max_retries=cfg.task_retries)
        # Its own operator (its `memory` differs from planning's): one task per clip (one block each,
        # above), so decoding keeps pace with the tracker within `frames_budget_bytes`.
        decode_args = {"memory": cfg.decode.memory} if cfg.decode.memory else {}
        ds = ds.map(decode_row, fn_kwargs={"cfg": cfg}, num_cpus=cfg.decode.num_cpus, max_retries=cfg.task_retries,
                    **decode_args)
        ds = ds.map_batches(
            TrackerStage,
            fn_constructor_kwargs=tracker_kwargs(cfg),
            batch_size=cfg.track.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(min_size=cfg.track.concurrency[0], max_size=cfg.track.concurrency[1]),
            num_cpus=cfg.track.num_cpus, num_gpus=cfg.track.num_gpus, max_task_retries=cfg.task_retries,
        )
        ds = ds.map_batches(
            ReferrerStage,
            fn_constructor_kwargs=referrer_kwargs(cfg),
            batch_size=cfg.refer.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(min_size=cfg.refer.concurrency[0], max_size=cfg.refer.concurrency[1]),
            num_cpus=cfg.refer.num_cpus, num_gpus=cfg.refer.num_gpus, max_task_retries=cfg.task_retries,
        )
    return ds


def iter_finished(ds) -> Iterator[dict[str, Any]]:
    """The graph's output rows, one dict each, as they stream out."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch["video_id"])
        for i in range(n):
            yield {k: v[i] for k, v in batch.items()}


def ensure_ray(address: str | None) -> None:
    """Join the given cluster, or RAY_ADDRESS, or start a local instance (an explicit address wins).

    Also keeps Ray's start-up noise off the terminal (`pipeline.ray_setup`).
    """
    import ray

    from pipeline.ray_setup import absorb_actor_restart_arg_error, quiet_ray_notices

    quiet_ray_notices()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if address:
            kwargs["address"] = address
        ray.init(**kwargs)
    absorb_actor_restart_arg_error()
