"""A small typed client of the service's HTTP API (httpx), used by the `reenact` CLI.

Every non-2xx answer becomes `ApiError` with the service's `{code, message, details}`, and
an unreachable server `Unreachable`, so callers print one clear line either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

FINISHED = ("succeeded", "failed", "canceled")


class ApiError(Exception):
    """The service answered with an error body."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details
        self.retry_after: float | None = None


class Unreachable(Exception):
    """No answer from the service (down, wrong URL, network)."""


@dataclass(frozen=True)
class ReenactOptions:
    output: str = "mp4"
    paste_back: bool = False
    keep_audio: bool = True
    background: str = "generated"
    background_color: str | None = None
    background_image: Path | None = None

    def fields(self) -> dict[str, str]:
        out = {
            "output": self.output,
            "paste_back": str(self.paste_back).lower(),
            "keep_audio": str(self.keep_audio).lower(),
            "background": self.background,
        }
        if self.background_color:
            out["background_color"] = self.background_color
        return out


class Client:
    """One API key against one service URL."""

    def __init__(self, url: str, key: str, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout_s,
            follow_redirects=True,  # result downloads may redirect to object storage
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach {self.url}: {exc}") from None
        if r.status_code >= 400:
            raise _error(r)
        return r.json() if r.content else None

    # --- avatars ----------------------------------------------------------------------------
    def create_avatar(
        self,
        photos: Sequence[Path],
        fine_tune: str = "none",
        steps: int | None = None,
        name: str = "avatar",
    ) -> dict[str, Any]:
        data = {"fine_tune": fine_tune, "name": name}
        if steps is not None:
            data["steps"] = str(steps)
        with ExitStack() as stack:
            files = [("photos", (p.name, stack.enter_context(p.open("rb")))) for p in photos]
            return dict(self._call("POST", "/v1/avatars", data=data, files=files))

    def avatars(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/avatars", params={"limit": 100})["items"])

    # --- jobs -------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/jobs/{job_id}"))

    def wait(
        self,
        job_id: str,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        interval_s: float = 0.5,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Poll until the job finishes; returns it whatever its final status."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s:g} s")
            time.sleep(interval_s)

    def reenact(self, avatar_id: str, video: Path, options: ReenactOptions) -> dict[str, Any]:
        data = {"avatar_id": avatar_id, **options.fields()}
        with ExitStack() as stack:
            files: list[tuple[str, tuple[str, IO[bytes]]]] = [
                ("video", (video.name, stack.enter_context(video.open("rb"))))
            ]
            if options.background_image is not None:
                image = stack.enter_context(options.background_image.open("rb"))
                files.append(("background_image", (options.background_image.name, image)))
            return dict(self._call("POST", "/v1/reenactments", data=data, files=files))

    # --- models ----------------------------------------------------------------------------
    def pose_encoder_contract(self) -> dict[str, Any]:
        """What a pose-only stream client runs and sends (`GET /v1/models/pose-encoder`)."""
        return dict(self._call("GET", "/v1/models/pose-encoder"))

    def download(self, path: str, out: Path) -> Path:
        """Stream a result file to `out` (written beside it, then renamed)."""
        tmp = out.with_name(f".{out.name}.partial")
        try:
            with self.http.stream("GET", path) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _error(r)
                with tmp.open("wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
            tmp.replace(out)
        except httpx.TransportError as exc:
            raise Unreachable(f"download from {self.url} failed: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return out


def _error(r: httpx.Response) -> ApiError:
    try:
        body = r.json()["error"]
        error = ApiError(r.status_code, body["code"], body["message"], body.get("details"))
    except (ValueError, KeyError, TypeError):
        error = ApiError(r.status_code, "http_error", r.text[:200] or r.reason_phrase)
    if "Retry-After" in r.headers:
        error.retry_after = float(r.headers["Retry-After"])
    return error
