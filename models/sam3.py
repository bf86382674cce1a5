"""SAM 3 checkpoints for finding objects by name: a local folder, a hub id, or the built-in `tiny-sam3`.

SAM 3 (`Sam3VideoModel`) detects every instance of a text concept ("person", "red car") on each frame
and tracks the instances with a SAM 2-style memory tracker. Checkpoints load the way `models.sam2`
loads SAM 2: the weights are read by `models.weights` and handed to transformers'
`from_pretrained(state_dict=...)`, and the load is strict (any missing, unexpected or mis-shaped tensor
fails it), so `facebook/sam3` and `tiny-sam3` share one path.

`tiny-sam3` is the real architecture with seeded random weights, shrunk so that CPU tests are fast (the
default config is a 32-layer ViT-L at 1008 px): 112 px input (8x8 patches of 14), a 2-layer ViT of
width 64, a 1-layer CLIP text encoder of width 64 over a 584-token vocabulary, 1-layer DETR encoder and
decoder with 4 queries, a 1-layer memory attention and 3 mask memories. Heads are 128 wide: the
tracker's memory channels are fixed at 64 by transformers, and at width 64 its object-pointer code
keeps a stray dimension that only its split for wider heads removes (width 64 crashes on the second
frame), so 128 keeps tiny on the real path. It is written once with `save_pretrained` (model, processor,
tokenizer) into the cache folder of `models.cache.cache_root()`, under a name that fingerprints its
definition, and loaded back like any other checkpoint. The tokenizer is a CLIP BPE over the byte
alphabet plus merges for a short word list, written by this module (no download).

Departures from plain random init, because random weights would otherwise make the concept tracker's
output untestable: every query would score sigmoid(0) * sigmoid(0) = 0.25, under SAM 3's 0.5 detection
threshold, so tiny would find nothing, and a small shift would make it find everything.

- the detector's presence head has output bias +10 (its clamp): "the concept is in the frame" is true;
- the dot-product scoring's text and query projections are scaled by 10, so a query's logit lands far
  from 0 (its sign set by the random projections of that query and that text) rather than at 0 +- 0.01,
  where float noise would decide;
- the tracker's object-presence head has output bias +2, as in tiny SAM 2 (`models.sam2`): random
  logits around 0 would drop tracked objects on about half of the frames;
- the config counts a track as confirmed by a detection at mask IoU 0.1 (SAM 3: 0.5): the random
  detector and tracker heads draw unrelated masks whose IoU hovers near 0.5, and SAM 3's "hotstart"
  rule would delete every track unconfirmed for 8 frames.

With these, every concept tried on shape clips of 6 to 30 frames (96x128 to 320x240; "person", "car",
"dog", "red car", "a person walking", "x", ...) yields one object tracked on every frame.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.cache import cache_root, write_once
from models.sam2 import TRACKER_DEFAULTS_FILE, resolve_device
from models.weights import quiet_transformers, read_strict

TINY = "tiny-sam3"
TINY_NAME = "tiny-sam3"
TINY_SEED = 0
TINY_IMAGE_SIZE = 112
TINY_PATCH = 14
TINY_HIDDEN = 128
TINY_QUERIES = 4
TINY_PRESENCE_BIAS = 10.0
TINY_SCORE_GAIN = 10.0
TINY_TRACKER_PRESENCE_BIAS = 2.0
TINY_TRACK_MATCH_IOU = 0.1
#: Words the tiny tokenizer keeps whole; anything else is spelled out byte by byte.
TINY_WORDS = ("person", "people", "car", "dog", "cat", "bus", "bicycle", "ball", "tree", "red", "blue", "green",
              "white", "black", "a", "the", "of", "and", "shape", "square", "circle", "box", "object")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SAM3_MODEL_TYPES = ("sam3_video", "sam3")


class Sam3LoadError(RuntimeError):
    """A SAM 3 checkpoint could not be found or loaded."""


class ConceptError(ValueError):
    """Concepts that SAM 3 cannot take: none at all, an empty one, or one longer than its text budget."""


@dataclass
class Sam3Bundle:
    """A loaded SAM 3 checkpoint: the video detector-tracker, its processor (with the CLIP tokenizer)."""

    name: str
    path: Path
    model: Any  # transformers.Sam3VideoModel
    processor: Any  # transformers.Sam3VideoProcessor
    device: torch.device
    dtype: torch.dtype
    tracker_defaults: dict[str, Any] = field(default_factory=dict)


# -- tiny-sam3 ----------------------------------------------------------------------------------------

def _tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary: every byte (alone and word-final), TINY_WORDS' merges, then the two specials.

    The specials come last, as in CLIP's released vocabulary, so their ids are the vocabulary's top two.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        built = pieces[0]
        for piece in pieces[1:]:
            if (built, piece) not in merges:
                merges.append((built, piece))
            built += piece
            vocab.setdefault(built, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def tiny_config() -> Any:
    """The reduced `Sam3VideoConfig` of `tiny-sam3` (sizes and why in the module docstring)."""
    from transformers import Sam3VideoConfig

    size, hidden, grid = TINY_IMAGE_SIZE, TINY_HIDDEN, TINY_IMAGE_SIZE // TINY_PATCH
    vocab, _ = _tiny_vocab()
    vit = {"model_type": "sam3_vit_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 2, "image_size": size, "patch_size": TINY_PATCH, "window_size": 4,
           "global_attn_indexes": [1], "pretrain_image_size": size}
    vision = {"model_type": "sam3_vision_model", "backbone_config": vit, "fpn_hidden_size": hidden,
              "backbone_feature_sizes": [[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]]}
    text = {"model_type": "clip_text_model", "vocab_size": len(vocab), "hidden_size": 64, "intermediate_size": 128,
            "projection_dim": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
            "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]}
    small = {"hidden_size": hidden, "num_attention_heads": 2, "intermediate_size": 2 * hidden}
    detector = {
        "vision_config": vision, "text_config": text,
        "geometry_encoder_config": {**small, "num_layers": 1},
        "detr_encoder_config": {**small, "num_layers": 1},
        "detr_decoder_config": {**small, "num_layers": 1, "num_queries": TINY_QUERIES},
        "mask_decoder_config": {"hidden_size": hidden, "num_attention_heads": 2},
    }
    tracker = {
        "image_size": size, "vision_config": vision,
        "prompt_encoder_config": {"hidden_size": hidden, "image_size": size, "patch_size": TINY_PATCH},
        "mask_decoder_config": {"hidden_size": hidden, "mlp_dim": 2 * hidden, "num_attention_heads": 2,
                                "iou_head_hidden_dim": hidden},
        "memory_attention_hidden_size": hidden, "memory_attention_num_layers": 1,
        "memory_attention_feed_forward_hidden_size": 2 * hidden, "memory_encoder_hidden_size": hidden,
        "mask_downsampler_embed_dim": hidden, "memory_fuser_embed_dim": hidden,
        "memory_fuser_intermediate_dim": 2 * hidden, "memory_fuser_num_layers": 1,
        "num_maskmem": 3, "max_object_pointers_in_encoder": 4,
    }
    return Sam3VideoConfig(detector_config=detector, tracker_config=tracker, low_res_mask_size=4 * grid,
                           trk_assoc_iou_thresh=TINY_TRACK_MATCH_IOU)


def tiny_processor(image_size: int = TINY_IMAGE_SIZE) -> Any:
    """A `Sam3VideoProcessor` at tiny's input size (or another, for benches of the full-size model), with
    the offline-made CLIP tokenizer."""
    from transformers import CLIPTokenizer, Sam3ImageProcessor, Sam3VideoProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    size = {"height": image_size, "width": image_size}
    mask = 4 * (image_size // TINY_PATCH)
    half = [0.5, 0.5, 0.5]  # SAM 3 normalises to [-1, 1]
    vocab, merges = _tiny_vocab()
    return Sam3VideoProcessor(
        image_processor=Sam3ImageProcessor(size=size, mask_size={"height": mask, "width": mask}),
        video_processor=Sam2VideoVideoProcessor(size=size, image_mean=half, image_std=half),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges), target_size=image_size)


def make_detectable(model: Any, *, presence_bias: float = TINY_PRESENCE_BIAS, score_gain: float = TINY_SCORE_GAIN,
                    tracker_presence_bias: float = TINY_TRACKER_PRESENCE_BIAS) -> Any:
    """Apply tiny's two departures (module docstring) to a randomly initialised `Sam3VideoModel`.

    Public so that a bench can time the full-size architecture with random weights that still detect,
    and so track and propagate, instead of detecting nothing.
    """
    detector = model.detector_model
    with torch.no_grad():
        detector.detr_decoder.presence_head.layer3.bias.fill_(presence_bias)
        detector.dot_product_scoring.query_proj.weight.mul_(score_gain)
        detector.dot_product_scoring.text_proj.weight.mul_(score_gain)
        model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(tracker_presence_bias)
    return model


def build_tiny_model() -> Any:
    """Seeded random `Sam3VideoModel` of `tiny_config()`; the caller's RNG state is left untouched."""
    from transformers import Sam3VideoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Sam3VideoModel(tiny_config())
    return make_detectable(model).eval()


