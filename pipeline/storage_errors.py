"""Turning object-store failures into one clear sentence, and keeping credentials out of it.

s3fs, gcsfs and adlfs raise a mix of Python errors (``PermissionError('Forbidden')``,
``FileNotFoundError('Not Found')``), botocore errors (``EndpointConnectionError`` for a reset
connection) and aiohttp errors, with the store's own error code (``InvalidAccessKeyId``,
``NoSuchBucket``, ``SlowDown``) only on a chained ``ClientError``. `classify` walks that chain once
and reduces it to a `Problem` (what kind of failure, the store's code, whether it is transient);
`explain` writes the sentence that names the URL, the problem and what to do about it.

Retrying is not done here. s3fs and botocore already retry throttling (503 SlowDown), server
errors and dropped connections with backoff (botocore's retry modes, then s3fs's own `retries`);
botocore's policy is tunable per store through the storage options, e.g.
``{"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 10}}}``. A transient error
that reaches this module has therefore already exhausted those retries, and the message says so.

Credentials never appear in a message: `redact` removes the values of secret-looking storage
options, ``user:password@`` in URLs and signature query parameters from any text shown to a user.
`is_secret_option` is the project's one list of secret option names (s3fs, gcsfs, adlfs, HTTP
headers, environment variables); `mask_secrets` applies it to a nested options dict. Everything that
masks or redacts (`jobs.masking`, `pixelrefer submit`, every error message) goes through these two, so
a name added here is hidden everywhere at once.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator, Mapping

#: fsspec protocols of object stores: flat key spaces where "folders" need not be created, and
#: where ``makedirs`` may create a *bucket* (s3fs, gcsfs do) instead of failing on a missing one.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "cos"})

_CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
    "AuthorizationHeaderMalformed", "InvalidClientTokenId", "UnrecognizedClientException", "AuthFailure",
    "InvalidSecurity", "MissingSecurityHeader", "AuthenticationFailed", "InvalidAuthenticationInfo",
})
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "AuthorizationFailure",
                           "AuthorizationPermissionMismatch", "InsufficientAccountPermissions", "403"})
_THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                             "TooManyRequests", "TooManyRequestsException", "RequestThrottled", "503", "429"})
_SERVER_CODES = frozenset({"InternalError", "ServiceUnavailable", "RequestTimeout", "500", "502", "504"})
_MISSING_CREDENTIAL_CLASSES = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError",
    "UnauthorizedSSOTokenError", "SSOTokenLoadError", "DefaultCredentialsError", "ClientAuthenticationError",
})
_NETWORK_CLASSES = frozenset({"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                              "ConnectTimeoutError", "HTTPClientError", "ProxyConnectionError", "SSLError",
                              "ClientOSError", "ServerDisconnectedError", "ClientConnectorError",
                              "ClientPayloadError", "ServerTimeoutError", "FSTimeoutError", "IncompleteRead",
                              "ResponseStreamingError", "ConnectionError", "TimeoutError"})
#: Modules whose exceptions are storage failures even when they are not OSErrors.
_STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs", "azure",
                    "google.auth", "google.api_core", "urllib3", "requests")

_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SIGNED_QUERY = re.compile(
    r"(?<![\w-])(?P<name>X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId|sig|se|skoid|sktid)"
    r"=[^&\s\"']+", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Problem:
    """What went wrong, reduced from an exception chain."""

    kind: str  # credentials | no_credentials | denied | no_bucket | not_found | throttled | server | network | other
    code: str | None  # the store's error code, e.g. "InvalidAccessKeyId"; None when it gave none
    status: int | None  # HTTP status, when an answer came back
    detail: str  # the store's (or the library's) own words, credentials removed by `explain`

    def as_missing_bucket(self) -> "Problem":
        """This problem read as a missing bucket: a 404 on a bucket's root means the bucket is not there."""
        return dataclasses.replace(self, kind="no_bucket", code="NoSuchBucket")

    @property
    def transient(self) -> bool:
        """Worth retrying later: the library's retries ran out, a later attempt may succeed."""
        return self.kind in ("throttled", "server", "network")


