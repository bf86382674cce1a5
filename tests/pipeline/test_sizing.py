"""Stage resources sized for described clusters (`pipeline.sizing`): everything packs, GPUs are
shared by the two models, pools may grow to the GPUs there are (or will be), and a cluster that
cannot run the stages at once is refused before the graph starts, naming what does not fit."""

from __future__ import annotations

import itertools

import pytest

from pipeline.config import IndexConfig
from pipeline.sizing import (SHOTS_GPU_SHARE, SHOTS_GPU_SLICE, Cluster, PlacementError, check_placement, decode_cpus,
                             gpu_shares, nodes, size_stages)


def placements_always_leave_room(cluster: Cluster) -> bool:
    """Wherever Ray puts one tracker and one referrer actor, some node still fits one decode task."""
    s = size_stages(cluster)
    for a, b in itertools.product(range(len(cluster.nodes)), repeat=2):
        free = [[n.cpus, n.gpus] for n in cluster.nodes]
        ok = True
        for k, stage in ((a, s.track), (b, s.refer)):
            if free[k][0] < stage.num_cpus or free[k][1] < stage.num_gpus:
                ok = False
                break
            free[k][0] -= stage.num_cpus
            free[k][1] -= stage.num_gpus
        if ok and not any(c >= s.decode.num_cpus for c, _ in free):
            return False
    return True


@pytest.mark.parametrize(
    ("spec", "cpus", "gpus", "pool", "decode"),
    [
        ([(2, 0)], 0.5, 0.0, (1, 1), 1.0),  # the 2-core CI machine: half a CPU (one thread) each
        ([(1, 0)], 0.25, 0.0, (1, 1), 0.5),  # one 1-CPU node: the requests shrink until all three pack
        ([(16, 0)], 7.0, 0.0, (1, 1), 1.0),  # a big CPU box: the model actors share its cores
        ([(1, 0), (1, 0)], 0.5, 0.0, (1, 1), 0.5),  # two 1-CPU nodes: the actors may take half of each
        ([(4, 0)] * 4, 1.0, 0.0, (1, 1), 1.0),
        ([(8, 0), (16, 1)], 2.0, 0.48, (1, 1), 1.0),  # CPU-only head + one GPU worker
        ([(16, 1)], 2.0, 0.48, (1, 1), 1.0),  # one GPU shared by both models
        ([(16, 2)], 2.0, 0.48, (1, 3), 1.0),  # two GPUs: either pool may take three of the four halves
        ([(8, 0)] + [(16, 1)] * 8, 2.0, 0.48, (1, 15), 1.0),  # CPU head + 8 GPU workers
        ([(2, 1)], 0.5, 0.48, (1, 1), 1.0),  # a small GPU box still leaves a CPU for decoding
        ([(1, 1)], 0.25, 0.48, (1, 1), 0.5),  # a GPU with one CPU: shrunk, not refused
        ([(16, 8)], 0.75, 0.48, (1, 15), 1.0),  # 8 GPUs, 16 CPUs: 16 actors at most, one CPU kept for decoding
        ([(96, 8)], 2.0, 0.48, (1, 15), 1.0),
    ],
)
def test_described_clusters(spec, cpus, gpus, pool, decode):
    cluster = Cluster(nodes(spec))
    s = size_stages(cluster)
    for stage in (s.track, s.refer):
        assert (stage.num_cpus, stage.num_gpus, stage.concurrency) == (cpus, gpus, pool)
    assert s.decode.num_cpus == decode and (s.track.batch_size, s.refer.batch_size) == (1, 16)
    check_placement(s, cluster)
    assert placements_always_leave_room(cluster)


def test_on_one_gpu_both_models_share_it():
    s = size_stages(Cluster(nodes([(16, 1)])))
    assert s.track.num_gpus + s.refer.num_gpus == pytest.approx(1.0 - SHOTS_GPU_SLICE)


def test_gpu_fractions_follow_the_stages_costs():
    assert gpu_shares({"tracker": 1.0, "referrer": 1.0}) == {"tracker": 0.5, "referrer": 0.5}
    assert gpu_shares({"tracker": 3.0, "referrer": 1.0}) == {"tracker": 0.75, "referrer": 0.25}
    assert gpu_shares({"tracker": 1.0, "referrer": 99.0}) == {"tracker": 0.25, "referrer": 0.75}  # a quarter at least
    cluster = Cluster(nodes([(16, 2)]))
    s = size_stages(cluster, costs={"tracker": 3.0, "referrer": 1.0})
    assert (s.track.num_gpus, s.refer.num_gpus) == pytest.approx((0.72, 0.24))  # 3:1 of what shot detection leaves
    # Each pool may take every GPU slot the other's one actor leaves: 1.75 / 0.75 and 1.25 / 0.25.
    assert (s.track.concurrency, s.refer.concurrency) == ((1, 2), (1, 5))
    check_placement(s, cluster)


@pytest.mark.parametrize("spec", [[(16, 1)], [(16, 2)], [(16, 8)], [(96, 8)], [(4, 1)], [(8, 0)] + [(16, 1)] * 8])
def test_pools_grown_to_every_gpu_still_leave_each_node_a_decode_task(spec):
    """At their largest the pools fill every GPU (one actor of each per GPU): the CPUs beside them
    still hold a decode task on every GPU node, so the grown pools do not starve decoding."""
    cluster = Cluster(nodes(spec))
    s = size_stages(cluster)
    assert s.track.concurrency[1] + s.refer.concurrency[1] >= 2 * cluster.gpus
    for node in cluster.nodes:
        if node.gpus:
            assert node.cpus - 2 * node.gpus * s.track.num_cpus >= s.decode.num_cpus


