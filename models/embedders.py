"""Sentence embedders for caption search by meaning (`--embedder`, `pixelrefer query --like`).

Two kinds, behind one small interface (`Embedder`: `name`, `dim`, `embed`):

- `wordllama` (the default): WordLlama's `l2_supercat` token embeddings, 256-d, mean-pooled. Its
  weights and tokenizer ship inside its PyPI wheel, so it works on clusters without internet, loads in
  a fraction of a second and embeds thousands of sentences a second on one CPU core. The package's
  own lookup looks for the tokenizer under a folder name that the wheel does not use and then goes
  to the network, so it is loaded with the installed package folder as its cache and downloads off.
- a transformers sentence-embedding model (a local folder or a Hugging Face id, from the cache when
  offline), e.g. `BAAI/bge-small-en-v1.5`: pooled as the checkpoint says (a sentence-transformers
  `1_Pooling/config.json` naming mean or CLS pooling; without one, the CLS token, as BGE-style
  models are trained), then L2-normalised.

Every vector is L2-normalised, so cosine similarity is a dot product and vectors of one embedder
are comparable across runs. `name` is what an index records next to each vector: a query must embed
its words with the same embedder, and the name is how it checks.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch

DEFAULT_EMBEDDER = "wordllama"
NO_EMBEDDER = "none"
#: The WordLlama configuration and width used: the package's default, the one its wheel carries.
WORDLLAMA_CONFIG = "l2_supercat"
WORDLLAMA_DIM = 256
WORDLLAMA_NAME = f"wordllama-{WORDLLAMA_CONFIG}_{WORDLLAMA_DIM}"
#: Sentences per forward pass of a transformers embedder: bounded activation memory on a CPU driver.
TRANSFORMERS_BATCH = 32
#: Longest input of a transformers embedder; captions and answers are far shorter.
TRANSFORMERS_MAX_TOKENS = 512


class EmbedderError(ValueError):
    """An embedder spec that cannot be loaded (unknown name, missing files, unsupported pooling)."""


class Embedder(abc.ABC):
    """Texts to L2-normalised float32 vectors of one fixed width."""

    name: str
    dim: int

    @abc.abstractmethod
    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, one unit vector per text (a zero vector for an empty text)."""


def embedder_name(spec: str) -> str | None:
    """The name an embedder spec will record, without loading it (None for `none`).

    Lets a run refuse an OUTPUT holding another embedder's vectors before it does any work.
    """
    spec = spec.strip()
    if spec == NO_EMBEDDER:
        return None
    if spec in (DEFAULT_EMBEDDER, WORDLLAMA_NAME):
        return WORDLLAMA_NAME
    return _model_name(spec)


def load_embedder(spec: str = DEFAULT_EMBEDDER) -> Embedder | None:
    """`wordllama` (or its recorded name), a transformers model folder or hub id, or `none` (None)."""
    spec = spec.strip()
    if not spec:
        raise EmbedderError("--embedder is empty: give 'wordllama', a model folder or hub id, or 'none'")
    if spec == NO_EMBEDDER:
        return None
    if spec in (DEFAULT_EMBEDDER, WORDLLAMA_NAME):
        return WordLlamaEmbedder()
    return TransformersEmbedder(spec)


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


@contextlib.contextmanager
def _keep_root_logging() -> Iterator[None]:
    """WordLlama calls `logging.basicConfig(level=INFO)` at import: undo it, so importing it late
    (after the CLI configured logging) or early (in a test or a notebook) changes nothing."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


class WordLlamaEmbedder(Embedder):
    """WordLlama from the files inside its installed wheel; never touches the network."""

    def __init__(self) -> None:
        with _keep_root_logging():
            import wordllama
            from wordllama import WordLlama

        package = Path(wordllama.__file__).parent
        try:
            self._model = WordLlama.load(config=WORDLLAMA_CONFIG, dim=WORDLLAMA_DIM, cache_dir=package,
                                         disable_download=True)
        except FileNotFoundError as exc:
            raise EmbedderError(f"WordLlama's files are missing from its installed package {package}: {exc}") from exc
        self.name = WORDLLAMA_NAME
        self.dim = int(self._model.embedding.shape[1])

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = self._model.embed(list(texts), norm=False, batch_size=256)
        return _normalise(np.asarray(vectors, np.float32))


def _model_name(spec: str) -> str:
    """The last path component: a hub id and the folder it was downloaded to record the same name."""
    name = spec.rstrip("/").rsplit("/", 1)[-1]
    if not name:
        raise EmbedderError(f"--embedder {spec!r} names no model")
    return name


def pooling_mode(folder: Path) -> str:
    """'cls' or 'mean', from the checkpoint's sentence-transformers pooling config (CLS without one)."""
    path = folder / "1_Pooling" / "config.json"
    modules = folder / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if str(module.get("type", "")).endswith("Pooling"):
                path = folder / module.get("path", "1_Pooling") / "config.json"
    if not path.is_file():
        return "cls"
    config: dict[str, Any] = json.loads(path.read_text())
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
    raise EmbedderError(f"{path}: pooling {modes or 'none'} is not supported (CLS or mean pooling only)")


class TransformersEmbedder(Embedder):
    """A transformers encoder pooled into sentence vectors, on CPU (the driver runs it at commit time)."""

    def __init__(self, spec: str) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from models.hub import resolve_checkpoint
        from models.weights import CheckpointError

        try:
            folder = resolve_checkpoint(os.path.expanduser(spec))
        except CheckpointError as exc:
            raise EmbedderError(f"--embedder {spec!r}: {exc}") from exc
        if not (folder / "config.json").is_file():
            raise EmbedderError(f"--embedder {spec!r}: {folder} has no config.json (not a transformers model)")
        self.pooling = pooling_mode(folder)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self._model = AutoModel.from_pretrained(str(folder)).eval()
        except (OSError, ValueError) as exc:
            raise EmbedderError(f"--embedder {spec!r}: cannot load {folder}: {exc}") from exc
        self._torch = torch
        self.name = _model_name(spec)
        self.dim = int(self._model.config.hidden_size)
        limits = [TRANSFORMERS_MAX_TOKENS, getattr(self._model.config, "max_position_embeddings", None),
                  getattr(self._tokenizer, "model_max_length", None)]
        self.max_tokens = min(int(v) for v in limits if v)

    def _pool(self, hidden: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        # Longest first, in batches of similar length: little padding, and the peak comes first.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with self._torch.inference_mode():
            for start in range(0, len(order), TRANSFORMERS_BATCH):
                chunk = order[start:start + TRANSFORMERS_BATCH]
                batch = self._tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                        max_length=self.max_tokens, return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state
                out[chunk] = self._pool(hidden, batch["attention_mask"]).float().numpy()
        return _normalise(out)
