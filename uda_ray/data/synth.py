"""The embedded benchmark: a deterministic procedural street-scene generator.

It writes a *source* dataset in GTA5's on-disk layout and a *target* dataset in
Cityscapes' layout, so the default path of the platform runs through the same readers
as the real data (see /work/shared/DATA.md)::

    OUT/gta5/images/00001.png                  RGB, 480x264 (GTA5: 1914x1052, aspect 1.82)
    OUT/gta5/labels/00001.png                  mode "P", Cityscapes labelIds, labelid_palette()
    OUT/cityscapes/leftImg8bit/{train,val}/<city>/<city>_<seq>_000019_leftImg8bit.png   512x256
    OUT/cityscapes/gtFine/{train,val}/<city>/<city>_<seq>_000019_gtFine_labelIds.png    mode "L"
    OUT/synth.json                             parameters and class frequencies, written LAST

Scenes. Every image is a street seen from a car: a pinhole camera (height, focal length,
horizon row) looks down a road with lanes and markings, sidewalks with curbs, grass
strips, facades with windows along both sides (with cross streets between them),
walls, fences and hedges, a distant skyline, street lamps, traffic lights and signs on
poles, trees, pedestrians, cyclists and motorcyclists (rider + bicycle/motorcycle), parked
and moving cars, trucks, buses and trams. Objects are placed in metres on the ground
plane, projected, and painted far to near, so sizes, occlusion and class frequencies
follow from perspective the way they do in real street scenes (road, building,
vegetation and sky large; rider, motorcycle, bus and train rare). Thin things (poles,
lights, signs, bicycles, riders) have real-world sizes at the top of their range so they
stay a few pixels wide at the 256x128 training size of the target.

Domains. The source is rendered like a game engine: saturated per-class colours, clean
low-amplitude textures, hard directional shading, no cast shadows, no optics or sensor.
The target is rendered like a car-mounted camera: each ingredient of the difference is
scaled by its own knob of :class:`Shift` (0 = rendered like the source, 1 = fully
photo-like); see the field docs of :class:`Shift`. Both domains draw from the same scene
grammar; the *layout* knob moves the target's scene statistics (camera, object sizes and
counts) from the source's to Cityscapes-like ones. The native size always differs (as in
the real pair).

Calibration of the "default" regime (seed 0, default counts): a ~0.44M-parameter FCN
(conv-BN-ReLU, stride 8 with dilations 2 and 4 plus a stride-4 skip), Adam lr 2e-3 with
poly decay, batch 8, 1000 iterations, one CPU thread, cross-entropy ignoring 255; trained
on the source (resized to 320x176, random 256x128 crops) or on target train (256x128, the
oracle), evaluated on target val (logits upsampled to 512x256, one 19-class confusion
matrix). Source-only 0.381 / 0.346 mIoU vs oracle 0.678 / 0.679 (two trainer seeds):
ratio 0.56 / 0.51 (palette 0.5 with the photo knobs 0.05-0.1 higher gave 0.47 / 0.43).

Determinism. Image ``i`` of a domain draws from ``SeedSequence((seed, domain, i))`` (three
spawned streams: scene layout, appearance, sensor noise), so the output is byte-identical
for the same arguments whatever ``workers`` is, and regimes that share the layout knob
show the same scenes.

Ownership. Generated data is the user's data once written: the implicit first use inside
``train`` and ``study`` (:func:`ensure_benchmark`) generates only where there is no
benchmark yet, uses an existing one as it is (whatever its image counts), and refuses one
whose seed, regime, generator version or image sizes differ from the config's, saying what
differs; it never deletes one. Only the explicit ``uda-ray data synth --out DIR``
(:func:`generate`) replaces the benchmark it wrote there before.
"""

from __future__ import annotations

import json
import math
import numbers
import multiprocessing as mp
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, make_dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from uda_ray.data.io import DatasetError
from uda_ray.data.labels import CLASSES_19, labelid_palette, train19_to_labelid
from uda_ray.errors import UserError

SYNTH_VERSION = 1
SOURCE_SIZE = (480, 264)  # (W, H): GTA5's 1914x1052 scaled by 1/4
TARGET_SIZE = (512, 256)  # (W, H): Cityscapes' 2048x1024 scaled by 1/4
DEFAULT_N_SOURCE = 500
DEFAULT_N_TARGET = 500
DEFAULT_N_VAL = 100
TRAIN_CITIES = ("aachen", "bremen", "jena", "zurich")  # disjoint from the val cities,
VAL_CITIES = ("frankfurt", "lindau", "munster")  # as in Cityscapes
FRAME = 19  # Cityscapes' annotated frame of each sequence

# Internal label codes: the 19 train ids, plus two void codes written as labelIds.
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTO, BICYCLE) = range(19)
EGO, STATIC, VOID = 19, 20, 255  # labelIds 1 (ego vehicle), 4 (static), 0 (unlabeled)

_DOMAINS = {"source": 0, "target_train": 1, "target_val": 2}
ZMIN, ZFAR = 0.4, 260.0  # nearest / farthest drawn depth (m)


# ----------------------------------------------------------------------------- knobs
@dataclass(frozen=True)
class Shift:
    """Strength of each ingredient of the source -> target shift, each in [0, 1].

    0 renders the target like the source (game render); 1 gives the full photo-like
    version of that ingredient. Ingredients, in rendering order:

    - ``palette``: per-class colours move from saturated, warm game colours to the
      desaturated grey-green colours of an overcast European city (road, facades,
      vegetation, sky, clothing, car paints: each class its own hue shift).
    - ``texture``: class textures move from clean, low-frequency render noise to the
      fine-grained, stronger noise of real asphalt, paving, foliage and plaster, and
      window glass of varied brightness.
    - ``illumination``: hard directional shading of the render gives way to diffuse
      light with a smooth spatial exposure/colour-temperature gradient across the frame.
    - ``shadows``: cast shadows of buildings and objects on the ground (renders here
      have none), soft-edged and bluish.
    - ``blur``: optical blur (Gaussian, up to ~1.2 px at 512 px width).
    - ``noise``: sensor noise, brightness-dependent with some chroma noise.
    - ``vignette``: radial light fall-off of the lens.
    - ``tone``: the camera's tone curve: lifted blacks, compressed highlights, lower
      saturation and a slight green cast.
    - ``layout``: scene statistics move from the game's (higher camera, wider lens,
      wider roads, more sky, terrain and trucks, few pedestrians) to Cityscapes'
      (lower camera behind the windscreen with the ego hood in view, longer lens,
      dense facades, many pedestrians, cyclists, parked cars, signs).
    """

    palette: float = 0.0
    texture: float = 0.0
    illumination: float = 0.0
    shadows: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    vignette: float = 0.0
    tone: float = 0.0
    layout: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0:
                raise ValueError(f"Shift knob {f.name!r} must be a number in [0, 1], got {v!r}")
            object.__setattr__(self, f.name, float(v))


_PHOTO = dict(illumination=1.0, shadows=1.0, blur=1.0, noise=1.0, vignette=1.0, tone=1.0)
REGIMES: dict[str, Shift] = {
    "none": Shift(),  # same renderer, only the scene sample and native size differ
    "appearance": Shift(palette=1.0, texture=1.0),
    "photo": Shift(**_PHOTO),
    "layout": Shift(layout=1.0),
    "full": Shift(palette=1.0, texture=1.0, layout=1.0, **_PHOTO),
    # Calibrated on measured numbers (module docstring): a source-only model reaches ~54%
    # (51-56% over two trainer seeds) of the target-trained oracle's target-val mIoU.
    "default": Shift(palette=0.4, texture=0.5, illumination=0.35, shadows=0.35, blur=0.25,
                     noise=0.25, vignette=0.35, tone=0.35, layout=0.8),
}


def _lerp(a, b, t):
    return a + (b - a) * t


# ----------------------------------------------------------------------------- layout
# Scene statistics: (source value, target value); the layout knob mixes them linearly.
# Counts are Poisson means per image. The source is a game: higher camera and wider lens,
# wide US-style roads with a yellow edge line, more sky, open ground and trucks, few
# pedestrians. The target is a European city seen from behind the windscreen (ego hood
# in view): narrower roads lined with facades and trees, parked cars, pedestrians,
# cyclists and signs.
_LAYOUT_TABLE = dict(
    horizon=(0.49, 0.43),  # horizon row / H
    cam_height=(1.75, 1.25),  # m
    focal=(0.80, 1.05),  # focal length / W
    lanes=(3.2, 2.0),  # mean number of lanes
    lane_w=(3.7, 3.1),  # m
    p_sidewalk=(0.75, 0.95),  # per side
    sidewalk_w=(2.8, 3.4),  # m
    p_parking=(0.25, 0.6),  # parking strip, per side
    p_grass=(0.55, 0.3),  # grass strip between sidewalk and facades, per side
    p_building=(0.40, 0.62),  # side segment kinds; the rest: open ground, cross streets
    p_hedge=(0.30, 0.26),
    p_cross=(0.10, 0.06),
    building_h=((6.0, 28.0), (10.0, 22.0)),  # (min, max) m
    skyline_h=(0.10, 0.05),  # max skyline height / H
    p_wall=(0.12, 0.08),  # inner boundary segments along the sidewalk
    p_fence=(0.14, 0.12),
    cars=(4.0, 2.2),  # moving and parked vehicles
    parked=(1.5, 2.4),
    trucks=(0.45, 0.1),
    buses=(0.1, 0.06),
    trains=(0.02, 0.02),
    persons=(1.5, 6.0),
    bicycles=(0.25, 1.8),
    motorcycles=(0.5, 0.2),
    lamps=(2.0, 2.0),
    lights=(0.5, 1.2),
    signs=(0.9, 2.0),
    trees=(3.0, 5.0),
    statics=(0.2, 0.6),  # bins (labelId 4 "static", ignored in evaluation)
    hood=(0.0, 0.065),  # ego-vehicle hood height / H (labelId 1, ignored)
    p_yellow=(0.6, 0.0),  # yellow left edge line
)
_Layout = make_dataclass("_Layout", list(_LAYOUT_TABLE), frozen=True)


