"""Expiring signed links to job results, so a browser, a CDN or a video player can fetch a
file without the API key: `/v1/files/{job_id}/{name}?expires=<unix s>&signature=<hex>`.

The signature is HMAC-SHA256(secret, "{job_id}/{name}/{expires}"); the link grants that one
file until `expires` and nothing else. Without a secret no links are made (an empty key would
let anyone forge them).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

from service.config import Settings


class InvalidSignature(ValueError):
    """The link was tampered with, made with another secret, or has expired."""


@dataclass(frozen=True)
class UrlSigner:
    secret: bytes
    ttl_s: int
    clock: Callable[[], float] = field(default=time.time, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> UrlSigner | None:
        """The signer of `settings`, or None when no secret is configured."""
        secret = settings.signed_url_secret.get_secret_value()
        return cls(secret.encode(), settings.signed_url_ttl_s) if secret else None

    def _digest(self, job_id: str, name: str, expires: int) -> str:
        message = f"{job_id}/{name}/{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def sign(self, job_id: str, name: str) -> tuple[str, int]:
        """A relative link to the file and its expiry (unix seconds)."""
        expires = int(self.clock()) + self.ttl_s
        query = urlencode({"expires": expires, "signature": self._digest(job_id, name, expires)})
        return f"/v1/files/{job_id}/{name}?{query}", expires

    def verify(self, job_id: str, name: str, expires: int, signature: str) -> None:
        """Raise InvalidSignature unless the link is genuine and not expired."""
        expected = self._digest(job_id, name, expires)
        # As bytes: compare_digest raises on non-ASCII str, and a forged link is not a 500.
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
            raise InvalidSignature("the link's signature is not valid")
        if expires < self.clock():
            raise InvalidSignature("the link has expired")
