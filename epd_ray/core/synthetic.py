"""Parametric synthetic faces: a labelled face set that needs no download and no licence.

Why it exists: a newcomer (and the test suite) must see the whole pipeline work in minutes on a laptop,
and de-identification results only mean something if the data carries *both* an identity signal and an
emotion signal that a classifier can learn, and that are independent of each other. Real sets (RaFD)
cannot be shipped, so we draw cartoon faces with PIL where we control exactly where each signal lives:

* **Identity** lives only in cues that an expression does not move: head width/height/shape, skin tone,
  hair colour and style, iris colour, eye spacing, nose size, brow thickness and marks (glasses, beard,
  freckles, mole). Palette cues are assigned by a small error-correcting code over the identity index
  (see :func:`_palette_code`) so that any two of the first 49 identities differ in at least four of the
  five coded cues, plus seeded continuous jitter on the geometry. That keeps them apart at 32 px.
* **Emotion** lives only in the expression geometry: mouth curve/opening/shape, brow height/tilt/arch and
  eye opening (plus nose wrinkles for disgust). The geometry is a table per emotion (:data:`EXPRESSIONS`)
  and does not read any identity trait except the overall face scale, so an emotion classifier cannot use
  identity and vice versa. The cues are drawn dark-on-skin and exaggerated, because the emotion
  verifier sees greyscale images at 32 px.
* **Nuisance** (per image, seeded): shift, rotation, scale, brightness/contrast, side light, background
  colour/gradient, Gaussian noise and a mild expression-intensity jitter, so that a classifier has to
  learn the cues rather than memorise pixels.

Determinism: identity traits depend only on ``(seed, identity index)`` and every image's nuisance on
``(seed, identity, emotion, variation index)``, each through its own ``numpy`` ``SeedSequence``. So the
same call returns the same bytes, and ``variation_offset`` yields *new* pictures of the *same* people
(held-out images for learnability checks).

Plain numpy + PIL on purpose: this module is imported by data preparation tasks and tests that must not
need Ray or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from epd_ray.core.labels import EMOTIONS, NUM_EMOTIONS

__all__ = [
    "EXPRESSIONS",
    "Expression",
    "HAIR_STYLES",
    "IdentityTraits",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "Nuisance",
    "SyntheticFaces",
    "identity_traits",
    "image_nuisance",
    "make_synthetic_faces",
    "render_face",
]

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 256
_MAX_INTERNAL = 512  # supersampled canvas side is at most this (keeps 256 px renders fast)
_ZOOM = 1.1  # canonical units -> half-image; >1 lets the face fill the frame (features matter at 32 px)

# ---------------------------------------------------------------------------------------------------------
# Palettes. Each is spread widely (light..dark, distinct hues) so that two palette entries never look alike
# after the lighting nuisance; seeded jitter is small compared with the gaps.
# ---------------------------------------------------------------------------------------------------------
_SKIN = np.array(
    [
        (255, 226, 204),
        (238, 196, 160),
        (222, 168, 122),
        (196, 136, 94),
        (160, 106, 70),
        (124, 80, 52),
        (96, 62, 42),
    ],
    dtype=np.float64,
)
_HAIR = np.array(
    [
        (22, 18, 18),  # black
        (82, 50, 28),  # dark brown
        (150, 95, 50),  # light brown
        (196, 78, 30),  # ginger
        (236, 206, 120),  # blonde
        (205, 205, 212),  # silver
        (60, 85, 175),  # dyed blue
    ],
    dtype=np.float64,
)
_IRIS = np.array(
    [
        (96, 56, 26),  # brown
        (50, 120, 210),  # blue
        (50, 140, 60),  # green
        (130, 140, 155),  # grey
        (205, 140, 30),  # amber
        (120, 100, 45),  # hazel
        (125, 70, 170),  # violet
    ],
    dtype=np.float64,
)
_FRAMES = np.array([(20, 20, 20), (170, 30, 30), (30, 60, 160), (150, 110, 40)], dtype=np.float64)

HAIR_STYLES: tuple[str, ...] = ("buzz", "side_part", "long", "bob", "afro", "spiky", "bun")
# Marks combos: (glasses, beard, freckles, mole).
_MARKS: tuple[tuple[bool, bool, bool, bool], ...] = (
    (False, False, False, False),
    (True, False, False, False),
    (False, True, False, False),
    (False, False, True, False),
    (False, False, False, True),
    (True, True, False, False),
    (True, False, True, False),
)
_CODE_Q = 7  # alphabet size of the palette code; every palette above has 7 entries
_CODE_SLOTS = _CODE_Q * _CODE_Q  # identities with pairwise-guaranteed palette separation

_Color = tuple[int, int, int]


def _palette_code(slot: int) -> tuple[int, int, int, int, int]:
    """Map a slot in [0, 49) to indices (skin, hair colour, hair style, iris, marks).

    Why: seeded random palettes collide (two people with the same skin *and* hair are common among 16).
    This is a Reed-Solomon-like code over Z_7 (a, b) -> (a, a+b, a+2b, a+3b, a+4b): two different slots
    agree in at most one coordinate, so any two identities differ in at least four of these five cues.
    """
    a, b = slot % _CODE_Q, (slot // _CODE_Q) % _CODE_Q
    return tuple((a + k * b) % _CODE_Q for k in range(5))  # type: ignore[return-value]


def _jitter_color(rng: np.random.Generator, base: np.ndarray, amount: float) -> _Color:
    c = base + rng.uniform(-amount, amount, size=3)
    return tuple(int(v) for v in np.clip(np.round(c), 0, 255))  # type: ignore[return-value]


def _luma(c: _Color | np.ndarray) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


@dataclass(frozen=True)
class IdentityTraits:
    """Everything that makes one synthetic person recognisable, and nothing an expression changes.

    Lengths are in canonical face units (the image spans [-1, 1]); colours are RGB 0..255.
    """

    head_width: float  # x scale of the head and of the feature layout
    head_height: float
    head_squareness: float  # superellipse exponent: 2 = oval, higher = squarer
    chin_taper: float  # 0 = round jaw, higher = pointed chin
    skin: _Color
    hair: _Color
    hair_style: int  # index into HAIR_STYLES
    iris: _Color
    eye_spacing: float  # half distance between the eye centres
    nose_size: float
    brow_thickness: float
    ear_size: float
    glasses: bool
    glasses_frame: _Color
    beard: bool
    freckles: tuple[tuple[float, float], ...]  # freckle centres (empty if none)
    mole: tuple[float, float] | None

    @classmethod
    def sample(cls, rng: np.random.Generator, slot: int | None = None) -> IdentityTraits:
        """Draw a person. ``slot`` picks the coded palette entries (see :func:`_palette_code`) so a set of
        identities is well spread; without it the palette entries are drawn at random from ``rng``."""
        if slot is None:
            code = tuple(int(v) for v in rng.integers(0, _CODE_Q, size=5))
        else:
            code = _palette_code(slot)
        skin_i, hair_i, style_i, iris_i, marks_i = code
        glasses, beard, freckles_on, mole_on = _MARKS[marks_i]
        skin = _jitter_color(rng, _SKIN[skin_i], 6)
        hair = _jitter_color(rng, _HAIR[hair_i], 10)
        iris = _jitter_color(rng, _IRIS[iris_i], 12)
        frame = _jitter_color(rng, _FRAMES[int(rng.integers(len(_FRAMES)))], 10)
        head_width = float(rng.uniform(0.86, 1.12))
        head_height = float(rng.uniform(0.92, 1.06))
        squareness = float(rng.uniform(1.9, 3.0))
        chin_taper = float(rng.uniform(0.0, 0.28))
        eye_spacing = float(rng.uniform(0.19, 0.28))
        nose_size = float(rng.uniform(0.7, 1.4))
        brow_thickness = float(rng.uniform(0.032, 0.07))
        ear_size = float(rng.uniform(0.8, 1.25))
        freckles: tuple[tuple[float, float], ...] = ()
        if freckles_on:
            n = int(rng.integers(10, 16))
            pts = []
            for k in range(n):
                side = 1.0 if k % 2 else -1.0
                pts.append((side * float(rng.uniform(0.12, 0.36)), float(rng.uniform(0.0, 0.16))))
            freckles = tuple(pts)
        mole = None
        if mole_on:
            side = 1.0 if rng.random() < 0.5 else -1.0
            mole = (side * float(rng.uniform(0.18, 0.32)), float(rng.uniform(0.16, 0.26)))
        return cls(
            head_width=head_width,
            head_height=head_height,
            head_squareness=squareness,
            chin_taper=chin_taper,
            skin=skin,
            hair=hair,
            hair_style=int(style_i),
            iris=iris,
            eye_spacing=eye_spacing,
            nose_size=nose_size,
            brow_thickness=brow_thickness,
            ear_size=ear_size,
            glasses=glasses,
            glasses_frame=frame,
            beard=beard,
            freckles=freckles,
            mole=mole,
        )


@dataclass(frozen=True)
class Nuisance:
    """Per-image variation that carries neither identity nor emotion (classifiers must ignore it)."""

    shift_x: float  # fraction of the image size
    shift_y: float
    angle_deg: float
    scale: float
    brightness: float  # added, in 0..255 units
    contrast: float  # multiplies deviations from mid-grey
    side_light: float  # horizontal multiplicative gradient, +-
    background_a: _Color
    background_b: _Color
    background_angle: float  # gradient direction, radians
    noise_sigma: float  # Gaussian pixel noise, 0..255 units
    noise_seed: int  # so render_face stays a pure function of its arguments
    intensity: float  # expression strength multiplier (kept near 1 so emotions stay distinct)

    @staticmethod
    def sample(rng: np.random.Generator) -> Nuisance:
        def bg() -> _Color:
            # Random hue, mid saturation: varied but rarely as saturated as the hair palette.
            h = rng.uniform(0, 1)
            s = rng.uniform(0.05, 0.55)
            v = rng.uniform(0.25, 0.95)
            i = int(h * 6) % 6
            f = h * 6 - int(h * 6)
            p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
            r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
            return (int(r * 255), int(g * 255), int(b * 255))

        return Nuisance(
            shift_x=float(rng.uniform(-0.04, 0.04)),
            shift_y=float(rng.uniform(-0.04, 0.04)),
            angle_deg=float(rng.uniform(-8.0, 8.0)),
            scale=float(rng.uniform(0.94, 1.06)),
            brightness=float(rng.uniform(-22.0, 22.0)),
            contrast=float(rng.uniform(0.82, 1.15)),
            side_light=float(rng.uniform(-0.12, 0.12)),
            background_a=bg(),
            background_b=bg(),
            background_angle=float(rng.uniform(0, 2 * math.pi)),
            noise_sigma=float(rng.uniform(0.0, 6.0)),
            noise_seed=int(rng.integers(0, 2**31 - 1)),
            intensity=float(rng.uniform(0.85, 1.12)),
        )


@dataclass(frozen=True)
class Expression:
    """Expression geometry of one emotion, in canonical face units. Positive ``brow_tilt`` pulls the
    inner brow ends down (anger); negative raises them (sadness, fear). ``mouth_curve`` > 0 lifts the
    corners (smile). ``mouth_open`` is the lip gap at the centre; ``mouth_round`` draws an O instead."""

    brow_raise: float = 0.0
    brow_tilt: float = 0.0
    brow_arch: float = 0.0
    eye_open: float = 1.0
    mouth_width: float = 1.0
    mouth_curve: float = 0.0
    mouth_open: float = 0.0
    upper_open: float = 0.0  # share of the opening above the corner line
    mouth_round: bool = False
    teeth: bool = False
    sneer: float = 0.0  # one-sided upper-lip raise (disgust)
    nose_wrinkle: bool = False
    lip_thickness: float = 0.03


# Exaggerated on purpose: an emotion classifier sees 32 px greyscale. Every pair differs in at least two
# of (brows, eyes, mouth). Only the mouth shape separates e.g. happy from neutral; it is made large for that.
EXPRESSIONS: dict[str, Expression] = {
    "angry": Expression(
        brow_raise=-0.05, brow_tilt=0.13, eye_open=0.6, mouth_width=0.8, mouth_curve=-0.05,
        mouth_open=0.075, upper_open=0.5, teeth=True, lip_thickness=0.035,
    ),
    "disgusted": Expression(
        brow_raise=-0.03, brow_tilt=0.05, eye_open=0.35, mouth_width=1.0, mouth_curve=-0.07,
        mouth_open=0.05, upper_open=0.8, sneer=0.08, nose_wrinkle=True,
    ),
    "fearful": Expression(
        brow_raise=0.08, brow_tilt=-0.1, eye_open=1.55, mouth_width=1.25, mouth_curve=-0.05,
        mouth_open=0.11, upper_open=0.3,
    ),
    "happy": Expression(
        brow_raise=0.02, brow_arch=0.03, eye_open=0.8, mouth_width=1.3, mouth_curve=0.12,
        mouth_open=0.13, upper_open=0.05, teeth=True,
    ),
    "sad": Expression(
        brow_raise=0.02, brow_tilt=-0.11, eye_open=0.65, mouth_width=1.0, mouth_curve=-0.13,
        lip_thickness=0.04,
    ),
    "surprised": Expression(
        brow_raise=0.14, brow_arch=0.06, eye_open=1.65, mouth_width=0.55, mouth_open=0.24,
        mouth_round=True,
    ),
    "neutral": Expression(mouth_width=0.9, lip_thickness=0.03),
}
if tuple(EXPRESSIONS) != EMOTIONS:  # the emotion index of a face is its index in labels.EMOTIONS
    raise RuntimeError("EXPRESSIONS must list exactly labels.EMOTIONS, in order")


# ---------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------
class _Pen:
    """Draws shapes given in canonical face units through one affine map (nuisance shift/rotation/scale
    and supersampling), so everything is rotated together and no image resampling blurs the face."""

    def __init__(self, draw: ImageDraw.ImageDraw, canvas: int, nuisance: Nuisance) -> None:
        self.draw = draw
        half = canvas / 2.0
        k = half * nuisance.scale * _ZOOM
        a = math.radians(nuisance.angle_deg)
        ca, sa = math.cos(a), math.sin(a)
        self.m = np.array([[ca * k, -sa * k], [sa * k, ca * k]])
        self.t = np.array([half + nuisance.shift_x * canvas, half + nuisance.shift_y * canvas])
        self.unit = k  # pixels per canonical unit

    def _xy(self, pts: np.ndarray) -> list[tuple[float, float]]:
        p = pts @ self.m.T + self.t
        return [(float(x), float(y)) for x, y in p]

    def polygon(self, pts: np.ndarray, fill: _Color, outline: _Color | None = None, width: float = 0) -> None:
        xy = self._xy(pts)
        self.draw.polygon(xy, fill=fill)
        if outline is not None and width > 0:
            self.draw.line(xy + [xy[0]], fill=outline, width=max(1, round(width * self.unit)), joint="curve")

    def line(self, pts: np.ndarray, fill: _Color, width: float) -> None:
        w = max(1, round(width * self.unit))
        xy = self._xy(pts)
        self.draw.line(xy, fill=fill, width=w, joint="curve")
        # Round caps: PIL lines have square ends, which look odd for brows and mouths.
        r = w / 2.0
        if w >= 3:
            for x, y in (xy[0], xy[-1]):
                self.draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: _Color | None,
                outline: _Color | None = None, width: float = 0, n: int = 28) -> None:
        pts = _ellipse_pts(cx, cy, rx, ry, n)
        if fill is not None:
            self.draw.polygon(self._xy(pts), fill=fill)
        if outline is not None and width > 0:
            self.line(np.vstack([pts, pts[:1]]), outline, width)

    def dot(self, cx: float, cy: float, r: float, fill: _Color) -> None:
        x, y = self._xy(np.array([[cx, cy]]))[0]
        rp = max(0.75, r * self.unit)
        self.draw.ellipse((x - rp, y - rp, x + rp, y + rp), fill=fill)


_UNIT_CIRCLE = {n: np.stack([np.cos(np.linspace(0, 2 * np.pi, n, endpoint=False)),
                             np.sin(np.linspace(0, 2 * np.pi, n, endpoint=False))], axis=1)
                for n in (12, 16, 20, 28, 48)}


def _ellipse_pts(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> np.ndarray:
    u = _UNIT_CIRCLE.get(n)
    if u is None:
        th = np.linspace(0, 2 * np.pi, n, endpoint=False)
        u = np.stack([np.cos(th), np.sin(th)], axis=1)
    return u * np.array([rx, ry]) + np.array([cx, cy])


def _head_outline(t: IdentityTraits, grow: float = 0.0, n: int = 48) -> np.ndarray:
    """Superellipse head with a tapered chin; ``grow`` inflates it (for hair that hugs the skull)."""
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(th), np.sin(th)
    e = 2.0 / t.head_squareness
    rx = 0.56 * t.head_width + grow
    ry = 0.70 * t.head_height + grow
    x = rx * np.sign(c) * np.abs(c) ** e
    y = ry * np.sign(s) * np.abs(s) ** e
    low = np.clip(y / ry, 0, None)  # 0 at the middle, 1 at the chin
    x = x * (1.0 - t.chin_taper * low**2)
    return np.stack([x, y + _HEAD_CY], axis=1)


_HEAD_CY = 0.02
_EYE_Y = -0.1
_BROW_Y = -0.3
_MOUTH_Y = 0.34
_NOSE_Y = 0.12


def _mix(a: _Color, b: _Color, w: float) -> _Color:
    return tuple(int(round(a[i] * (1 - w) + b[i] * w)) for i in range(3))  # type: ignore[return-value]


def _scale(c: _Color, f: float) -> _Color:
    return tuple(int(max(0, min(255, round(v * f)))) for v in c)  # type: ignore[return-value]


def _darker_than(c: _Color, ref: _Color, ratio: float) -> _Color:
    """Scale ``c`` down until its luma is at most ``ratio`` x the luma of ``ref``: keeps brows and lips
    visible against the skin in greyscale whatever the hair/skin pair."""
    lc, lr = _luma(c), _luma(ref)
    if lc <= ratio * lr or lc == 0:
        return c
    return _scale(c, ratio * lr / lc)


def _draw_hair_back(pen: _Pen, t: IdentityTraits) -> None:
    style = HAIR_STYLES[t.hair_style]
    w = 0.56 * t.head_width
    top = _HEAD_CY - 0.70 * t.head_height
    if style == "long":
        pts = np.array([[-w - 0.1, top + 0.35], [-w - 0.14, 0.95], [w + 0.14, 0.95], [w + 0.1, top + 0.35]])
        pen.polygon(pts, t.hair)
        pen.ellipse(0, top + 0.4, w + 0.1, 0.45, t.hair)
    elif style == "bob":
        pen.ellipse(0, top + 0.48, w + 0.14, 0.62, t.hair)
    elif style == "afro":
        pen.ellipse(0, top + 0.32, w + 0.26, 0.5, t.hair)
        for k in range(11):
            a = math.pi * (1.05 + 0.9 * k / 10)
            pen.ellipse((w + 0.2) * math.cos(a), top + 0.35 + 0.45 * math.sin(a), 0.12, 0.12, t.hair, n=12)
    elif style == "bun":
        pen.ellipse(0, top - 0.08, 0.17, 0.14, t.hair, n=20)


def _draw_hair_front(pen: _Pen, t: IdentityTraits) -> None:
    """Hair over the skull and forehead. It stops above the highest brow position so it never hides
    the expression."""
    style = HAIR_STYLES[t.hair_style]
    w = 0.56 * t.head_width
    top = _HEAD_CY - 0.70 * t.head_height
    outline = _head_outline(t, grow=0.03)
    hairline = -0.5  # surprised brows peak near -0.5 in the middle; fringes reach lower only at the sides
    if style == "buzz":
        cap = outline[outline[:, 1] < hairline + 0.04]
        pen.polygon(cap, _mix(t.hair, t.skin, 0.25))
    elif style == "side_part":
        cap = outline[outline[:, 1] < hairline]
        pen.polygon(cap, t.hair)
        sweep = np.array([[-w * 0.9, hairline - 0.02], [-w * 0.2, top + 0.05], [w * 0.95, hairline + 0.07],
                          [w * 0.3, hairline - 0.05]])
        pen.polygon(sweep, t.hair)
    elif style in ("long", "bob"):
        cap = outline[outline[:, 1] < hairline]
        pen.polygon(cap, t.hair)
        fringe = np.array([[-w * 0.95, hairline + 0.12], [-w * 0.8, top + 0.1], [w * 0.8, top + 0.1],
                           [w * 0.95, hairline + 0.12], [w * 0.5, hairline + 0.02], [0, hairline + 0.04],
                           [-w * 0.5, hairline + 0.02]])
        pen.polygon(fringe, t.hair)
    elif style == "afro":
        cap = outline[outline[:, 1] < hairline - 0.02]
        pen.polygon(cap, t.hair)
    elif style == "spiky":
        cap = outline[outline[:, 1] < hairline]
        pen.polygon(cap, t.hair)
        n = 6
        for k in range(n):
            x0 = -w * 0.85 + (2 * w * 0.85) * k / (n - 1)
            pen.polygon(np.array([[x0 - 0.12, top + 0.12], [x0 + 0.02 * (k - 2.5), top - 0.2],
                                  [x0 + 0.12, top + 0.12]]), t.hair)
    elif style == "bun":
        cap = outline[outline[:, 1] < hairline - 0.03]
        pen.polygon(cap, t.hair)


def _draw_eye(pen: _Pen, t: IdentityTraits, x: float, open_: float, white: _Color, lid: _Color) -> None:
    rx = 0.1
    ry = max(0.012, 0.065 * open_)
    pen.ellipse(x, _EYE_Y, rx, ry, white, n=20)
    ir = 0.055
    pen.ellipse(x, _EYE_Y, ir, min(ir, ry * 0.98), t.iris, n=16)
    pen.ellipse(x, _EYE_Y, 0.026, min(0.026, ry * 0.9), (10, 10, 12), n=12)
    # Upper lid line: the dark cue that carries eye opening in greyscale.
    xs = np.linspace(-rx, rx, 9)
    ys = _EYE_Y - ry * np.sqrt(np.clip(1 - (xs / rx) ** 2, 0, 1))
    pen.line(np.stack([xs + x, ys], axis=1), lid, 0.025)
    if open_ < 0.7:  # squint: lower lid line too
        ys2 = _EYE_Y + ry * np.sqrt(np.clip(1 - (xs / rx) ** 2, 0, 1))
        pen.line(np.stack([xs + x, ys2], axis=1), lid, 0.015)


def _draw_brow(pen: _Pen, t: IdentityTraits, side: float, ex: Expression, k: float, color: _Color) -> None:
    inner_x = side * 0.07
    outer_x = side * (t.eye_spacing + 0.13)
    base = _BROW_Y - ex.brow_raise * k
    inner_y = base + ex.brow_tilt * k
    outer_y = base - 0.3 * ex.brow_tilt * k
    mid_x = 0.5 * (inner_x + outer_x)
    mid_y = 0.5 * (inner_y + outer_y) - ex.brow_arch * k - 0.015
    pen.line(np.array([[inner_x, inner_y], [mid_x, mid_y], [outer_x, outer_y]]), color, t.brow_thickness)


def _mouth_curves(ex: Expression, k: float, n: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w = 0.2 * (1 + (ex.mouth_width - 1) * k)
    xs = np.linspace(-w, w, n)
    u = xs / w
    centre = _MOUTH_Y - ex.mouth_curve * k * (u**2 - 0.4)
    bump = 1 - u**2
    up = ex.mouth_open * k * ex.upper_open * bump
    down = ex.mouth_open * k * (1 - ex.upper_open) * bump
    if ex.sneer:
        up = up + ex.sneer * k * np.clip(u + 0.2, 0, None) ** 2 * bump * 2.5
    upper = np.stack([xs, centre - up], axis=1)
    lower = np.stack([xs, centre + down], axis=1)
    return xs, upper, lower


def _draw_mouth(pen: _Pen, t: IdentityTraits, ex: Expression, k: float) -> None:
    lip = _darker_than(_mix(t.skin, (150, 40, 50), 0.45), t.skin, 0.62)
    inside = (30, 8, 14)
    if ex.mouth_round:
        rx, ry = 0.11 * (1 + (ex.mouth_width - 1) * k) + 0.02, 0.5 * ex.mouth_open * k
        pen.ellipse(0, _MOUTH_Y + 0.03, rx, ry, inside, outline=lip, width=0.035)
        return
    _, upper, lower = _mouth_curves(ex, k)
    if ex.mouth_open * k > 0.02:
        pen.polygon(np.vstack([upper, lower[::-1]]), inside)
        if ex.teeth:
            # Teeth band just under the upper lip, and for a clenched (angry) mouth also above the lower.
            gap = lower[:, 1] - upper[:, 1]
            tb = np.stack([upper[:, 0], upper[:, 1] + 0.45 * gap], axis=1)
            pen.polygon(np.vstack([upper, tb[::-1]]), (245, 245, 240))
            if ex.upper_open >= 0.4:
                lb = np.stack([lower[:, 0], lower[:, 1] - 0.4 * gap], axis=1)
                pen.polygon(np.vstack([lb, lower[::-1]]), (235, 235, 230))
        pen.line(upper, lip, ex.lip_thickness)
        pen.line(lower, lip, ex.lip_thickness * 1.2)
    else:
        pen.line(upper, _scale(lip, 0.8), ex.lip_thickness)


def render_face(traits: IdentityTraits, emotion: int, nuisance: Nuisance, image_size: int) -> np.ndarray:
    """Render one face as a (image_size, image_size, 3) uint8 RGB array.

    Drawn on a supersampled canvas (4x, at most 512 px) and downsampled with LANCZOS, because PIL's
    ImageDraw has no antialiasing and jagged 32 px edges would be a nuisance cue of their own. The face is
    drawn through one affine map (shift/rotation/scale) instead of rotating a bitmap, so it stays sharp.
    Lighting and noise are applied at the final size, as a camera would.
    """
    image_size = _check_size(image_size)
    if not 0 <= int(emotion) < NUM_EMOTIONS:
        raise ValueError(f"emotion must be in [0, {NUM_EMOTIONS}), got {emotion!r}")
    ex = EXPRESSIONS[EMOTIONS[int(emotion)]]
    k = nuisance.intensity
    factor = max(1, min(4, _MAX_INTERNAL // image_size))
    canvas = image_size * factor

    img = _background(canvas, nuisance)
    draw = ImageDraw.Draw(img)
    pen = _Pen(draw, canvas, nuisance)
    t = traits
    skin = t.skin
    shade = _scale(skin, 0.8)
    hx = t.head_width  # features spread with the head width (face scale), not with the emotion

    _draw_hair_back(pen, t)
    # Neck and ears.
    pen.polygon(np.array([[-0.2, 0.5], [-0.24, 1.05], [0.24, 1.05], [0.2, 0.5]]), shade)
    for side in (-1.0, 1.0):
        pen.ellipse(side * 0.56 * hx, 0.0, 0.08 * t.ear_size, 0.13 * t.ear_size, shade, n=16)
    pen.polygon(_head_outline(t), skin)

    if t.beard:
        outline = _head_outline(t)
        below = outline[outline[:, 1] > 0.05]
        below = below[np.argsort(-below[:, 0])]  # right to left along the jaw
        inner = np.array([[-0.3 * hx, 0.22], [-0.22 * hx, 0.5], [0.0, 0.56], [0.22 * hx, 0.5], [0.3 * hx, 0.22]])
        pen.polygon(np.vstack([below, inner]), _mix(t.hair, skin, 0.15))
    for fx, fy in t.freckles:
        pen.dot(fx * hx, fy, 0.012, _scale(skin, 0.62))
    if t.mole is not None:
        pen.dot(t.mole[0] * hx, t.mole[1], 0.022, (45, 28, 22))

    # Nose: identity (size); wrinkles on the bridge only for disgust.
    ns = t.nose_size
    nose_col = _scale(skin, 0.68)
    pen.line(np.array([[0.0, _EYE_Y + 0.04], [0.03 * ns, _NOSE_Y], [-0.01, _NOSE_Y + 0.015]]), nose_col, 0.018)
    for side in (-1.0, 1.0):
        pen.dot(side * 0.045 * ns, _NOSE_Y + 0.01, 0.018 * ns, nose_col)
    if ex.nose_wrinkle:
        for dy in (-0.02, 0.02):
            pen.line(np.array([[-0.06, _EYE_Y + 0.02 + dy], [0.0, _EYE_Y + 0.05 + dy], [0.06, _EYE_Y + 0.02 + dy]]),
                     _scale(skin, 0.55), 0.016)

    _draw_mouth(pen, t, ex, k)

    eye_open = 1.0 + (ex.eye_open - 1.0) * k
    lid = _darker_than((40, 25, 20), skin, 0.5)
    for side in (-1.0, 1.0):
        _draw_eye(pen, t, side * t.eye_spacing * hx, eye_open, (250, 250, 250), lid)
    if t.glasses:
        for side in (-1.0, 1.0):
            pen.ellipse(side * t.eye_spacing * hx, _EYE_Y, 0.145, 0.12, None, outline=t.glasses_frame, width=0.022)
        ex_ = t.eye_spacing * hx - 0.145
        pen.line(np.array([[-ex_, _EYE_Y - 0.02], [ex_, _EYE_Y - 0.02]]), t.glasses_frame, 0.02)

    brow = _darker_than(_scale(t.hair, 0.55), skin, 0.45)
    for side in (-1.0, 1.0):
        _draw_brow(pen, t, side, ex, k, brow)
    _draw_hair_front(pen, t)

    if factor > 1:
        img = img.resize((image_size, image_size), Image.LANCZOS)
    return _light_and_noise(np.asarray(img, dtype=np.float32), nuisance)


def _background(canvas: int, nz: Nuisance) -> Image.Image:
    """Linear two-colour gradient. Built at 64 px and upscaled: a smooth gradient needs no detail."""
    g = 64
    ys, xs = np.mgrid[0:g, 0:g].astype(np.float32) / (g - 1) - 0.5
    d = xs * math.cos(nz.background_angle) + ys * math.sin(nz.background_angle)
    w = np.clip(d + 0.5, 0, 1)[..., None]
    a = np.array(nz.background_a, np.float32)
    b = np.array(nz.background_b, np.float32)
    arr = (a * (1 - w) + b * w).astype(np.uint8)
    return Image.fromarray(arr, "RGB").resize((canvas, canvas), Image.BILINEAR)


def _light_and_noise(arr: np.ndarray, nz: Nuisance) -> np.ndarray:
    size = arr.shape[0]
    x = (np.arange(size, dtype=np.float32) / max(1, size - 1) - 0.5)[None, :, None]
    arr = (arr - 128.0) * nz.contrast + 128.0 + nz.brightness
    arr = arr * (1.0 + nz.side_light * 2 * x)
    if nz.noise_sigma > 0:
        arr = arr + np.random.default_rng(nz.noise_seed).normal(0.0, nz.noise_sigma, arr.shape).astype(np.float32)
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Data set
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticFaces:
    """A rendered set, identity-major: index = (identity * 7 + emotion) * variations + variation."""

    pixels: np.ndarray  # (N, size, size, 3) uint8 RGB
    identity: np.ndarray  # (N,) int64 in [0, num_identities)
    emotion: np.ndarray  # (N,) int64 in [0, 7), index into EMOTIONS
    identity_names: list[str]  # len num_identities, "synthetic-007"
    source: list[str]  # len N, "synthetic:seed=0:identity=3:emotion=happy:variation=2"


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def _check_size(image_size: object) -> int:
    return _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)


def identity_traits(seed: int, identity: int) -> IdentityTraits:
    """The person with this index under this seed. Depends on nothing else, so any subset of a set, or
    new variations of it, shows the same people. The seed also rotates the palette-code slots, so a
    different seed gives different people."""
    slot = (identity + seed * 17) % _CODE_SLOTS
    rng = np.random.default_rng([seed, identity, 0x1D])
    return IdentityTraits.sample(rng, slot=slot)


def image_nuisance(seed: int, identity: int, emotion: int, variation: int) -> Nuisance:
    """Nuisance of one image, seeded per image so that any image can be re-rendered alone."""
    return Nuisance.sample(np.random.default_rng([seed, identity, emotion, variation, 0x2E]))


def make_synthetic_faces(
    num_identities: int,
    variations: int,
    image_size: int,
    seed: int = 0,
    *,
    variation_offset: int = 0,
) -> SyntheticFaces:
    """Render ``num_identities`` x 7 emotions x ``variations`` faces, identity-major.

    The same arguments give the same bytes. ``variation_offset`` shifts the variation indices: with the
    same ``seed`` it renders *new* images of the *same* identities (held-out data), which is how the
    learnability tests build a test set. The first 49 identities of a seed have pairwise-separated
    palettes (skin, hair colour, hair style, iris, marks); beyond 49 only the continuous traits differ.
    """
    num_identities = _check_int("num_identities", num_identities, 1)
    variations = _check_int("variations", variations, 1)
    image_size = _check_size(image_size)
    seed = _check_int("seed", seed, 0)
    variation_offset = _check_int("variation_offset", variation_offset, 0)

    n = num_identities * NUM_EMOTIONS * variations
    pixels = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    identity = np.empty(n, dtype=np.int64)
    emotion = np.empty(n, dtype=np.int64)
    source: list[str] = []
    i = 0
    for ident in range(num_identities):
        traits = identity_traits(seed, ident)
        for emo in range(NUM_EMOTIONS):
            for var in range(variation_offset, variation_offset + variations):
                nz = image_nuisance(seed, ident, emo, var)
                pixels[i] = render_face(traits, emo, nz, image_size)
                identity[i] = ident
                emotion[i] = emo
                source.append(f"synthetic:seed={seed}:identity={ident}:emotion={EMOTIONS[emo]}:variation={var}")
                i += 1
    names = [f"synthetic-{k:03d}" for k in range(num_identities)]
    return SyntheticFaces(pixels=pixels, identity=identity, emotion=emotion, identity_names=names, source=source)