def _layout(t: float):
    """Scene statistics at layout knob ``t`` (0: the source's, 1: Cityscapes-like)."""
    vals = {}
    for k, (a, b) in _LAYOUT_TABLE.items():
        vals[k] = tuple(_lerp(x, y, t) for x, y in zip(a, b)) if isinstance(a, tuple) else _lerp(a, b, t)
    return _Layout(**vals)


# ----------------------------------------------------------------------------- palette
def _c(*rgb):
    return np.array(rgb, np.float32) / 255.0


# class -> (source colours, target colours); an instance picks one index and jitters it.
_PALETTE = {
    ROAD: ([_c(84, 82, 88), _c(96, 93, 92), _c(74, 74, 80)],
           [_c(112, 106, 114), _c(102, 101, 106), _c(121, 116, 119)]),
    SIDEWALK: ([_c(168, 152, 132), _c(182, 168, 150), _c(150, 142, 128)],
               [_c(132, 127, 123), _c(146, 142, 137), _c(117, 114, 112)]),
    BUILDING: ([_c(196, 160, 118), _c(168, 92, 66), _c(210, 204, 188), _c(118, 130, 156),
                _c(214, 182, 138), _c(144, 110, 86)],
               [_c(142, 137, 127), _c(122, 102, 92), _c(172, 167, 157), _c(102, 106, 112),
                _c(152, 142, 122), _c(97, 87, 82)]),
    WALL: ([_c(178, 166, 142), _c(152, 140, 122), _c(194, 188, 170)],
           [_c(137, 132, 122), _c(122, 120, 114), _c(152, 150, 142)]),
    FENCE: ([_c(124, 94, 60), _c(112, 112, 112), _c(88, 104, 78)],
            [_c(97, 92, 78), _c(102, 104, 102), _c(87, 92, 82)]),
    POLE: ([_c(72, 74, 70), _c(98, 98, 92), _c(58, 66, 58)],
           [_c(92, 94, 92), _c(112, 112, 110), _c(72, 74, 72)]),
    LIGHT: ([_c(38, 40, 26), _c(56, 56, 36)], [_c(36, 39, 36), _c(52, 54, 47)]),
    SIGN: ([_c(206, 28, 28), _c(28, 70, 186), _c(236, 202, 36), _c(238, 238, 238)],
           [_c(170, 46, 46), _c(46, 76, 140), _c(200, 180, 64), _c(200, 200, 198)]),
    VEG: ([_c(58, 124, 36), _c(82, 138, 42), _c(46, 102, 30)],
          [_c(76, 96, 52), _c(96, 106, 62), _c(62, 82, 46)]),
    TERRAIN: ([_c(146, 132, 72), _c(118, 128, 56), _c(156, 122, 78)],
              [_c(112, 116, 76), _c(102, 112, 66), _c(126, 116, 86)]),
    SKY: ([_c(64, 128, 224), _c(172, 202, 238)],  # (zenith, horizon)
          [_c(168, 184, 196), _c(206, 212, 216)]),
    PERSON: ([_c(204, 38, 38), _c(38, 58, 164), _c(232, 202, 48), _c(30, 30, 30),
              _c(240, 240, 240), _c(58, 142, 58)],
             [_c(92, 92, 97), _c(42, 42, 47), _c(122, 62, 52), _c(62, 72, 92),
              _c(172, 167, 162), _c(72, 82, 62)]),
    CAR: ([_c(184, 18, 18), _c(18, 40, 124), _c(232, 232, 232), _c(20, 20, 20),
           _c(204, 172, 28), _c(122, 122, 128), _c(38, 112, 58)],
          [_c(102, 102, 107), _c(42, 47, 57), _c(177, 177, 177), _c(26, 26, 29),
           _c(122, 112, 92), _c(82, 87, 92), _c(62, 72, 67)]),
    TRUCK: ([_c(222, 222, 216), _c(204, 88, 28), _c(58, 80, 144), _c(152, 152, 152)],
            [_c(182, 182, 177), _c(152, 92, 52), _c(72, 82, 102), _c(122, 122, 120)]),
    BUS: ([_c(204, 38, 38), _c(232, 232, 232), _c(38, 122, 204)],
          [_c(182, 62, 52), _c(192, 192, 187), _c(72, 102, 142)]),
    TRAIN: ([_c(232, 202, 38), _c(222, 222, 222), _c(182, 38, 38)],
            [_c(192, 172, 72), _c(182, 182, 177), _c(152, 62, 52)]),
    MOTO: ([_c(28, 28, 28), _c(184, 18, 18), _c(38, 38, 154)],
           [_c(37, 37, 40), _c(132, 37, 32), _c(52, 52, 102)]),
    BICYCLE: ([_c(28, 28, 28), _c(58, 58, 204), _c(204, 58, 38)],
              [_c(42, 42, 44), _c(72, 77, 112), _c(132, 62, 47)]),
}
_GLASS = (_c(88, 122, 168), _c(52, 58, 62))  # window glass (source, target)
_SKIN = (_c(222, 178, 138), _c(176, 142, 118))

# Texture amplitudes per class for (fine ~2 px, mid ~8 px, coarse ~40 px) noise octaves.
_TEX_SRC = np.full((256, 3), (0.01, 0.015, 0.02), np.float32)
_TEX_TGT = np.full((256, 3), (0.04, 0.04, 0.03), np.float32)
for _k, _s, _t in [(ROAD, (0.015, 0.02, 0.04), (0.09, 0.05, 0.06)),
                   (SIDEWALK, (0.015, 0.025, 0.03), (0.07, 0.07, 0.05)),
                   (BUILDING, (0.01, 0.02, 0.04), (0.05, 0.06, 0.07)),
                   (VEG, (0.03, 0.10, 0.10), (0.20, 0.18, 0.08)),
                   (TERRAIN, (0.03, 0.06, 0.06), (0.13, 0.10, 0.07)),
                   (SKY, (0.0, 0.0, 0.04), (0.0, 0.015, 0.07))]:
    _TEX_SRC[_k], _TEX_TGT[_k] = _s, _t


@dataclass(frozen=True)
class _Style:
    """Rendering parameters of a domain, derived from a :class:`Shift`."""

    palette: float
    texture: float
    directional: float  # strength of face shading by the sun (hard render light)
    gradient: float  # amplitude of the spatial illumination gradient
    shadow: float  # darkening inside cast shadows
    blur_sigma: float  # px at 512 px width
    noise_std: float
    vignette: float
    tone: float


def _style(s: Shift) -> _Style:
    return _Style(palette=s.palette, texture=s.texture,
                  directional=_lerp(0.32, 0.10, s.illumination), gradient=0.35 * s.illumination,
                  shadow=0.5 * s.shadows, blur_sigma=1.2 * s.blur, noise_std=0.045 * s.noise,
                  vignette=0.45 * s.vignette, tone=s.tone)


# ----------------------------------------------------------------------------- drawing
class _Canvas:
    """Image (float RGB), label and shadow layers painted together, far to near."""

    def __init__(self, w, h):
        self.w, self.h = w, h
        self.img = np.zeros((h, w, 3), np.float32)
        self.lab = np.full((h, w), VOID, np.uint8)
        self.shadow = np.zeros((h, w), np.float32)

    def fill(self, polys, color, cls=None, shadow=None):
        """Fill polygons (each (n, 2) in px); cls/shadow None leaves that layer alone."""
        pts = [np.round(np.asarray(p, np.float64) * 16).astype(np.int32) for p in polys]
        cv2.fillPoly(self.img, pts, tuple(float(c) for c in color), cv2.LINE_8, 4)
        if cls is not None:
            cv2.fillPoly(self.lab, pts, int(cls), cv2.LINE_8, 4)
        if shadow is not None:
            cv2.fillPoly(self.shadow, pts, float(shadow), cv2.LINE_8, 4)

    def blend(self, polys, color, alpha, cls, shadow=None):
        """See-through fill (mesh fences, spoked wheels): labelled fully, image mixed."""
        m = np.zeros((self.h, self.w), np.uint8)
        cv2.fillPoly(m, [np.round(np.asarray(p) * 16).astype(np.int32) for p in polys], 1,
                     cv2.LINE_8, 4)
        idx = m.astype(bool)
        self.img[idx] = self.img[idx] * (1 - alpha) + np.asarray(color, np.float32) * alpha
        self.lab[idx] = cls
        if shadow is not None:
            self.shadow[idx] = shadow

    def shade_ground(self, polys):
        """Mark a cast shadow on whatever is painted there now (the ground)."""
        cv2.fillPoly(self.shadow, [np.round(np.asarray(p) * 16).astype(np.int32) for p in polys],
                     1.0, cv2.LINE_8, 4)


