"""Where a sync's Delta tables live: a local path, or ``s3://bucket/prefix``.

For S3 the settings are the standard AWS ones, found the way the bucket store (``storage.s3``)
finds them, so one set of ``AWS_*`` variables (or a profile) serves both: endpoint from
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, region and credentials from boto3's chain
(environment, ``AWS_PROFILE``, ``~/.aws``). deltalake (object_store) reads the environment itself
but not profiles, and refuses a plain-HTTP endpoint (MinIO, a local test server) unless told:
``storage_options`` hands it what boto3 resolved. ``check`` runs before a worker takes a snapshot,
so a missing bucket or refused credentials is one line in status, not a crashing worker.
"""

from __future__ import annotations

import os
from pathlib import Path

import boto3

from storage.s3 import S3Client, S3Error, S3Unavailable, parse_s3_uri


class LocationError(Exception):
    """The lakehouse location cannot be written; the message names it and the remedy. ``transient``:
    it may work later (the endpoint did not answer), as opposed to a setting to fix."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def storage_options(uri: str) -> dict[str, str] | None:
    """deltalake ``storage_options`` for ``uri`` (None for a local path)."""
    if not is_s3(uri):
        return None
    options: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    session = boto3.session.Session()
    if session.region_name:
        options["AWS_REGION"] = session.region_name
    if not os.environ.get("AWS_ACCESS_KEY_ID"):  # else deltalake reads them (and a session token) itself
        creds = session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            options["AWS_ACCESS_KEY_ID"] = frozen.access_key
            options["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
            if frozen.token:
                options["AWS_SESSION_TOKEN"] = frozen.token
    return options


def check(uri: str) -> None:
    """Raise ``LocationError`` unless Delta tables can be written under ``uri``."""
    if is_s3(uri):
        try:
            S3Client(parse_s3_uri(uri), retry_for=10).check()
        except S3Error as e:
            raise LocationError(f"lakehouse {uri}: {e}", transient=isinstance(e, S3Unavailable)) from None
        return
    if "://" in uri and not uri.startswith("file://"):
        raise LocationError(f"lakehouse {uri}: use a local path or s3://BUCKET/PREFIX")
    path = Path(uri.removeprefix("file://"))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LocationError(f"lakehouse {uri}: cannot create it ({e.strerror}): pick a writable path") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise LocationError(f"lakehouse {uri}: not writable by this user: pick a writable path or fix its owner")
