"""Credentials out of everything `pixelrefer submit` prints: command lines, logs, errors.

`--storage-options` may carry object-store credentials that must reach the job but never a
terminal or a log. Apart from `pipeline.storage_errors.redact` (which removes the values of one
known options dict from an error), this also masks a command line field by field, values whose
field names say they are secret, and the passwords of URLs, before anything is known about them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse
from typing import Any, Iterable

from pipeline.storage_errors import redact_url

MASK = "***"
# Names of storage-option fields whose values are credentials (fsspec/s3fs/gcsfs/adlfs spellings).
_SECRET_NAME = re.compile(
    r"(^|_)(key|secret|token|password|passwd|credentials?|signature|sas|private|auth|session)($|_)"
    r"|secret|token|password|credential|apikey|accesskey|authorization",
    re.IGNORECASE,
)

def is_secret_name(name: str) -> bool:
    """Whether a storage-option field (or environment variable) holds a credential."""
    return bool(_SECRET_NAME.search(name))


def mask_storage_options(value: Any) -> tuple[Any, set[str]]:
    """A copy of a parsed storage-options value with credentials masked, and the masked strings.

    Nested dicts (`client_kwargs`, `config_kwargs`) are walked too: a credential can sit anywhere.
    """
    found: set[str] = set()

    def walk(item: Any, secret: bool) -> Any:
        if isinstance(item, dict):
            return {k: walk(v, secret or is_secret_name(str(k))) for k, v in item.items()}
        if isinstance(item, list):
            return [walk(v, secret) for v in item]
        if secret and item not in (None, "", True, False):
            found.add(str(item))
            return MASK
        return item

    return walk(value, False), found


@dataclasses.dataclass
class Masker:
    """Hides known secret strings and URL passwords in anything this module prints."""

    secrets: set[str] = dataclasses.field(default_factory=set)

    def add(self, values: Iterable[str]) -> None:
        # Very short values would mask ordinary words; nobody's credential is 1-3 characters long.
        self.secrets.update(v for v in values if len(v) >= 4)

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
        return redact_url(text)  # `user:password@` of any URL, as storage errors are redacted

    def argv(self, argv: list[str]) -> list[str]:
        """The command line with `--storage-options` credentials masked field by field."""
        out: list[str] = []
        it = iter(argv)
        for arg in it:
            if arg == "--storage-options":
                out.append(arg)
                out.append(self._storage_options(next(it, "")))
            elif arg.startswith("--storage-options="):
                out.append("--storage-options=" + self._storage_options(arg.split("=", 1)[1]))
            else:
                out.append(self.text(arg))
        return out

    def _storage_options(self, raw: str) -> str:
        try:
            masked, found = mask_storage_options(json.loads(raw))
        except json.JSONDecodeError:
            self.add([raw])  # cannot tell which part is secret: hide all of it, wherever it shows up
            return MASK
        self.add(found)
        return json.dumps(masked)
