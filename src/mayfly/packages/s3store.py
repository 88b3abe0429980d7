"""The package store on S3 (MinIO, SeaweedFS, AWS) through the ``minio`` client."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import S3Error

from mayfly.errors import StoreError
from mayfly.packages.store import check_key

__all__ = ["S3PackageStore"]

T = TypeVar("T")
_MISSING = frozenset({"NoSuchKey", "NoSuchObject"})


class S3PackageStore:
    """A bucket holding ``<name>/<version>/...`` and ``<name>/channels/...``."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        access_key: str,
        secret_key: str,
        region: str | None = None,
        create_bucket: bool = False,
    ) -> None:
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        if not parts.netloc:
            raise StoreError(f"invalid S3 endpoint {endpoint!r}")
        self.endpoint = f"{parts.scheme}://{parts.netloc}"
        self.bucket = bucket
        self._connect = (parts.netloc, access_key, secret_key, parts.scheme == "https", region)
        self._pid = 0
        self._minio: Minio | None = None
        if create_bucket:
            self._call("create bucket", self._ensure_bucket)

    @property
    def _client(self) -> Minio:
        # One client per process: a forked coordinator must never share the
        # warm parent's pooled sockets, or two processes read each other's
        # responses. The inherited client is dropped, not closed.
        if self._minio is None or self._pid != os.getpid():
            netloc, access_key, secret_key, secure, region = self._connect
            # Few retries and short timeouts: a store that is down should say
            # so in seconds, not hang a coordinator for minutes.
            http = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=3.0, read=30.0),
                retries=urllib3.Retry(
                    total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)
                ),
            )
            self._minio = Minio(
                netloc,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region,
                http_client=http,
            )
            self._pid = os.getpid()
        return self._minio

    def describe(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint}"

    def _ensure_bucket(self) -> None:
        if not self._client.bucket_exists(self.bucket):
            self._client.make_bucket(self.bucket)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except S3Error as exc:
            raise StoreError(
                f"{what} in {self.describe()} failed: {exc.code}: {exc.message}"
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreError(f"{what}: cannot reach S3 at {self.endpoint}: {exc}") from exc

    def get(self, key: str) -> bytes | None:
        check_key(key)

        def fetch() -> bytes | None:
            try:
                response = self._client.get_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in _MISSING:
                    return None
                raise
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return self._call(f"get {key}", fetch)

    def put(self, key: str, data: bytes) -> None:
        check_key(key)
        self._call(
            f"put {key}",
            lambda: self._client.put_object(self.bucket, key, io.BytesIO(data), len(data)),
        )

    def put_new(self, key: str, data: bytes) -> bool:
        check_key(key)

        def create() -> bool:
            try:
                self._client.stat_object(self.bucket, key)
                return False
            except S3Error as exc:
                if exc.code not in _MISSING:
                    raise
            # minio-py cannot send If-None-Match on PUT, so two publishers racing
            # within one round trip could both write; the repository re-reads
            # after writing and refuses a version whose bytes are not its own.
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data))
            return True

        return self._call(f"put {key}", create)

    def list_keys(self, prefix: str) -> list[str]:
        return self._call(
            f"list {prefix}",
            lambda: sorted(
                str(obj.object_name)
                for obj in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if obj.object_name is not None
            ),
        )
