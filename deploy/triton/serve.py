"""Launch the tritonserver binary bundled in the nvidia-pytriton wheel on a model repository.

The embedded server is the single-machine default (tests, `make run`, a laptop): no Docker
engine, no separate install. Production runs the official Triton image on the same repository.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

logger = logging.getLogger("deploy.triton.server")

# The server runs from here so that python-backend models can `import model` (the stub puts
# its cwd first on sys.path and ignores PYTHONPATH).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL_LINES = 200
_POLL_INTERVAL_S = 0.1
_TRITON_LEVEL = re.compile(r"^([IWE])\d{4} ")
_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR}
# Printed on every CPU-only host and harmless there; not worth an ERROR in the service logs.
_CPU_HOST_NOISE = re.compile(
    r"CudaDriverHelper has not been initialized|Unable to allocate pinned system memory"
)


class TritonServerError(RuntimeError):
    """The embedded tritonserver could not be started, became unhealthy or failed to stop."""


class TritonNotInstalled(TritonServerError):
    """The nvidia-pytriton wheel, or its stub for this Python version, is missing."""


class PortInUse(TritonServerError):
    """A port the server needs is already bound; Triton itself only notices after model load."""


@dataclass(frozen=True)
class TritonInstall:
    """Paths inside the nvidia-pytriton wheel that a launch needs."""

    binary: Path
    libs: Path  # site-packages/nvidia_pytriton.libs (libcudart and the server's deps)
    python_backend: Path  # libtriton_python.so
    backend_utils: Path  # triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for the running Python
    caches: Path


def find_tritonserver(python_version: tuple[int, int] | None = None) -> TritonInstall:
    """Locate the bundled server without importing pytriton (which pulls in tritonclient)."""
    major, minor = python_version or sys.version_info[:2]
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled("nvidia-pytriton is not installed (pip install nvidia-pytriton)")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    stubs = root / "python_backend_stubs"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        libs=package.parent / "nvidia_pytriton.libs",
        python_backend=root / "backends" / "python" / "libtriton_python.so",
        backend_utils=root / "backends" / "python" / "triton_python_backend_utils.py",
        stub=stubs / f"{major}.{minor}" / "triton_python_backend_stub",
        caches=root / "caches",
    )
    if not install.stub.is_file() and stubs.is_dir():
        have = ", ".join(sorted(p.name for p in stubs.iterdir() if p.is_dir()))
        raise TritonNotInstalled(
            f"nvidia-pytriton has no python backend stub for Python {major}.{minor} (has: {have})"
        )
    for path in (install.binary, install.libs, install.python_backend, install.backend_utils):
        if not path.exists():
            raise TritonNotInstalled(f"incomplete nvidia-pytriton install: {path} is missing")
    if not install.stub.is_file():
        raise TritonNotInstalled(f"incomplete nvidia-pytriton install: {install.stub} is missing")
    return install


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (racy, good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    # SO_REUSEADDR, as the server uses, so TIME_WAIT leftovers of a previous run don't count.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _client_host(host: str) -> str:
    """Where a local client should connect when the server binds `host`."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


def list_models(repository: Path) -> tuple[str, ...]:
    """Model names in a repository: subdirectories holding a config.pbtxt."""
    return tuple(sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()))


@dataclass(frozen=True)
class ServerConfig:
    """How to run the embedded server; defaults bind loopback only."""

    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    models: tuple[str, ...] = ()  # empty: every model in the repository
    model_control: str = "explicit"
    log_verbose: int = 0
    exit_timeout_s: int = 20  # torch stubs of four models take ~7 s to unload on 2 cores
    work_dir: Path | None = None  # holds backends/python; default: a tempdir removed on stop
    extra_env: dict[str, str] = field(default_factory=dict)
    # Its bin dir goes first on PATH: the stub takes sys.prefix from `python3` on PATH.
    python_executable: Path = field(default_factory=lambda: Path(sys.executable))
    startup_timeout_s: float = 120.0


