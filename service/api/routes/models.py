"""`GET /v1/models/pose-encoder` and its ONNX files: what a pose-only stream client needs to
compute pose descriptors itself (`WS /v1/avatars/{id}/stream?mode=pose`).

The contract states the encoder's tensors, the face crop it was trained on (the exact rule of
media.faces, media.smoothing and media.crop, from their own constants), the wire format of a
descriptor, and the version (service.pose_encoder) to open the stream with. The files are
served with `ETag: "<version>"`, so a client revalidates its copy with If-None-Match.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from deploy.triton.spec import FRAMES, POSE, POSE_ENCODER
from media.crop import BLUR_SIGMA, FADE_WIDTH
from media.faces import FaceConfig
from media.smoothing import SmoothingConfig
from service.api.deps import PrincipalDep, SettingsDep
from service.config import Settings
from service.errors import ApiError, error_example, unavailable
from service.pose_encoder import (
    PRECISIONS,
    PoseEncoderFiles,
    PoseEncoderInfo,
    PoseEncoderUnavailable,
    Precision,
)

router = APIRouter(prefix="/v1/models", tags=["models"])

FILES_PATH: Final = "/v1/models/pose-encoder/{precision}.onnx"
STREAM_PATH: Final = "/v1/avatars/{avatar_id}/stream?mode=pose&version={version}"
ONNX_MEDIA_TYPE: Final = "application/octet-stream"  # ONNX has no registered media type
# Clients keep their copy and revalidate it (ETag); shared caches must not (the API key).
CACHE_CONTROL: Final = "private, no-cache"


# --- the contract ----------------------------------------------------------------------------


class TensorSpec(BaseModel):
    name: str
    dtype: Literal["uint8", "float32"]
    shape: list[int] = Field(description="-1: any batch size.")
    layout: Literal["NCHW"] | None = None
    channels: Literal["RGB"] | None = None


class OutsideFrame(BaseModel):
    """How the parts of the crop window outside the frame are filled."""

    padding: Literal["reflect_101"] = Field(
        default="reflect_101", description="OpenCV BORDER_REFLECT_101 of the part inside."
    )
    blur_sigma: float = Field(
        default=BLUR_SIGMA, description="Gaussian blur of the resized crop, sigma = this x S."
    )
    fade_width: float = Field(
        default=FADE_WIDTH,
        description="Over this x S output pixels beyond the frame's edge, the blurred padding "
        "fades linearly to the frame's per-channel median colour.",
    )


class Smoothing(BaseModel):
    """The One Euro filter (Casiez et al. 2012) on (cx, cy, side), per stream."""

    filter: Literal["one_euro"] = "one_euro"
    min_cutoff_hz: float
    beta: float = Field(description="Cutoff increase per (box sides / s) of speed.")
    d_cutoff_hz: float
    cut_threshold: float = Field(
        description="A centre jump of more box sides than this restarts the filter."
    )
    cut_scale_ratio: float = Field(description="So does a size change by more than this ratio.")
    missed: Literal["hold_last_box"] = Field(
        default="hold_last_box", description="A frame without a face reuses the last box."
    )


class CropRule(BaseModel):
    """Frame (H, W, 3) RGB -> the S x S crop the encoder takes, as the server makes it."""

    detector: str = Field(description="The face detector and its model.")
    min_confidence: float
    face: Literal["largest", "single", "index"] = Field(
        description="Which detection is used when there are several."
    )
    scale: float = Field(description="The crop box is a square of side scale x the longer side.")
    box: str
    window: str
    resize: str
    outside_frame: OutsideFrame
    smoothing: Smoothing
    reference: str = Field(description="The Python implementation of this rule.")


class WireFormat(BaseModel):
    dtype: Literal["float16"] = "float16"
    byte_order: Literal["little"] = "little"
    bytes_per_frame: int = Field(description="2 x pose_dim: one binary WebSocket message.")


class PoseEncoderContract(BaseModel):
    """Everything a client needs to send pose descriptors the server's generator accepts."""

    name: Literal["pose_encoder"] = POSE_ENCODER
    version: str = Field(
        description="First 16 hex digits of the SHA-256 of the served base checkpoint; pass "
        "it as the stream's `version`."
    )
    image_size: int = Field(description="S: the square crop size in pixels.")
    pose_dim: int = Field(description="D: floats per pose descriptor.")
    input: TensorSpec
    output: TensorSpec
    normalisation: str = Field(
        description="What the client does to pixel values: nothing, the graph scales them."
    )
    crop: CropRule
    wire: WireFormat
    files: dict[str, str] = Field(
        description="By precision: the ONNX file's path. Both take uint8 FRAMES and return "
        "float32 POSE; fp16 has half weights and computes in half inside."
    )
    stream: str = Field(description="The WebSocket path of a pose-only stream.")


