"""One list of secret option names (`pipeline.storage_errors.is_secret_option`), used by every redaction.

The option names are those of s3fs, gcsfs and adlfs, plus HTTP headers inside `client_kwargs` and
environment variables; the values are fakes shaped like the real ones.
"""

from __future__ import annotations

import json

import pytest

from jobs.masking import MASK, Masker, is_secret_name, mask_storage_options
from pipeline.storage_errors import explain, is_secret_option, mask_secrets, redact, secret_values

ACCOUNT_KEY = "Zm9vYmFyYmF6cXV4+c2VjcmV0a2V5/MTIzNDU2Nzg5MA=="
CONNECTION_STRING = (f"DefaultEndpointsProtocol=https;AccountName=videos;AccountKey={ACCOUNT_KEY};"
                     "EndpointSuffix=core.windows.net")  # fmt: skip
BEARER = "eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl"
PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"

S3 = {"key": "AKIAFAKEKEY0123456789", "secret": "s3cr3t/Value+xyz", "token": "FwoGZXIvYXdzEFAKE",
      "endpoint_url": "http://minio:9000",
      "client_kwargs": {"region_name": "eu-1", "aws_session_token": "sess-tok-4242",
                        "headers": {"Authorization": f"Bearer {BEARER}", "X-Trace": "trace-1"}},
      "config_kwargs": {"signature_version": "s3v4", "retries": {"max_attempts": 5}}}  # fmt: skip
GCS = {"project": "my-project",
       "token": {"type": "service_account", "client_email": "sa@my-project.iam.gserviceaccount.com",
                 "private_key_id": "0123456789abcdef", "private_key": PRIVATE_KEY}}  # fmt: skip
AZURE = {"account_name": "videos", "connection_string": CONNECTION_STRING, "account_key": ACCOUNT_KEY,
         "sas_token": "sv=2022-11-02&ss=b&sig=c2FzU2lnbmF0dXJl", "client_id": "app-id",
         "client_secret": "cl1ent~s3cret", "tenant_id": "tenant", "credential": "cred-value-9",
         "connection_timeout": 30}  # fmt: skip


@pytest.mark.parametrize("name", [
    "key", "secret", "token", "password", "session_token", "aws_secret_access_key", "aws_access_key_id",
    "aws_session_token", "Authorization", "X-Amz-Security-Token", "private_key", "connection_string",
    "connectionString", "account_key", "AccountKey", "sas_token", "SASToken", "client_secret", "credential",
    "AZURE_STORAGE_CONNECTION_STRING", "AWS_SECRET_ACCESS_KEY", "SSECustomerKey",
])  # fmt: skip
def test_secret_names_of_s3fs_gcsfs_adlfs_and_headers(name: str) -> None:
    assert is_secret_option(name) and is_secret_name(name)


@pytest.mark.parametrize("name", [
    "endpoint_url", "region_name", "anon", "project", "account_name", "client_id", "tenant_id", "headers",
    "client_kwargs", "connection_timeout", "signature_version", "use_ssl", "requester_pays", "MONKEY", "PATH",
])  # fmt: skip
def test_settings_are_not_secret(name: str) -> None:
    assert not is_secret_option(name)


def test_nested_options_are_masked_and_settings_kept() -> None:
    masked, found = mask_secrets({"s3": S3, "gcs": GCS, "azure": AZURE})
    s3, gcs, azure = masked["s3"], masked["gcs"], masked["azure"]
    assert s3["key"] == s3["secret"] == s3["token"] == s3["client_kwargs"]["aws_session_token"] == MASK
    assert s3["client_kwargs"]["headers"] == {"Authorization": MASK, "X-Trace": "trace-1"}
    assert s3["config_kwargs"] == S3["config_kwargs"] and s3["endpoint_url"] == "http://minio:9000"
    # A service-account dict under `token`: its secrets are hidden, who it is stays readable.
    assert gcs["token"]["private_key"] == gcs["token"]["private_key_id"] == MASK
    assert gcs["token"]["client_email"] == GCS["token"]["client_email"] and gcs["project"] == "my-project"
    for name in ("connection_string", "account_key", "sas_token", "client_secret", "credential"):
        assert azure[name] == MASK, name
    assert azure["account_name"] == "videos" and azure["client_id"] == "app-id" and azure["connection_timeout"] == 30
    assert ACCOUNT_KEY in found and BEARER in found  # the parts an error may quote alone
    assert {"token": {"opaque": "x1y2z3w4"}} != mask_secrets({"token": {"opaque": "x1y2z3w4"}})[0]


