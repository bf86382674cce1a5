"""Stage resources chosen for the cluster: every pool and one decode task must fit on one node."""

from __future__ import annotations

import pytest

from pipeline.config import IndexConfig


@pytest.mark.parametrize(
    ("cluster_cpus", "gpus", "node_cpus", "want_cpus", "want_gpus", "want_pool"),
    [
        (2, 0, 2, 0.5, 0.0, (1, 1)),  # the 2-core CI machine: half a CPU (one thread) each
        (4, 0, 1, 0.5, 0.0, (1, 1)),  # four 1-CPU nodes: nothing may ask for more than one node has
        (16, 0, 16, 7.0, 0.0, (1, 1)),  # a big CPU box: the model actors share its cores
        (64, 0, 16, 7.0, 0.0, (1, 1)),  # sized by the largest node, not the cluster
        (16, 1, 16, 2.0, 0.5, (1, 1)),  # one GPU shared by both models
        (32, 8, 16, 2.0, 1.0, (1, 4)),
        (2, 1, 2, 0.5, 0.5, (1, 1)),  # a small GPU box: CPUs must still leave room for decoding
    ],
)
def test_fit_resources(cluster_cpus, gpus, node_cpus, want_cpus, want_gpus, want_pool):
    cfg = IndexConfig(source="s", output="o")
    cfg.fit_resources(cluster_cpus, gpus, node_cpus)
    for stage in (cfg.track, cfg.refer):
        assert (stage.num_cpus, stage.num_gpus, stage.concurrency) == (want_cpus, want_gpus, want_pool)
    assert cfg.decode.num_cpus == 1.0
    assert cfg.track.num_cpus + cfg.refer.num_cpus + cfg.decode.num_cpus <= max(node_cpus, 2)


def test_without_node_sizes_the_cluster_total_is_used():
    cfg = IndexConfig(source="s", output="o")
    cfg.fit_resources(8, 0)
    assert cfg.track.num_cpus == 3.0
