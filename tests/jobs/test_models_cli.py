"""`pixelrefer models check` / `models download` (jobs/models.py).

Downloads cannot reach the hub here: offline runs must fail with a clear message, and the download logic
(which files, the vision tower the config names, where they land) runs against a local stand-in for the
hub's two calls (list a repo's files, fetch some of them), after which the results are checked offline.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from jobs.models import add_models_arguments, models_main  # noqa: E402
from models.hub import select_repo_files  # noqa: E402
from pixelrefer_helpers import (  # noqa: E402
    LITE_FIXTURE,
    TOWER_REPO,
    copy_checkpoint,
    hub_repo,
    offline_hub,
    released_shape,
    weights_to_bin,
)

MODEL_REPO = "Alibaba-DAMO-Academy/PixelRefer-Lite-tiny"
SAM2_REPO = "facebook/sam2.1-hiera-tiny"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="pixelrefer models")
    add_models_arguments(parser)
    rc = models_main(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_parser():
    parser = argparse.ArgumentParser()
    add_models_arguments(parser)
    args = parser.parse_args(["download", "a/b", "c/d", "--to", "/x"])
    assert (args.models_command, args.names, args.to) == ("download", ["a/b", "c/d"], Path("/x"))
    args = parser.parse_args(["check", "tiny", "--full"])
    assert (args.models_command, args.model, args.full) == ("check", "tiny", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["download"])


# -- check --------------------------------------------------------------------------------------------
def test_check_tiny(capsys):
    from models.referrer import Referrer

    rc, out, err = run(["check", "tiny-full", "--full"], capsys)
    assert rc == 0, err
    count = sum(p.numel() for p in Referrer.from_pretrained("tiny-full").model.parameters())
    assert out.startswith("tiny-full: OK\n")
    assert f"parameters:  {count:,} (every one stored; strict check passed)" in out
    assert "framework:   full (pixelrefer_qwen2)" in out and "weights:     model.safetensors" in out
    assert "full load:   every tensor read" in out
    assert "generation:  greedy, repetition_penalty 1.0" in out


def test_check_released_shape_offline(tmp_path, monkeypatch, capsys):
    hf_home = tmp_path / "hf"
    fixture = released_shape(LITE_FIXTURE, tmp_path / "fixture", hf_home)
    offline_hub(monkeypatch, hf_home)
    rc, out, err = run(["check", str(fixture)], capsys)
    assert rc == 0, err
    assert "weights:     pytorch_model.bin.index.json -> 3 bin shard(s)" in out
    assert f"vision:      {TOWER_REPO}: hub cache {hf_home / 'hub'}" in out
    assert "stored as:   bfloat16 (87) (config torch_dtype bfloat16)" in out
    assert "generation:  greedy, repetition_penalty 1.1, eos [295, 293], pad 293" in out


def test_check_reports_a_broken_checkpoint(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(LITE_FIXTURE, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.mm_projector.readout.0.bias"]
    save_file(state, str(folder / "model.safetensors"))
    rc, out, err = run(["check", str(folder)], capsys)
    assert rc == 1 and out == ""
    assert "error: checkpoint does not match the lite architecture" in err
    assert "missing tensors (1): model.mm_projector.readout.0.bias" in err


def test_check_tiny_sam2(capsys):
    rc, out, err = run(["check", "tiny-sam2"], capsys)
    assert rc == 0, err
    assert "framework:   SAM 2 video (sam2_video), image size 128" in out
    assert "weights:     model.safetensors" in out and "strict check passed" in out


def test_check_tiny_sam3(capsys):
    rc, out, err = run(["check", "tiny-sam3"], capsys)
    assert rc == 0, err
    assert "framework:   SAM 3 video (sam3_video)" in out and "strict check passed" in out


# -- download -----------------------------------------------------------------------------------------
def test_download_offline_fails_clearly(tmp_path, monkeypatch, capsys):
    offline_hub(monkeypatch, tmp_path / "hf")
    rc, out, err = run(["download", MODEL_REPO, SAM2_REPO], capsys)
    assert rc == 1 and out == ""
    assert f"error: cannot download {MODEL_REPO}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set" in err
    assert not (tmp_path / "hf").exists()


def test_select_repo_files():
    sam2_repo = ["README.md", "config.json", "model.safetensors", "processor_config.json", "sam2.1_hiera_t.pt",
                 "sam2.1_hiera_t.yaml", ".gitattributes"]  # fmt: skip
    assert select_repo_files(sam2_repo) == ["config.json", "model.safetensors", "processor_config.json"]
    model_repo = ["config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin",
                  "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "training_args.bin",
                  "tokenizer.json", "merges.txt", "vocab.json", "tower/config.json", "tower/model.safetensors",
                  "optimizer.pt"]  # fmt: skip
    assert select_repo_files(model_repo) == sorted(
        ["config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin",
         "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "tokenizer.json", "merges.txt",
         "vocab.json", "tower/config.json"]
    )  # fmt: skip
    both = ["model.safetensors", "pytorch_model.bin", "config.json"]
    assert select_repo_files(both) == ["config.json", "model.safetensors"]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The hub's repos as local folders; `_list_files`/`_fetch` serve them the way huggingface_hub would
    (a plain folder for `local_dir`, else a cache snapshot under HF_HOME). Returns (HF_HOME, fetched)."""
    from models import hub
    from models.sam2 import tiny_checkpoint as tiny_sam2

    remote = tmp_path / "remote"
    model = released_shape(LITE_FIXTURE, remote / "model", tmp_path / "unused-hf")
    (model / "training_args.bin").write_bytes(b"not needed")
    tower = next((tmp_path / "unused-hf" / "hub").glob("models--*/snapshots/*"))
    sam2 = shutil.copytree(tiny_sam2(), remote / "sam2", copy_function=shutil.copyfile)
    (sam2 / "sam2.1_hiera_t.pt").write_bytes(b"original-format checkpoint")
    repos = {MODEL_REPO: model, TOWER_REPO: tower, SAM2_REPO: sam2}
    hf_home = tmp_path / "hf"
    fetched: dict[str, list[str]] = {}

    def list_files(repo: str) -> list[str]:
        return [str(p.relative_to(repos[repo])) for p in repos[repo].rglob("*") if p.is_file()]

    def fetch(repo: str, patterns: list[str], local_dir: Path | None) -> Path:
        names = [f for f in list_files(repo) if any(fnmatch.fnmatch(f, p) for p in patterns)]
        fetched[repo] = sorted(names)
        staging = tmp_path / "staging" / repo.replace("/", "--")
        for name in names:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(repos[repo] / name, staging / name)
        if local_dir is not None:
            shutil.copytree(staging, local_dir, dirs_exist_ok=True)
            return local_dir
        return hub_repo(hf_home, repo, staging)

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_list_files", list_files)
    monkeypatch.setattr(hub, "_fetch", fetch)
    return hf_home, fetched


