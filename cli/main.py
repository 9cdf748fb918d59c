"""`reenact`: the service from a terminal.

    reenact avatar create me1.jpg me2.jpg --fine-tune light     # waits, prints the avatar id
    reenact avatar list
    reenact job wait JOB_ID                                     # progress bar
    reenact video --avatar AVATAR_ID talk.mp4 -o me-talking.mp4 [--output webm] [--paste-back]
    reenact stream --avatar AVATAR_ID --source webcam|0|clip.mp4 [-o out.mp4] [--pose-only]
    reenact local --photos me.jpg --checkpoint ckpt.safetensors talk.mp4 -o out.mp4   # no server

The service and key come from --url/--key or LPD_API_URL/LPD_API_KEY. Exit status: 0 done,
1 the service refused or the job failed (one line says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cli.api import ApiError, Client, ReenactOptions, Unreachable

DEFAULT_URL = "http://127.0.0.1:8000"
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "demo-tiny-64.safetensors"

# What to do about the errors people meet most, by the service's error code.
HINTS = {
    "unauthorized": "check --key / LPD_API_KEY (`python -m service.admin create-key`)",
    "rate_limited": "too many requests for this key; wait and retry",
    "quota_exceeded": "wait for running jobs to finish, or delete avatars",
    "avatar_not_ready": "wait for the avatar's job: `reenact job wait JOB_ID`",
    "no_face": "use a photo or video where one face is clearly visible",
    "multiple_faces": "crop the photo to one person",
    "queue_unavailable": "the service's job queue is down; retry later",
}


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


def _existing(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return p


def _client(args: argparse.Namespace) -> Client:
    if not args.key:
        raise UsageError("no API key: pass --key or set LPD_API_KEY")
    return Client(args.url, args.key)


def _progress(job_id: str, quiet: bool) -> tuple[Any, Any]:
    bar = tqdm(total=100, desc=f"job {job_id[:8]}", unit="%", disable=quiet, file=sys.stderr)

    def update(job: dict[str, Any]) -> None:
        bar.set_postfix_str(f"{job['status']} {job.get('stage') or ''}".strip())
        bar.update(round(100 * job["progress"]) - bar.n)

    return bar, update


def _wait(client: Client, job_id: str, quiet: bool) -> dict[str, Any]:
    bar, update = _progress(job_id, quiet)
    try:
        job = client.wait(job_id, update)
    finally:
        bar.close()
    if job["status"] != "succeeded":
        error = job.get("error") or {"code": job["status"], "message": f"the job {job['status']}"}
        raise ApiError(200, error["code"], error["message"])
    return job


# --- commands ---------------------------------------------------------------------------------


def avatar_create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        created = client.create_avatar(args.photos, args.fine_tune, args.steps, args.name)
        avatar_id, job_id = created["avatar"]["id"], created["job"]["id"]
        print(f"avatar {avatar_id} (job {job_id})", file=sys.stderr)
        if not args.no_wait:
            _wait(client, job_id, args.quiet)
    print(avatar_id)
    return 0


def avatar_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for a in client.avatars():
            tuned = "fine-tuned" if a["fine_tuned"] else "zero-shot"
            print(f"{a['id']}  {a['status']:<8} {tuned:<10} {a['name']}")
    return 0


def job_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _wait(client, args.job_id, args.quiet)
    print(job["status"])
    return 0


def video(args: argparse.Namespace) -> int:
    options = ReenactOptions(
        output=args.output,
        paste_back=args.paste_back,
        keep_audio=not args.no_audio,
        background="image"
        if args.background_image
        else "color"
        if args.background_color
        else "generated",
        background_color=args.background_color,
        background_image=args.background_image,
    )
    with _client(args) as client:
        job = client.reenact(args.avatar, args.driver, options)
        job = _wait(client, job["id"], args.quiet)
        result = job["result"]
        main = result.get("video") or result["mask"]
        client.download(main, args.out)
        if args.mask and result.get("mask"):
            client.download(result["mask"], args.mask)
    print(f"{args.out}: {result['frames']} frames at {result['fps']:g} fps", file=sys.stderr)
    return 0


def stream(args: argparse.Namespace) -> int:
    from cli.live import run_pose_stream, run_stream  # websockets, cv2: only for this command

    if not args.key:
        raise UsageError("no API key: pass --key or set LPD_API_KEY")
    if args.pose_only:
        report = run_pose_stream(
            args.url,
            args.key,
            args.avatar,
            args.source,
            args.out,
            args.fps,
            args.frames,
            precision=args.precision,
            cache=args.model_cache,
        )
        print(report, file=sys.stderr)
        return 0
    summary = run_stream(
        args.url, args.key, args.avatar, args.source, args.out, args.fps, args.frames
    )
    print(summary, file=sys.stderr)
    return 0


def local(args: argparse.Namespace) -> int:
    from cli.offline import reenact_offline  # torch: only for this command

    frames = reenact_offline(
        args.checkpoint, args.photos, args.driver, args.out, paste_back=args.paste_back
    )
    print(f"{args.out}: {frames} frames", file=sys.stderr)
    return 0


# --- parsing -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reenact",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=os.environ.get("LPD_API_URL", DEFAULT_URL))
    parser.add_argument("--key", default=os.environ.get("LPD_API_KEY"))
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    avatar = sub.add_parser("avatar", help="create or list avatars").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = avatar.add_parser("create", help="an avatar from 1-32 photos of one person")
    p.add_argument("photos", nargs="+", type=_existing, metavar="PHOTO")
    p.add_argument("--fine-tune", choices=["none", "light", "full"], default="none")
    p.add_argument("--steps", type=int, help="fine-tune steps (default: by photo count)")
    p.add_argument("--name", default="avatar")
    p.add_argument("--no-wait", action="store_true", help="print the id, don't wait")
    p.set_defaults(run=avatar_create)
    avatar.add_parser("list", help="your avatars").set_defaults(run=avatar_list)

    job = sub.add_parser("job", help="follow a job").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = job.add_parser("wait", help="show progress until the job ends")
    p.add_argument("job_id")
    p.set_defaults(run=job_wait)

    p = sub.add_parser("video", help="reenact a driver video and download the result")
    p.add_argument("driver", type=_existing, metavar="DRIVER")
    p.add_argument("--avatar", required=True, help="a ready avatar's id")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--output", choices=["mp4", "webm", "mask"], default="mp4")
    p.add_argument("--paste-back", action="store_true", help="the head in the driver's frames")
    p.add_argument("--no-audio", action="store_true", help="drop the driver's audio")
    p.add_argument("--background-color", metavar="#RRGGBB")
    p.add_argument("--background-image", type=_existing, metavar="IMAGE")
    p.add_argument("--mask", type=Path, metavar="OUT", help="also save the matte here")
    p.set_defaults(run=video)

    p = sub.add_parser("stream", help="live: webcam or a video file through the stream")
    p.add_argument("--avatar", required=True)
    p.add_argument("--source", default="webcam", help="webcam, a camera index, or a video file")
    p.add_argument(
        "-o", "--out", type=Path, help="save the returned frames: a video (.mp4) or a folder"
    )
    p.add_argument("--fps", type=float, default=15.0, help="frames sent per second")
    p.add_argument("--frames", type=int, help="stop after this many frames")
    p.add_argument(
        "--pose-only",
        action="store_true",
        help="crop and encode here (ONNX), send 2 x D bytes of float16 pose per frame",
    )
    p.add_argument("--precision", choices=["fp16", "fp32"], default="fp16", help="--pose-only")
    p.add_argument(
        "--model-cache",
        type=Path,
        help="--pose-only: where downloaded encoders are kept (default ~/.cache/lpd/pose-encoder)",
    )
    p.set_defaults(run=stream)

    p = sub.add_parser("local", help="run the model in this process (no server)")
    p.add_argument("driver", type=_existing, metavar="DRIVER")
    p.add_argument("--photos", nargs="+", type=_existing, required=True)
    p.add_argument(
        "--checkpoint", type=_existing, default=Path("checkpoints/demo-tiny-64.safetensors")
    )
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--paste-back", action="store_true")
    p.set_defaults(run=local)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        hint = HINTS.get(exc.code)
        wait = f" (retry after {exc.retry_after:g} s)" if exc.retry_after else ""
        print(f"error: {exc.code}: {exc.message}{wait}", file=sys.stderr)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 1
    except (Unreachable, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