def tiny_fingerprint() -> str:
    """Short hash of everything that defines tiny's files, so a changed definition gets a new folder."""
    cfg = {k: v for k, v in tiny_config().to_dict().items() if k != "transformers_version"}
    spec = {"config": cfg, "seed": TINY_SEED, "presence_bias": TINY_PRESENCE_BIAS, "score_gain": TINY_SCORE_GAIN,
            "tracker_presence_bias": TINY_TRACKER_PRESENCE_BIAS, "words": TINY_WORDS, "image_size": TINY_IMAGE_SIZE}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]


def tiny_checkpoint(root: Path | None = None) -> Path:
    """The tiny-sam3 folder, written on first use (atomically: `models.cache.write_once`)."""
    def fill(tmp: Path) -> None:
        with quiet_transformers():
            # save_original_format=False: transformers "reverts" its SAM 3 tracker key mapping on save,
            # which is meant for a standalone tracker and, for the tracker nested in Sam3VideoModel,
            # writes `tracker_model.tracker_model.*` instead of the released `tracker_model.*`.
            build_tiny_model().save_pretrained(tmp, save_original_format=False)
            tiny_processor().save_pretrained(tmp)
        # The released repos also carry the BPE files themselves, next to tokenizer.json.
        vocab, merges = _tiny_vocab()
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

    folder = (root or cache_root()) / f"{TINY_NAME}-{tiny_fingerprint()}"
    return write_once(folder, fill, marker="processor_config.json")


