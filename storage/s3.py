"""A bucket, spoken to with boto3: the one place that knows S3's errors and retries them.

Why boto3 (see ``bench/s3_client.py`` and the README's design section): it is the reference
implementation of how AWS tools find their endpoint, region and credentials (``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_ACCESS_KEY_ID``…, ``AWS_PROFILE`` and ``~/.aws``), which is what makes MinIO,
Ceph, R2 and GCS work with no Lakelet-specific settings; it exposes conditional writes
(``IfNoneMatch``/``IfMatch``); and of the two clients measured it fetched packs in parallel —
what a materialize from the bucket does — about three times faster.

Every call goes through ``_call``: throttling, 5xx answers, timeouts and dropped connections are
retried with exponential backoff (botocore's own retries are off, so there is one policy), and when
they persist past ``retry_for`` seconds the caller gets one ``S3Unavailable`` line naming the
operation, the object and the last error. Answers that retrying cannot change map to their own
errors: a missing object, a failed precondition, a missing bucket, refused credentials.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig

from storage.errors import StorageError
from storage.objectstore import ObjectNotFound

log = logging.getLogger("lakelet.storage.s3")
# botocore says at INFO where it found credentials, on every start: not an event of ours.
logging.getLogger("botocore.credentials").setLevel(logging.WARNING)

T = TypeVar("T")

RETRYABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "RequestLimitExceeded"}
CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken", "403", "AllAccessDisabled"}
TRANSIENT = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
             botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError,
             botocore.exceptions.ResponseStreamingError, ConnectionError, TimeoutError)
# Packs are written once and read whole: one PUT up to this size, multipart above it.
MULTIPART_THRESHOLD = 64 << 20
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys


class S3Error(StorageError):
    """The bucket could not be used; the message is one line naming what and why."""


class S3Unavailable(S3Error):
    """Retried past the deadline: the endpoint keeps failing (5xx, throttling, timeouts)."""


class BucketMissing(S3Error):
    pass


class CredentialsRefused(S3Error):
    pass


class PreconditionFailed(S3Error):
    """A conditional write (If-None-Match / If-Match) lost: someone else wrote the object."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending in "/"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_s3_uri(uri: str) -> S3Location:
    """``s3://bucket`` or ``s3://bucket/some/prefix`` → location; anything else is a one-line error."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise S3Error(f"store_uri {uri!r} is not s3://BUCKET[/PREFIX]")
    prefix = parsed.path.strip("/")
    if any(p in (".", "..") for p in prefix.split("/")):
        raise S3Error(f"store_uri {uri!r}: the prefix may not contain . or .. parts")
    return S3Location(parsed.netloc, prefix + "/" if prefix else "")


def _code(e: botocore.exceptions.ClientError) -> tuple[str, int]:
    err = e.response.get("Error", {})
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return str(err.get("Code", status)), status


def _describe(e: BaseException) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        code, status = _code(e)
        message = e.response.get("Error", {}).get("Message") or ""
        return f"{status} {code}{': ' + message if message else ''}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class S3Client:
    """One bucket (and key prefix); thread-safe, as boto3 clients are."""

    def __init__(self, location: S3Location, *, retry_for: float = 60.0, max_connections: int = 32) -> None:
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.retry_for = retry_for
        # Endpoint, region and credentials come the standard AWS way: environment, profile, ~/.aws.
        session = boto3.session.Session()
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.c = session.client(
            "s3", endpoint_url=self.endpoint or None,
            config=BotoConfig(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5,
                              read_timeout=30, max_pool_connections=max_connections,
                              s3={"addressing_style": "path"} if self.endpoint else None,
                              # Checksums only where S3 requires them: many S3-compatible servers
                              # (MinIO, Ceph, R2 and moto alike) mishandle the aws-chunked trailers
                              # botocore sends by default since 1.36.
                              request_checksum_calculation="when_required",
                              response_checksum_validation="when_required"),
        )
        # Called before every attempt of every write (retries included): the lease's fence, so a
        # write retried past the moment this process stopped holding the bucket is never sent.
        self.fence: Callable[[], None] = lambda: None
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=16 << 20,
                                       max_concurrency=4, use_threads=True)

    def key(self, name: str) -> str:
        return self.prefix + name

    def where(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"

    # -- the one retry policy -------------------------------------------------------------------

    def _call(self, what: str, name: str, fn: Callable[[], T], *, retry_for: float | None = None,
              warn: bool = True, fenced: bool = False) -> T:
        deadline = time.monotonic() + (self.retry_for if retry_for is None else retry_for)
        delay = 0.1
        attempt = 0
        while True:
            attempt += 1
            if fenced:
                self.fence()
            try:
                return fn()
            except botocore.exceptions.ClientError as e:
                code, status = _code(e)
                if code in ("NoSuchKey", "404", "NotFound") and status == 404:
                    raise ObjectNotFound(name) from None
                if code == "NoSuchBucket":
                    raise BucketMissing(f"bucket {self.bucket!r} does not exist at "
                                        f"{self.endpoint or 'AWS S3'}: create it or fix store_uri") from None
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                    raise PreconditionFailed(f"{what} {self.where(name)}: precondition failed ({code})") from None
                if code in CREDENTIAL_CODES or status == 403:
                    raise CredentialsRefused(f"{self.where(name)} refused the credentials ({_describe(e)}): "
                                             "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
                if not (code in RETRYABLE_CODES or status >= 500 or status == 429):
                    raise S3Error(f"{what} {self.where(name)} failed: {_describe(e)}") from None
                last: BaseException = e
            except botocore.exceptions.NoCredentialsError:
                raise CredentialsRefused("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                         "or AWS_PROFILE") from None
            except TRANSIENT as e:
                last = e
            if time.monotonic() + delay > deadline:
                raise S3Unavailable(f"{what} {self.where(name)} kept failing for {attempt} attempts: "
                                    f"{_describe(last)}; check that {self.endpoint or 'S3'} is reachable") from None
            if attempt == 3 and warn:
                log.warning("S3 request failing; retrying with backoff",
                            extra={"operation": what, "key": name, "error": _describe(last)})
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    # -- operations -----------------------------------------------------------------------------

    def check(self) -> None:
        """At start: the bucket exists and takes these credentials, or one line saying which not."""
        try:
            # Quiet: at start a failure is the one line lakelet up ends with.
            self._call("HEAD bucket", "", lambda: self.c.head_bucket(Bucket=self.bucket), retry_for=10, warn=False)
        except ObjectNotFound:
            raise BucketMissing(f"bucket {self.bucket!r} does not exist at {self.endpoint or 'AWS S3'}: "
                                "create it or fix store_uri") from None
        except CredentialsRefused:
            # A HEAD answer has no body: ask once more with a GET to name the reason
            # (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied) in the line.
            self._call("LIST", "", lambda: self.c.list_objects_v2(Bucket=self.bucket, MaxKeys=1), retry_for=10,
                       warn=False)
            raise
        except S3Error as e:
            if "400" in str(e) or "Bad Request" in str(e):
                raise CredentialsRefused(f"{self.where()} refused the request (400): check the region "
                                         "(AWS_REGION) and credentials") from None
            raise

    def put(self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None,
            fenced: bool = True) -> str:
        """PUT one object; returns its ETag. ``if_none_match``: only if absent; ``if_match``: only
        if its ETag is still that (both raise ``PreconditionFailed`` otherwise). ``fenced``: not
        for the lease object itself, which is how the fence is kept."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(name), "Body": data}
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        return str(self._call("PUT", name, lambda: self.c.put_object(**args), fenced=fenced)["ETag"])

    def put_file(self, name: str, path: Path) -> None:
        self._call("PUT", name, lambda: self.c.upload_file(str(path), self.bucket, self.key(name),
                                                           Config=self.transfer), fenced=True)

    def get(self, name: str) -> bytes:
        return self._call("GET", name, lambda: self.c.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read())

    def get_with_etag(self, name: str) -> tuple[bytes, str]:
        def fetch() -> tuple[bytes, str]:
            r = self.c.get_object(Bucket=self.bucket, Key=self.key(name))
            return r["Body"].read(), str(r["ETag"])
        return self._call("GET", name, fetch)

    def get_range(self, name: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        rng = f"bytes={start}-{start + length - 1}"
        return self._call("GET", name, lambda: self.c.get_object(
            Bucket=self.bucket, Key=self.key(name), Range=rng)["Body"].read())

    def get_to_file(self, name: str, path: Path) -> None:
        """One GET streamed into ``path`` (packs are far below the size where ranged parallel
        GETs of one object would pay for their extra requests)."""
        def fetch() -> None:
            body = self.c.get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
            with open(path, "wb") as f:
                for chunk in body.iter_chunks(1 << 20):
                    f.write(chunk)
        self._call("GET", name, fetch)

    def head(self, name: str) -> tuple[int, str] | None:
        """(size, ETag), or None when there is no such object."""
        try:
            r = self._call("HEAD", name, lambda: self.c.head_object(Bucket=self.bucket, Key=self.key(name)))
        except ObjectNotFound:
            return None
        return int(r["ContentLength"]), str(r["ETag"])

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(name, size) of every object under ``prefix`` (names without the store's prefix)."""
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.key(prefix), "MaxKeys": 1000}
            if token:
                args["ContinuationToken"] = token
            page = self._call("LIST", prefix, lambda a=args: self.c.list_objects_v2(**a))  # type: ignore[misc]
            for obj in page.get("Contents", []):
                yield str(obj["Key"])[len(self.prefix):], int(obj["Size"])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def delete_many(self, names: list[str]) -> None:
        """Delete in batches of up to 1000 keys (one DeleteObjects request each)."""
        for i in range(0, len(names), DELETE_BATCH):
            batch = names[i:i + DELETE_BATCH]
            req = {"Objects": [{"Key": self.key(n)} for n in batch], "Quiet": True}
            out = self._call("DELETE", batch[0], lambda r=req: self.c.delete_objects(  # type: ignore[misc]
                Bucket=self.bucket, Delete=r), fenced=True)
            errors = [e for e in out.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise S3Error(f"DELETE {self.where(errors[0]['Key'][len(self.prefix):])} failed: "
                              f"{errors[0].get('Code')} {errors[0].get('Message', '')}".rstrip())
