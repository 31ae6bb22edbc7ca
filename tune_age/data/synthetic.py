"""The built-in face generator: procedural portraits saved under UTKFace-style names.

Each image shows one person of a given age. Age shows through several cues of
different subtlety, each with its own per-person noise: child head proportions
(large cranium, low eyes, round face, small nose and chin) up to about 18,
wrinkles from about 30, greying hair with a per-person onset, a receding and
thinning hairline (more for men), and skin that loses colour, gains spots and
sags with age. Skin tone, hair colour, background, lighting, pose, scale,
accessories, blur and JPEG quality vary independently of age.

Calibration (version 4): faces sit anywhere in a wide band of positions, sizes
and tilts, which a translation-invariant network (batch-norm, global average
pooling, augmentation) copes with and the original project's flatten head at
full resolution does not: it memorizes the training set and stays near the
majority-class accuracy, while a well-chosen small CNN keeps improving (see
the README's "Results on the built-in data" for the figures and commands). Files are named
`{age}_{gender}_{race}_{YYYYMMDDHHMMSSfff}.jpg.chip.jpg`, so the UTKFace loader
reads them like the real data set.

    paths = write_synthetic("faces/", n=3000, seed=0)   # the same bytes for the same seed
    folder = ensure_synthetic(n=3000, seed=0)            # cached; drawn once
    image = draw_face(34, np.random.default_rng(1))      # one 128 px PIL image

Three thousand faces at 128 px take about 20 s on two idle cores.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import DataError

log = logging.getLogger(__name__)

VERSION = 4  # bump whenever the drawing changes, so cached folders are redrawn
SUPERSAMPLE = 2  # draw at twice the size, then downscale: smooth edges for free
RACE_P = (0.42, 0.19, 0.15, 0.17, 0.07)  # UTKFace's mix: white, black, asian, indian, others
SKIN_LUMINANCE = ((0.70, 0.95), (0.22, 0.55), (0.60, 0.88), (0.40, 0.72), (0.42, 0.88))  # by race
# black, dark brown, brown, light brown, blond, red; probabilities for others and for white
HAIR = np.array([(0.07, 0.06, 0.05), (0.24, 0.16, 0.10), (0.42, 0.28, 0.16),
                 (0.62, 0.48, 0.30), (0.85, 0.74, 0.50), (0.60, 0.28, 0.12)])
HAIR_P = ((0.60, 0.30, 0.05, 0.03, 0.01, 0.01), (0.15, 0.30, 0.20, 0.15, 0.12, 0.08))
EYES = np.array([(0.25, 0.15, 0.08), (0.35, 0.25, 0.12), (0.25, 0.40, 0.55), (0.30, 0.40, 0.25)])
EYES_P = ((0.85, 0.10, 0.03, 0.02), (0.5, 0.2, 0.2, 0.1))
_DATE0 = datetime(2017, 1, 10, 12, 0, 0)
MARKER = "synthetic.json"  # written last into a folder of faces: what was drawn
_CHUNK = 50  # most images per worker task

# (probability, sampler) per component of the age mixture; see sample_ages.
_AGE_MIX = (
    (0.11, lambda r, k: np.where((x := r.gamma(1.4, 2.6, k)) < 10, x, r.uniform(0, 10, k))),
    (0.07, lambda r, k: 10 + 10 * r.beta(2.0, 1.4, k)),
    (0.45, lambda r, k: np.clip(r.normal(27.0, 5.0, k), 18, 45)),
    (0.29, lambda r, k: np.minimum(30 + r.gamma(1.6, 10.0, k), 89.9)),
    (0.07, lambda r, k: np.minimum(58 + r.gamma(2.2, 7.0, k), 99.9)),
    (0.01, lambda r, k: r.uniform(90, 101, k)),
)


def sample_ages(n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` whole-year ages shaped like UTKFace: many babies and toddlers, a peak in
    the late twenties, most adults 20-40 and a long tail to 100."""
    probs = np.array([p for p, _ in _AGE_MIX])
    comp = rng.choice(len(_AGE_MIX), size=n, p=probs / probs.sum())
    ages = np.zeros(n)
    for c, (_, sampler) in enumerate(_AGE_MIX):
        pick = comp == c
        if pick.any():
            ages[pick] = sampler(rng, int(pick.sum()))
    return np.clip(ages.astype(int), 0, 100)


# ---------------------------------------------------------------- one face


def _lerp(a, b, t):
    return a + (b - a) * t