class _Cam:
    """Pinhole camera over a flat ground plane: X right, Y up, Z forward (metres)."""

    def __init__(self, f, cx, yh, hc):
        self.f, self.cx, self.yh, self.hc = f, cx, yh, hc

    def p(self, X, Y, Z):
        X, Y, Z = np.broadcast_arrays(np.asarray(X, float), np.asarray(Y, float),
                                      np.maximum(np.asarray(Z, float), ZMIN))
        return np.stack([self.cx + self.f * X / Z, self.yh + self.f * (self.hc - Y) / Z], -1)

    def side(self, X, y0, y1, z0, z1):  # vertical face at constant X
        return self.p(X, [y0, y1, y1, y0], [z0, z0, z1, z1])

    def front(self, x0, x1, y0, y1, Z):  # vertical face at constant Z
        return self.p([x0, x1, x1, x0], [y0, y0, y1, y1], Z)

    def flat(self, x0, x1, z0, z1, Y=0.0):  # horizontal face at height Y
        return self.p([x0, x1, x1, x0], Y, [z0, z0, z1, z1])

    def billboard(self, X, Z, uv):
        """Local (u right, v up) metres of an upright flat object standing at (X, Z) -> px."""
        Z = max(Z, ZMIN)
        uv = np.asarray(uv, float)
        s = self.f / Z
        return np.stack([self.cx + self.f * X / Z + s * uv[..., 0],
                         self.yh + self.f * self.hc / Z - s * uv[..., 1]], -1)


def _ellipse(cx, cy, rx, ry, n=18):
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], -1)


def _rect(u0, u1, v0, v1):
    return np.array([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], float)


