"""Draw a synthetic identity in a pose: the procedural head renderer and its ground truth.

Face video datasets cannot be downloaded here, so a cartoon head stands in: feature points on an
ellipsoid, rotated, projected and drawn with anti-aliased cv2 polygons in painter's order.
`render` is pure, so any identity can be drawn in any pose (ground truth for cross-reenactment).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from training.synthetic.params import BACKGROUNDS, HAIR_STYLES, RGB, IdentityParams, PoseParams

NUM_LANDMARKS = 68  # iBUG-68 order: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67


@dataclass(frozen=True, eq=False)
class SyntheticFrame:
    """One rendered frame with its ground truth."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    mask: np.ndarray  # (S, S) uint8 0..255; head, hair, neck and shoulders
    landmarks: np.ndarray  # (68, 2) float32 pixel (x, y), iBUG-68 order
    identity: IdentityParams
    pose: PoseParams

    @property
    def identity_vector(self) -> np.ndarray:
        return self.identity.to_vector()

    @property
    def pose_vector(self) -> np.ndarray:
        return self.pose.to_vector()


# --- geometry ------------------------------------------------------------------------------------
# Head units: head centre at the origin, y up, z toward the camera, half-height about 1.
_PIVOT = np.array([0.0, -0.5, -0.2])  # heads turn about the neck, not their centre
_LIGHT = np.array([-0.4, 0.35, 0.85]) / np.linalg.norm([-0.4, 0.35, 0.85])  # camera space
_PX_PER_UNIT = 0.29  # of the image size, at scale 1
_HEAD_Y = 0.44  # head centre height, fraction of the image
_SHOULDER_Y = 1.45  # head units below the head centre, identity-independent
_GRID_LAT = np.sin(np.linspace(-math.pi / 2, math.pi / 2, 23))
_GRID_LON = np.linspace(0.0, 2 * math.pi, 44, endpoint=False)