def test_download_to_folders_then_run_offline(fake_hub, tmp_path, monkeypatch, capsys):
    _, fetched = fake_hub
    to = tmp_path / "models"
    rc, out, err = run(["download", MODEL_REPO, SAM2_REPO, "tiny", "--to", str(to)], capsys)
    assert rc == 0, err
    assert out.splitlines() == [
        f"{MODEL_REPO}\t{to / 'PixelRefer-Lite-tiny'}",
        f"{TOWER_REPO}\t{to / 'PixelRefer-Lite-tiny' / 'VL3-SigLIP-NaViT'}",
        f"{SAM2_REPO}\t{to / 'sam2.1-hiera-tiny'}",
    ]
    assert "tiny: built in" in err and "use these folders as --model / --tracker" in err
    assert "training_args.bin" not in fetched[MODEL_REPO] and "inputs.npz" not in fetched[MODEL_REPO]
    assert "pytorch_model.bin.index.json" in fetched[MODEL_REPO]
    assert fetched[TOWER_REPO] == ["config.json", "preprocessor_config.json"]
    assert "sam2.1_hiera_t.pt" not in fetched[SAM2_REPO] and "model.safetensors" in fetched[SAM2_REPO]

    offline_hub(monkeypatch, tmp_path / "empty-hf")  # the pod: no network, no cache, just the folders
    rc, out, err = run(["check", str(to / "PixelRefer-Lite-tiny")], capsys)
    assert rc == 0, err
    assert f"vision:      {TOWER_REPO}: folder {to / 'PixelRefer-Lite-tiny' / 'VL3-SigLIP-NaViT'}" in out
    rc, out, err = run(["check", str(to / "sam2.1-hiera-tiny")], capsys)
    assert rc == 0, err


def test_download_to_the_cache_then_run_offline_by_hub_id(fake_hub, monkeypatch, capsys):
    hf_home, _ = fake_hub
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hf_home / "hub"))
    rc, out, err = run(["download", MODEL_REPO], capsys)
    assert rc == 0, err
    assert "run offline with HF_HUB_OFFLINE=1 and the same hub ids" in err
    offline_hub(monkeypatch, hf_home)
    rc, out, err = run(["check", MODEL_REPO], capsys)
    assert rc == 0, err
    assert f"vision:      {TOWER_REPO}: hub cache {hf_home / 'hub'}" in out


def test_check_of_a_model_missing_from_the_offline_cache(tmp_path, monkeypatch, capsys):
    offline_hub(monkeypatch, tmp_path / "hf")
    rc, out, err = run(["check", MODEL_REPO], capsys)
    assert rc == 1
    assert f"cannot get '{MODEL_REPO}' from the Hugging Face hub or its local cache" in err
    assert "offline (HF_HUB_OFFLINE)" in err


def test_check_bin_layout_of_tiny_sam2(tmp_path, capsys):
    from models.sam2 import tiny_checkpoint as tiny_sam2

    folder = copy_checkpoint(tiny_sam2(), tmp_path / "sam2")
    weights_to_bin(folder, shards=2)
    rc, out, err = run(["check", str(folder), "--full"], capsys)
    assert rc == 0, err
    assert "pytorch_model.bin.index.json -> 2 bin shard(s)" in out and "full load:" in out
    assert json.loads((folder / "config.json").read_text())["model_type"] == "sam2_video"
