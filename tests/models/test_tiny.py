"""The built-in ``tiny`` model's vocabulary decodes to printable placeholder text (issue 20: random ids of a
byte-level vocabulary decoded to U+FFFD noise), through the released checkpoints' tokenizer class."""

from __future__ import annotations

from transformers import Qwen2Tokenizer

from pixelrefer_helpers import make_video


def test_every_token_id_decodes_to_printable_text(tiny_lite):
    tokenizer = tiny_lite.tokenizer
    assert type(tokenizer) is Qwen2Tokenizer
    vocab = tiny_lite.config.text["vocab_size"]  # padded past the tokenizer, as released vocabularies are
    assert vocab >= len(tokenizer)
    for i in range(vocab):
        text = tokenizer.decode([i], skip_special_tokens=True)  # how answers are decoded
        assert "\ufffd" not in text and text.isprintable(), (i, text)
        raw = tokenizer.decode([i])
        assert "\ufffd" not in raw and (raw.isprintable() or raw == "\n"), (i, raw)


def test_random_answers_read_as_placeholder_text(tiny_lite):
    frames, times, objects = make_video(num_frames=2, num_objects=3)
    captions = tiny_lite.caption(frames, times, objects, max_new_tokens=24)
    assert all(c and c.isprintable() and c.isascii() for c in captions), captions
    words = {"lorem", "ipsum", "dolor", "amet", "consectetur", "adipiscing", "eiusmod", "tempor", "incididunt"}
    vocabulary = {tiny_lite.tokenizer.decode([i]).strip().lower() for i in range(len(tiny_lite.tokenizer))}
    assert words <= vocabulary  # whole placeholder words are single tokens


def test_prompts_keep_their_structure(tiny_lite):
    """Line breaks survive encoding (a special token, so answers never contain one); other characters
    outside printable ASCII are dropped rather than split into bytes."""
    tokenizer = tiny_lite.tokenizer
    ids = tokenizer("<|im_start|>user\nDescribe the café.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "<|im_start|>user\nDescribe the caf.<|im_end|>"
