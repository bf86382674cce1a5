"""The one exception every decoding path raises for a bad file, clip or decoder failure.

A module of its own so that the worker pool (`pipeline.decode.isolation`), which re-raises it across the
process boundary, and the decoders, which raise it, share it without importing each other.
"""

from __future__ import annotations


class DecodeError(Exception):
    """This video (or clip) cannot be decoded; the message names the file and the reason for a user."""