@dataclass(frozen=True)
class _Head:
    """Identity geometry in head units, derived from IdentityParams."""

    a: float  # half-width
    b: float  # half-height
    c: float  # half-depth
    taper: float  # how much the lower face narrows toward the chin
    jaw_power: float  # superellipse power of the lower half: 2 round .. 3 square
    eye_x: float
    eye_y: float
    eye_w: float
    eye_h: float
    brow_y: float
    brow_th: float
    nose_top: float
    nose_tip: float
    nose_w: float
    nose_out: float
    mouth_y: float
    mouth_w: float

    @classmethod
    def of(cls, p: IdentityParams) -> _Head:
        eye_w = 0.125 + 0.05 * p.eye_size
        nose_tip = -0.27 - 0.10 * p.nose_length
        return cls(
            a=0.72 + 0.14 * p.face_width,
            b=0.96 + 0.12 * p.face_height,
            c=0.92,
            taper=0.05 + 0.25 * p.jaw,
            jaw_power=2.9 - 0.9 * p.jaw,
            eye_x=0.25 + 0.09 * p.eye_spacing,
            eye_y=0.02,
            eye_w=eye_w,
            eye_h=0.55 * eye_w,
            brow_y=0.22 + 0.35 * eye_w,
            brow_th=0.025 + 0.03 * p.brow_thickness,
            nose_top=0.0,
            nose_tip=nose_tip,
            nose_w=0.07 + 0.05 * p.nose_width,
            nose_out=0.10 + 0.10 * p.nose_length,
            mouth_y=nose_tip - 0.21,
            mouth_w=0.17 + 0.09 * p.mouth_width,
        )

    def half_widths(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Half-width (x) and half-depth (z) of the horizontal cross-section at height y."""
        s = np.clip(np.asarray(y, float) / self.b, -1.0, 1.0)
        power = np.where(s < 0, self.jaw_power, 2.0)
        q = (1.0 - np.abs(s) ** power) ** (1.0 / power)
        taper = 1.0 - self.taper * np.clip(-s, 0.0, 1.0) ** 2
        return self.a * taper * q, self.c * q

    def lift(self, x: np.ndarray, y: np.ndarray, out: float | np.ndarray = 0.0) -> np.ndarray:
        """Put face-plane points (x, y) onto the front of the head surface, `out` above it."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        rx, rz = self.half_widths(y)
        z = rz * np.sqrt(np.clip(1.0 - (x / np.maximum(rx, 1e-6)) ** 2, 0.0, 1.0)) + out
        return np.stack(np.broadcast_arrays(x, y, z), -1)

    def normal(self, p: np.ndarray) -> np.ndarray:
        """Approximate outward normal (of the untapered ellipsoid) at head points (..., 3)."""
        n = p / np.array([self.a**2, self.b**2, self.c**2])
        return n / np.linalg.norm(n, axis=-1, keepdims=True)

    def surface(self) -> np.ndarray:
        """Points covering the whole head surface, (N, 3)."""
        y = self.b * _GRID_LAT
        rx, rz = self.half_widths(y)
        x = rx[:, None] * np.sin(_GRID_LON)
        z = rz[:, None] * np.cos(_GRID_LON)
        return np.stack([x, np.broadcast_to(y[:, None], x.shape), z], -1).reshape(-1, 3)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    r_roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return r_roll @ r_pitch @ r_yaw


@dataclass(frozen=True)
class _Camera:
    """Pose as a rigid transform plus jaw drop, and the orthographic projection to pixels."""

    rot: np.ndarray  # (3, 3) head -> camera
    px: float  # pixels per head unit
    cx: float
    cy: float
    mouth_y: float
    jaw_drop: float
    body_x: float  # pixel centre of the shoulders' top
    body_y: float

    @classmethod
    def of(cls, pose: PoseParams, head: _Head, size: int) -> _Camera:
        px = _PX_PER_UNIT * size * pose.scale
        return cls(
            rot=_rotation(pose.yaw, pose.pitch, pose.roll),
            px=px,
            cx=size * (0.5 + pose.tx),
            cy=size * (_HEAD_Y + pose.ty),
            mouth_y=head.mouth_y,
            jaw_drop=0.09 * pose.mouth_open,
            # shoulders follow the head's translation, not its rotation
            body_x=size * (0.5 + 0.7 * pose.tx) + 0.1 * px * pose.yaw,
            body_y=size * (_HEAD_Y + 0.7 * pose.ty) + _SHOULDER_Y * px,
        )

    @property
    def view(self) -> np.ndarray:
        """Direction toward the camera, in head coordinates."""
        return self.rot[2]

    def deform(self, p: np.ndarray) -> np.ndarray:
        """Open the jaw: everything below the mouth moves down."""
        if self.jaw_drop == 0.0:
            return p
        w = np.clip((self.mouth_y - p[..., 1]) / 0.3, 0.0, 1.0)
        out = p.copy()
        out[..., 1] -= self.jaw_drop * w * w * (3 - 2 * w)
        return out

    def to_camera(self, p: np.ndarray, rigid: bool = False) -> np.ndarray:
        p = p if rigid else self.deform(p)
        return (p - _PIVOT) @ self.rot.T + _PIVOT

    def project(self, p: np.ndarray, rigid: bool = False) -> np.ndarray:
        """Head points (..., 3) -> pixel (x, y) (..., 2)."""
        q = self.to_camera(p, rigid)
        return np.stack([self.cx + self.px * q[..., 0], self.cy - self.px * q[..., 1]], -1)

    def body(self, offsets: np.ndarray) -> np.ndarray:
        """Pixel positions of (right, down) offsets in head units from the shoulders' top."""
        return np.array([self.body_x, self.body_y]) + self.px * offsets

    def facing(self, normals: np.ndarray) -> np.ndarray:
        """How much head-space normals face the camera (cosine)."""
        return normals @ self.view

    def lit(self, normals: np.ndarray) -> np.ndarray:
        return (normals @ self.rot.T) @ _LIGHT


# --- drawing -------------------------------------------------------------------------------------
_SHIFT = 4  # cv2 sub-pixel bits: polygons are placed to 1/16 px, so motion is smooth


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points).reshape(-1, 2) * (1 << _SHIFT)).astype(np.int32)


def _color(rgb: RGB | np.ndarray, gain: float = 1.0) -> tuple[float, float, float]:
    r, g, b = (min(255.0, 255.0 * gain * float(v)) for v in rgb)
    return (r, g, b)


