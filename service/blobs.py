"""Where artifacts live besides the local directory: nowhere (`LocalBlobs`: the directory is
the store) or an S3-compatible bucket (`S3Blobs`: the source of truth shared by the API and
workers on different hosts, each host's directory a working copy that PyAV, numpy and torch
read and write by path).

A key is written once (its path holds a fresh UUID; a retried stage rewrites the same bytes),
so a local copy is never stale.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Final, Protocol

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.config import Settings

MISSING: Final = frozenset({"404", "NoSuchKey", "NotFound"})
# What a request can raise: the client's own errors, and the transfer manager's wrappers of
# them (S3UploadFailedError, RetriesExceededError).
ERRORS: Final = (BotoCoreError, ClientError, Boto3Error)


class StorageUnavailable(Exception):
    """The bucket failed a request after the client's retries (outage, credentials)."""


class BlobStore(Protocol):
    """The remote side of the artifact store, addressed by paths relative to its root."""

    def push(self, relative: str) -> None:
        """Upload the local file."""

    def pull(self, relative: str) -> bool:
        """Download the object to the local path; False if there is no such object."""

    def pull_dir(self, relative_dir: str) -> None:
        """Download every object under the folder that is missing locally."""

    def delete(self, relative: str) -> None:
        """Delete one object (idempotent)."""

    def delete_prefix(self, relative_dir: str) -> None:
        """Delete every object under the folder (idempotent)."""

    def presigned_get(self, relative: str, filename: str, content_type: str) -> str | None:
        """A time-limited URL serving the object inline as `filename`; None: serve the file."""


class LocalBlobs:
    """No remote: the local directory is the store (a shared volume across hosts)."""

    def push(self, relative: str) -> None:
        pass

    def pull(self, relative: str) -> bool:
        return False

    def pull_dir(self, relative_dir: str) -> None:
        pass

    def delete(self, relative: str) -> None:
        pass

    def delete_prefix(self, relative_dir: str) -> None:
        pass

    def presigned_get(self, relative: str, filename: str, content_type: str) -> str | None:
        return None


class S3Blobs:
    """Objects at `<prefix><relative path>` in one bucket, mirrored under `root`.

    `client` is a boto3 S3 client (see `s3_client`); transfers go through its managed
    upload/download, multipart for large files.
    """

    def __init__(
        self, client: Any, bucket: str, prefix: str, root: Path, presign_ttl_s: int
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.root = Path(root)
        self.presign_ttl_s = presign_ttl_s

    def key(self, relative: str) -> str:
        return self.prefix + relative.strip("/")

    def push(self, relative: str) -> None:
        try:
            self.client.upload_file(str(self.root / relative), self.bucket, self.key(relative))
        except ERRORS as exc:
            raise StorageUnavailable(f"cannot upload {relative}: {exc}") from exc

    def pull(self, relative: str) -> bool:
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        # A dot-name beside the target: listings skip it, and maintenance sweeps `.partial`
        # leftovers of a killed process.
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        try:
            self.client.download_file(self.bucket, self.key(relative), str(tmp))
            os.replace(tmp, target)
        except ERRORS as exc:
            if (
                isinstance(exc, ClientError)
                and exc.response.get("Error", {}).get("Code") in MISSING
            ):
                return False
            raise StorageUnavailable(f"cannot download {relative}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def pull_dir(self, relative_dir: str) -> None:
        for key in self._keys(relative_dir):
            relative = key.removeprefix(self.prefix)
            if not (self.root / relative).is_file():
                self.pull(relative)

    def delete(self, relative: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(relative))
        except ERRORS as exc:
            raise StorageUnavailable(f"cannot delete {relative}: {exc}") from exc

    def delete_prefix(self, relative_dir: str) -> None:
        keys = self._keys(relative_dir)
        try:
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000
                batch = [{"Key": k} for k in keys[start : start + 1000]]
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
        except ERRORS as exc:
            raise StorageUnavailable(f"cannot delete {relative_dir}/: {exc}") from exc

    def presigned_get(self, relative: str, filename: str, content_type: str) -> str | None:
        params = {
            "Bucket": self.bucket,
            "Key": self.key(relative),
            "ResponseContentDisposition": f'inline; filename="{filename}"',
            "ResponseContentType": content_type,
        }
        try:  # signed locally: no request is made
            url: str = self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=self.presign_ttl_s
            )
        except ERRORS as exc:
            raise StorageUnavailable(f"cannot sign a URL for {relative}: {exc}") from exc
        return url

    def _keys(self, relative_dir: str) -> list[str]:
        """Every key under the folder (the trailing `/` keeps a sibling id out)."""
        prefix = self.key(relative_dir) + "/"
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        except ERRORS as exc:
            raise StorageUnavailable(f"cannot list {relative_dir}/: {exc}") from exc


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client: credentials from the standard AWS chain (environment, config files,
    instance role), retries in botocore's `standard` mode, SigV4; path-style addressing with a
    custom endpoint, which MinIO and Ceph expect."""
    config = Config(
        retries={"mode": "standard", "max_attempts": 5},
        signature_version="s3v4",
        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=config,
    )


def open_blobs(settings: Settings, root: Path) -> BlobStore:
    """The remote side `settings.storage` names, mirrored under `root`."""
    if settings.storage == "local":
        return LocalBlobs()
    return S3Blobs(
        s3_client(settings), settings.s3_bucket, settings.s3_prefix, root, settings.s3_presign_ttl_s
    )