def test_gcs_token_methods_and_paths() -> None:
    assert mask_secrets({"token": "google_default"})[0] == {"token": "google_default"}
    assert mask_secrets({"token": "/secrets/sa.json"}) == ({"token": MASK}, ["/secrets/sa.json"])


def test_error_messages_lose_every_credential() -> None:
    options = {**S3, **AZURE}
    text = (f"ValueError: Connection string is invalid: {CONNECTION_STRING!r}; "
            f"request headers {S3['client_kwargs']['headers']!r}; key part {ACCOUNT_KEY}; "
            f"session {S3['client_kwargs']['aws_session_token']}")  # fmt: skip
    clean = redact(text, options)
    for secret in (ACCOUNT_KEY, BEARER, "sess-tok-4242", "AKIAFAKEKEY"):
        assert secret not in clean, secret
    assert "Connection string is invalid: '***'" in clean and "'X-Trace': 'trace-1'" in clean


def test_credentials_in_text_without_the_options() -> None:
    """Errors that quote a credential the options did not name (an env var's, a default chain's)."""
    text = (f"bad {CONNECTION_STRING}\nAuthorization: Bearer {BEARER}\n{json.dumps({'private_key': PRIVATE_KEY})}\n"
            "{'client_secret': 'cl1ent~s3cret', 'client_id': 'app-id'} token=FwoGZXIvYXdzEFAKE "
            "AuthorizationHeaderMalformed: key=videos/a.mp4")  # fmt: skip
    clean = redact(text)
    for secret in (ACCOUNT_KEY, BEARER, "MIIEvQIBADAN", "cl1ent~s3cret", "FwoGZXIvYXdzEFAKE"):
        assert secret not in clean, secret
    assert "'client_id': 'app-id'" in clean and "AuthorizationHeaderMalformed: key=videos/a.mp4" in clean


def test_explain_redacts_an_azure_connection_string() -> None:
    exc = ValueError(f"Connection string missing required connection details: {CONNECTION_STRING}")
    message = explain(exc, "abfs://videos/out", role="OUTPUT", action="listing",
                      storage_options={"connection_string": CONNECTION_STRING})  # fmt: skip
    assert ACCOUNT_KEY not in message and CONNECTION_STRING not in message and "OUTPUT 'abfs://videos/out'" in message


def test_secret_values_skip_short_values_and_come_longest_first() -> None:
    values = secret_values({"password": "abc", "secret": "abcd", "token": "abcdefgh"})
    assert values == ["abcdefgh", "abcd"]


def test_masker_uses_the_same_list() -> None:
    masker = Masker()
    masked = masker.argv(["index", "abfs://c/in", "abfs://c/out", "--storage-options", json.dumps(AZURE)])
    shown = json.loads(masked[-1])
    assert shown["connection_string"] == shown["account_key"] == shown["sas_token"] == MASK
    line = masker.text(f"adlfs: AccountKey {ACCOUNT_KEY} rejected for {CONNECTION_STRING}")
    assert ACCOUNT_KEY not in line and "cl1ent~s3cret" not in masker.text("secret cl1ent~s3cret")
    assert mask_storage_options(GCS)[0]["token"]["private_key"] == MASK
