"""TritonPythonModel classes for the Python-backend flavour of the repository.

Each `<name>/1/model.py` that `deploy.triton.export` writes is three lines: put the project
on sys.path (the stub runs Python isolated, so PYTHONPATH is ignored) and import one class
from here. The classes only move tensors between Triton and `deploy.triton.runtime`.
`triton_python_backend_utils` exists only inside the Triton stub, hence the lazy import.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np

from deploy.triton import spec
from deploy.triton.runtime import (
    GeneratorRuntime,
    IdentityEncoderRuntime,
    PoseEncoderRuntime,
    RenderRequest,
    RequestError,
    RuntimeConfig,
)


def _pb() -> Any:
    import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

    return pb_utils


class _Model:
    """Shared initialize: parameters, device and the error helpers."""

    def initialize(self, args: dict[str, str]) -> None:
        self.pb = _pb()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        gpu = args["model_instance_kind"] == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        model_dir = Path(args["model_repository"]) / args["model_version"]
        self.setup(RuntimeConfig.from_parameters(params, model_dir, device))

    def setup(self, cfg: RuntimeConfig) -> None:
        raise NotImplementedError

    def input(self, request: Any, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def error(self, message: str, invalid: bool = True) -> Any:
        pb = self.pb
        code = pb.TritonError.INVALID_ARG if invalid else pb.TritonError.INTERNAL
        return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message, code))

    def respond(self, **outputs: np.ndarray) -> Any:
        tensors = [self.pb.Tensor(name, np.ascontiguousarray(v)) for name, v in outputs.items()]
        return self.pb.InferenceResponse(output_tensors=tensors)


class IdentityEncoderModel(_Model):
    def setup(self, cfg: RuntimeConfig) -> None:
        self.runtime = IdentityEncoderRuntime(cfg)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            images = self.input(request, spec.IMAGES)
            try:
                assert images is not None  # a required input
                responses.append(self.respond(IDENTITY=self.runtime(images)))
            except RequestError as e:
                responses.append(self.error(str(e)))
        return responses


class PoseEncoderModel(_Model):
    def setup(self, cfg: RuntimeConfig) -> None:
        self.runtime = PoseEncoderRuntime(cfg)

    def execute(self, requests: list[Any]) -> list[Any]:
        frames = [self.input(r, spec.FRAMES) for r in requests]
        try:
            poses = self.runtime([f for f in frames if f is not None])
        except RequestError as e:  # shapes are fixed by the config, so this is rare
            return [self.error(str(e)) for _ in requests]
        return [self.respond(POSE=p) for p in poses]


class GeneratorModel(_Model):
    """Also publishes the avatar cache on Triton's /metrics (lpd_avatar_cache_*)."""

    def setup(self, cfg: RuntimeConfig) -> None:
        self.runtime = GeneratorRuntime(cfg)
        self.gauges: dict[str, Any] = {}
        self.families: list[Any] = []  # must outlive their metrics
        if self.runtime.cache is not None:
            gauge = self.pb.MetricFamily.GAUGE
            for field in (
                "hits",
                "misses",
                "evictions",
                "load_s_total",
                "resident",
                "resident_bytes",
            ):
                family = self.pb.MetricFamily(
                    name=f"lpd_avatar_cache_{field}",
                    description=f"avatar cache {field.replace('_', ' ')} (generator model)",
                    kind=gauge,
                )
                self.families.append(family)
                self.gauges[field] = family.Metric(labels={"model": spec.GENERATOR})

    def _publish(self) -> None:
        if self.runtime.cache is None:
            return
        stats = self.runtime.cache.stats
        for field, metric in self.gauges.items():
            metric.set(float(getattr(stats, field)))

    def execute(self, requests: list[Any]) -> list[Any]:
        batch = []
        for request in requests:
            ids = self.input(request, spec.AVATAR_ID)
            poses = self.input(request, spec.POSE)
            assert poses is not None  # a required input
            batch.append(
                RenderRequest(
                    poses=poses,
                    identity=self.input(request, spec.IDENTITY),
                    avatar_ids=None if ids is None else [_text(v) for v in ids.reshape(-1)],
                )
            )
        responses = []
        for result in self.runtime(batch):
            if isinstance(result, RequestError):
                responses.append(self.error(str(result)))
            else:
                responses.append(self.respond(RGB=result[0], MASK=result[1]))
        self._publish()
        return responses


class ReenactModel(_Model):
    """BLS: each request goes to pose_encoder and then generator, whose dynamic batchers
    merge concurrent requests; an error (say, an unknown avatar) fails only its request."""

    def setup(self, cfg: RuntimeConfig) -> None:
        pass  # holds no weights

    async def execute(self, requests: list[Any]) -> list[Any]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, request: Any) -> Any:
        frames = self.input(request, spec.FRAMES)
        identity = self.input(request, spec.IDENTITY)
        ids = self.input(request, spec.AVATAR_ID)
        assert frames is not None  # a required input
        if identity is None and ids is None:
            return self.error("reenact needs IDENTITY (zero-shot) or AVATAR_ID (fine-tuned)")
        pose = await self._call(spec.POSE_ENCODER, {spec.FRAMES: frames}, [spec.POSE])
        if not isinstance(pose, dict):
            return pose
        inputs = {spec.POSE: pose[spec.POSE]}
        if identity is not None:
            inputs[spec.IDENTITY] = identity
        if ids is not None:
            inputs[spec.AVATAR_ID] = ids
        out = await self._call(spec.GENERATOR, inputs, [spec.RGB, spec.MASK])
        if not isinstance(out, dict):
            return out
        return self.respond(RGB=out[spec.RGB], MASK=out[spec.MASK])

    async def _call(
        self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]
    ) -> dict[str, np.ndarray] | Any:
        """Outputs as numpy, or the error response to pass back to the client."""
        pb = self.pb
        request = pb.InferenceRequest(
            model_name=model,
            inputs=[pb.Tensor(name, value) for name, value in inputs.items()],
            requested_output_names=outputs,
            preferred_memory=pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = await request.async_exec()
        if response.has_error():  # pass the inner model's message and code through
            err = response.error()
            return pb.InferenceResponse(
                output_tensors=[], error=pb.TritonError(err.message(), err.code())
            )
        return {name: pb.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