def _ramp(x, lo, hi):
    """0 below lo, 1 above hi, linear between."""
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def _sample_look(r: np.random.Generator, gender: int, race: int) -> dict:
    """Everything about a person and a photo that does not depend on age.

    The number of draws is fixed, so two calls with equal generators give the
    same person and photo whatever the age (the tests rely on this)."""
    u = r.uniform
    male = gender == 0
    lum = u(*SKIN_LUMINANCE[race])
    skin = lum * np.array([1.0, 0.80 + u(-0.05, 0.05), 0.66 + u(-0.08, 0.06)]) + u(-0.03, 0.03, 3)
    hair = HAIR[r.choice(len(HAIR), p=HAIR_P[race == 0])]
    hair = np.clip(hair * u(0.85, 1.15), 0, 1)
    bg = np.array([c * (1 - k) + c.mean() * k for c, k in zip(u(0, 1, (2, 3)), u(0.2, 0.8, 2))])
    look = dict(
        male=male, race=race, skin=np.clip(skin, 0.05, 1.0), hair=hair,
        grey=np.full(3, u(0.72, 0.95)) + np.array([0.0, 0.0, u(-0.03, 0.03)]),
        beard_col=np.clip(hair * u(0.8, 1.2), 0, 1),
        eye_col=EYES[r.choice(len(EYES), p=EYES_P[race == 0])],
        lip=u(0.15, 0.45), clothes=u(0, 1, 3), bg=bg, bg_angle=u(0, 2 * np.pi), bg_kind=r.choice(3),
        clutter=r.integers(0, 2**31, size=1)[0],
        theta=np.clip(r.normal(0, 12.0), -28, 28), dx=u(-0.25, 0.25), dy=u(-0.16, 0.16),
        scale=u(0.62, 1.12), yaw=u(-0.12, 0.12), gaze=u(-0.25, 0.25, 2),
        long_hair=u() < (0.75 if not male else 0.12), vol=u(0.05, 0.22),
        glasses=u() < 0.2, glass_col=u(0, 0.5, 3), glass_round=u() < 0.5, tint=u(0, 60),
        hat=u() < 0.08, hat_col=u(0, 1, 3),
        earrings=u() < (0.45 if not male else 0.05), ear_col=u(0.5, 1.0, 3),
        beard=male and u() < 0.35, beard_dens=u(0.45, 1.0), moustache=u() < 0.7,
        dyed=u() < (0.10 if not male else 0.03),
        grey_onset=r.normal(38.0, 4.0), grey_span=u(10.0, 25.0),
        wrinkle_onset=r.normal(30.0, 4.0), wrinkle_k=u(0.6, 1.3),
        recede=u() < (0.65 if male else 0.15), recede_onset=r.normal(40.0, 10.0),
        sag_k=u(0.5, 1.3), sag_off=r.normal(0, 8.0), skin_off=r.normal(0, 8.0),
        spot_k=u(0.2, 1.4), freckles=u() < 0.08,
        blush=u(0, 1), brow_k=u(0.7, 1.3) * (1.3 if male else 1.0),
        prop=r.normal(0, 1, 6), light=(u(0.75, 1.2), u(0, 0.45), u(0, 2 * np.pi), u(0.7, 1.2)),
        cast=1 + r.normal(0, 0.05, 3), blur=u(0, 1.3) if u() < 0.5 else 0.0,
        noise=u(0.03, 0.11), quality=int(r.integers(60, 96)), detail=r.integers(0, 2**31, size=1)[0],
    )
    look["light"] = tuple(float(v) for v in look["light"])
    # float32 arrays and Python scalars keep every image array in float32
    return {k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
            else v.item() if isinstance(v, np.generic) else v for k, v in look.items()}


