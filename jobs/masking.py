"""Credentials out of everything `pixelrefer submit` prints: command lines, logs, errors.

`--storage-options` may carry object-store credentials that must reach the job but never a
terminal or a log. Which option names are secret is decided in one place,
`pipeline.storage_errors.is_secret_option` (also used by every error message the pipeline prints);
this module applies it to a command line field by field, remembers the values it hid, and hides
them again, with the passwords of URLs, in anything printed later.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from typing import Any, Iterable

from pipeline.storage_errors import MASK, MIN_SECRET_LENGTH, is_secret_option, mask_secrets, redact

__all__ = ["MASK", "Masker", "is_secret_name", "mask_storage_options"]


def is_secret_name(name: str) -> bool:
    """Whether a storage-option field (or environment variable) holds a credential; see `is_secret_option`."""
    return is_secret_option(name)


def mask_storage_options(value: Any) -> tuple[Any, set[str]]:
    """A copy of a parsed storage-options value with credentials masked, and the masked strings.

    Nested dicts (`client_kwargs`, `config_kwargs`, `headers`) are walked too: a credential can sit anywhere.
    """
    masked, found = mask_secrets(value)
    return masked, set(found)


@dataclasses.dataclass
class Masker:
    """Hides known secret strings and URL passwords in anything this module prints."""

    secrets: set[str] = dataclasses.field(default_factory=set)

    def add(self, values: Iterable[str]) -> None:
        # Very short values would mask ordinary words; nobody's credential is 1-3 characters long.
        self.secrets.update(v for v in values if len(v) >= MIN_SECRET_LENGTH)

    def add_url(self, url: str) -> None:
        """Remember the password of a `scheme://user:password@host` address (a proxy's, a dashboard's).

        Split by hand rather than with urllib: a password with an unescaped '/' is not userinfo to a
        URL parser, yet error messages still quote it (in pieces, split at the '/').
        """
        _, sep, rest = url.partition("://")
        if not sep or "@" not in rest:
            return
        password = rest.rsplit("@", 1)[0].partition(":")[2]
        if password:
            self.add({password, urllib.parse.unquote(password), *password.split("/")})

    def text(self, text: str) -> str:
        for value in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(value, MASK)
        return redact(text)  # what looks like a credential anyway, as storage errors are redacted

    def argv(self, argv: list[str]) -> list[str]:
        """The command line with `--storage-options` credentials masked field by field."""
        out: list[str] = []
        it = iter(argv)
        for arg in it:
            flag, sep, value = arg.partition("=")
            if not _is_storage_options_flag(flag):
                out.append(self.text(arg))
            elif sep:
                out.append(flag + "=" + self._storage_options(value))
            else:
                out.append(arg)
                out.append(self._storage_options(next(it, "")))
        return out

    def _storage_options(self, raw: str) -> str:
        try:
            masked, found = mask_storage_options(json.loads(raw))
        except json.JSONDecodeError:
            self.add([raw])  # cannot tell which part is secret: hide all of it, wherever it shows up
            return MASK
        self.add(found)
        return json.dumps(masked)


def _is_storage_options_flag(arg: str) -> bool:
    """`--storage-options`, or an abbreviation of it that argparse accepts (`--storage`, `--st`)."""
    return len(arg) >= len("--st") and "--storage-options".startswith(arg)