def _chain(exc: BaseException, implicit: bool = True) -> Iterator[BaseException]:
    """`exc`, what it was raised from, and (with `implicit`) what was being handled when it was."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (current.__context__ if implicit else None)


def _response(exc: BaseException) -> tuple[str | None, int | None, str | None]:
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return None, None, None
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    code = error.get("Code")
    status = meta.get("HTTPStatusCode")
    return (str(code) if code else None), (int(status) if status else None), error.get("Message")


def is_storage_exception(exc: BaseException) -> bool:
    """True for the failures of a filesystem or object-store client (not for programming errors).

    Only explicit causes count: a bug raised while handling a storage error is still a bug.
    """
    for link in _chain(exc, implicit=False):
        if isinstance(link, OSError):
            return True
        module = type(link).__module__ or ""
        if module.startswith(_STORAGE_MODULES) and not isinstance(link, (TypeError, AttributeError, NameError)):
            return True
    return False


def classify(exc: BaseException) -> Problem:
    """Reduce an exception (and what it was raised from) to a `Problem`."""
    code = status = message = None
    network = missing_credentials = None
    for link in _chain(exc):
        link_code, link_status, link_message = _response(link)
        if link_code and code is None:
            code, status, message = link_code, link_status, link_message
        name = type(link).__name__
        if name in _MISSING_CREDENTIAL_CLASSES and missing_credentials is None:
            missing_credentials = link
        if name in _NETWORK_CLASSES or isinstance(link, (ConnectionError, TimeoutError)):
            network = link  # the innermost one says what happened ("Connection reset by peer")
    detail = message or str(exc) or type(exc).__name__
    if missing_credentials is not None:
        return Problem("no_credentials", None, None, str(missing_credentials) or type(missing_credentials).__name__)
    if code in _CREDENTIAL_CODES:
        return Problem("credentials", code, status, detail)
    if code == "NoSuchBucket" or (code is None and "bucket does not exist" in str(exc).lower()):
        return Problem("no_bucket", code or "NoSuchBucket", status, detail)
    if code in _DENIED_CODES or (code is None and isinstance(exc, PermissionError)):
        return Problem("denied", code, status or (403 if code == "403" else None), detail)
    if code in _THROTTLE_CODES:
        return Problem("throttled", code, status, detail)
    if code in _SERVER_CODES or (status is not None and status >= 500):
        return Problem("server", code, status, detail)
    if code in ("NoSuchKey", "404", "NotFound") or (code is None and isinstance(exc, FileNotFoundError)):
        return Problem("not_found", code, status, detail)
    if network is not None:
        return Problem("network", None, None, f"{type(network).__name__}: {network}".rstrip(": "))
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 16:  # s3fs maps an unknown 503 to EBUSY
        return Problem("throttled", code, status, detail)
    return Problem("other", code, status, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def bucket_of(url: str) -> str | None:
    """The bucket (container) of an object-store URL, else None."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://([^/]*)", url)
    if not match or match.group(1).lower() not in OBJECT_STORE_PROTOCOLS:
        return None
    return match.group(2).rpartition("@")[2] or None


def is_object_store(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in OBJECT_STORE_PROTOCOLS for p in protocols)


def explain(
    exc: BaseException, url: str, *, role: str, action: str, storage_options: Mapping[str, Any] | None = None,
    problem: Problem | None = None, subject: str | None = None,
) -> str:
    """One sentence for a user: which URL, what went wrong, what to do. Credentials are removed.

    `role` is how the user knows the location (``SOURCE``, ``OUTPUT``); `action` what was being
    done, as a gerund phrase (``listing``, ``writing the run's files``). `subject` replaces the
    sentence's opening (``OUTPUT 's3://b/x'``) when the caller has a better one.
    """
    problem = problem or classify(exc)
    where = subject or (f"{role} {redact_url(url)!r}" if url else role)
    code = f"{problem.code}: " if problem.code and not problem.code.isdigit() else ""
    said = f"({code}{problem.detail})"
    bucket = bucket_of(url)
    if problem.kind == "credentials":
        text = (f"{where}: the storage credentials were rejected while {action} {said}; check the access key and "
                "secret given in --storage-options or in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)")
    elif problem.kind == "no_credentials":
        text = (f"{where}: no storage credentials were found while {action} ({problem.detail}); give them in "
                "--storage-options or the environment, or pass {\"anon\": true} for a public bucket")
    elif problem.kind == "denied" and bucket is None:  # a local folder, or a store without credentials
        text = f"{where}: permission denied while {action} {said}"
    elif problem.kind == "denied":
        text = (f"{where}: access denied while {action} {said}; the credentials in use were refused or lack "
                "permission for this location")
    elif problem.kind == "no_bucket":
        text = f"{where}: bucket {bucket!r} does not exist" if bucket else f"{where}: its bucket does not exist"
    elif problem.kind == "not_found":
        text = f"{where}: not found while {action} {said}"
    elif problem.kind == "throttled":
        status = problem.status or (int(problem.code) if problem.code and problem.code.isdigit() else 503)
        answer = f"HTTP {status}" + (f" {problem.code}" if problem.code and not problem.code.isdigit() else "")
        text = (f"{where}: the store kept throttling requests ({answer}) while {action}, and the retries ran "
                "out; try again later or lower the request rate")
    elif problem.kind == "server":
        text = (f"{where}: the storage service kept failing (HTTP {problem.status or '5xx'}, {code}{problem.detail}) "
                f"while {action}, "
                "and the retries ran out; try again later")
    elif problem.kind == "network":
        text = (f"{where}: network error while {action} ({problem.detail}), still failing after retries; check "
                "the endpoint and the network, then run again")
    else:
        text = f"{where}: {action} failed ({problem.detail})"
    return redact(text, storage_options)


