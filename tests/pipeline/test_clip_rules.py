"""The clip length rules have one definition each: the default and the maximum live in `pipeline.clips`,
and the CLI, the job config and the planner all use those same objects."""

from __future__ import annotations

import pytest

import pipeline.clips as clips
import pipeline.config as config
from jobs.cli import build_parser
from pipeline.config import IndexConfig


def test_one_default_and_one_maximum():
    assert config.DEFAULT_CLIP_SECONDS is clips.DEFAULT_CLIP_SECONDS
    assert config.MAX_CLIP_SECONDS is clips.MAX_CLIP_SECONDS
    assert clips.MAX_CLIP_SECONDS == 600.0  # README / config: clips of at most 10 minutes
    assert IndexConfig("in", "out").clip_seconds == clips.DEFAULT_CLIP_SECONDS
    args = build_parser().parse_args(["index", "in", "out"])
    assert args.clip_seconds == clips.DEFAULT_CLIP_SECONDS


def test_the_maximum_is_enforced_alike_everywhere():
    top = clips.MAX_CLIP_SECONDS
    assert IndexConfig("in", "out", clip_seconds=top).clip_seconds == top
    assert clips.validate_clip_seconds(top) == top
    with pytest.raises(ValueError, match="--clip-seconds"):
        IndexConfig("in", "out", clip_seconds=top + 1)
    with pytest.raises(ValueError, match="maximum"):
        clips.validate_clip_seconds(top + 1)
    with pytest.raises(ValueError, match="maximum"):
        clips.split_clips(3600.0, (), top + 1)
