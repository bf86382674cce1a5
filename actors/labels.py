"""An object's category from PixelRefer: the question asked beside each caption, and its answer made
into a label (`objects.label`) that `query --label` can match.

Objects found by a concept (SAM 3) are labelled by that concept. The others (prompted, or found by
SAM 2's class-agnostic discovery) would otherwise have nothing to filter on but their captions' words,
so the referrer answers one short question per object per clip, in the same LLM batches as the
captions; the driver keeps the answer most clips agree on (`vote`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

#: One `<region>`, answered in a few words: the model's own short-answer style.
CATEGORY_PROMPT = (
    "There is one object in the video: <region>.\n"
    "What kind of object is the marked object? Answer with a short noun phrase of one to three words."
)
#: New tokens a category answer may take: 3 words and a full stop, with room for sub-word pieces.
CATEGORY_TOKENS = 8
#: Words kept of an answer: "a red pickup truck parked by the road" becomes "red pickup truck".
MAX_LABEL_WORDS = 3

_LEAD = re.compile(r"^(?:it is|it's|this is|that is|the object is|the marked object is|an?|the)\s+")
_STOP_AT = re.compile(r"\b(?:that|which|who|with|in|on|at|by|near|from|of|and|is|are|was|being)\b")


def normalise_category(text: str | None) -> str | None:
    """The answer as a lowercase noun phrase (None when nothing of it is left).

    Lowercase, first line and first sentence only, leading "it is" / articles dropped, cut before
    a clause ("a man who is walking" -> "man"), letters, digits, spaces and hyphens kept, at most
    `MAX_LABEL_WORDS` words.
    """
    if not text:
        return None
    phrase = text.strip().splitlines()[0].lower() if text.strip() else ""
    phrase = re.split(r"[.;:!?,(]", phrase, maxsplit=1)[0]
    phrase = re.sub(r"[^a-z0-9\- ]+", " ", phrase)
    phrase = re.sub(r"\s+", " ", phrase).strip()
    for _ in range(3):
        phrase = _LEAD.sub("", phrase)
    cut = _STOP_AT.search(phrase)
    if cut and cut.start() > 0:
        phrase = phrase[: cut.start()]
    words = phrase.split()[:MAX_LABEL_WORDS]
    return " ".join(words) or None


def vote(labels: Iterable[str | None]) -> str | None:
    """The label most clips gave (ties: the earliest), or None when none gave one."""
    seen = [label for label in labels if label]
    if not seen:
        return None
    counts = Counter(seen)
    best = max(counts.values())
    return next(label for label in seen if counts[label] == best)