class _Canvas:
    """RGB image and foreground mask drawn together; `fg=True` shapes also enter the mask."""

    def __init__(self, background: np.ndarray, px: float) -> None:
        self.image = background.copy()
        self.mask = np.zeros(background.shape[:2], np.uint8)
        self.px = px

    def width(self, units: float) -> int:
        return max(1, round(units * self.px))

    def fill(self, points: np.ndarray, color: tuple[float, ...], fg: bool = False) -> None:
        if len(points) < 3:
            return
        pts = [_fixed(points)]
        cv2.fillPoly(self.image, pts, color, cv2.LINE_AA, _SHIFT)
        if fg:
            cv2.fillPoly(self.mask, pts, (255.0,), cv2.LINE_AA, _SHIFT)

    def line(
        self,
        points: np.ndarray,
        color: tuple[float, ...],
        units: float,
        closed: bool = False,
        fg: bool = False,
    ) -> None:
        pts, width = [_fixed(points)], self.width(units)
        cv2.polylines(self.image, pts, closed, color, width, cv2.LINE_AA, _SHIFT)
        if fg:
            cv2.polylines(self.mask, pts, closed, (255.0,), width, cv2.LINE_AA, _SHIFT)

    def disc(self, centre: np.ndarray, radius: float, color: tuple[float, ...]) -> None:
        x, y = _fixed(centre)[0]
        r = round(radius * self.px * (1 << _SHIFT))
        cv2.circle(self.image, (int(x), int(y)), r, color, -1, cv2.LINE_AA, _SHIFT)

    def hull(self, points: np.ndarray, color: tuple[float, ...], fg: bool = False) -> None:
        if len(points) >= 3:
            self.fill(cv2.convexHull(points.astype(np.float32)).reshape(-1, 2), color, fg)


@functools.lru_cache(maxsize=64)
def _background(kind: int, a: RGB, b: RGB, size: int) -> np.ndarray:
    """Static backdrop; cached because it depends on the identity only."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    name = BACKGROUNDS[kind]
    if name == "vertical":
        t = yy
    elif name == "diagonal":
        t = (xx + yy) / 2
    elif name == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (5 * xx + 2 * yy))
    elif name == "dots":
        r2 = (xx * 6 % 1 - 0.5) ** 2 + (yy * 6 % 1 - 0.5) ** 2
        t = np.clip((0.06 - r2) * size / 3, 0.0, 1.0)
    else:
        t = np.zeros_like(xx)
    ca, cb = np.array(a) * 255, np.array(b) * 255
    image = np.round(ca + (cb - ca) * t[..., None]).astype(np.uint8)
    image.setflags(write=False)
    return image


# --- hair: regions on an ellipsoidal shell -------------------------------------------------------
def _sphere(elevation: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Unit vectors at (elevation, azimuth); azimuth 0 faces the camera, +pi/2 is the head's +x."""
    ce = np.cos(elevation)
    return np.stack(np.broadcast_arrays(ce * np.sin(phi), np.sin(elevation), ce * np.cos(phi)), -1)