def _bar(p0, p1, w):
    """Quad of width w (same units) along the segment p0 -> p1."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9) * w / 2
    return np.stack([p0 + n, p1 + n, p1 - n, p0 - n])


# ----------------------------------------------------------------------------- scene
_FEATURED = (TRAIN, MOTO, BUS, TRUCK, BICYCLE, LIGHT, SIGN, WALL, FENCE, PERSON, TERRAIN, CAR)


class _Scene:
    """One image: builds the scene from the layout stream and paints it."""

    def __init__(self, w, h, lay, sty: _Style, rng, arng, featured):
        self.w, self.h, self.lay, self.sty, self.rng, self.arng = w, h, lay, sty, rng, arng
        self.featured = featured
        self.cv = _Canvas(w, h)
        r = rng
        self.cam = _Cam(f=w * lay.focal * math.exp(r.normal(0, 0.05)),
                        cx=w * (0.5 + r.normal(0, 0.03)),
                        yh=h * (lay.horizon + r.normal(0, 0.02)),
                        hc=lay.cam_height * math.exp(r.normal(0, 0.05)))
        L = r.uniform(0.5, 1.6)  # shadow length per metre of height
        az = r.uniform(0, 2 * np.pi)
        self.sun = (L * math.cos(az), L * math.sin(az))  # ground offset of a shadow per metre
        self.shadow_regions = []  # ground quads (X, Z) shaded by buildings
        self.objects = []  # (near Z, callable) painted far to near

    # -- colours -------------------------------------------------------------------
    def color(self, cls, idx=None, jitter=0.08):
        src, tgt = _PALETTE[cls]
        i = int(self.arng.integers(len(src))) if idx is None else idx
        j = math.exp(self.arng.normal(0, jitter)) * (1 + self.arng.normal(0, 0.02, 3))
        return np.clip(_lerp(src[i], tgt[i], self.sty.palette) * j, 0, 1)

    def glass(self):
        return _lerp(*_GLASS, self.sty.palette) * math.exp(self.arng.normal(0, 0.15))

    def skin(self):
        return _lerp(*_SKIN, self.sty.palette) * math.exp(self.arng.normal(0, 0.12))

    def lit(self, nx, nz, ny=0.0):
        """Render shading of a face with normal (nx, ny, nz): hard sun + ambient."""
        sx, sz = -self.sun[0], -self.sun[1]
        n = math.hypot(sx, sz)
        elev = 1.0 / math.hypot(1.0, n)  # sun direction normalised with unit height
        lam = max(0.0, (nx * sx + nz * sz) * elev + ny * elev)
        d = self.sty.directional
        return (1 - d) + 2 * d * min(lam, 1.0)

    def in_shadow(self, X, Z):
        for q in self.shadow_regions:
            c = [(q[(i + 1) % 4][0] - q[i][0]) * (Z - q[i][1]) - (q[(i + 1) % 4][1] - q[i][1]) * (X - q[i][0])
                 for i in range(4)]
            if all(v >= 0 for v in c) or all(v <= 0 for v in c):
                return 1.0
        return 0.0

    def cast(self, X0, X1, Z0, Z1, height):
        """Ground shadow of an upright box footprint [X0,X1]x[Z0,Z1] of the given height."""
        dx, dz = self.sun[0] * height, self.sun[1] * height
        pts = np.array([[X0, Z0], [X1, Z0], [X1, Z1], [X0, Z1]], float)
        hull = cv2.convexHull(np.concatenate([pts, pts + [dx, dz]]).astype(np.float32))[:, 0]
        self.cv.shade_ground([self.cam.p(hull[:, 0], 0.0, hull[:, 1])])

    # -- build ---------------------------------------------------------------------
    def build(self):
        r, lay, feat = self.rng, self.lay, self.featured
        # Road: lanes around the ego lane, optional parking strips, sidewalks, grass.
        n_lanes = int(np.clip(round(r.normal(lay.lanes, 0.8)), 1, 5))
        n_lanes = max(n_lanes, 2) if feat in (TRAIN, BUS, TRUCK) else n_lanes
        lw = lay.lane_w * r.uniform(0.92, 1.08)
        ego = int(r.integers(n_lanes))
        self.lanes, self.lw = [(j - ego) * lw for j in range(n_lanes)], lw
        left, right = -(ego + 0.5) * lw, (n_lanes - ego - 0.5) * lw
        self.park = {}
        for s in (-1, 1):
            if r.random() < lay.p_parking:
                edge = left if s < 0 else right
                self.park[s] = edge + s * 1.2
                if s < 0:
                    left -= 2.4
                else:
                    right += 2.4
        self.edge = {-1: left, 1: right}
        self.walk = {}  # side -> (inner X, outer X) of the sidewalk
        grass = {}
        for s in (-1, 1):
            has = r.random() < lay.p_sidewalk or (s == 1 and -1 not in self.walk)
            sw = lay.sidewalk_w * r.uniform(0.6, 1.4) if has else 0.0
            self.walk[s] = (self.edge[s], self.edge[s] + s * sw)
            g = r.random() < lay.p_grass or (feat == TERRAIN and s == 1)
            grass[s] = r.uniform(1.5, 6.0) if g else 0.0
        self.back = {s: self.walk[s][1] + s * grass[s] for s in (-1, 1)}
        self.occ = {}  # slot -> list of (z0, z1) taken by vehicles

        self.draw_sky_and_ground(grass)
        self.build_sides()
        self.build_vehicles()
        self.build_people()
        self.build_street_furniture()
        for _, paint in sorted(self.objects, key=lambda o: -o[0]):
            paint()
        if lay.hood > 0.002:
            self.draw_hood()

    def draw_sky_and_ground(self, grass):
        r, cam, cv, w, h = self.rng, self.cam, self.cv, self.w, self.h
        zen, hor = (_lerp(a, b, self.sty.palette) for a, b in zip(*_PALETTE[SKY]))
        t = np.clip((cam.yh - np.arange(h, dtype=np.float32)) / h, 0, 1)[:, None, None] ** 0.7
        cv.img[:] = hor * (1 - t) + zen * t
        cv.lab[:] = SKY
        # Skyline: distant blocks and tree lines standing on the horizon.
        y0 = cam.yh + cam.f * cam.hc / ZFAR
        x = 0.0
        while x < w:
            bw = w * r.uniform(0.03, 0.12)
            kind = BUILDING if r.random() < 0.7 else VEG
            top = y0 - h * self.lay.skyline_h * r.uniform(0.15, 1.0)
            col = self.color(kind) * 0.9
            if kind == BUILDING:
                cv.fill([np.array([[x, y0], [x, top], [x + bw, top], [x + bw, y0]])], col, kind, 0.0)
            else:
                xs = np.linspace(x, x + bw, 8)
                ys = top + (y0 - top) * r.uniform(0, 0.4, 8)
                cv.fill([np.concatenate([[[x, y0]], np.stack([xs, ys], -1), [[x + bw, y0]]])], col, kind, 0.0)
            x += bw
        # Ground: far terrain everywhere, then road, sidewalks with curbs, grass strips.
        cv.fill([np.array([[0, y0], [w, y0], [w, h + 1], [0, h + 1]])], self.color(TERRAIN), TERRAIN, 0.0)
        cv.fill([cam.flat(self.edge[-1], self.edge[1], ZMIN, ZFAR)], self.color(ROAD), ROAD, 0.0)
        for s in (-1, 1):
            a, b = self.walk[s]
            if a != b:
                col = self.color(SIDEWALK)
                cv.fill([cam.flat(a, b, ZMIN, ZFAR, 0.15)], col, SIDEWALK, 0.0)
                cv.fill([cam.side(a, 0.0, 0.15, ZMIN, ZFAR)], col * 1.1, SIDEWALK, 0.0)
            if grass[s] > 0:
                cv.fill([cam.flat(b, self.back[s], ZMIN, ZFAR)], self.color(TERRAIN), TERRAIN, 0.0)
        self.draw_markings()

    def draw_markings(self):
        r, cam, cv = self.rng, self.cam, self.cv
        white = np.clip(_lerp(np.array([0.92, 0.92, 0.9]), np.array([0.78, 0.78, 0.76]), self.sty.palette), 0, 1)
        yellow = np.array([0.9, 0.75, 0.2])
        polys = []
        for j in range(1, len(self.lanes)):
            x = (self.lanes[j - 1] + self.lanes[j]) / 2
            z = r.uniform(0, 9)
            for _ in range(30):
                polys.append(cam.flat(x - 0.07, x + 0.07, z, z + 3.0, 0.001))
                z += 9.0
        if polys:
            cv.fill(polys, white, ROAD)
        # Solid edge lines; the game's roads have a yellow edge line on the left.
        lc = yellow if r.random() < self.lay.p_yellow else white
        lx, rx = self.lanes[0] - self.lw / 2, self.lanes[-1] + self.lw / 2
        cv.fill([cam.flat(lx - 0.08, lx + 0.08, ZMIN, ZFAR, 0.001)], lc, ROAD)
        cv.fill([cam.flat(rx - 0.08, rx + 0.08, ZMIN, ZFAR, 0.001)], white, ROAD)
        if r.random() < 0.2:  # zebra crossing
            z = r.uniform(8, 30)
            xs = np.arange(self.edge[-1] + 0.3, self.edge[1] - 0.3, 1.0)
            cv.fill([cam.flat(x, x + 0.5, z, z + 3.5, 0.001) for x in xs], white, ROAD)

    # Sides: facades, hedges, cross streets; walls and fences in front of them.
    def build_sides(self):
        r, lay, cam, cv = self.rng, self.lay, self.cam, self.cv
        background = []
        self.crossings = []
        for s in (-1, 1):
            z = r.uniform(-10, 2)
            while z < ZFAR:
                u = r.random()
                if u < lay.p_building:
                    L = r.uniform(8, 35)
                    X = self.back[s] + s * r.uniform(0, 1.5)
                    hgt = r.uniform(*lay.building_h)
                    background.append((max(z, ZMIN), self.facade_painter(s, X, z, z + L, hgt)))
                elif u < lay.p_building + lay.p_hedge:
                    L = r.uniform(6, 25)
                    X = self.back[s] + s * r.uniform(0, 1.0)
                    tall = r.random() < 0.5
                    hgt = r.uniform(5, 11) if tall else r.uniform(1.0, 2.2)
                    background.append((max(z, ZMIN), self.hedge_painter(s, X, z, z + L, hgt)))
                elif u < lay.p_building + lay.p_hedge + lay.p_cross and z > 5:
                    L = r.uniform(10, 16)
                    self.crossings.append((s, z, z + L))
                else:
                    L = r.uniform(6, 20)  # open ground
                z += L
        # Cross streets cut the sidewalks and grass.
        for s, z0, z1 in self.crossings:
            cv.fill([cam.flat(self.edge[s], self.edge[s] + s * 80, z0, z1, 0.002)], self.color(ROAD), ROAD, 0.0)
        # Inner boundary: walls and fences along the outer edge of the sidewalk.
        inner = []
        for s in (-1, 1):
            z = r.uniform(1, 12)
            forced = self.featured in (WALL, FENCE) and s == 1
            while z < 120:
                u = r.random()
                L = r.uniform(5, 22)
                kind = None
                if forced:
                    kind, forced, z, L = self.featured, False, r.uniform(4, 12), r.uniform(8, 18)
                elif u < lay.p_wall:
                    kind = WALL
                elif u < lay.p_wall + lay.p_fence:
                    kind = FENCE
                if kind is not None and not self.crossed(s, z, z + L):
                    X = self.walk[s][1] + s * 0.15
                    inner.append((max(z, ZMIN), self.boundary_painter(kind, s, X, z, z + L)))
                z += L + r.uniform(0, 25)
        for _, paint in sorted(background, key=lambda o: -o[0]):
            paint()
        for _, paint in sorted(inner, key=lambda o: -o[0]):
            paint()

    def crossed(self, s, z0, z1):
        return any(c[0] == s and z0 < c[2] and c[1] < z1 for c in self.crossings)

    def facade_painter(self, s, X, z0, z1, hgt):
        r, cam, cv = self.rng, self.cam, self.cv
        col = self.color(BUILDING)
        floor_h, col_w = r.uniform(2.9, 3.6), r.uniform(2.4, 4.0)
        win_w, win_h = col_w * r.uniform(0.35, 0.6), floor_h * r.uniform(0.4, 0.6)
        glass = [self.glass() for _ in range(3)]
        shop = r.random() < 0.5
        # Shadow of the facade on the street when the sun is behind it.
        dx, dz = self.sun[0] * hgt, self.sun[1] * hgt
        shadow_q = None
        if dx * s < 0:
            shadow_q = [(X, z0), (X, z1), (X + dx, z1 + dz), (X + dx, z0 + dz)]
            self.shadow_regions.append(shadow_q)

        def paint():
            if shadow_q is not None:
                q = np.array(shadow_q)
                cv.shade_ground([cam.p(q[:, 0], 0.0, q[:, 1])])
            zz0 = max(z0, ZMIN)
            cv.fill([cam.front(X, X + s * 15, 0, hgt, zz0)], col * self.lit(0, -1), BUILDING, 0.0)
            cv.fill([cam.side(X, 0, hgt, zz0, z1)], col * self.lit(-s, 0), BUILDING, 0.0)
            # Windows: one fillPoly per glass shade; skip the ones too small to see.
            zc = np.arange(zz0 + col_w / 2, z1 - win_w / 2, col_w)
            yc = np.arange(1.2 + floor_h * 0.5, hgt - win_h * 0.6, floor_h)
            if len(zc) == 0 or len(yc) == 0:
                return
            Zg, Yg = np.meshgrid(zc, yc)
            Zg, Yg = Zg.ravel(), Yg.ravel()
            keep = cam.f * win_h / Zg > 2.0
            Zg, Yg = Zg[keep], Yg[keep]
            which = self.arng.integers(0, 3, len(Zg))
            for k in range(3):
                m = which == k
                if m.any():
                    zq = np.stack([Zg[m] - win_w / 2, Zg[m] - win_w / 2, Zg[m] + win_w / 2, Zg[m] + win_w / 2], 1)
                    yq = np.stack([Yg[m] - win_h / 2, Yg[m] + win_h / 2, Yg[m] + win_h / 2, Yg[m] - win_h / 2], 1)
                    g = _lerp(glass[0], glass[k], self.sty.texture)  # varied glass in photos
                    cv.fill(list(cam.p(X, yq, zq)), g * self.lit(-s, 0), BUILDING)
            if shop:
                cv.fill([cam.side(X, 0.3, 1.0 + floor_h * 0.2, zz0 + 1, z1 - 1)], glass[1] * 0.8, BUILDING)

        return paint

    def hedge_painter(self, s, X, z0, z1, hgt):
        r, cam, cv = self.rng, self.cam, self.cv
        col = self.color(VEG)
        zs = np.linspace(max(z0, ZMIN), z1, 12)
        ys = hgt * r.uniform(0.7, 1.0, 12)

        def paint():
            top = cam.p(X, ys, zs)
            bot = cam.p(X, 0.0, zs[::-1])
            cv.fill([np.concatenate([top, bot])], col * self.lit(-s, 0), VEG, 0.0)

        return paint

    def boundary_painter(self, kind, s, X, z0, z1):
        r, cam, cv = self.rng, self.cam, self.cv
        col = self.color(kind)
        hgt = r.uniform(0.9, 2.6) if kind == WALL else r.uniform(1.0, 2.0)
        if self.featured == kind:
            hgt = max(hgt, 1.8)
        sh = self.in_shadow(X, (z0 + z1) / 2)

        def paint():
            zz0 = max(z0, ZMIN)
            face = cam.side(X, 0.15, 0.15 + hgt, zz0, z1)
            if kind == WALL:
                cv.fill([face], col * self.lit(-s, 0), WALL, sh)
                cv.fill([cam.side(X, hgt, 0.15 + hgt, zz0, z1)], col * 1.15, WALL)  # coping
                cv.fill([cam.front(X, X + s * 0.3, 0.15, 0.15 + hgt, zz0)], col * self.lit(0, -1), WALL, sh)
            else:  # mesh fence: see-through but labelled, posts and rails solid
                cv.blend([face], col, 0.55, FENCE, sh)
                zp = np.arange(zz0, z1, 2.0)
                cv.fill([cam.side(X, 0.15, 0.15 + hgt, z, z + 0.1) for z in zp], col * 0.7, FENCE, sh)
                cv.fill([cam.side(X, 0.1 + hgt, 0.2 + hgt, zz0, z1)], col * 0.8, FENCE, sh)

        return paint

    # Vehicles in lanes (moving) and parking strips (parked).
    def slot_free(self, slot, z0, z1):
        return all(z1 + 1.5 < a or b + 1.5 < z0 for a, b in self.occ.get(slot, []))

    def place(self, kind, force=False):
        r = self.rng
        dims = {CAR: (1.8, 4.4), TRUCK: (2.5, 9.0), BUS: (2.55, 12.0), TRAIN: (2.65, 26.0)}
        wdt, length = dims[kind]
        length *= r.uniform(0.9, 1.1)
        for _ in range(8):
            parked = kind != TRAIN and self.park and r.random() < (0.8 if kind == CAR else 0.15) * (
                self.lay.parked / (self.lay.parked + self.lay.cars))
            if parked:
                s = list(self.park)[int(r.integers(len(self.park)))]
                slot, X = ("park", s), self.park[s]
            else:
                j = int(r.integers(len(self.lanes)))
                if kind == TRAIN and len(self.lanes) > 1 and j == self.lanes.index(0.0):
                    j = (j + 1) % len(self.lanes)
                slot, X = ("lane", j), self.lanes[j] + r.normal(0, 0.25)
            z0 = (r.uniform(6, 22) if kind == CAR else r.uniform(18, 45)) if force else 5.0 + r.exponential(22.0)
            if slot == ("lane", self.lanes.index(0.0)):
                z0 = max(z0, 7.0)
            if z0 < 90 and self.slot_free(slot, z0, z0 + length):
                self.occ.setdefault(slot, []).append((z0, z0 + length))
                oncoming = not parked and X < -self.lw / 2 and r.random() < 0.8
                self.objects.append((z0, self.vehicle_painter(kind, X, z0, wdt, length, oncoming)))
                return True
        return False

    def build_vehicles(self):
        r, lay, f = self.rng, self.lay, self.featured
        for kind, lam in ((TRAIN, lay.trains), (BUS, lay.buses), (TRUCK, lay.trucks)):
            n = r.poisson(lam) + (f == kind)
            for i in range(n):
                self.place(kind, force=(i == 0 and f == kind))
        for i in range(r.poisson(lay.cars + lay.parked) + (f == CAR)):
            self.place(CAR, force=(i == 0 and f == CAR))

    def vehicle_painter(self, kind, X, z0, wdt, length, oncoming):
        r, cam, cv = self.rng, self.cam, self.cv
        col = self.color(kind)
        glass = self.glass()
        sh = self.in_shadow(X, z0 + length / 2)
        x0, x1 = X - wdt / 2, X + wdt / 2
        if kind == CAR:
            hgt = r.uniform(1.35, 1.6)
            boxes = [(0.3, 0.95, z0, z0 + length, 0.0), (0.95, hgt, z0 + 1.1, z0 + length - 1.1, 0.1)]
        elif kind == TRUCK:
            hgt = r.uniform(3.0, 3.8)
            zc = z0 if oncoming else z0 + length - 2.3  # the cab leads
            zl = z0 + 2.5 if oncoming else z0
            boxes = [(0.8, hgt, zl, zl + length - 2.5, 0.0), (0.6, hgt * 0.8, zc, zc + 2.3, 0.0)]
        else:
            hgt = r.uniform(3.0, 3.3) if kind == BUS else r.uniform(3.3, 3.7)
            boxes = [(0.35, hgt, z0, z0 + length, 0.0)]
        rw = {CAR: 0.33, TRUCK: 0.5, BUS: 0.5, TRAIN: 0.4}[kind]  # wheel radius
        cargo_col = self.color(TRUCK, jitter=0.05) if kind == TRUCK else col
        light = np.array([0.95, 0.92, 0.8]) if oncoming else np.array([0.75, 0.08, 0.06])
        dark = np.array([0.07, 0.07, 0.07])

        def box(y0, y1, za, zb, inset, c):
            xa, xb = x0 + inset, x1 - inset
            if xa > 0:  # the left face is visible
                cv.fill([cam.side(xa, y0, y1, za, zb)], c * self.lit(-1, 0), kind, sh)
            elif xb < 0:
                cv.fill([cam.side(xb, y0, y1, za, zb)], c * self.lit(1, 0), kind, sh)
            if y1 < cam.hc:
                cv.fill([cam.flat(xa, xb, za, zb, y1)], c * self.lit(0, 0, 1), kind, sh)

        def wheels(zs):
            xs = x0 if x0 > 0 else x1 if x1 < 0 else None
            polys = []
            for zw in zs:
                a = np.linspace(0, 2 * np.pi, 14, endpoint=False)
                if xs is not None:
                    polys.append(cam.p(xs, rw + rw * np.sin(a), zw + rw * np.cos(a)))
                polys.append(cam.front(x0 + 0.08, x0 + 0.4, 0.0, 1.6 * rw, zw))
                polys.append(cam.front(x1 - 0.4, x1 - 0.08, 0.0, 1.6 * rw, zw))
            cv.fill(polys, dark, kind, sh)

        def paint():
            self.cast(x0, x1, z0, z0 + length, hgt)
            cv.fill([cam.front(x0 + 0.2, x1 - 0.2, 0.0, 0.8, z0 + 0.5)], dark * 1.5, kind, sh)  # underbody
            wheels([z0 + length - 0.9])
            for i, (y0, y1, za, zb, inset) in enumerate(sorted(boxes, key=lambda b: -b[2])):
                c = cargo_col if (kind == TRUCK and y1 == hgt) else col
                box(y0, y1, za, zb, inset, c)
                if kind in (BUS, TRAIN):  # window band along the side
                    xs = x0 if x0 > 0 else x1 if x1 < 0 else None
                    if xs is not None:
                        cv.fill([cam.side(xs, 1.2, hgt - 0.5, za + 0.8, zb - 0.8)], glass, kind)
                if kind == CAR and i == 0:
                    xs = x0 + 0.08 if x0 > 0 else x1 - 0.08 if x1 < 0 else None
                    if xs is not None:
                        cv.fill([cam.side(xs, 1.02, hgt - 0.08, za + 0.2, zb - 0.2)], glass, kind)
            wheels([z0 + 0.9])
            for y0, y1, za, zb, inset in sorted(boxes, key=lambda b: -b[2]):
                c = cargo_col if (kind == TRUCK and y1 == hgt) else col
                cv.fill([cam.front(x0 + inset, x1 - inset, y0, y1, za)], c * self.lit(0, -1), kind, sh)
            # Rear/front details on the nearest face.
            if kind == CAR:
                cv.fill([cam.front(x0 + 0.2, x1 - 0.2, 1.0, hgt - 0.08, z0 + 1.1)], glass, kind)
                cv.fill([cam.front(x0 + 0.1, x0 + 0.45, 0.65, 0.82, z0),
                         cam.front(x1 - 0.45, x1 - 0.1, 0.65, 0.82, z0)], light, kind)
            elif kind in (BUS, TRAIN) or (kind == TRUCK and oncoming):
                top = hgt * 0.8 if kind == TRUCK else hgt - 0.3
                cv.fill([cam.front(x0 + 0.15, x1 - 0.15, top - 1.1, top - 0.1, z0)], glass, kind)
                cv.fill([cam.front(x0 + 0.15, x0 + 0.45, 0.7, 0.95, z0),
                         cam.front(x1 - 0.45, x1 - 0.15, 0.7, 0.95, z0)], light, kind)
            if kind == TRAIN:  # pantograph
                arm = _bar(cam.p(X, hgt, z0 + 8), cam.p(X + 0.6, hgt + 1.2, z0 + 9), max(1.0, cam.f * 0.08 / z0))
                cv.fill([arm], col * 0.4, TRAIN)

        return paint

    # People: pedestrians on sidewalks (some crossing), cyclists and motorcyclists.
    def side_spot(self, s):
        a, b = self.walk[s]
        if a == b:
            a, b = self.edge[s], self.edge[s] + s * 1.5
        return a + (b - a) * self.rng.uniform(0.2, 0.9)

    def build_people(self):
        r, lay, f = self.rng, self.lay, self.featured
        n = r.poisson(lay.persons) + (f == PERSON)
        for i in range(n):
            s = 1 if r.random() < 0.5 else -1
            if r.random() < 0.12:
                X = r.uniform(self.edge[-1], self.edge[1])  # crossing the road
            else:
                X = self.side_spot(s)
            Z = r.uniform(6, 18) if (i == 0 and f == PERSON) else 3.0 + r.exponential(18.0)
            self.objects.append((Z, self.person_painter(X, Z)))
        for kind, lam in ((BICYCLE, lay.bicycles), (MOTO, lay.motorcycles)):
            for i in range(r.poisson(lam) + (f == kind)):
                forced = i == 0 and f == kind
                ridden = forced or r.random() < (0.45 if kind == BICYCLE else 0.7)
                s = 1 if r.random() < 0.6 else -1
                if ridden:
                    X = self.edge[s] - s * r.uniform(0.6, 1.4)
                else:
                    X = self.side_spot(s)
                Z = r.uniform(6, 16) if forced else 4.0 + r.exponential(16.0)
                self.objects.append((Z, self.cycle_painter(kind, X, Z, ridden)))

    def person_painter(self, X, Z, scale=None):
        r, cam, cv = self.rng, self.cam, self.cv
        h = r.uniform(1.55, 1.95) if scale is None else scale
        top, legs, skin = self.color(PERSON), self.color(PERSON), self.skin()
        hair = np.array([0.1, 0.08, 0.06]) * math.exp(r.normal(0, 0.5))
        a = r.uniform(0, 0.13) * h
        swing = r.uniform(-0.08, 0.08) * h
        sh = self.in_shadow(X, Z)

        def paint():
            self.cast(X - 0.25, X + 0.25, Z - 0.15, Z + 0.15, h)
            uv = lambda pts: cam.billboard(X, Z, np.asarray(pts) * h)  # noqa: E731
            lw = 0.085
            cv.fill([uv(_bar((-0.05, 0.48), (-a / h, 0.0), lw)), uv(_bar((0.05, 0.48), (a / h, 0.0), lw))],
                    legs, PERSON, sh)
            cv.fill([uv([(-0.12, 0.46), (0.12, 0.46), (0.14, 0.81), (-0.14, 0.81)])], top, PERSON, sh)
            cv.fill([uv(_bar((-0.14, 0.79), (-0.17 - swing / h, 0.45), 0.06)),
                     uv(_bar((0.14, 0.79), (0.17 + swing / h, 0.45), 0.06))], top * 0.85, PERSON, sh)
            cv.fill([uv(_ellipse(0, 0.885, 0.062, 0.075))], skin, PERSON, sh)
            cv.fill([uv(_ellipse(0, 0.925, 0.066, 0.04))], hair, PERSON, sh)

        return paint

    def cycle_painter(self, kind, X, Z, ridden):
        r, cam, cv = self.rng, self.cam, self.cv
        col = self.color(kind)
        d = (1 if r.random() < 0.5 else -1) * r.uniform(0.45, 1.0)  # facing and foreshortening
        moto = kind == MOTO
        rw, hub = (0.32, 0.72) if moto else (0.35, 0.53)
        clothes, skin = self.color(PERSON), self.skin()
        helmet = self.color(MOTO) if moto else skin
        sh = self.in_shadow(X, Z)

        def paint():
            self.cast(X - 1.0 * abs(d), X + 1.0 * abs(d), Z - 0.3, Z + 0.3, 1.6 if ridden else 1.0)
            uv = lambda pts: cam.billboard(X, Z, np.asarray(pts, float) * [d, 1.0])  # noqa: E731
            wheels = [uv(_ellipse(x, rw, rw, rw, 20)) for x in (-hub, hub)]
            tyre = np.array([0.07, 0.07, 0.07])
            if moto:
                cv.fill(wheels, tyre, MOTO, sh)
                cv.fill([uv(_ellipse(x, rw, rw * 0.45, rw * 0.45)) for x in (-hub, hub)], col * 0.6 + 0.25, MOTO)
                cv.fill([uv([(-0.8, 0.55), (-0.35, 0.95), (0.3, 1.0), (0.62, 0.88), (0.68, 0.5),
                             (0.2, 0.28), (-0.45, 0.35)])], col, MOTO, sh)
                cv.fill([uv(_bar((0.55, 0.85), (0.62, 1.15), 0.07))], tyre, MOTO, sh)
            else:  # spoked wheels are see-through but labelled, the tyre and frame solid
                cv.blend(wheels, tyre, 0.35, BICYCLE, sh)
                rings = [np.concatenate([_ellipse(x, rw, rw, rw, 20), _ellipse(x, rw, rw - 0.06, rw - 0.06, 20)[::-1]])
                         for x in (-hub, hub)]
                cv.fill([uv(p) for p in rings], tyre, BICYCLE, sh)
                frame = [((-hub, rw), (-0.1, 0.9)), ((-0.1, 0.9), (0.4, 0.9)), ((-hub, rw), (0.05, rw)),
                         ((0.05, rw), (-0.1, 0.9)), ((0.05, rw), (0.4, 0.9)), ((0.4, 0.9), (hub, rw)),
                         ((0.4, 0.9), (0.45, 1.05))]
                cv.fill([uv(_bar(a, b, 0.07)) for a, b in frame], col, BICYCLE, sh)
                cv.fill([uv(_bar((-0.22, 0.93), (0.0, 0.93), 0.07)), uv(_bar((0.35, 1.05), (0.55, 1.05), 0.07))],
                        tyre, BICYCLE, sh)
            if ridden:
                seat = (-0.1, 0.98) if moto else (-0.1, 0.95)
                shoulder = (0.15, 1.5) if moto else (0.12, 1.52)
                hand = (0.58, 1.12) if moto else (0.5, 1.06)
                foot = (0.1, 0.42) if moto else (0.05, 0.38)
                cv.fill([uv(_bar(seat, (0.25, 0.65), 0.14)), uv(_bar((0.25, 0.65), foot, 0.12))],
                        clothes * 0.6, RIDER, sh)
                torso = [(seat[0] - 0.12, seat[1]), (seat[0] + 0.12, seat[1]),
                         (shoulder[0] + 0.12, shoulder[1]), (shoulder[0] - 0.13, shoulder[1])]
                cv.fill([uv(torso)], clothes, RIDER, sh)
                cv.fill([uv(_bar(shoulder, hand, 0.09))], clothes * 0.85, RIDER, sh)
                hr = 0.14 if moto else 0.11
                cv.fill([uv(_ellipse(shoulder[0] + 0.05, shoulder[1] + 0.17, hr, hr * 1.1))], helmet, RIDER, sh)

        return paint

    # Street furniture: lamps, traffic lights and signs on poles, trees, bins.
    def build_street_furniture(self):
        r, lay, f = self.rng, self.lay, self.featured
        for _ in range(r.poisson(lay.lamps)):
            s = 1 if r.random() < 0.5 else -1
            self.add_pole(s, 4.0 + r.exponential(22.0), "lamp")
        zc = [c[1] for c in self.crossings if c[1] < 60]
        for i in range(r.poisson(lay.lights) + (f == LIGHT)):
            s = 1 if r.random() < 0.6 else -1
            if i == 0 and f == LIGHT:
                Z = r.uniform(8, 20)
            else:  # the first two stand at cross streets when there are any
                Z = zc[i % len(zc)] - 0.5 if zc and i < 2 else 6.0 + r.exponential(22.0)
            self.add_pole(s, Z, "light")
        for i in range(r.poisson(lay.signs) + (f == SIGN)):
            s = 1 if r.random() < 0.75 else -1
            Z = r.uniform(7, 18) if (i == 0 and f == SIGN) else 4.0 + r.exponential(20.0)
            self.add_pole(s, Z, "sign")
        for _ in range(r.poisson(lay.trees)):
            s = 1 if r.random() < 0.5 else -1
            Z = 4.0 + r.exponential(25.0)
            a, b = self.walk[s]
            X = b + s * r.uniform(-1.0, 2.0) if a != b else self.edge[s] + s * 2.0
            self.objects.append((Z, self.tree_painter(X, Z)))
        for _ in range(r.poisson(lay.statics)):
            s = 1 if r.random() < 0.5 else -1
            Z = 4.0 + r.exponential(15.0)
            X = self.side_spot(s)
            self.objects.append((Z, self.static_painter(X, Z)))

    def add_pole(self, s, Z, what):
        r = self.rng
        X = self.edge[s] + s * r.uniform(0.4, 0.9)
        pw = r.uniform(0.2, 0.32)
        col = self.color(POLE)
        if what == "lamp":
            hgt, arm = r.uniform(6, 9), r.uniform(1.0, 2.0)
        elif what == "light":
            over = r.random() < 0.35  # mast arm over the road
            hgt = 5.6 if over else r.uniform(3.2, 4.2)
            arm = r.uniform(2.5, 5.0) if over else 0.0
        else:
            hgt = r.uniform(2.6, 3.4)
            arm = 0.0
        extra = self.light_spec() if what == "light" else self.sign_spec() if what == "sign" else None
        sh = self.in_shadow(X, Z)
        cam, cv = self.cam, self.cv

        def paint():
            self.cast(X - pw / 2, X + pw / 2, Z - 0.1, Z + 0.1, hgt)
            cv.fill([cam.billboard(X, Z, _rect(-pw / 2, pw / 2, 0, hgt))], col, POLE, sh)
            tip = (-s * arm, hgt)
            if arm:
                cv.fill([cam.billboard(X, Z, _bar((0, hgt - 0.2), tip, 0.16))], col, POLE, sh)
            if what == "lamp":
                cv.fill([cam.billboard(X, Z, _ellipse(tip[0], hgt - 0.25, 0.4, 0.15))], col * 1.2, POLE, sh)
            elif what == "light":
                self.paint_light(X, Z, tip[0], hgt - 0.05 if not arm else hgt - 0.1, extra, sh)
            else:
                self.paint_sign(X, Z, hgt, extra, sh)

        self.objects.append((Z, paint))

    def light_spec(self):
        r = self.rng
        return dict(w=r.uniform(0.42, 0.55), h=r.uniform(1.05, 1.3), front=r.random() < 0.7,
                    lamp=int(r.integers(3)), plate=r.random() < 0.5, col=self.color(LIGHT))

    def paint_light(self, X, Z, u, top, sp, sh):
        cam, cv = self.cam, self.cv
        w, h = sp["w"], sp["h"]
        if sp["plate"]:
            plate = _rect(u - w * 0.8, u + w * 0.8, top - h * 1.05, top + 0.05)
            cv.fill([cam.billboard(X, Z, plate)], sp["col"] * 1.3, LIGHT, sh)
        cv.fill([cam.billboard(X, Z, _rect(u - w / 2, u + w / 2, top - h, top))], sp["col"], LIGHT, sh)
        if sp["front"]:
            lamps = [np.array([0.95, 0.15, 0.1]), np.array([0.95, 0.7, 0.1]), np.array([0.2, 0.9, 0.45])]
            for k in range(3):
                c = lamps[k] if k == sp["lamp"] else sp["col"] * 2.0
                lamp = _ellipse(u, top - h * (k + 0.5) / 3, w * 0.33, w * 0.33, 12)
                cv.fill([cam.billboard(X, Z, lamp)], c, LIGHT)

    def sign_spec(self):
        r = self.rng
        shape = ["circle", "triangle", "rect", "diamond"][int(r.integers(4))]
        i = int(r.integers(4))
        return dict(shape=shape, size=r.uniform(0.75, 1.0), face=self.color(SIGN, idx=i),
                    inner=self.color(SIGN, idx=3 if i != 3 else 1), front=r.random() < 0.8,
                    back=self.color(POLE) * 1.1)

    def paint_sign(self, X, Z, top, sp, sh):
        cam, cv = self.cam, self.cv
        sz = sp["size"]
        cy = top - sz / 2
        if sp["shape"] == "circle":
            outer, inner = _ellipse(0, cy, sz / 2, sz / 2, 20), _ellipse(0, cy, sz * 0.32, sz * 0.32, 20)
        elif sp["shape"] == "triangle":
            outer = np.array([(-sz / 2, cy - sz * 0.4), (sz / 2, cy - sz * 0.4), (0, cy + sz * 0.5)])
            inner = np.array([(-sz * 0.28, cy - sz * 0.26), (sz * 0.28, cy - sz * 0.26), (0, cy + sz * 0.24)])
        elif sp["shape"] == "rect":
            outer = _rect(-sz * 0.45, sz * 0.45, cy - sz * 0.5, cy + sz * 0.5)
            inner = _rect(-sz * 0.33, sz * 0.33, cy - sz * 0.38, cy + sz * 0.38)
        else:
            outer = np.array([(0, cy - sz / 2), (sz / 2, cy), (0, cy + sz / 2), (-sz / 2, cy)])
            inner = np.array([(0, cy - sz / 3), (sz / 3, cy), (0, cy + sz / 3), (-sz / 3, cy)])
        if sp["front"]:
            cv.fill([cam.billboard(X, Z, outer)], sp["face"], SIGN, sh)
            cv.fill([cam.billboard(X, Z, inner)], sp["inner"], SIGN)
        else:
            cv.fill([cam.billboard(X, Z, outer)], sp["back"], SIGN, sh)

    def tree_painter(self, X, Z):
        r, cam, cv = self.rng, self.cam, self.cv
        th, tw = r.uniform(2.0, 3.5), r.uniform(0.3, 0.5)
        R = r.uniform(1.5, 3.5)
        blobs = [(r.normal(0, R * 0.45), th + R * r.uniform(0.5, 1.3), R * r.uniform(0.5, 0.9))
                 for _ in range(int(r.integers(3, 7)))]  # canopy
        col = self.color(VEG)
        shades = [math.exp(self.arng.normal(0, 0.12)) for _ in blobs]
        trunk = np.array([0.32, 0.25, 0.18]) * (0.8 + 0.2 * self.sty.palette)
        sh = self.in_shadow(X, Z)

        def paint():
            self.cast(X - R, X + R, Z - R * 0.5, Z + R * 0.5, th + R)
            stem = [(-tw / 2, 0), (tw / 2, 0), (tw / 3, th + R), (-tw / 3, th + R)]
            cv.fill([cam.billboard(X, Z, stem)], trunk, VEG, sh)
            for (u, v, rr), k in zip(blobs, shades):
                cv.fill([cam.billboard(X, Z, _ellipse(u, v, rr, rr * 0.85, 16))], col * k, VEG, sh)

        return paint

    def static_painter(self, X, Z):
        cam, cv = self.cam, self.cv
        col = np.array([0.25, 0.3, 0.25]) * math.exp(self.arng.normal(0, 0.3))

        def paint():
            cv.fill([cam.billboard(X, Z, _rect(-0.3, 0.3, 0, 1.1))], col, STATIC, 0.0)

        return paint

    def draw_hood(self):
        """Cityscapes' ego vehicle: the bonnet at the bottom of every frame (labelId 1)."""
        w, h, cv = self.w, self.h, self.cv
        hh = self.lay.hood * h
        xs = np.linspace(-1, 1, 33)
        top = h - hh * (1 - 0.55 * xs ** 2)
        pts = np.concatenate([np.stack([(xs + 1) * w / 2, top], -1), [[w, h + 1], [0, h + 1]]])
        cv.fill([pts], np.array([0.12, 0.12, 0.13]), EGO, 0.0)
        ys = np.arange(h)
        band = np.clip((ys - (h - hh)) / max(hh, 1), 0, 1)[:, None]  # sky reflection fades downwards
        m = cv.lab == EGO
        refl = (0.25 * (1 - band) * np.ones((1, w)))[..., None] * np.array([0.8, 0.85, 0.9])
        cv.img[m] += refl[m]