def diagnose(fs: Any, path: str) -> BaseException | None:
    """The error of a listing of `path`, which carries the store's error code.

    A refused HEAD request (what ``info``/``exists`` send) has no body, so all that comes back is
    "403 Forbidden": wrong credentials and a missing permission look alike. A listing is a GET,
    whose refusal names the reason (``InvalidAccessKeyId``, ``SignatureDoesNotMatch``,
    ``AccessDenied``). Returns None when the listing works.
    """
    try:
        fs.ls(path, detail=False, refresh=True)
    except Exception as exc:  # noqa: BLE001 - whatever it is, it is the answer
        return exc
    return None


def better(first: BaseException, fs: Any, path: str) -> BaseException:
    """`first`, or the listing's error when `first` is a bare HTTP 403 without the store's reason."""
    problem = classify(first)
    if problem.kind == "denied" and (problem.code in (None, "403")) and is_object_store(fs):
        second = diagnose(fs, path)
        if second is not None and classify(second).kind in ("credentials", "denied", "no_bucket", "no_credentials"):
            return second
    return first


# --------------------------------------------------------------------------------------------
# Credentials: which option names are secret, and taking their values out of text.
# --------------------------------------------------------------------------------------------

MASK = "***"
#: Shorter values would mask ordinary words wherever they occur; no credential is that short.
MIN_SECRET_LENGTH = 4
#: Words of an option name (``aws_secret_access_key``, ``AccountKey``, ``X-Amz-Security-Token``)
#: that make its value a credential. Key *ids* count too: they name the account.
_SECRET_WORDS = frozenset({
    "secret", "password", "passwd", "pwd", "passphrase", "token", "credential", "credentials", "creds",
    "signature", "sig", "sas", "auth", "authorization", "cookie", "key", "apikey", "accesskey", "secretkey",
    "accountkey", "privatekey", "sastoken", "connstr", "connectionstring",
})
#: Word pairs that are secret together though neither is alone (``connection_timeout`` is not).
_SECRET_PAIRS = frozenset({("connection", "string"), ("conn", "str")})
#: Option names with a secret-sounding word whose values are settings, shown and never masked.
_PUBLIC_NAMES = frozenset({"signature_version", "auth_uri", "token_uri", "auth_provider_x509_cert_url"})
#: gcsfs ``token`` values that name an authentication method rather than carry a credential.
_PUBLIC_VALUES = frozenset({"anon", "google_default", "cache", "cloud", "browser"})
_MAX_DEPTH = 8

_QUOTED_PAIR = re.compile(
    r"(?P<q1>[\"'])(?P<name>[A-Za-z_][\w-]*)(?P=q1)\s*:\s*(?P<q2>[\"'])(?P<value>(?:\\.|(?!(?P=q2))[^\\])*)(?P=q2)")
_ASSIGNMENT = re.compile(r"(?<![\w-])(?P<name>[A-Za-z_][\w-]*)=(?P<value>[^&;,\s\"')\]}]+)")
_HEADER_LINE = re.compile(
    r"(?<![\w-])(?P<name>(?:Proxy-)?Authorization|X-Amz-Security-Token|X-Goog-Api-Key|Cookie)[ \t]*:[ \t]*"
    r"(?P<value>[^\s\"',}][^\r\n\"',}]*)", re.IGNORECASE)
_BEARER = re.compile(r"\bBearer\s+[A-Za-z0-9\-._~+/]{8,}=*")
_PRIVATE_KEY = re.compile(
    r"-----BEGIN[A-Z ]*PRIVATE KEY-----(?:.*?-----END[A-Z ]*PRIVATE KEY-----|(?:[A-Za-z0-9+/=\s]|\\n)*)", re.DOTALL)