@dataclass(frozen=True)
class _Hair:
    """Hair as closed loops on the unit sphere (region on the left), mapped onto a shell.

    The far loop is drawn behind the head, the near loop in front of the face: painter's order
    for a convex shell. They differ only for long hair, which hangs down rather than wrapping
    around the jaw, so its low part stays behind the head.
    """

    center: np.ndarray
    radii: np.ndarray
    far_loop: np.ndarray  # (K, 3) unit vectors
    near_loop: np.ndarray

    @classmethod
    def of(cls, p: IdentityParams, head: _Head) -> _Hair:
        style = HAIR_STYLES[p.hair_style]
        volume = {"bald": 1.03, "short": 1.07, "long": 1.08, "bangs": 1.08, "curly": 1.22}[style]
        radii = np.array([head.a, head.b, head.c]) * volume
        center = np.array([0.0, 0.03 + (volume - 1) * 0.4, -0.04])
        if style == "bald":  # a horseshoe fringe above the ears and around the back
            phi = np.linspace(1.4, 2 * math.pi - 1.4, 48)
            ends = np.clip(np.minimum(phi - phi[0], phi[-1] - phi) / 0.3, 0.0, 1.0)
            lo = np.interp(np.abs(phi - math.pi), (0.0, 1.2, math.pi), (-0.4, 0.08, 0.08))
            hi = lo + 0.3 * np.sqrt(ends)
            loop = np.concatenate([_sphere(lo, phi), _sphere(hi[::-1], phi[::-1])])
            return cls(center, radii, loop, loop)
        phi = np.linspace(-math.pi, math.pi, 96, endpoint=False)
        # hairline elevation at |phi| = 0 (forehead), 0.8, 1.2 (temple), pi/2 (ear), 2.2, pi (nape)
        knots = {
            "short": (0.62, 0.50, 0.25, 0.14, -0.30, -0.55),
            "long": (0.60, 0.45, 0.10, -0.25, -0.80, -1.10),
            "bangs": (0.30, 0.25, 0.15, 0.10, -0.30, -0.55),
            "curly": (0.58, 0.45, 0.20, 0.05, -0.35, -0.60),
        }[style]
        lo = np.interp(np.abs(phi), (0.0, 0.8, 1.2, math.pi / 2, 2.2, math.pi), knots)
        if style in ("short", "curly"):  # sideburns in front of the ears
            lo -= 0.3 * np.exp(-(((np.abs(phi) - 1.25) / 0.1) ** 2))
        if style == "bangs":  # a jagged fringe across the forehead
            lo += 0.05 * np.abs(np.sin(7 * phi)) * (np.abs(phi) < 0.9)
        if style == "curly":  # a wavy hairline
            lo += 0.035 * np.sin(22 * phi)
        near = np.maximum(lo, -0.15) if style == "long" else lo
        return cls(center, radii, _sphere(lo, phi), _sphere(near, phi))

    def polygons(self, view: np.ndarray, far: bool) -> list[np.ndarray]:
        """Outlines (head coordinates) of the hair seen from the camera, or hidden from it."""
        w = (-view if far else view) / self.radii  # on the unit sphere, visible means u . w > 0
        loops = _clip_to_hemisphere(self.far_loop if far else self.near_loop, w)
        return [self.center + self.radii * u for u in loops]

    def drape(self) -> np.ndarray:
        """Long hair falling behind the neck to the shoulders, as points to take the hull of."""
        phi = np.linspace(math.pi / 2 - 0.25, 3 * math.pi / 2 + 0.25, 9)
        top = self.center + self.radii * _sphere(np.full_like(phi, 0.1), phi)
        x = 1.25 * self.radii[0] * np.sin(phi)
        bottom = np.stack([x, np.full_like(phi, -1.55), 0.5 * np.cos(phi) - 0.3], -1)
        return np.concatenate([top, bottom])


