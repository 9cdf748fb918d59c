"""The embedded tritonserver launcher against a throwaway python-backend model."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.triton.serve import (
    PROJECT_ROOT,
    PortInUse,
    ServerConfig,
    TritonNotInstalled,
    TritonServer,
    TritonServerError,
    find_tritonserver,
    free_port,
)

pytestmark = pytest.mark.integration

CONFIG = """\
backend: "python"
max_batch_size: 4
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 2 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 2 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

DOUBLE = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x * 2).astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""

BROKEN = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("deliberate initialize failure")

    def execute(self, requests):
        return []
"""


def make_repository(root: Path, name: str, code: str) -> Path:
    version = root / name / "1"
    version.mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(CONFIG)
    (version / "model.py").write_text(code)
    return root


def server_config(repository: Path, **overrides: Any) -> ServerConfig:
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    http, grpc, metrics = sorted(ports)
    cfg = ServerConfig(
        repository, http_port=http, grpc_port=grpc, metrics_port=metrics, startup_timeout_s=45
    )
    return dataclasses.replace(cfg, **overrides)


def group_gone(pgid: int, timeout: float = 5.0) -> bool:
    """True once no process (server or stub) is left in the server's process group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def double_repo(tmp_path: Path) -> Path:
    return make_repository(tmp_path / "repo", "double", DOUBLE)


@pytest.fixture
def server(double_repo: Path, tmp_path: Path) -> Iterator[TritonServer]:
    with TritonServer(server_config(double_repo, work_dir=tmp_path / "work")) as srv:
        yield srv


def test_find_tritonserver_rejects_python_without_stub() -> None:
    assert find_tritonserver().binary.is_file()
    with pytest.raises(TritonNotInstalled, match=r"Python 2\.7"):
        find_tritonserver(python_version=(2, 7))


def test_serves_python_model_then_stops(server: TritonServer) -> None:
    assert server.running
    assert server.http_url.startswith("127.0.0.1:")
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as r:
        assert r.status == 200

    body = {
        "inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.5]}],
        "outputs": [{"name": "OUTPUT0"}],
    }
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/double/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        reply = json.load(r)
    (output,) = reply["outputs"]
    assert output["name"] == "OUTPUT0" and output["shape"] == [1, 2]
    assert output["data"] == [2.0, 5.0]

    pid = server.pid
    assert pid is not None
    server.stop()
    server.stop()  # idempotent
    assert not server.running
    assert group_gone(pid)
    assert port_closed(server.config.http_port)


def test_port_in_use_fails_fast(double_repo: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = TritonServer(server_config(double_repo, grpc_port=port))
        start = time.monotonic()
        with pytest.raises(PortInUse, match=f"port {port} already in use"):
            server.start()
    assert time.monotonic() - start < 2
    assert server.pid is None


def test_model_load_failure_raises_with_log_tail(tmp_path: Path) -> None:
    repository = make_repository(tmp_path / "repo", "broken", BROKEN)
    server = TritonServer(server_config(repository))
    start = time.monotonic()
    with pytest.raises(TritonServerError, match="deliberate initialize failure") as info, server:
        pass
    assert time.monotonic() - start < 45
    assert "exited with code" in str(info.value)
    assert server.pid is not None and not server.running
    assert group_gone(server.pid)


def test_cli_serves_until_sigterm(double_repo: Path, tmp_path: Path) -> None:
    cfg = server_config(double_repo)
    stderr = tmp_path / "serve.log"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deploy.triton.serve",
                f"--repository={double_repo}",
                f"--http-port={cfg.http_port}",
                f"--grpc-port={cfg.grpc_port}",
                f"--metrics-port={cfg.metrics_port}",
                "--model=double",
                "--startup-timeout=45",
            ],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert f"http=127.0.0.1:{cfg.http_port}" in line, stderr.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert port_closed(cfg.http_port)


def test_cli_missing_repository_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy.triton.serve", "--repository", str(tmp_path / "nope")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a directory" in result.stderr