def test_pools_may_grow_to_gpus_an_autoscaler_adds():
    now = size_stages(Cluster(nodes([(8, 0), (16, 1)])))
    later = size_stages(Cluster(nodes([(8, 0), (16, 1)]), max_gpus=8))
    assert now.track.concurrency == (1, 1) and later.track.concurrency == (1, 15)
    assert later.refer.concurrency == (1, 15)


def test_the_decode_request_is_what_every_placement_leaves():
    cluster = Cluster(nodes([(1, 0), (1, 0)]))
    s = size_stages(cluster)
    assert decode_cpus(cluster, s.track, s.refer) == 0.5


def test_a_cluster_too_small_is_refused_with_what_to_change():
    cluster = Cluster(nodes([(0.5, 0)]))
    with pytest.raises(PlacementError, match=r"(?s)decod.*add a node"):
        check_placement(size_stages(cluster), cluster)
    cluster = Cluster(nodes([(0.4, 0)]))  # the first actor fits, the second does not
    with pytest.raises(PlacementError, match=r"the referrer actor needs 0\.25 CPU.*add a node"):
        check_placement(size_stages(cluster), cluster)


def test_gpus_promised_but_none_present_are_refused_naming_the_stage():
    """`--max-gpus` on a cluster with no GPU node yet: the pools ask for GPUs (not a silent CPU run),
    and the plan is refused at once instead of waiting for a node that may never come."""
    cluster = Cluster(nodes([(8, 0)]), max_gpus=4)
    s = size_stages(cluster)
    assert s.track.num_gpus == 0.48 and s.track.concurrency == (1, 7)
    with pytest.raises(PlacementError, match=r"the tracker actor needs 0\.48 GPU but no node has one.*--max-gpus"):
        check_placement(s, cluster)


def test_the_index_command_refuses_a_cluster_it_cannot_run_on(tmp_path, monkeypatch, capsys):
    """The refusal reaches the user as one line and a non-zero exit, before any graph starts."""
    from jobs.cli import main
    from pipeline import run

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"not decoded: the run stops before")
    monkeypatch.setattr(run, "ensure_ray", lambda address: None)
    monkeypatch.setattr(Cluster, "from_ray", classmethod(lambda cls, max_gpus=None: cls(nodes([(0.5, 0)]))))
    monkeypatch.setattr(run, "build_dataset", lambda *a: pytest.fail("the graph started"))
    code = main(["index", str(tmp_path / "videos"), str(tmp_path / "index"), "--cuts", "none"])
    err = capsys.readouterr().err
    assert code == 1 and "error: this cluster cannot run the index: no CPU is left for decoding" in err, err


def test_fit_resources_applies_the_sizing_and_checks_it():
    cfg = IndexConfig(source="s", output="o")
    cfg.fit_resources(Cluster(nodes([(16, 2)])))
    assert cfg.track.concurrency == (1, 3) and cfg.refer.num_gpus == 0.48
    assert cfg.shots.num_gpus == SHOTS_GPU_SHARE
    with pytest.raises(PlacementError):
        cfg.fit_resources(Cluster(nodes([(0.5, 0)])))


def test_max_gpus_must_be_a_count():
    with pytest.raises(ValueError, match="--max-gpus"):
        IndexConfig(source="s", output="o", max_gpus=-1)


def test_clips_per_call_sets_the_referrer_batch_and_decoding_declares_its_heap():
    cfg = IndexConfig(source="s", output="o", clips_per_call=4)
    cfg.fit_resources(Cluster(nodes([(2, 0)])))
    assert cfg.refer.batch_size == 4 and cfg.track.batch_size == 1
    assert cfg.decode.memory and cfg.decode.memory >= 128 * 2**20  # also keeps decoding out of planning's task
    with pytest.raises(ValueError, match="--clips-per-call"):
        IndexConfig(source="s", output="o", clips_per_call=0)


@pytest.mark.parametrize(
    ("spec", "cpus", "gpus"),
    [
        ([(2, 0)], 1.0, 0.0),  # no GPU: the model runs on the segment task's CPU
        ([(16, 0)] * 4, 1.0, 0.0),
        ([(16, 1)], 1.0, SHOTS_GPU_SHARE),  # a GPU: TransNetV2 beside the models, the decode on a CPU
        ([(8, 0), (16, 1)], 1.0, SHOTS_GPU_SHARE),
        ([(16, 8)], 1.0, SHOTS_GPU_SHARE),
        ([(1, 1)], 0.5, SHOTS_GPU_SHARE),  # a GPU with one CPU: the decode slot shrinks with the actors'
        ([(64, 0), (1, 1)], 1.0, 0.0),  # the GPU node's CPU is the actors': shot detection stays on the CPU nodes
    ],
)
def test_shot_detection_runs_on_a_gpu_slice_where_the_cluster_has_one(spec, cpus, gpus):
    """Segment tasks ask for a slice of a GPU where the GPU nodes keep a CPU for their decode beside
    full pools; the model actors leave that slice on every GPU, so the tasks are placed beside them."""
    cluster = Cluster(nodes(spec))
    s = size_stages(cluster)
    assert (s.shots.num_cpus, s.shots.num_gpus) == (cpus, gpus) and s.shots.memory
    if gpus:
        for node in cluster.nodes:
            if node.gpus:  # every GPU full of model actors still holds the shot tasks' slices and CPUs
                assert node.gpus * (s.track.num_gpus + s.refer.num_gpus) + node.gpus * SHOTS_GPU_SLICE <= node.gpus + 1e-9
                assert node.cpus - 2 * node.gpus * s.track.num_cpus >= s.shots.num_cpus
        assert SHOTS_GPU_SLICE / SHOTS_GPU_SHARE >= 4  # segment tasks per GPU at once