def _clip_to_hemisphere(loop: np.ndarray, w: np.ndarray, step: float = 0.04) -> list[np.ndarray]:
    """Intersect the region left of a closed loop on the unit sphere with {u . w > 0}.

    Weiler-Atherton on the sphere: follow the loop while it is visible; where it leaves, follow
    the rim (the great circle normal to w, oriented with the hemisphere on its left) to where
    the loop comes back. Assumes the rim is not entirely inside the region.
    """
    w = w / np.linalg.norm(w)
    g = loop @ w
    inside = g > 0
    if inside.all():
        return [loop]
    if not inside.any():
        return []
    n = len(loop)
    nxt = (np.arange(n) + 1) % n
    crossings = np.flatnonzero(inside != inside[nxt])  # edge i -> i + 1 crosses the rim
    lam = g[crossings] / (g[crossings] - g[nxt[crossings]])
    points = loop[crossings] + lam[:, None] * (loop[nxt[crossings]] - loop[crossings])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    e1 = np.cross(w, [1.0, 0.0, 0.0] if abs(w[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(w, e1)  # e1 x e2 = w: the hemisphere lies left of increasing t
    t = np.arctan2(points @ e2, points @ e1)
    is_entry = ~inside[crossings]
    entries, exits = np.flatnonzero(is_entry), np.flatnonzero(~is_entry)

    polygons, unused = [], set(entries.tolist())
    while unused:
        start = current = min(unused)
        parts: list[np.ndarray] = []
        for _ in range(len(crossings)):
            unused.discard(current)
            i = crossings[current]
            exit_ = exits[np.argmin((crossings[exits] - i - 1) % n)]  # next exit along the loop
            m = crossings[exit_]
            idx = np.arange(i + 1, m + 1 + (n if m < i + 1 else 0)) % n
            parts += [points[current : current + 1], loop[idx], points[exit_ : exit_ + 1]]
            gaps = (t[entries] - t[exit_]) % (2 * math.pi)
            current = entries[np.argmin(gaps)]  # the first return met along the rim
            arc = t[exit_] + gaps.min() * np.linspace(0, 1, max(2, math.ceil(gaps.min() / step)))
            parts.append(np.cos(arc[1:-1, None]) * e1 + np.sin(arc[1:-1, None]) * e2)
            if current == start:
                break
        polygons.append(np.concatenate(parts))
    return polygons


# --- face features (shared by drawing and landmarks) ---------------------------------------------
_T_EYE = np.linspace(-1.0, 1.0, 13)
_T_MOUTH = np.linspace(-1.0, 1.0, 17)
_T_CIRCLE = np.linspace(0.0, 2 * math.pi, 20, endpoint=False)
_T_THIRDS = np.array([-1.0, -1 / 3, 1 / 3, 1.0, 1 / 3, -1 / 3])  # corner, upper, corner, lower


def _lids(
    head: _Head, side: int, openness: float, smile: float, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, upper lid y and lower lid y of one eye (side -1 image left, +1 image right)."""
    x = side * head.eye_x + head.eye_w * t
    bump = np.clip(1 - t**2, 0.0, 1.0)
    tilt = 0.08 * head.eye_h * t * side  # outer corners slightly raised
    centre = head.eye_y + tilt
    upper = centre + head.eye_h * (1.1 * openness - 0.15) * bump**0.7
    lower = centre - head.eye_h * (0.55 * openness + 0.25 - 0.3 * smile * openness) * bump**0.9
    return x, upper, np.minimum(lower, upper)


def _brow(head: _Head, side: int, raise_: float, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x and centre-line y of one brow; t runs from image left to image right."""
    x = side * head.eye_x + 1.2 * head.eye_w * t
    inner = np.clip(-t * side, 0.0, 1.0)  # 1 at the end nearest the nose
    y = head.brow_y + 0.045 * (1 - t**2) - 0.02 * (t * side) + 0.05 * raise_ + 0.02 * raise_ * inner
    return x, y


def _mouth(head: _Head, pose: PoseParams, t: np.ndarray) -> dict[str, np.ndarray]:
    """x and the four lip curves' y at t in [-1, 1] (image left to right)."""
    s, o = pose.smile, pose.mouth_open
    bump = np.clip(1 - t**2, 0.0, 1.0)
    base = head.mouth_y + 0.05 * s * t**2 - 0.01 * (1 - s) * t**2
    upper_in = base + 0.012 * o * bump
    lower_in = base - 0.13 * o * bump**0.8
    return {
        "x": head.mouth_w * (1 + 0.12 * s - 0.1 * o) * t,
        "upper_out": base + 0.045 * bump**0.5 * (1 - 0.35 * np.exp(-((t / 0.2) ** 2))),
        "upper_in": upper_in,
        "lower_in": lower_in,
        "lower_out": lower_in - 0.055 * bump**0.6,
    }


def _landmarks3d(head: _Head, pose: PoseParams) -> np.ndarray:
    """The 68 iBUG landmarks on the head, before pose; (68, 3)."""
    theta = np.linspace(0.0, math.pi, 17)
    top, chin = head.eye_y - 0.06, -0.97 * head.b
    jaw_y = top + (chin - top) * np.sin(theta)
    jaw_x = -np.cos(theta) * 0.96 * head.half_widths(jaw_y)[0]
    t5 = np.linspace(-0.9, 0.9, 5)
    brows = [head.lift(*_brow(head, side, pose.brow_raise, t5), 0.01) for side in (-1, 1)]
    bridge_y = np.linspace(head.nose_top, head.nose_tip, 4)
    bridge = head.lift(np.zeros(4), bridge_y, np.linspace(0.02, head.nose_out, 4))
    nostril_x = head.nose_w * np.array([-0.9, -0.45, 0.0, 0.45, 0.9])
    nostril_y = head.nose_tip - 0.06 + np.array([0.02, 0.0, -0.01, 0.0, 0.02])
    nostril_out = head.nose_out * np.array([0.25, 0.5, 0.6, 0.5, 0.25])
    nostrils = head.lift(nostril_x, nostril_y, nostril_out)
    eyes = []
    for side, blink in ((-1, pose.blink_right), (1, pose.blink_left)):
        x, upper, lower = _lids(head, side, 1 - blink, pose.smile, _T_THIRDS)
        eyes.append(head.lift(x, np.where(np.arange(6) < 3, upper, lower), 0.01))
    outer_t = np.array([-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0, -1 / 3, -2 / 3])
    m = _mouth(head, pose, outer_t)
    outer_y = np.where(np.arange(12) <= 6, m["upper_out"], m["lower_out"])
    inner_t = np.array([-0.92, -1 / 3, 0, 1 / 3, 0.92, 1 / 3, 0, -1 / 3])
    mi = _mouth(head, pose, inner_t)
    inner_y = np.where(np.arange(8) <= 4, mi["upper_in"], mi["lower_in"])
    inner_y[[0, 4]] = (mi["upper_in"][[0, 4]] + mi["lower_in"][[0, 4]]) / 2
    return np.concatenate(
        [
            head.lift(jaw_x, jaw_y),
            *brows,
            bridge,
            nostrils,
            *eyes,
            head.lift(m["x"], outer_y, 0.025),
            head.lift(mi["x"], inner_y, 0.02),
        ]
    )


# --- renderer ------------------------------------------------------------------------------------
def render(identity: IdentityParams, pose: PoseParams, size: int) -> SyntheticFrame:
    """Draw `identity` in `pose` at size x size pixels; a pure function of its arguments."""
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    head = _Head.of(identity)
    cam = _Camera.of(pose, head, size)
    bg = _background(identity.background, identity.background_a, identity.background_b, size)
    canvas = _Canvas(bg, cam.px)
    hair = _Hair.of(identity, head)
    style = HAIR_STYLES[identity.hair_style]
    skin = np.array(identity.skin)

    _draw_body(canvas, identity, cam, size)
    if style == "long":
        canvas.hull(cam.project(hair.drape(), rigid=True), _color(identity.hair_color, 0.7), True)
    _draw_neck(canvas, head, cam, skin)
    for poly in hair.polygons(cam.view, far=True):
        canvas.fill(cam.project(poly, rigid=True), _color(identity.hair_color, 0.75), True)
    ears = [] if style == "long" else [-1, 1]
    near = {side: cam.facing(np.array([side, 0.0, 0.25])) > 0.3 for side in ears}
    for side in ears:
        if not near[side]:
            _draw_ear(canvas, identity, head, cam, side)
    _draw_skin(canvas, head, cam, skin)
    for side in ears:
        if near[side]:
            _draw_ear(canvas, identity, head, cam, side)
    _draw_eyes(canvas, identity, head, pose, cam)
    _draw_brows(canvas, identity, head, pose, cam)
    _draw_mouth(canvas, identity, head, pose, cam)
    _draw_nose(canvas, head, cam, skin)
    for poly in hair.polygons(cam.view, far=False):
        canvas.fill(cam.project(poly, rigid=True), _color(identity.hair_color), True)
    if style == "long" and identity.earrings:  # ears are hidden, earrings hang below the hair
        for side in (-1, 1):
            if cam.facing(np.array([side, 0.0, 0.25])) > -0.2:
                _draw_earring(canvas, identity, head, cam, side)
    if identity.glasses:
        _draw_glasses(canvas, identity, head, cam)

    landmarks = cam.project(_landmarks3d(head, pose)).astype(np.float32)
    return SyntheticFrame(canvas.image, canvas.mask, landmarks, identity, pose)


def _draw_body(canvas: _Canvas, p: IdentityParams, cam: _Camera, size: int) -> None:
    t = np.linspace(math.pi, 2 * math.pi, 25)
    shoulders = np.stack([1.8 * np.cos(t), 1.0 + np.sin(t)], -1)
    below = size / cam.px + 2.0  # far enough below the frame in head units
    shoulders = np.concatenate([shoulders, [[1.8, below], [-1.8, below]]])
    canvas.fill(cam.body(shoulders), _color(p.shirt_color), fg=True)
    collar = cam.body(np.array([[-0.38, 0.02], [0.38, 0.02], [0.0, 0.55]]))
    canvas.fill(collar, _color(p.skin, 0.78))
    canvas.line(collar, _color(p.shirt_color, 0.7), 0.04)


def _draw_neck(canvas: _Canvas, head: _Head, cam: _Camera, skin: np.ndarray) -> None:
    """From under the jaw (turning with the head) to the collar (which does not turn)."""
    attach = cam.project(np.array([[-0.34, -0.55 * head.b, -0.2], [0.34, -0.55 * head.b, -0.2]]))
    base = cam.body(np.array([[0.38, 0.15], [-0.38, 0.15]]))
    canvas.fill(np.concatenate([attach, base]), _color(skin, 0.78), fg=True)


def _draw_skin(canvas: _Canvas, head: _Head, cam: _Camera, skin: np.ndarray) -> None:
    """Head silhouette in shadow, then the lit part on top: cheap shading that shows rotation."""
    points = head.surface()
    xy = cam.project(points)
    canvas.hull(xy, _color(skin, 0.86), fg=True)
    normals = head.normal(points)
    lit = (cam.facing(normals) > 0.0) & (cam.lit(normals) > 0.15)
    canvas.hull(xy[lit], _color(skin))


def _draw_ear(canvas: _Canvas, p: IdentityParams, head: _Head, cam: _Camera, side: int) -> None:
    y0 = head.eye_y - 0.12
    rx, _ = head.half_widths(np.array(y0))
    flap = np.array([side * 0.5, 0.0, -0.85])  # ears point outward and back
    t = _T_CIRCLE
    reach = 0.09 + 0.09 * np.cos(t)  # along the flap
    height = y0 + 0.19 * np.sin(t)
    base = np.stack([np.full_like(t, side * float(rx) * 0.95), height, np.full_like(t, -0.12)], -1)
    outline = base + reach[:, None] * flap
    canvas.fill(cam.project(outline), _color(p.skin, 0.88), fg=True)
    inner = base + (0.05 + 0.05 * np.cos(t))[:, None] * flap
    inner[:, 1] = y0 + 0.1 * np.sin(t)
    canvas.fill(cam.project(inner), _color(p.skin, 0.7))
    if p.earrings:
        _draw_earring(canvas, p, head, cam, side)


def _draw_earring(canvas: _Canvas, p: IdentityParams, head: _Head, cam: _Camera, side: int) -> None:
    y0 = head.eye_y - 0.12
    rx = float(head.half_widths(np.array(y0))[0])
    lobe = cam.project(np.array([[side * rx * 0.97, y0 - 0.2, -0.1]]))[0]
    ring = lobe + 0.05 * cam.px * np.stack([np.cos(_T_CIRCLE), 1.2 + np.sin(_T_CIRCLE)], -1)
    canvas.line(ring, _color(p.earring_color), 0.025, closed=True, fg=True)


def _draw_eyes(
    canvas: _Canvas, p: IdentityParams, head: _Head, pose: PoseParams, cam: _Camera
) -> None:
    dark = (25.0, 20.0, 20.0)
    for side, blink in ((-1, pose.blink_right), (1, pose.blink_left)):
        centre = head.lift(np.array([side * head.eye_x]), np.array([head.eye_y]))
        if cam.facing(head.normal(centre))[0] < 0.05:
            continue
        openness = 1.0 - blink
        x, upper, lower = _lids(head, side, openness, pose.smile, _T_EYE)
        if openness > 0.08:
            opening = np.concatenate([head.lift(x, upper), head.lift(x[::-1], lower[::-1])])
            canvas.fill(cam.project(opening), (245.0, 245.0, 240.0))
            ex, ey = side * head.eye_x, head.eye_y + 0.05 * head.eye_h
            radius = 0.72 * head.eye_h
            for r, color in ((radius, _color(p.iris_color)), (0.45 * radius, dark)):
                cxs = np.clip(ex + r * np.cos(_T_CIRCLE), x[0], x[-1])
                cys = ey + r * np.sin(_T_CIRCLE)
                cys = np.clip(cys, np.interp(cxs, x, lower), np.interp(cxs, x, upper))
                canvas.fill(cam.project(head.lift(cxs, cys, 0.005)), color)
            if openness > 0.5:
                glint = head.lift(np.array([ex - 0.3 * radius]), np.array([ey + 0.3 * radius]))
                canvas.disc(cam.project(glint)[0], 0.13 * radius, (255.0, 255.0, 255.0))
            canvas.line(cam.project(head.lift(x, lower)), _color(p.skin, 0.6), 0.012)
        canvas.line(cam.project(head.lift(x, upper)), dark, 0.028)


def _draw_brows(
    canvas: _Canvas, p: IdentityParams, head: _Head, pose: PoseParams, cam: _Camera
) -> None:
    t = np.linspace(-1.0, 1.0, 11)
    for side in (-1, 1):
        x, y = _brow(head, side, pose.brow_raise, t)
        if cam.facing(head.normal(head.lift(x[5:6], y[5:6])))[0] < 0.05:
            continue
        half = head.brow_th * (1 - 0.5 * np.clip(t * side, 0.0, 1.0)) / 2  # thinner outside
        outline = np.concatenate([head.lift(x, y + half), head.lift(x[::-1], (y - half)[::-1])])
        canvas.fill(cam.project(outline), _color(p.brow_color))


def _draw_mouth(
    canvas: _Canvas, p: IdentityParams, head: _Head, pose: PoseParams, cam: _Camera
) -> None:
    m = _mouth(head, pose, _T_MOUTH)
    x = m["x"]

    def between(upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
        return cam.project(
            np.concatenate([head.lift(x, upper, 0.02), head.lift(x[::-1], lower[::-1], 0.02)])
        )

    canvas.fill(between(m["upper_out"], m["lower_out"]), _color(p.lip_color))
    canvas.fill(between(m["upper_out"], m["upper_in"]), _color(p.lip_color, 0.85))
    if pose.mouth_open > 0.03:
        canvas.fill(between(m["upper_in"], m["lower_in"]), (70.0, 20.0, 25.0))
        teeth = np.maximum(m["upper_in"] - 0.03 * np.clip(1 - _T_MOUTH**2, 0, 1), m["lower_in"])
        canvas.fill(between(m["upper_in"], teeth), (240.0, 236.0, 225.0))
    canvas.line(cam.project(head.lift(x, m["upper_in"], 0.02)), _color(p.lip_color, 0.55), 0.012)


def _draw_nose(canvas: _Canvas, head: _Head, cam: _Camera, skin: np.ndarray) -> None:
    """The side away from the light in shadow, a base line and nostrils."""
    tip, w, out = head.nose_tip, head.nose_w, head.nose_out
    bottom = tip - 0.06
    sides = []
    for side in (-1, 1):
        pts = head.lift(
            np.array([side * 0.03, side * 0.5 * w, side * w, 0.0]),
            np.array([head.nose_top, tip + 0.02, bottom + 0.02, bottom - 0.01]),
            np.array([0.02, 0.9 * out, 0.25 * out, 0.6 * out]),
        )
        sides.append(pts)
    normals = np.array([[-0.8, 0.0, 0.6], [0.8, 0.0, 0.6]])
    shade = cam.lit(normals)
    dark = int(np.argmin(shade))
    ridge = head.lift(np.zeros(2), np.array([head.nose_top, tip]), np.array([0.02, out]))
    shadow = np.concatenate([ridge, sides[dark][2:3], sides[dark][1:2]])
    canvas.hull(cam.project(shadow), _color(skin, 0.88))
    t = np.linspace(-1.0, 1.0, 9)
    base = head.lift(w * t, bottom + 0.03 * t**2 - 0.01, head.nose_out * (0.6 - 0.35 * t**2))
    canvas.line(cam.project(base), _color(skin, 0.55), 0.014)
    for side in (-1, 1):
        c = np.array([side * 0.45 * w, bottom + 0.005, 0.35 * out])
        ring = np.stack(
            [
                c[0] + 0.3 * w * np.cos(_T_CIRCLE),
                np.full(20, c[1]),
                c[2] + 0.12 * out * np.sin(_T_CIRCLE),
            ],
            -1,
        )
        ring[:, 2] += head.lift(ring[:, 0], ring[:, 1])[:, 2]
        canvas.fill(cam.project(ring), _color(skin, 0.45))


def _draw_glasses(canvas: _Canvas, p: IdentityParams, head: _Head, cam: _Camera) -> None:
    color = _color(p.glasses_color)
    rims = []
    for side in (-1, 1):
        ex = side * head.eye_x
        z = float(head.lift(np.array([ex]), np.array([head.eye_y]))[0, 2]) + 0.06
        rx, ry = 1.35 * head.eye_w, 1.15 * head.eye_w
        rim = np.stack(
            [
                ex + rx * np.cos(_T_CIRCLE),
                head.eye_y + 0.01 + ry * np.sin(_T_CIRCLE),
                np.full(20, z),
            ],
            -1,
        )
        rims.append(rim)
        if cam.facing(np.array([side * 0.6, 0.0, 0.8])) > -0.2:
            temple = np.array(
                [
                    [ex + side * rx, head.eye_y + 0.02, z],
                    [side * head.a * 0.98, head.eye_y + 0.04, -0.05],
                ]
            )
            canvas.line(cam.project(temple, rigid=True), color, 0.03, fg=True)
    for rim in rims:
        canvas.line(cam.project(rim, rigid=True), color, 0.03, closed=True, fg=True)
    inner = head.eye_x - 1.35 * head.eye_w
    t = np.linspace(-1.0, 1.0, 7)
    bridge = head.lift(inner * t, head.eye_y + 0.05 + 0.03 * (1 - t**2), 0.06)
    canvas.line(cam.project(bridge, rigid=True), color, 0.03)