def crop_rule() -> CropRule:
    """The rule of FaceDetector.crop_box, BoxSmoother and crop_face, from their defaults."""
    face, smooth = FaceConfig(), SmoothingConfig()
    detector_model = "full_range" if face.model_selection == 1 else "short_range"
    return CropRule(
        detector=f"mediapipe face_detection ({detector_model} model)",
        min_confidence=face.min_confidence,
        face=face.policy,
        scale=face.box_scale,
        box="the detector's box (x0, y0, x1, y1) in frame pixels -> a square on its centre "
        "(cx, cy), side = scale x max(width, height), then smoothed",
        window="integer window in frame pixels: side = max(1, round(box side)), "
        "x0 = round(cx - side / 2), y0 = round(cy - side / 2)",
        resize="the window resized to S x S with OpenCV: INTER_CUBIC when side < S, else "
        "INTER_AREA",
        outside_frame=OutsideFrame(),
        smoothing=Smoothing(
            min_cutoff_hz=smooth.min_cutoff,
            beta=smooth.beta,
            d_cutoff_hz=smooth.d_cutoff,
            cut_threshold=smooth.cut_threshold,
            cut_scale_ratio=smooth.cut_scale_ratio,
        ),
        reference="media.faces.FaceDetector.crop_box, media.smoothing.BoxSmoother, "
        "media.crop.crop_face",
    )


def build_contract(info: PoseEncoderInfo) -> PoseEncoderContract:
    s, d = info.image_size, info.pose_dim
    return PoseEncoderContract(
        version=info.version,
        image_size=s,
        pose_dim=d,
        input=TensorSpec(
            name=FRAMES, dtype="uint8", layout="NCHW", channels="RGB", shape=[-1, 3, s, s]
        ),
        output=TensorSpec(name=POSE, dtype="float32", shape=[-1, d]),
        normalisation="none: FRAMES are the crop's RGB bytes (0-255), channels first; the "
        "graph divides by 255 itself",
        crop=crop_rule(),
        wire=WireFormat(bytes_per_frame=2 * d),
        files={p: FILES_PATH.format(precision=p) for p in PRECISIONS},
        stream=STREAM_PATH.format(avatar_id="{avatar_id}", version=info.version),
    )


# --- routes ----------------------------------------------------------------------------------

UNAVAILABLE: Final = error_example(
    "model_unavailable", "the pose encoder could not be exported; try again later"
)


def _unavailable(settings: Settings) -> ApiError:
    return unavailable(
        "model_unavailable",
        "the pose encoder is unavailable; try again later",
        settings.retry_after_s,
    )


def _version_headers(version: str) -> dict[str, str]:
    return {"ETag": f'"{version}"', "X-Model-Version": version, "Cache-Control": CACHE_CONTROL}


def _matches(if_none_match: str | None, version: str) -> bool:
    """Whether an If-None-Match header names this version (weak tags compare equal)."""
    if if_none_match is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or f'"{version}"' in tags


@router.get(
    "/pose-encoder",
    summary="The pose encoder's contract, for pose-only streams",
    responses={503: UNAVAILABLE},
)
def pose_encoder_contract(
    principal: PrincipalDep, settings: SettingsDep, response: Response
) -> PoseEncoderContract:
    """Tensors, crop rule, wire format, version and file paths of the pose encoder the
    server's generator was trained with."""
    try:
        info = PoseEncoderFiles.from_settings(settings).info()
    except PoseEncoderUnavailable:
        raise _unavailable(settings) from None
    response.headers.update(_version_headers(info.version))
    return build_contract(info)


@router.get(
    "/pose-encoder/{precision}.onnx",
    summary="Download the pose encoder as ONNX",
    response_class=FileResponse,
    responses={
        200: {"content": {ONNX_MEDIA_TYPE: {}}, "description": "The ONNX model."},
        304: {"description": "If-None-Match names the current version: keep your copy."},
        404: error_example("not_found", "no such file; files: fp32.onnx, fp16.onnx"),
        503: UNAVAILABLE,
    },
)
async def pose_encoder_file(
    precision: str,
    principal: PrincipalDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """`fp32` or `fp16`: uint8 FRAMES in, float32 POSE out. The first download after a new
    base checkpoint waits for its export."""
    if precision not in PRECISIONS:
        names = ", ".join(f"{p}.onnx" for p in PRECISIONS)
        raise ApiError(404, "not_found", f"no such file; files: {names}")
    chosen: Precision = "fp16" if precision == "fp16" else "fp32"
    files = PoseEncoderFiles.from_settings(settings)
    try:
        info = await run_in_threadpool(files.info)
        headers = _version_headers(info.version)
        if _matches(if_none_match, info.version):
            return Response(status_code=304, headers=headers)
        path = await run_in_threadpool(files.path, chosen)
    except PoseEncoderUnavailable:
        raise _unavailable(settings) from None
    return FileResponse(
        path,
        media_type=ONNX_MEDIA_TYPE,
        filename=f"pose_encoder-{info.version}-{precision}.onnx",
        headers=headers,
    )
