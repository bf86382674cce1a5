"""`models.embedders`: WordLlama from its wheel, offline, and a transformers encoder from a folder.

The transformers path is exercised with a tiny randomly initialised BERT saved with
`save_pretrained`, and a WordPiece vocabulary this file writes, loaded through `load_embedder` as a
real checkpoint folder would be; its vectors are checked against the model run by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.embedders import (
    WORDLLAMA_NAME,
    EmbedderError,
    TransformersEmbedder,
    WordLlamaEmbedder,
    embedder_name,
    load_embedder,
    pooling_mode,
)

WORDS = "a man carrying ladder across the street dog running on grass woman riding bike".split()
TEXTS = ["a man carrying a ladder across the street", "dog running", "a woman riding a bike on the grass"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece tokenizer, saved as a checkpoint folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("embedders") / "tiny-bert"
    vocab = folder.parent / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    BertTokenizer(vocab=str(vocab)).save_pretrained(folder)
    return folder


def _by_hand(folder: Path, texts: list[str], pooling: str) -> np.ndarray:
    """The model run one text at a time (no padding), pooled and normalised here."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(str(folder)), AutoModel.from_pretrained(str(folder)).eval()
    out = []
    with torch.inference_mode():
        for text in texts:
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            vector = hidden[0] if pooling == "cls" else hidden.mean(0)
            out.append((vector / vector.norm()).numpy())
    return np.stack(out)


def test_wordllama_loads_from_its_wheel_without_the_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import requests

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("WordLlama tried to download")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/wordllama to fall back on
    embedder = load_embedder("wordllama")
    assert isinstance(embedder, WordLlamaEmbedder)
    assert (embedder.name, embedder.dim) == (WORDLLAMA_NAME, 256) == ("wordllama-l2_supercat_256", 256)
    vectors = embedder.embed(TEXTS)
    assert vectors.shape == (3, 256) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(vectors, embedder.embed(TEXTS))  # deterministic
    np.testing.assert_allclose(embedder.embed(TEXTS[1:2])[0], vectors[1], rtol=1e-5, atol=1e-6)  # batch-independent
    assert embedder.embed([]).shape == (0, 256)
    assert load_embedder(WORDLLAMA_NAME).name == WORDLLAMA_NAME  # the recorded name loads it too


def test_wordllama_puts_paraphrases_closest() -> None:
    embedder = load_embedder("wordllama")
    scenes = embedder.embed(["a man carrying a ladder across the street", "a dog running on the beach",
                             "a cat sleeping on the sofa"])
    queries = embedder.embed(["person holding steps", "puppy sprinting along the shore", "kitten napping on a couch"])
    assert list((queries @ scenes.T).argmax(axis=1)) == [0, 1, 2]


def test_transformers_folder_is_cls_pooled_without_a_pooling_config(tiny_bert: Path) -> None:
    embedder = load_embedder(str(tiny_bert))
    assert isinstance(embedder, TransformersEmbedder)
    assert (embedder.name, embedder.dim, embedder.pooling) == ("tiny-bert", 32, "cls")
    assert embedder_name(str(tiny_bert)) == "tiny-bert"
    vectors = embedder.embed(TEXTS)  # one padded batch
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, _by_hand(tiny_bert, TEXTS, "cls"), atol=1e-5)


def test_sentence_transformers_mean_pooling_config_is_followed(tiny_bert: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "tiny-bert-mean"
    shutil.copytree(tiny_bert, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    embedder = load_embedder(str(folder))
    assert embedder.pooling == "mean"
    np.testing.assert_allclose(embedder.embed(TEXTS), _by_hand(folder, TEXTS, "mean"), atol=1e-5)


def test_unsupported_pooling_is_refused(tmp_path: Path) -> None:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(EmbedderError, match="max_tokens"):
        pooling_mode(tmp_path)


def test_none_and_bad_specs(tmp_path: Path) -> None:
    assert load_embedder("none") is None and embedder_name("none") is None
    assert embedder_name("wordllama") == WORDLLAMA_NAME
    assert embedder_name("BAAI/bge-small-en-v1.5") == "bge-small-en-v1.5"  # the same as its downloaded folder
    with pytest.raises(EmbedderError, match="empty"):
        load_embedder("  ")
    with pytest.raises(EmbedderError, match="neither an existing folder nor a hub id"):
        load_embedder(str(tmp_path / "no-such-model"))
    with pytest.raises(EmbedderError, match="no config.json"):
        load_embedder(str(tmp_path))