# -- any checkpoint -----------------------------------------------------------------------------------

def checkpoint_folder(spec: str) -> Path:
    """`tiny-sam3`, a local folder, or a hub id (downloaded, or from the local cache when offline)."""
    if spec == TINY:
        return tiny_checkpoint()
    from models.hub import resolve_checkpoint
    from models.weights import CheckpointError

    try:
        return resolve_checkpoint(spec)
    except CheckpointError as exc:
        raise Sam3LoadError(f"SAM 3 checkpoint {spec!r}: {exc}") from exc


def _model_type(config_file: Path) -> str | None:
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_sam3(spec: str) -> bool:
    """Whether a tracker spec names SAM 3 rather than SAM 2, without loading it or touching the network.

    `tiny-sam3`; a folder whose config.json says `sam3_video` (or the image-only `sam3`, so that it is
    routed here and refused with a clear message); a hub id by its cached config.json, and, when that is
    not cached, by its name (`facebook/sam3`).
    """
    if spec == TINY:
        return True
    path = Path(spec).expanduser()
    if path.is_dir():
        return _model_type(path / "config.json") in SAM3_MODEL_TYPES
    from models.hub import is_hub_id

    if not is_hub_id(spec):
        return False
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    if isinstance(cached, str):
        return _model_type(Path(cached)) in SAM3_MODEL_TYPES
    return "sam3" in spec.split("/")[1].lower().replace("-", "").replace("_", "")


def _model_name(stored: str) -> str:
    """A stored tensor's model name: `tracker_model.tracker_model.*`, which transformers' own
    `save_pretrained` writes for SAM 3 video (see `tiny_checkpoint`), is `tracker_model.*`."""
    return stored.replace("tracker_model.tracker_model.", "tracker_model.", 1)