def _age_traits(age: float, p: dict) -> dict:
    """The age-dependent geometry and colours of one person `p`."""
    g = min(age, 18.0) / 18.0  # growth: 0 at birth, 1 at adulthood
    n = p["prop"] * 0.035  # per-person proportions: faces differ at any age
    old = _ramp(age + p["sag_off"], 45, 90)
    b = _lerp(1.02, 1.30, g ** 0.8) + n[0]  # head half-height; half-width is 1
    v_eye = _lerp(0.32, 0.0, g ** 0.7) * b + n[1]
    v_nose = v_eye + _lerp(0.27, 0.47, g) * b + 0.04 * old + n[2]
    v_mouth = v_nose + _lerp(0.17, 0.26, g) * b + n[3]
    grey = 0.0 if p["dyed"] else _ramp(age, p["grey_onset"], p["grey_onset"] + p["grey_span"]) ** 0.8
    rec = _ramp(age, p["recede_onset"], p["recede_onset"] + 35) if p["recede"] and age >= 18 else 0.0
    return dict(
        g=g, b=b, v_eye=v_eye, v_nose=v_nose, v_mouth=v_mouth,
        eye_dx=_lerp(0.35, 0.40, g) + n[4], eye_rx=_lerp(0.20, 0.145, g) * (1 + n[5]),
        eye_open=_lerp(0.62, 0.52, g) - 0.14 * old, nose_w=_lerp(0.10, 0.17, g) + 0.02 * old,
        mouth_w=_lerp(0.20, 0.32, g), lip=_lerp(0.07, 0.06, g) - 0.025 * old,
        taper=_lerp(0.04, 0.16, g) - 0.10 * old * p["sag_k"], jowl=0.09 * old * p["sag_k"],
        hairline=-_lerp(0.55, 0.60, g) * b - 0.45 * rec, temple=0.35 * rec + 0.15 * rec * p["male"],
        thin=0.9 * rec**1.5 if p["male"] else 0.4 * rec,
        baby_hair=_ramp(age, 0.3, 3.5), grey=grey, beard_grey=min(1.0, grey * 1.25),
        wrinkle=max(0.0, (age - p["wrinkle_onset"]) / 30.0) * p["wrinkle_k"],
        skin_age=_ramp(age + p["skin_off"], 25, 85), old=old,
        spots=max(0.0, (age - 48) / 10.0) * p["spot_k"],
    )


@lru_cache(maxsize=4)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    return x, y


def _blend(canvas: np.ndarray, color, alpha: np.ndarray) -> None:
    a = alpha[..., None]
    canvas *= 1 - a
    canvas += a * color