# ----------------------------------------------------------------------------- photo
def _octave(rng, h, w, cell):
    g = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    big = cv2.resize(g, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_CUBIC)
    return big[cell:cell + h, cell:cell + w]


def _finish(cv: _Canvas, sty: _Style, arng, nrng, w) -> np.ndarray:
    """Textures, light, optics, sensor and tone: albedo canvas -> uint8 RGB."""
    h = cv.h
    img, lab = cv.img, cv.lab
    # 1. Class textures: three noise octaves weighted per class (render -> photo).
    tex = _lerp(_TEX_SRC, _TEX_TGT, sty.texture)[lab]  # (h, w, 3)
    oct_ = np.stack([_octave(arng, h, w, c) for c in (2, 8, 40)], -1)
    img *= (1.0 + (tex * oct_).sum(-1))[..., None]
    # 2. Illumination: smooth exposure / colour-temperature gradient across the frame.
    if sty.gradient > 0:
        a = arng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = ((xx / w - 0.5) * math.cos(a) + (yy / h - 0.5) * math.sin(a))
        warm = arng.normal(0, 1)
        gain = 1.0 + sty.gradient * ramp + 0.3 * sty.gradient * _octave(arng, h, w, 64)
        img *= gain[..., None]
        img *= np.array([1 + 0.08 * sty.gradient * warm, 1.0, 1 - 0.08 * sty.gradient * warm], np.float32)
    # 3. Cast shadows: soft-edged, darker and bluish (lit by the sky only).
    if sty.shadow > 0:
        sh = cv2.GaussianBlur(cv.shadow, (0, 0), max(0.6, w / 512))
        img *= (1.0 - sty.shadow * sh[..., None] * np.array([1.0, 0.95, 0.82], np.float32))
    # 4. Lens: vignetting, then blur.
    if sty.vignette > 0:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) / 0.5
        img *= (1.0 - sty.vignette * r2)[..., None]
    if sty.blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), sty.blur_sigma * w / 512)
    # 5. Sensor noise: shot-noise-like (grows with brightness) plus a little chroma noise.
    if sty.noise_std > 0:
        lum = np.clip(img.mean(-1, keepdims=True), 0, 1)
        n = nrng.standard_normal((h, w, 1), dtype=np.float32) * (0.5 + 0.5 * np.sqrt(lum))
        c = nrng.standard_normal((h, w, 3), dtype=np.float32) * 0.35
        img = img + sty.noise_std * (n + c)
    # 6. Tone: lifted blacks, compressed highlights, less saturation, slight green cast.
    img = np.clip(img, 0, 1)
    if sty.tone > 0:
        y = 0.05 + 0.9 * img ** 1.1
        y = y - 0.08 * np.maximum(y - 0.75, 0) ** 2 * 4
        g = y.mean(-1, keepdims=True)
        y = (g + 0.8 * (y - g)) * np.array([0.96, 1.0, 0.94], np.float32)
        img = _lerp(img, y, sty.tone)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- jobs
