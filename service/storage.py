"""Local-directory artifact store: each avatar's photos, crops and weights under
`artifacts_dir/tenants/<tenant id>/avatars/<avatar id>/`, each job's upload and results under
`artifacts_dir/tenants/<tenant id>/jobs/<job id>/`.

Paths are built only from ids this service generated (checked to be UUIDs), never from
client filenames; files are written to a temporary name and renamed, so a reader never sees
half a file. The database stores paths relative to the root, so the root can move.

With `storage=s3` a bucket (service.blobs) is the store and the root each host's working
copy: callers `pull` inputs before a stage and `push` outputs before its job's state says
they exist.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from service.blobs import BlobStore, LocalBlobs, open_blobs
from service.config import Settings

PHOTOS = "photos"
CROPS = "crops.npz"
FINETUNE = "finetune"
INPUT = "input"


def _checked_id(value: str) -> str:
    """`value` if it is a canonical UUID string; a path component made of anything else could
    climb out of the store."""
    try:
        if str(uuid.UUID(value)) == value:
            return value
    except (ValueError, TypeError, AttributeError):
        pass
    raise ValueError(f"not an id: {value!r}")


class ArtifactStore:
    """Files of avatars and jobs under one root directory, optionally backed by a bucket."""

    def __init__(self, root: Path, blobs: BlobStore | None = None) -> None:
        self.root = Path(root)
        self.blobs: BlobStore = blobs if blobs is not None else LocalBlobs()

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        """`artifacts_dir`, backed by the bucket when `storage=s3`."""
        return cls(settings.artifacts_dir, open_blobs(settings, settings.artifacts_dir))

    # --- layout --------------------------------------------------------------------------
    def avatar_dir(self, tenant_id: str, avatar_id: str) -> Path:
        return self.root / "tenants" / _checked_id(tenant_id) / "avatars" / _checked_id(avatar_id)

    def photos_dir(self, tenant_id: str, avatar_id: str) -> Path:
        return self.avatar_dir(tenant_id, avatar_id) / PHOTOS

    def staging_dir(self, tenant_id: str, avatar_id: str) -> Path:
        """Where an upload lands before it is validated (renamed to `photos_dir` after)."""
        return self.avatar_dir(tenant_id, avatar_id) / f".{PHOTOS}.{uuid.uuid4().hex}.partial"

    def crops_path(self, tenant_id: str, avatar_id: str) -> Path:
        """Preprocessed photos: `images` (N, S, S, 3) uint8 and `masks` (N, S, S) uint8."""
        return self.avatar_dir(tenant_id, avatar_id) / CROPS

    def finetune_path(self, tenant_id: str, avatar_id: str, job_id: str) -> Path:
        """The avatar checkpoint a fine-tune job writes; its preview is the `.png` beside it
        and its resumable state the `.work` directory (training.finetune's convention)."""
        return (
            self.avatar_dir(tenant_id, avatar_id) / FINETUNE / f"{_checked_id(job_id)}.safetensors"
        )

    def job_dir(self, tenant_id: str, job_id: str) -> Path:
        """A reenactment job's driver upload (`input/`) and rendered results."""
        return self.root / "tenants" / _checked_id(tenant_id) / "jobs" / _checked_id(job_id)

    def job_input_dir(self, tenant_id: str, job_id: str) -> Path:
        return self.job_dir(tenant_id, job_id) / INPUT

    def photos(self, tenant_id: str, avatar_id: str) -> list[Path]:
        """The stored photos in upload order (dot-names are temporary files)."""
        folder = self.photos_dir(tenant_id, avatar_id)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

    # --- paths in the database -----------------------------------------------------------
    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def resolve(self, relative: str) -> Path:
        """The file for a stored relative path; ValueError if it points outside the root."""
        root = self.root.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"{relative!r} is outside the artifact store")
        return path

    # --- writing and deleting ------------------------------------------------------------
    @contextmanager
    def atomic(self, path: Path) -> Iterator[IO[bytes]]:
        """Write `path` through a temporary file that replaces it only if the block succeeds."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with tmp.open("wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write_arrays(self, path: Path, **arrays: np.ndarray) -> Path:
        with self.atomic(path) as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        return path

    def delete_avatar(self, tenant_id: str, avatar_id: str) -> None:
        """Remove everything stored for the avatar (idempotent)."""
        shutil.rmtree(self.avatar_dir(tenant_id, avatar_id), ignore_errors=True)

    def delete_job(self, tenant_id: str, job_id: str) -> None:
        """Remove a job's upload and results (idempotent)."""
        shutil.rmtree(self.job_dir(tenant_id, job_id), ignore_errors=True)

    # --- the bucket (no-ops with the local store) ----------------------------------------
    # delete_avatar/delete_job above touch this host's copy only: the API calls them on its
    # event loop, where a bucket request must not run; `drop_dir` is the bucket's side.
    def push(self, *paths: Path) -> None:
        """Upload files, and every file under folders except dot-names (temporary)."""
        for path in paths:
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            for file in files:
                if file.is_file() and not file.name.startswith("."):
                    self.blobs.push(self.relative(file))

    def pull(self, path: Path) -> bool:
        """Whether the file is here, after downloading it if only the bucket has it."""
        return path.is_file() or self.blobs.pull(self.relative(path))

    def pull_dir(self, folder: Path) -> None:
        """Download the files under `folder` that only the bucket has."""
        self.blobs.pull_dir(self.relative(folder))

    def drop(self, *files: Path) -> None:
        """Delete the bucket's copies of files (idempotent)."""
        for file in files:
            self.blobs.delete(self.relative(file))

    def drop_dir(self, folder: Path) -> None:
        """Delete the bucket's copy of everything under `folder` (idempotent)."""
        self.blobs.delete_prefix(self.relative(folder))

    def download_url(self, path: Path, filename: str, content_type: str) -> str | None:
        """A presigned URL of the bucket's copy; None with the local store (serve the file)."""
        return self.blobs.presigned_get(self.relative(path), filename, content_type)


# --- fine-tuned avatars for the inference server ---------------------------------------------
SERVED_SUFFIX = ".safetensors"


def served_avatar_key(artifact_path: str) -> str:
    """The name Triton knows a fine-tuned avatar by: its fine-tune job's id (the checkpoint's
    stem), so weights from a newer fine-tune never hit a cached older copy."""
    return _checked_id(Path(artifact_path).stem)


def served_path(served_dir: Path, key: str) -> Path:
    """Where Triton finds the avatar it knows as `key`."""
    return Path(served_dir) / f"{_checked_id(key)}{SERVED_SUFFIX}"


def publish_served_avatar(source: Path, served_dir: Path, key: str) -> Path:
    """Make `<served_dir>/<key>.safetensors` (Triton's `--avatar-dir`) hold `source`: a hard
    link when both share a filesystem, else a copy; atomic, and a no-op when present."""
    target = served_path(served_dir, key)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem, or links not supported
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def unpublish_served_avatar(served_dir: Path, key: str) -> None:
    served_path(served_dir, key).unlink(missing_ok=True)