def read_sam3(folder: Path, *, dtype: torch.dtype, meta: bool = False) -> tuple[Any, str]:
    """`Sam3VideoModel` of a folder's config with its weights, strictly; also the weight files read.

    Unexpected tensors are counted here rather than taken from transformers: the nested detector and
    tracker bring their own unexpected-key ignore lists (`^tracker_model.`, `^tracker_neck.`,
    `^detector_model.`, meant for loading either part alone), and transformers applies them to the
    whole video model, so a stray tensor anywhere under those prefixes would load silently.
    `meta=True` checks names and shapes against the files' headers without reading tensor data.
    """
    from transformers import Sam3VideoConfig, Sam3VideoModel

    kind = _model_type(folder / "config.json")
    if kind != "sam3_video":
        raise Sam3LoadError(
            f"{folder / 'config.json'}: model_type {kind!r}; finding objects by name needs a SAM 3 video checkpoint "
            f"(model_type 'sam3_video', e.g. facebook/sam3), whose detector and tracker share one backbone")
    model, problems, files = read_strict(folder, Sam3VideoModel, Sam3VideoConfig, dtype=dtype, meta=meta,
                                         model_name=_model_name, count_unexpected=True)
    if problems:
        raise Sam3LoadError(f"SAM 3 checkpoint {folder} does not match its config: " + " | ".join(problems))
    return model, files


def load_sam3(spec: str = TINY, *, device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None) -> Sam3Bundle:
    """Load a SAM 3 checkpoint (`tiny-sam3`, a local folder or a hub id) onto a device, strictly."""
    from transformers import Sam3VideoProcessor

    dev, dt = resolve_device(device, dtype)
    folder = checkpoint_folder(spec)
    try:
        with quiet_transformers():
            model = read_sam3(folder, dtype=dt)[0].to(dev).eval()
            processor = Sam3VideoProcessor.from_pretrained(folder)
    except Sam3LoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise Sam3LoadError(f"cannot load SAM 3 from {spec!r} ({folder}): {exc}") from exc
    defaults_file = folder / TRACKER_DEFAULTS_FILE
    defaults = json.loads(defaults_file.read_text()) if defaults_file.is_file() else {}
    return Sam3Bundle(name=TINY_NAME if spec == TINY else str(spec), path=folder, model=model, processor=processor,
                      device=dev, dtype=dt, tracker_defaults=defaults)


# -- concepts -----------------------------------------------------------------------------------------

def concept_token_budget(bundle: Sam3Bundle) -> int:
    """Most tokens a concept may take, its start and end tokens included: the text encoder's positions."""
    return int(bundle.model.config.detector_config.text_config.max_position_embeddings)


def check_concepts(bundle: Sam3Bundle, concepts: Sequence[str]) -> None:
    """Refuse, before any model work, concepts that SAM 3 would fail on or silently misread.

    A concept over the budget would not fail cleanly: the processor pads to 32 tokens but never
    truncates, and the text encoder has no positions past its budget.
    """
    if isinstance(concepts, str) or not isinstance(concepts, Sequence):
        raise ConceptError(f"concepts must be a list of strings, got {type(concepts).__name__}: {concepts!r}")
    if not concepts:
        raise ConceptError("no concepts given: name at least one thing to find, e.g. ['person', 'car']")
    _check_lengths(concepts, bundle.processor.tokenizer, concept_token_budget(bundle), bundle.name)


def check_concepts_of(spec: str, concepts: Sequence[str]) -> None:
    """`check_concepts` from a checkpoint's tokenizer and config alone, without its weights: the
    driver refuses a `--find` concept over the budget before any video is decoded."""
    from transformers import AutoConfig, AutoTokenizer

    folder = checkpoint_folder(spec)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder)
            config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise Sam3LoadError(f"cannot read SAM 3's tokenizer from {spec!r} ({folder}): {exc}") from exc
    budget = int(config.detector_config.text_config.max_position_embeddings)
    _check_lengths(concepts, tokenizer, budget, TINY_NAME if spec == TINY else str(spec))


def _check_lengths(concepts: Sequence[str], tokenizer: Any, budget: int, name: str) -> None:
    for k, concept in enumerate(concepts):
        if not isinstance(concept, str):
            raise ConceptError(f"concept #{k + 1} ({concept!r}) is not a string")
        if not concept.strip():
            raise ConceptError(f"concept #{k + 1} ({concept!r}) is empty")
        n = len(tokenizer(concept.strip()).input_ids)
        if n > budget:
            raise ConceptError(f"concept {concept.strip()!r} is {n} tokens long; {name}'s text encoder takes "
                               f"at most {budget}, its start and end tokens included: use a shorter noun phrase")