_JOB: dict = {}  # per-process job settings (set by _init_worker)


def _label_lut():
    """Internal code -> Cityscapes labelId (void -> 0 unlabeled)."""
    lut = np.zeros(256, np.uint8)
    lut[:19] = train19_to_labelid()
    lut[EGO], lut[STATIC] = 1, 4
    return lut


def render(seed: int, domain: str, index: int, shift: Shift) -> tuple[np.ndarray, np.ndarray]:
    """One image and its internal label map (train ids; 19 ego, 20 static, 255 void).

    ``domain`` is "source", "target_train" or "target_val"; the source ignores ``shift``.
    """
    code = _DOMAINS[domain]
    ss = np.random.SeedSequence((seed, code, index))
    rng, arng, nrng = (np.random.default_rng(s) for s in ss.spawn(3))
    if code == 0:
        (w, h), lay, sty = SOURCE_SIZE, _layout(0.0), _style(Shift())
    else:
        (w, h), lay, sty = TARGET_SIZE, _layout(shift.layout), _style(shift)
    scene = _Scene(w, h, lay, sty, rng, arng, _FEATURED[(index + 5 * code) % len(_FEATURED)])
    scene.build()
    return _finish(scene.cv, sty, arng, nrng, w), scene.cv.lab


def _paths(out: Path, domain: str, index: int) -> tuple[Path, Path]:
    if domain == "source":
        name = f"{index + 1:05d}.png"
        return out / "gta5" / "images" / name, out / "gta5" / "labels" / name
    split, cities = ("train", TRAIN_CITIES) if domain == "target_train" else ("val", VAL_CITIES)
    city = cities[index % len(cities)]
    stem = f"{city}_{index // len(cities):06d}_{FRAME:06d}"
    return (out / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
            out / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


def _init_worker(job):
    cv2.setNumThreads(0)  # sequential OpenCV: no thread pool inherited across fork
    _JOB.clear()
    _JOB.update(job)


def _work(task):
    domain, index = task
    img, lab = render(_JOB["seed"], domain, index, _JOB["shift"])
    ip, lp = _paths(_JOB["out"], domain, index)
    Image.fromarray(img).save(ip, compress_level=1)
    ids = _JOB["lut"][lab]
    if domain == "source":
        im = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
        im.putpalette(_JOB["palette"])
    else:
        im = Image.frombytes("L", (ids.shape[1], ids.shape[0]), ids.tobytes())
    im.save(lp, compress_level=1)
    counts = np.bincount(lab.ravel(), minlength=256)
    return domain, np.append(counts[:19], counts[19:].sum())


# ----------------------------------------------------------------------------- API
class SynthArgumentError(UserError, ValueError):
    """A bad argument of the generator (unknown regime, a count < 1, ...)."""


# What the generator writes in its folder; a folder holding anything else is not the benchmark's.
# ``pretrain``: the embedded pretraining domain that ``uda-ray data synth --pretrain`` writes
# beside the benchmark (and earlier versions' first-use weights cache), kept by a regeneration.
OWN_ENTRIES = ("gta5", "cityscapes", "synth.json", ".synth_partial", "pretrain")


def _check_own_folder(out: Path) -> None:
    """Refuse to write into a folder that holds anything the generator did not write: the
    benchmark's folders are recognised by its marker files (``synth.json`` when complete,
    ``.synth_partial`` while or if interrupted while writing). Nothing is deleted here."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder; the embedded benchmark needs a new or empty folder")
    entries = sorted(p.name for p in out.iterdir())
    foreign = [e for e in entries if e not in OWN_ENTRIES]
    marked = (out / "synth.json").is_file() or (out / ".synth_partial").is_file()
    if foreign or (set(entries) - {"pretrain"} and not marked):
        shown = ", ".join(foreign or entries)
        raise DatasetError(f"{out}: refusing to write the embedded benchmark into a folder that holds data it did "
                           f"not write ({shown}{'' if marked else '; no synth.json'}); give it a new or empty "
                           f"folder")


def _params(seed, n_source, n_target, n_val, regime, shift) -> dict:
    """Validate the arguments and return the record that synth.json keeps."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SynthArgumentError(f"seed must be an integer >= 0, got {seed!r}")
    for name, n in (("n_source", n_source), ("n_target", n_target), ("n_val", n_val)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise SynthArgumentError(f"{name} must be an integer >= 1, got {n!r}")
    if shift is None:
        if regime not in REGIMES:
            raise SynthArgumentError(f"unknown regime {regime!r}; valid regimes: {', '.join(sorted(REGIMES))}")
        shift = REGIMES[regime]
    elif not isinstance(shift, Shift):
        raise TypeError(f"shift must be a Shift, got {type(shift).__name__}")
    else:
        regime = next((k for k, v in REGIMES.items() if v == shift), "custom")
    return {"version": SYNTH_VERSION, "seed": int(seed), "n_source": int(n_source),
            "n_target": int(n_target), "n_val": int(n_val), "regime": regime, "shift": asdict(shift),
            "source_size": list(SOURCE_SIZE), "target_size": list(TARGET_SIZE)}


def generate(out, *, seed=0, n_source=DEFAULT_N_SOURCE, n_target=DEFAULT_N_TARGET, n_val=DEFAULT_N_VAL,
             regime="default", shift: Shift | None = None, workers=2, progress=False) -> dict:
    """Write the benchmark under ``out`` (layout in the module docstring); return a summary.

    ``shift`` overrides ``regime`` (recorded as the matching regime name, else "custom").
    A previous benchmark in ``out`` is replaced (this is the explicit request, ``uda-ray data
    synth``; first use goes through :func:`ensure_benchmark`, which never replaces one); a folder
    holding anything else is refused (:class:`DatasetError`), and nothing of it is touched.
    The summary has ``seconds``, ``counts`` and ``class_freq`` (per domain, the fraction of
    labelled pixels of each of the 19 classes, plus ``ignore``: the void fraction of all pixels).
    """
    params = _params(seed, n_source, n_target, n_val, regime, shift)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SynthArgumentError(f"workers must be an integer >= 1, got {workers!r}")
    t0 = time.perf_counter()
    out = Path(out)
    marker, partial = out / "synth.json", out / ".synth_partial"
    _check_own_folder(out)
    for p in (out / "gta5", out / "cityscapes"):  # a previous benchmark (marked as ours above)
        shutil.rmtree(p, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    partial.touch()
    tasks = ([("source", i) for i in range(n_source)] + [("target_train", i) for i in range(n_target)]
             + [("target_val", i) for i in range(n_val)])
    for t in tasks:  # directories first, so workers never race on mkdir
        for p in _paths(out, *t):
            p.parent.mkdir(parents=True, exist_ok=True)
    job = {"seed": params["seed"], "shift": Shift(**params["shift"]), "out": out, "lut": _label_lut(),
           "palette": labelid_palette()}
    counts = {d: np.zeros(20, np.int64) for d in _DOMAINS}

    def collect(results):
        bar = None
        if progress:  # a bar with rate and ETA on stderr
            from tqdm import tqdm

            bar = tqdm(total=len(tasks), desc="synth", unit="img", dynamic_ncols=True, file=sys.stderr)
        for d, c in results:
            counts[d] += c
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    if workers == 1:
        threads = cv2.getNumThreads()
        try:
            _init_worker(job)
            collect(map(_work, tasks))
        finally:
            cv2.setNumThreads(threads)
            _JOB.clear()
    else:
        # fork (Linux's default here): unlike spawn it works from scripts without a
        # ``__main__`` guard and starts at once; the children only run numpy, PIL and
        # OpenCV, the latter with its thread pool off, so threads of the caller do not matter.
        with mp.get_context("fork").Pool(workers, _init_worker, (job,)) as pool:
            collect(pool.imap_unordered(_work, tasks, chunksize=8))
    freq = {}
    for d, c in counts.items():
        valid = max(int(c[:19].sum()), 1)
        freq[d] = {name: round(float(c[k]) / valid, 6) for k, name in enumerate(CLASSES_19)}
        freq[d]["ignore"] = round(float(c[19]) / max(int(c.sum()), 1), 6)
    record = dict(params, class_freq=freq)
    marker.write_text(json.dumps(record, indent=1))  # last: the "complete" marker
    partial.unlink(missing_ok=True)
    return {"out": str(out), "seconds": round(time.perf_counter() - t0, 2),
            "counts": {"source": n_source, "target_train": n_target, "target_val": n_val},
            "regime": params["regime"], "class_freq": freq}


# What in synth.json changes the data: a benchmark that differs from what is asked for in one of
# these is another benchmark. The image counts are not here: more or fewer images of the same
# generator are the same benchmark, and a user who generated a small one meant it.
DATA_FIELDS = ("version", "seed", "regime", "shift", "source_size", "target_size")


class BenchmarkMismatch(DatasetError):
    """The benchmark at ``out`` was generated with other data-changing parameters than asked
    for. ``diffs`` lists ``(field, benchmark's value, asked value)``; ``have`` is its record."""

    def __init__(self, out: Path, have: dict, diffs: list[tuple[str, object, object]]):
        self.out, self.have, self.diffs = out, have, diffs
        was = ", ".join(f"{f} {h!r}" for f, h, _ in diffs)
        asked = ", ".join(f"{f} {w!r}" for f, _, w in diffs)
        super().__init__(f"{out} holds the embedded benchmark generated with {was}; asked for {asked}; it is "
                         f"kept as it is: generate the other one elsewhere (uda-ray data synth --out DIR)")


def ensure_benchmark(out, **kw) -> Path:
    """The benchmark at ``out``, generated only if there is none (with a progress bar unless
    ``progress=False``): the implicit first use inside ``train`` and ``study``.

    Generated data is the user's data once written, so this never replaces a complete
    benchmark (``synth.json``): it is used as it is when it differs from what is asked for only
    in its image counts (a small one generated on purpose), and refused with
    :class:`BenchmarkMismatch` when it differs in what changes the data (:data:`DATA_FIELDS`:
    seed, regime/shift, generator version, image sizes). An unreadable ``synth.json`` is
    refused too. Only a half-written one (``.synth_partial``, no ``synth.json``) is written
    again, and :func:`generate` refuses a folder holding anything it did not write.
    ``uda-ray data synth --out DIR`` (:func:`generate`) is the explicit way to replace one.
    """
    kw.setdefault("progress", True)
    out = Path(out)
    gen_kw = {k: kw[k] for k in ("seed", "n_source", "n_target", "n_val", "regime", "shift") if k in kw}
    unknown = set(kw) - set(gen_kw) - {"workers", "progress"}
    if unknown:
        raise TypeError(f"unknown arguments: {sorted(unknown)}")
    want = _params(**{"seed": 0, "n_source": DEFAULT_N_SOURCE, "n_target": DEFAULT_N_TARGET,
                      "n_val": DEFAULT_N_VAL, "regime": "default", "shift": None, **gen_kw})
    marker = out / "synth.json"
    if marker.exists():
        try:
            have = json.loads(marker.read_text())
            if not isinstance(have, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise DatasetError(f"{marker}: unreadable ({e}); the benchmark it marks is kept: regenerate it with "
                               f"uda-ray data synth --out {out}, or use another folder") from None
        diffs = [(k, have.get(k), want[k]) for k in DATA_FIELDS if have.get(k) != want[k]]
        if have.get("regime") != want["regime"] and "custom" not in (have.get("regime"), want["regime"]):
            diffs = [d for d in diffs if d[0] != "shift"]  # two named regimes: their names say it
        if diffs:
            raise BenchmarkMismatch(out, have, diffs)
        return out
    # Said where, in full: a relative out depends on the current folder.
    why = "an interrupted generation" if (out / ".synth_partial").is_file() else "first use"
    print(f"generating the embedded benchmark in {out.resolve()} ({why}) ...", file=sys.stderr, flush=True)
    generate(out, **kw)
    return out
