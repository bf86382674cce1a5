"""Category answers made into labels, and the vote over an object's clips (`actors.labels`)."""

from __future__ import annotations

import pytest

from actors.labels import CATEGORY_PROMPT, normalise_category, vote
from models.processing_pixelrefer import count_regions


@pytest.mark.parametrize("answer,label", [
    ("A red pickup truck.", "red pickup truck"),
    ("It is a dog", "dog"),
    ("The man who is walking along the road", "man"),
    ("  Person\nwearing a hat", "person"),
    ("Forklift, yellow", "forklift"),
    ("a cat on the sofa", "cat"),
    ("T-shirt (white)", "t-shirt"),
    ("The marked object is an old wooden chair with a blanket", "old wooden chair"),
    ("", None),
    ("!!!", None),
    (None, None),
])
def test_answers_become_lowercase_noun_phrases(answer, label):
    assert normalise_category(answer) == label


def test_vote_keeps_what_most_clips_said_and_the_earliest_on_ties():
    assert vote(["car", None, "truck", "car"]) == "car"
    assert vote(["truck", "car"]) == "truck"
    assert vote([None, None]) is None and vote([]) is None


def test_the_category_prompt_refers_to_one_object():
    assert count_regions(CATEGORY_PROMPT) == 1
