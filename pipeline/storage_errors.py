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

#: Names of storage options whose values are secrets (or identify the account: key ids too).
_SECRET_OPTION = re.compile(r"secret|token|passw|credential|sas|signature|private|(^|_)key(_id)?$|access_key",
                            re.IGNORECASE)
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


def redact(text: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """`text` without credentials: secret option values, URL user info, signed query parameters."""
    for value in _secret_values(storage_options or {}):
        text = text.replace(value, "***")
    text = _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
    return _SIGNED_QUERY.sub(lambda m: m.group("name") + "=***", text)


def redact_url(url: str) -> str:
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", url)


def _secret_values(options: Mapping[str, Any], depth: int = 0) -> Iterator[str]:
    for name, value in options.items():
        if isinstance(value, Mapping) and depth < 3:
            yield from _secret_values(value, depth + 1)
        elif isinstance(value, str) and len(value) >= 4 and _SECRET_OPTION.search(str(name)):
            yield value