def _words(name: str) -> list[str]:
    """``AccountKey`` -> account, key; ``SASToken`` -> sas, token; ``x-amz-security-token`` -> x, amz, ..."""
    split = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return [w for w in re.split(r"[^a-z0-9]+", split.lower()) if w]


def is_secret_option(name: str) -> bool:
    """Whether the value of a storage option, HTTP header or environment variable called `name` is a credential.

    Decided by the words of the name rather than a list of exact spellings: s3fs (`key`, `secret`,
    `token`, `aws_session_token` in `client_kwargs`), gcsfs (`token`: a path, a dict or a method),
    adlfs (`account_key`, `connection_string`, `sas_token`, `client_secret`, `credential`), HTTP
    headers (`Authorization`) and environment variables (`AZURE_STORAGE_CONNECTION_STRING`) all spell
    their credentials differently, and the next library will too.
    """
    words = _words(name)
    if "_".join(words) in _PUBLIC_NAMES:
        return False
    return bool(_SECRET_WORDS.intersection(words)) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def mask_secrets(options: Any) -> tuple[Any, list[str]]:
    """A copy of `options` with every credential replaced by `MASK`, and the credential texts found.

    Nested dicts and lists are walked (`client_kwargs`, `headers`, `config_kwargs`). A dict under a
    secret name is all secret unless some of its own names are: a gcsfs service-account dict under
    `token` hides `private_key` but shows `client_email`, an unknown dict hides everything. The texts include
    the parts an error message may quote on their own: the `AccountKey` of a connection string,
    the token of a ``Bearer ...`` header.
    """
    found: list[str] = []

    def walk(item: Any, secret: bool, depth: int) -> Any:
        if isinstance(item, Mapping) and depth < _MAX_DEPTH:
            named = {k: is_secret_option(str(k)) for k in item}
            inherit = secret and not any(named.values())
            return {k: walk(v, inherit or named[k], depth + 1) for k, v in item.items()}
        if isinstance(item, (list, tuple)) and depth < _MAX_DEPTH:
            return [walk(v, secret, depth + 1) for v in item]
        if not secret or item is None or isinstance(item, bool) or item == "" or item in _PUBLIC_VALUES:
            return item
        if isinstance(item, (str, int, float)):
            found.extend(_with_parts(str(item)))
        return MASK

    return walk(options, False, 0), found


def secret_values(options: Any) -> list[str]:
    """The credential texts of a storage-options value, longest first, each at least `MIN_SECRET_LENGTH` long."""
    values = {v for v in mask_secrets(options)[1] if len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def _with_parts(value: str) -> list[str]:
    """`value`, and the secret pieces of a connection string (``AccountKey=...``) or an auth header."""
    parts = [value]
    for item in value.split(";"):
        name, sep, part = item.strip().partition("=")
        if sep and part and is_secret_option(name):
            parts.append(part)
    scheme, _, credential = value.strip().partition(" ")
    if credential and scheme.isalpha():
        parts.append(credential.strip())
    return parts


def redact(text: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """`text` without credentials.

    Removes the values of secret `storage_options` wherever they appear, and, without knowing any
    value, what looks like a credential: PEM private keys, secret names paired with values
    (``'client_secret': '...'``, ``AccountKey=...;``, ``Authorization: ...``), bearer tokens,
    ``user:password@`` in URLs and signature query parameters. A bare ``key=`` is left alone: in
    storage errors it is an object's path far more often than an access key id.
    """
    for value in secret_values(storage_options or {}):
        text = text.replace(value, MASK)
    text = _PRIVATE_KEY.sub(MASK, text)
    text = _QUOTED_PAIR.sub(_mask_pair, text)
    text = _ASSIGNMENT.sub(_mask_pair, text)
    text = _HEADER_LINE.sub(lambda m: m.group(0)[: m.start("value") - m.start(0)] + MASK, text)
    text = _BEARER.sub("Bearer " + MASK, text)
    text = redact_url(text)
    return _SIGNED_QUERY.sub(lambda m: m.group("name") + "=" + MASK, text)


def _mask_pair(match: re.Match[str]) -> str:
    name, value = match.group("name"), match.group("value")
    if name.lower() == "key" or not value or value == MASK or value in _PUBLIC_VALUES or not is_secret_option(name):
        return match.group(0)
    start, end = match.start("value") - match.start(0), match.end("value") - match.start(0)
    whole = match.group(0)
    return whole[:start] + MASK + whole[end:]


def redact_url(url: str) -> str:
    """`url` (or any text) with the ``user:password@`` part of each URL replaced by ``***@``."""
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", url)