class TritonServer:
    """A tritonserver child process; as a context manager it is started and ready inside."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._owned_work_dir: Path | None = None
        self._lock = threading.Lock()

    # -- addresses -------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"{_client_host(self.config.host)}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_client_host(self.config.host)}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{_client_host(self.config.host)}:{self.config.metrics_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_tail(self) -> list[str]:
        """The last server output lines, for error messages."""
        return list(self._tail)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the server (not yet ready: call wait_ready)."""
        if self._process is not None:
            raise TritonServerError("tritonserver already started")
        cfg = self.config
        repository = cfg.repository.resolve()
        if not repository.is_dir():
            raise TritonServerError(f"model repository {repository} is not a directory")
        if cfg.models and cfg.model_control != "explicit":
            raise TritonServerError("models to load need model_control='explicit'")
        ports = (cfg.http_port, cfg.grpc_port, cfg.metrics_port)
        if len(set(ports)) != len(ports):
            raise TritonServerError(f"http, grpc and metrics ports must differ, got {ports}")
        for port in ports:
            if not _port_is_free(cfg.host, port):
                raise PortInUse(f"port {port} already in use on {cfg.host}")
        install = find_tritonserver()
        backends = self._make_backend_dir(install)
        cmd = self._command(install, repository, backends)
        logger.debug("starting %s", " ".join(cmd))
        try:
            self._process = subprocess.Popen(
                cmd,
                cwd=PROJECT_ROOT,
                env=self._environment(install),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal reaches only us; we stop it
            )
        except OSError as exc:
            self.stop()
            raise TritonServerError(f"cannot run {install.binary}: {exc}") from exc
        self._reader = threading.Thread(
            target=self._forward_output, name="tritonserver-log", daemon=True
        )
        self._reader.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll /v2/health/ready; on exit or timeout stop the server and raise with the log."""
        timeout = self.config.startup_timeout_s if timeout is None else timeout
        if self._process is None:
            raise TritonServerError("tritonserver not started")
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while True:
            code = self._process.poll()
            if code is not None:
                self.stop()
                raise self._failure(f"tritonserver exited with code {code} before ready")
            if _is_ready(url):
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise self._failure(f"tritonserver not ready after {timeout:g} s")
            time.sleep(_POLL_INTERVAL_S)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for the whole group after exit_timeout_s + 10 s; idempotent."""
        with self._lock:
            process = self._process
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=self.config.exit_timeout_s + 10)
                except subprocess.TimeoutExpired:
                    logger.warning("tritonserver ignored SIGTERM; killing process group")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                logger.info("tritonserver exited with code %s", process.returncode)
            if self._reader is not None:
                # Stubs share the pipe and exit shortly after the server; don't wait forever.
                self._reader.join(timeout=3)
                self._reader = None
            if self._owned_work_dir is not None:
                shutil.rmtree(self._owned_work_dir, ignore_errors=True)
                self._owned_work_dir = None

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _make_backend_dir(self, install: TritonInstall) -> Path:
        if self.config.work_dir is None:
            self._owned_work_dir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
            work_dir = self._owned_work_dir
        else:
            work_dir = self.config.work_dir.resolve()
        python_dir = work_dir / "backends" / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for source in (install.python_backend, install.backend_utils, install.stub):
            target = python_dir / source.name
            if target.is_symlink() or target.exists():
                target.unlink()
            try:
                # A symlink keeps the stub's RPATH ($ORIGIN/../..) pointing into the wheel.
                target.symlink_to(source)
            except OSError:
                shutil.copy2(source, target)  # LD_LIBRARY_PATH covers the copied stub
        return work_dir / "backends"

    def _command(self, install: TritonInstall, repository: Path, backends: Path) -> list[str]:
        cfg = self.config
        cmd = [
            str(install.binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={install.caches}",
            f"--model-control-mode={cfg.model_control}",
            "--disable-auto-complete-config",  # saves an extra stub per model at load (~3x)
            f"--http-address={cfg.host}",
            f"--grpc-address={cfg.host}",
            f"--metrics-address={cfg.host}",
            f"--http-port={cfg.http_port}",
            f"--grpc-port={cfg.grpc_port}",
            f"--metrics-port={cfg.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",  # otherwise NVML/DCGM errors on CPU hosts
            f"--exit-timeout-secs={cfg.exit_timeout_s}",
            f"--log-verbose={cfg.log_verbose}",
        ]
        if cfg.model_control == "explicit":
            models = cfg.models or list_models(repository)
            cmd += [f"--load-model={name}" for name in models]
        return cmd

    def _environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        # A copied stub can't find libcudart without the wheel's libs (model load then hangs);
        # LIBDIR makes the stub link this interpreter's libpython, not the system one.
        lib_dirs = [str(install.libs)]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            lib_dirs.append(str(libdir))
        if env.get("LD_LIBRARY_PATH"):
            lib_dirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
        # Not resolved: the venv's bin/python3 is a symlink out of the venv.
        venv_bin = str(Path(self.config.python_executable).absolute().parent)
        env["PATH"] = os.pathsep.join(p for p in (venv_bin, env.get("PATH", "")) if p)
        env["PROJECT_ROOT"] = str(PROJECT_ROOT)
        env.update(self.config.extra_env)
        return env

    def _forward_output(self) -> None:
        process = self._process
        if process is None or process.stdout is None:
            return
        with process.stdout:
            for raw in process.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip()
                if not line:
                    continue
                self._tail.append(line)
                logger.log(_level(line), "%s", line)

    def _failure(self, message: str) -> TritonServerError:
        tail = "\n".join(self._tail)
        return TritonServerError(f"{message}; last server output:\n{tail}" if tail else message)


def _level(line: str) -> int:
    """Logging level of a server output line (Triton prefixes them with I/W/E)."""
    if _CPU_HOST_NOISE.search(line):
        return logging.INFO
    if line.startswith("error:"):  # the fatal line tritonserver prints before exiting
        return logging.ERROR
    match = _TRITON_LEVEL.match(line)
    return _LEVELS[match.group(1)] if match else logging.INFO


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False  # HTTPError (400 while loading) is a URLError too


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.triton.serve",
        description="Run the tritonserver bundled in nvidia-pytriton on a model repository.",
    )
    parser.add_argument("--repository", type=Path, required=True, help="model repository dir")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        help="model to load (repeatable; default: all in the repository)",
    )
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM: 0 after a clean stop, 2 if the server never got ready."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.repository.is_dir():
        sys.stderr.write(f"error: model repository {args.repository} is not a directory\n")
        return 2
    stop_requested = threading.Event()

    def _request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)

    server = TritonServer(
        ServerConfig(
            repository=args.repository,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            host=args.host,
            models=tuple(args.models),
            log_verbose=args.log_verbose,
            startup_timeout_s=args.startup_timeout,
        )
    )
    try:
        server.start()
        server.wait_ready()
    except TritonServerError as exc:
        server.stop()
        # The full server log already went to stderr through logging.
        sys.stderr.write(f"error: {str(exc).splitlines()[0]}\n")
        return 2
    print(
        f"tritonserver ready: http={server.http_url} grpc={server.grpc_url} "
        f"metrics={server.metrics_url} pid={server.pid}",
        flush=True,
    )
    try:
        while not stop_requested.wait(0.5):
            if not server.running:
                sys.stderr.write("error: tritonserver exited unexpectedly\n")
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