def _oval(U: np.ndarray, V: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse, in face units."""
    return (np.sqrt(((U - cu) / ru) ** 2 + ((V - cv) / rv) ** 2) - 1) * min(ru, rv)


def _edge(d: np.ndarray, px: float) -> np.ndarray:
    """Coverage of a shape from a signed distance (negative inside), antialiased."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def _background(p: dict, n: int) -> np.ndarray:
    x, y = _grid(n)
    t = (math.cos(p["bg_angle"]) * x + math.sin(p["bg_angle"]) * y) / n
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    c0, c1 = p["bg"]
    if p["bg_kind"] == 0:  # plain
        c1 = c0 + (c1 - c0) * 0.15
    canvas = c0 + (c1 - c0) * t[..., None]
    if p["bg_kind"] == 2:  # clutter: blurred blocks, like a room behind the person
        r = np.random.default_rng(p["clutter"])
        small = Image.fromarray((canvas[::8, ::8] * 255).astype(np.uint8))
        d = ImageDraw.Draw(small)
        m = small.size[0]
        for _ in range(r.integers(3, 9)):
            x0, y0 = r.integers(0, m, 2)
            w, h = r.integers(m // 8, m // 2, 2)
            box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
            col = tuple(int(c) for c in r.integers(0, 256, 3))
            (d.rectangle if r.uniform() < 0.6 else d.ellipse)(box, fill=col)
        small = small.filter(ImageFilter.GaussianBlur(0.8)).resize((n, n), Image.BILINEAR)
        canvas = np.asarray(small, dtype=np.float32) / 255.0
    return canvas.astype(np.float32)


def _noise(r: np.random.Generator, n: int, rows: int, cols: int) -> np.ndarray:
    """Smooth noise in [0, 1], `rows` x `cols` cells stretched over n x n pixels."""
    cells = Image.fromarray(r.integers(0, 256, (rows, cols), dtype=np.uint8))
    return np.asarray(cells.resize((n, n), Image.BILINEAR), dtype=np.float32) / 255.0


def _render(age: float, p: dict, t: dict, size: int) -> Image.Image:
    # Areas (skin, hair, background) are numpy layers with antialiased edges at the
    # final size; lines and small shapes are drawn by PIL at SUPERSAMPLE times it.
    n = size
    x, y = _grid(n)
    s = 0.29 * n * p["scale"]  # pixels per face unit; the head is 2 units wide
    cx, cy = n * (0.5 + p["dx"]), n * (0.47 + p["dy"])
    th = float(np.deg2rad(p["theta"]))
    co, si = float(np.cos(th)), float(np.sin(th))
    U = ((x - cx) * co + (y - cy) * si) / s
    V = (-(x - cx) * si + (y - cy) * co) / s
    px = 1.0 / s  # one pixel in face units

    def P(u, v):  # face units -> supersampled pixel coordinates
        return (SUPERSAMPLE * (cx + s * (u * co - v * si)), SUPERSAMPLE * (cy + s * (u * si + v * co)))

    b, yaw = t["b"], p["yaw"]
    r = np.random.default_rng(p["detail"])
    img = _background(p, n)
    skin = p["skin"] * _lerp(1.0, 0.9, t["skin_age"])
    skin = skin.mean() + (skin - skin.mean()) * _lerp(1.15, 0.72, t["skin_age"])  # babies rosy, old pale
    skin = skin + np.array([0.03, -0.01, -0.01], np.float32) * (1 - t["g"])
    strands = _noise(r, n, n // 10, n // 3)  # hair runs roughly top to bottom
    grey_mix = np.clip((t["grey"] - strands) * 2.5 + 0.5, 0, 1)[..., None] if t["grey"] > 0 else 0.0
    shine = (0.8 + 0.4 * strands)[..., None]
    hair_col = (p["hair"] * (1 - grey_mix) + p["grey"] * grey_mix) * shine
    vol = p["vol"] * (1 - 0.6 * t["thin"]) * _lerp(0.3, 1.0, t["baby_hair"])

    # clothes and long hair behind the head, then the neck and ears
    _blend(img, p["clothes"], _edge(_oval(U, V, 0, b + 1.5, 2.3, 1.0), px))
    if p["long_hair"] and t["baby_hair"] > 0.6:
        hw, hb = 1.12 + vol, b + 0.45 + vol  # a rounded box hanging behind the head
        d = (np.abs(U) / hw) ** 6 + (np.maximum(V + 0.2, 0) / hb) ** 6
        d = np.where(V < -0.2, np.sqrt((U / hw) ** 2 + ((V + 0.2) / (b - 0.1 + vol)) ** 2), d ** (1 / 6))
        _blend(img, hair_col * 0.85, _edge((d - 1) * hw, px))
    neck = np.maximum(np.abs(U - yaw * 0.3) - 0.48, np.abs(V - b - 0.3) - 0.8)
    _blend(img, skin * 0.8, _edge(neck, px))
    for side in (-1, 1):  # the far ear is partly hidden by the yaw
        eu = side * (0.97 - 0.15 * max(0.0, side * yaw))
        ev = (t["v_eye"] + t["v_nose"]) / 2
        _blend(img, skin * 0.88, _edge(_oval(U, V, eu, ev, 0.13, 0.24), px))
    # the head: an ellipse whose lower half tapers to the chin, with jowls in old age
    vb = np.clip(V / b, 0.0, 1.0)
    width = 1 - t["taper"] * vb**2 + t["jowl"] * np.exp(-(((vb - 0.8) / 0.14) ** 2))
    q = np.sqrt((U / width) ** 2 + (V / b) ** 2)
    head = _edge(q - 1, px)
    shade = 1 - 0.18 * np.clip(q, 0, 1) ** 4
    blotch = _noise(r, n, n // 6, n // 6) - 0.5
    grain = r.standard_normal((n, n), dtype=np.float32)
    tex = blotch * (0.03 + 0.12 * t["skin_age"]) + grain * (0.008 + 0.03 * t["skin_age"])
    face_col = skin * (shade + tex)[..., None]
    blush = _edge(_oval(np.abs(U), V, 0.52, t["v_nose"], 0.2, 0.14), 0.15)  # soft: cheeks
    pink = np.array([0.5, -0.12, -0.1], np.float32) * (0.10 * p["blush"] + 0.12 * (1 - t["g"]))
    _blend(img, face_col + pink * blush[..., None], head)

    # hair on top and down the sides to the sideburns, inside an outline a bit larger
    # than the head, thinning from the crown and receding from the forehead
    v_sb = t["v_eye"] + 0.05
    h0 = t["hairline"]
    au = np.abs(U)
    hl = h0 + 0.2 * U**2 + (v_sb - h0) * np.clip((au - 0.5) / 0.42, 0, 1) ** 2
    hl = hl - t["temple"] * np.exp(-(((au - 0.55) / 0.2) ** 2))
    top = np.clip((hl - V) / 0.07 + 0.5, 0, 1)
    outline = _edge((np.sqrt((U / (1 + vol)) ** 2 + ((V + 0.05) / (b + vol)) ** 2) - 1) * (1 + vol), px)
    if not p["long_hair"]:
        outline = outline * np.clip((v_sb + 0.08 - V) / 0.06, 0, 1)
    cover = outline * (1 - head * (1 - top))
    dens = 1 - t["thin"] * np.exp(-((U / 0.6) ** 2) - ((V + 0.75 * b) / 0.55) ** 2)
    dens = dens * _lerp(0.35, 1.0, t["baby_hair"]) * (0.85 + 0.3 * strands)
    _blend(img, hair_col, np.clip(cover * dens, 0, 1))
    if p["beard"] and age >= 18:
        grey_b = t["beard_grey"]
        bcol = (p["beard_col"] * (1 - grey_b) + p["grey"] * grey_b) * shine
        mu = yaw * 0.5
        chin_dip = 0.5 * np.clip(0.75 - au, 0, 1) * (au > 0.25)  # the beard rises at the cheeks
        jaw = np.clip((V - (t["v_nose"] + 0.1) - chin_dip) / 0.06, 0, 1)
        lips = np.exp(-(((U - mu) / (t["mouth_w"] * 1.05)) ** 2) - ((V - t["v_mouth"]) / 0.07) ** 2)
        beard = jaw * (1 - lips)
        if p["moustache"]:
            tache = np.exp(-(((U - mu) / 0.3) ** 4) - ((V - t["v_mouth"] + 0.1) / 0.045) ** 2)
            beard = np.maximum(beard, tache)
        _blend(img, bcol, np.clip(head * beard * p["beard_dens"] * (0.7 + 0.5 * strands), 0, 1))

    im = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    # NEAREST up, box down: the areas come back unchanged, the features antialiased
    im = im.resize((n * SUPERSAMPLE,) * 2, Image.NEAREST)
    hair_mean = (p["hair"] * (1 - t["grey"]) + p["grey"] * t["grey"])
    _draw_features(ImageDraw.Draw(im, "RGBA"), age, p, t, skin, hair_mean, P, s * SUPERSAMPLE, r)
    return _photo(im.reduce(SUPERSAMPLE), p)


def _c(rgb, a=255) -> tuple:
    return tuple(int(v) for v in np.clip(np.asarray(rgb) * 255, 0, 255)) + (int(a),)


def _draw_features(d, age, p, t, skin, hair_mean, P, s, r) -> None:
    yaw = p["yaw"]
    lw = lambda w: max(1, int(round(w * s)))  # noqa: E731 - line width in face units
    dark = skin * 0.5
    ve, vn, vm = t["v_eye"], t["v_nose"], t["v_mouth"]
    W = t["wrinkle"]

    def dot(u, v, ru, rv, col):  # a small axis-aligned ellipse; rotation is invisible at this size
        d.ellipse([*P(u - ru, v - rv), *P(u + ru, v + rv)], fill=col)

    def line(pts, col, width):
        d.line([P(u, v) for u, v in pts], fill=col, width=lw(width), joint="curve")

    def arc(u0, u1, v0, v1, bulge, k=10):
        ts = np.linspace(0, 1, k)
        return [(_lerp(u0, u1, a), _lerp(v0, v1, a) - bulge * 4 * a * (1 - a)) for a in ts]

    # age spots, freckles
    for _ in range(int(r.poisson(t["spots"]))):
        u, v = r.uniform(-0.8, 0.8), r.uniform(t["hairline"] + 0.1, vm)
        rr = r.uniform(0.015, 0.045)
        dot(u, v, rr, rr, _c(skin * 0.7 + np.array([0.02, -0.02, -0.06]), r.uniform(50, 120)))
    if p["freckles"]:
        for _ in range(25):
            u, v = r.uniform(-0.6, 0.6), r.uniform(ve + 0.1, vn + 0.1)
            dot(u, v, 0.012, 0.012, _c(skin * 0.75, 90))
    # wrinkles: count, length and darkness grow with age; where they sit is noise
    if W > 0:
        fa = lambda k: int(np.clip(k * 255, 0, 220))  # noqa: E731
        top = max(t["hairline"] + 0.08, ve - 0.75)
        for i in range(int(np.clip(round(W * 5 + r.normal(0, 0.8)), 0, 6))):
            v = _lerp(ve - 0.34, top, (i + 0.5) / 6) + r.normal(0, 0.02)
            half = min(0.7, 0.2 + 0.45 * W * r.uniform(0.6, 1.2))
            off = r.normal(0, 0.05)
            darkness = fa(0.25 + 0.6 * W * r.uniform(0.8, 1.2))
            line(arc(off - half, off + half, v, v, 0.03), _c(dark, darkness), 0.08)
        for sgn in (-1, 1):
            eu = sgn * (t["eye_dx"] + t["eye_rx"] * 1.05) + yaw * 0.3
            for _ in range(int(np.clip(round(W * 4 + r.normal(0, 0.7)), 0, 5))):
                ang = r.uniform(-0.6, 0.6)
                ln = 0.05 + 0.12 * min(W, 1.2) * r.uniform(0.6, 1.2)
                tip = (eu + sgn * ln * np.cos(ang), ve + ln * np.sin(ang))
                line([(eu, ve), tip], _c(dark, fa(0.25 + 0.6 * W)), 0.07)
            # nasolabial fold, from the nose wing past the mouth corner
            nu = sgn * (t["nose_w"] + 0.06) + yaw * 0.5
            mu = sgn * (t["mouth_w"] + 0.05) + yaw * 0.5
            ku = sgn * (t["mouth_w"] + 0.16) + yaw * 0.5  # bows outward, round the cheek
            ts = np.linspace(0, 1, 10)[:, None]
            ends = np.array([(nu, vn - 0.08), (ku, (vn + vm) / 2), (mu, vm + 0.04 + 0.08 * min(W, 1.5))])
            fold = (1 - ts) ** 2 * ends[0] + 2 * ts * (1 - ts) * ends[1] + ts**2 * ends[2]
            line(fold.tolist(), _c(dark, fa(0.2 + 0.7 * W)), 0.075)
            if W > 0.35:  # bags under the eyes
                bag = arc(eu - sgn * t["eye_rx"] * 1.8, eu - sgn * 0.02, ve + 0.12, ve + 0.10, -0.04)
                line(bag, _c(dark, fa(0.4 * W)), 0.04)
            if W > 0.55:  # marionette lines
                mu2 = sgn * t["mouth_w"] * 0.5 + yaw * 0.5
                tip = (mu2 + sgn * 0.04, vm + 0.10 + 0.12 * W)
                line([(mu2, vm + 0.03), tip], _c(dark, fa(0.4 * W)), 0.04)
    # eyebrows grey later than the hair
    brow_col = hair_mean * 0.7 + p["hair"] * 0.3
    for sgn in (-1, 1):
        eu = sgn * t["eye_dx"] + yaw * 0.3
        pts = arc(eu - sgn * 0.15, eu + sgn * 0.18, ve - 0.20, ve - 0.17, 0.05)
        line(pts, _c(brow_col * 0.8, 230), 0.035 * p["brow_k"] * _lerp(0.6, 1.0, t["g"]))
    # eyes: white, iris, pupil, then lids drawn in skin colour over the iris
    rx = t["eye_rx"]
    ry = rx * t["eye_open"]
    for sgn in (-1, 1):
        eu = sgn * t["eye_dx"] + yaw * 0.3
        ts = np.linspace(0, np.pi, 12)
        upper = [(eu - rx * np.cos(a), ve - ry * np.sin(a) * (1 - 0.2 * t["old"])) for a in ts]
        lower = [(eu + rx * np.cos(a), ve + ry * 0.8 * np.sin(a)) for a in ts]
        d.polygon([P(*q) for q in upper + lower], fill=_c([0.92, 0.9, 0.88]))
        iu, iv = eu + p["gaze"][0] * rx * 0.4, ve + p["gaze"][1] * ry * 0.2
        ri = rx * 0.55
        dot(iu, iv, ri, ri, _c(p["eye_col"]))
        dot(iu, iv, ri * 0.45, ri * 0.45, _c([0.03, 0.03, 0.03]))
        lid = skin * 0.92
        above = [(eu + rx * 1.2, ve - ry * 2.5), (eu - rx * 1.2, ve - ry * 2.5)]
        below = [(eu - rx * 1.2, ve + ry * 2.2), (eu + rx * 1.2, ve + ry * 2.2)]
        d.polygon([P(*q) for q in upper + above], fill=_c(lid))
        d.polygon([P(*q) for q in lower + below], fill=_c(skin))
        line(upper, _c([0.08, 0.06, 0.05]), 0.022)
        line(lower, _c(dark, 120), 0.01)
        if t["old"] > 0:  # a hooded lid line above the eye
            hood = arc(eu - rx, eu + rx, ve - ry - 0.03, ve - ry - 0.03, 0.03)
            line(hood, _c(dark, int(150 * t["old"])), 0.012)
    # nose and mouth
    nu = yaw * 0.55
    nw = t["nose_w"]
    line(arc(nu - nw, nu + nw, vn, vn, -0.03), _c(dark, 150), 0.018)
    line([(nu + yaw * 0.3 - 0.05, ve + 0.05), (nu - 0.04, vn - 0.12)], _c(dark, 50), 0.02)
    for sgn in (-1, 1):
        rr = nw * 0.25
        dot(nu + sgn * nw * 0.45, vn - rr * 0.1, rr, rr * 0.6, _c(dark * 0.7, 200))
    mu, mw, lip = yaw * 0.5, t["mouth_w"], t["lip"]
    lip_col = skin * (1 - p["lip"]) + np.array([0.75, 0.25, 0.28]) * p["lip"]
    droop = 0.03 * t["old"]
    up = arc(mu - mw, mu + mw, vm + droop, vm + droop, lip * 0.4)
    up = [(u, v - lip * np.sin(np.pi * k / 9)) for k, (u, v) in enumerate(up)]
    lo = arc(mu + mw, mu - mw, vm + droop, vm + droop, 0)
    lo = [(u, v + lip * 1.2 * np.sin(np.pi * k / 9)) for k, (u, v) in enumerate(lo)]
    d.polygon([P(*q) for q in up + lo], fill=_c(lip_col))
    line([(mu - mw, vm + droop)] + [(mu, vm)] + [(mu + mw, vm + droop)], _c(dark * 0.6, 230), 0.014)
    # accessories
    if p["earrings"]:
        for sgn in (-1, 1):
            eu = sgn * 0.98
            rr = 0.035
            vv = t["v_nose"] + 0.05
            d.ellipse([*P(eu - rr, vv - rr), *P(eu + rr, vv + rr)], fill=_c(p["ear_col"]))
    if p["glasses"]:
        gw, gh = rx * 1.55, rx * (1.1 if p["glass_round"] else 0.85)
        for sgn in (-1, 1):
            eu = sgn * t["eye_dx"] + yaw * 0.3
            ts = np.linspace(0, 2 * np.pi, 24)
            ring = [P(eu + gw * np.cos(a), ve + 0.01 + gh * np.sin(a)) for a in ts]
            d.polygon(ring, fill=_c([0.5, 0.5, 0.5], p["tint"]))
            d.line(ring, fill=_c(p["glass_col"]), width=lw(0.022))
            line([(eu + sgn * gw, ve), (sgn * 1.0, ve - 0.03)], _c(p["glass_col"]), 0.02)
        mid = yaw * 0.3
        bridge = [(mid - t["eye_dx"] + gw, ve), (mid, ve - 0.04), (mid + t["eye_dx"] - gw, ve)]
        line(bridge, _c(p["glass_col"]), 0.02)
    if p["hat"]:
        vb = min(t["hairline"] + 0.05, ve - 0.35)
        ts = np.linspace(0, np.pi, 16)
        dome = [((1.08 + p["vol"]) * np.cos(a), vb - (t["b"] + vb + 0.2) * np.sin(a)) for a in ts]
        d.polygon([P(*q) for q in dome], fill=_c(p["hat_col"]))
        line([(-1.1, vb), (1.1, vb)], _c(p["hat_col"] * 0.7), 0.08)


def _photo(im: Image.Image, p: dict) -> Image.Image:
    """Camera and lighting: directional light, contrast, colour cast, blur, sensor noise."""
    n = im.size[0]
    x, y = _grid(n)
    gain, grad, ang, contrast = p["light"]
    light = gain + grad * ((math.cos(ang) * x + math.sin(ang) * y) / n - 0.5)
    a = np.asarray(im, dtype=np.float32) / 255.0
    a = (a - a.mean()) * contrast + a.mean()
    a = a * light[..., None] * p["cast"]
    r = np.random.default_rng(p["detail"] + 1)
    a = a + r.standard_normal(a.shape, dtype=np.float32) * p["noise"]
    out = Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))
    if p["blur"] > 0.1:
        out = out.filter(ImageFilter.GaussianBlur(p["blur"] * n / 128))
    return out


def draw_face(age: int, rng: np.random.Generator, size: int = 128, *, gender: int | None = None,
              race: int | None = None) -> Image.Image:
    """One RGB portrait, `size` pixels square, of a person aged `age` (0-100).

    `gender` (0 male, 1 female) and `race` (0-4, UTKFace's codes) are drawn from
    `rng` when not given. All other factors come from `rng` in a fixed order, so
    the same generator state with another age shows the same person and photo,
    older or younger."""
    if not 0 <= age <= 130:
        raise ValueError(f"age {age} is outside 0-130")
    g = int(rng.integers(0, 2)) if gender is None else int(gender)
    rc = int(rng.choice(5, p=RACE_P)) if race is None else int(race)
    look = _sample_look(rng, g, rc)
    return _render(float(age), look, _age_traits(float(age), look), size)


# ---------------------------------------------------------------- many faces


def _face_file(seed: int, i: int, age: int, size: int) -> tuple[str, bytes]:
    """The name and JPEG bytes of image `i` of a seed; depends on nothing else."""
    rng = np.random.default_rng([seed, i])
    gender = int(rng.integers(0, 2))
    race = int(rng.choice(5, p=RACE_P))
    stamp = _DATE0 + timedelta(seconds=int(i) * 7, milliseconds=int(rng.integers(0, 1000)))
    name = f"{age}_{gender}_{race}_{stamp:%Y%m%d%H%M%S}{stamp.microsecond // 1000:03d}.jpg.chip.jpg"
    look = _sample_look(rng, gender, race)
    image = _render(float(age), look, _age_traits(float(age), look), size)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=look["quality"])
    return name, buf.getvalue()


def _write_chunk(args: tuple) -> list[str]:
    seed, start, ages, size, folder = args
    names = []
    for k, age in enumerate(ages):
        name, data = _face_file(seed, start + k, int(age), size)
        Path(folder, name).write_bytes(data)
        names.append(name)
    return names


def _workers(workers: int | None, n: int) -> int:
    if workers is None:
        affinity = getattr(os, "sched_getaffinity", None)
        workers = len(affinity(0)) if affinity else os.cpu_count() or 1
    return max(1, min(int(workers), -(-n // 8)))  # a pool is not worth it for a handful


def _draw_into(folder: Path, n: int, seed: int, size: int, workers: int | None) -> list[str]:
    """Draws the faces of a seed into an existing empty folder; returns the file names."""
    start = time.perf_counter()
    ages = sample_ages(n, np.random.default_rng(seed))
    procs = _workers(workers, n)
    chunk = max(1, min(_CHUNK, -(-n // (4 * procs))))  # a few tasks per process balance the load
    tasks = [(seed, a, ages[a:a + chunk], size, str(folder)) for a in range(0, n, chunk)]
    if procs == 1:
        names = [m for task in tasks for m in _write_chunk(task)]
    else:
        # fork: no re-import of the caller's __main__, which spawn would need guarded
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with multiprocessing.get_context(method).Pool(procs) as pool:
            names = [m for chunk in pool.imap(_write_chunk, tasks) for m in chunk]
    if len(set(names)) != n:
        raise RuntimeError(f"expected {n} distinct file names, got {len(set(names))}")
    decades = np.bincount(np.minimum(ages // 10, 9), minlength=10).tolist()
    info = dict(n=n, seed=seed, size=size, version=VERSION, decades=decades)
    (folder / MARKER).write_text(json.dumps(info) + "\n")
    log.info("drew %d synthetic faces (seed %d, %d px) in %.1f s with %d processes", n, seed, size,
             time.perf_counter() - start, procs)
    return names


def _temp_beside(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    return tmp


def write_synthetic(out_dir: str | os.PathLike, n: int = 3000, seed: int = 0, size: int = 128,
                    workers: int | None = None, overwrite: bool = False) -> list[Path]:
    """Draws `n` faces of `size` pixels into the folder `out_dir`; returns their paths, sorted.

    The files are the same bytes for the same `seed`, `n` and `size`, whatever
    the number of `workers` (processes; None: one per available core). Images
    are drawn into a hidden sibling folder that is renamed to `out_dir` only
    when complete, so an interrupted run never looks like a finished one.
    An existing non-empty `out_dir` is an error unless `overwrite`, which
    replaces it once the new faces are complete. A `synthetic.json` beside
    the images records what was drawn (n, seed, size, version, ages per decade).
    """
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; choose a new folder or pass overwrite")
    tmp = _temp_beside(out)
    try:
        names = _draw_into(tmp, n, seed, size, workers)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    log.info("synthetic faces are in %s", out)
    return sorted(out / m for m in names)


def _complete(folder: Path, n: int) -> bool:
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return info.get("n") == n and sum(1 for _ in folder.glob("*.jpg")) == n


def _resolve_cache_root(cache_root: str | os.PathLike | None) -> Path:
    root = cache_root or os.environ.get("TUNE_AGE_CACHE") or "~/.cache/tune_age"
    return Path(root).expanduser()


def ensure_synthetic(n: int = 3000, seed: int = 0, size: int = 128,
                     cache_root: str | os.PathLike | None = None) -> Path:
    """The folder of `n` synthetic faces for `seed`, drawn only when not cached yet.

    It is `<cache_root>/synthetic/n{n}-s{seed}-px{size}-v{VERSION}`; cache_root
    defaults to $TUNE_AGE_CACHE, else ~/.cache/tune_age. Safe when several
    processes ask at once: each draws into its own hidden folder, the first to
    finish renames it into place and the others discard theirs.
    """
    folder = _resolve_cache_root(cache_root) / "synthetic" / f"n{n}-s{seed}-px{size}-v{VERSION}"
    if _complete(folder, n):
        log.debug("synthetic faces cached in %s", folder)
        return folder
    log.info("drawing %d synthetic faces into the cache %s (once)", n, folder)
    tmp = _temp_beside(folder)
    try:
        _draw_into(tmp, n, seed, size, None)
        if _complete(folder, n):
            return folder  # another process finished first; its files are the same bytes
        if folder.exists():  # incomplete, e.g. files deleted by hand: replace it
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
