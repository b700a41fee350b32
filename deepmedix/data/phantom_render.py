"""Drawing of the phantom chest X-rays (the dataset is :mod:`deepmedix.data.phantom`): the patient's anatomy, the
findings with their ground-truth boxes, and ``render_study``, which draws one frontal radiograph.

Deterministic from a seed: every random draw comes from a seeded ``numpy.random.Generator`` (no ``hash()``, no
global random state), so the same seed gives byte-identical images and boxes.

Sides are the *patient's* sides; radiological convention puts the patient's right on the image's LEFT.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import distance_transform_edt, gaussian_filter

from deepmedix.data import phantom_text as text
from deepmedix.data.phantom_text import FINDINGS, SEVERITIES, FindingSpec
from deepmedix.data.schema import Box
from deepmedix.errors import InputError

__all__ = ["render_study"]

_SEV = {s: i for i, s in enumerate(SEVERITIES)}  # 0, 1, 2


def _sig(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(z))


def _bbox(mask: np.ndarray, size: int) -> list[float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise RuntimeError("phantom: a finding drew nothing (no pixels for its box)")
    x1, y1, x2, y2 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    return [max(0.0, x1), max(0.0, y1), min(float(size), x2), min(float(size), y2)]


def _effect_box(effect: np.ndarray, size: int, frac: float = 0.2) -> list[float]:
    """Box around where a finding's effect is at least ``frac`` of its peak."""
    return _bbox(effect > frac * float(effect.max()), size)


# ----------------------------------------------------------------------------------------------- anatomy

def _anatomy(base_rng: np.random.Generator, jitter_rng: np.random.Generator, view: str) -> dict:
    """Patient anatomy in normalised units (fractions of the image size)."""
    r = base_rng
    a = {
        "cx": 0.5 + r.normal(0, 0.012),
        "apex": 0.13 + r.normal(0, 0.01),
        "base": 0.80 + r.normal(0, 0.015),
        "lung_w": 0.355 + r.normal(0, 0.012),
        "med0": 0.055 + r.normal(0, 0.004),
        "dome_h": 0.055 + r.normal(0, 0.006),
        "right_up": 0.022 + r.normal(0, 0.006),  # patient's right hemidiaphragm sits higher
        "ctr": 0.44 + r.normal(0, 0.02),          # cardiothoracic ratio
        "heart_hh": 0.105 + r.normal(0, 0.006),
        "body_hw": 0.445 + r.normal(0, 0.01),
        "rib_w": 0.016 + r.normal(0, 0.0015),
        "rib_seed": int(r.integers(2**31)),
    }
    j = jitter_rng  # per-study positioning and inspiration
    a["cx"] += j.normal(0, 0.006)
    shift = j.normal(0, 0.008)
    a["apex"] += shift
    a["base"] += shift + j.normal(0, 0.008)
    if view == "AP":  # supine/portable: shallower inspiration, magnified heart, clavicles higher
        a["base"] -= 0.03
        a["ctr"] *= 1.1
        a["heart_hh"] *= 1.08
        a["clav"] = a["apex"] - 0.02
    else:
        a["clav"] = a["apex"] + 0.025
    return a


def _lung_geometry(a: dict, X: np.ndarray, Y: np.ndarray, sgn: int):
    """Per-lung coordinates: D (distance from midline toward this lung), t (0 apex .. 1 base), borders, dome."""
    D = sgn * (X - a["cx"])
    t = (Y - a["apex"]) / (a["base"] - a["apex"])
    g = np.clip(t / 0.85, 0.0, 1.0) ** 0.45
    medial = a["med0"] + 0.07 * (1 - g) ** 2
    if sgn > 0:  # aortic knob on the patient's left
        medial = medial + 0.028 * np.exp(-(((t - 0.28) / 0.09) ** 2))
    lateral = 0.125 + (a["lung_w"] - 0.125) * g
    base = a["base"] - (a["right_up"] if sgn < 0 else 0.0)
    k = 0.13
    bump = np.where(D > k, 1 - ((D - k) / (a["lung_w"] - k + 0.005)) ** 2, 1 - ((k - D) / 0.3) ** 2)
    dome = base - a["dome_h"] * np.clip(bump, 0, 1)
    return D, t, medial, lateral, dome


def _heart(a: dict, X: np.ndarray, Y: np.ndarray, scale: float = 1.0) -> np.ndarray:
    width = a["ctr"] * 2 * a["lung_w"] * scale
    hh = a["heart_hh"] * (1 + 0.5 * (scale - 1))
    hx = a["cx"] + 0.01
    hy = a["base"] - 0.025 - hh
    hw = np.where(X < hx, 0.36 * width, 0.64 * width)
    dy = Y - hy - 0.03 * np.clip((X - hx) / (0.64 * width), 0, 1)
    r = np.sqrt(((X - hx) / hw) ** 2 + (dy / hh) ** 2)
    return _sig((1 - r) / 0.03)


def _draw_polyline_layer(size: int, lines: Iterable[tuple[list[tuple[float, float]], float]]) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    for pts, width in lines:
        d.line([(x * size, y * size) for x, y in pts], fill=255, width=max(1, int(round(width * size))),
               joint="curve")
    return np.asarray(img, dtype=np.float32) / 255.0


def _ribs_and_clavicles(a: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(a["rib_seed"])
    post, ant, clav = [], [], []
    span = a["base"] - a["apex"] + 0.04
    for sgn in (-1, 1):
        for i in range(11):
            y0 = a["apex"] - 0.035 + i * span / 9.5 + r.normal(0, 0.003)
            s = np.linspace(0, 1, 28)
            reach = 0.035 + (a["lung_w"] + 0.03 - 0.035) * min(1.0, 0.55 + 0.12 * i)
            d = 0.03 + s * reach
            y = y0 - (0.045 - 0.002 * i) * np.sin(0.95 * np.pi * s) + (0.05 + 0.004 * i) * s ** 2.5
            post.append(([(a["cx"] + sgn * dd, yy) for dd, yy in zip(d, y)], a["rib_w"]))
            if i < 7:  # anterior ribs: from the lateral wall running medially and down, fainter
                ya = a["apex"] + 0.04 + i * span / 8.0
                d2 = a["lung_w"] + 0.02 - s * (a["lung_w"] - 0.12)
                y2 = ya + 0.02 * np.sin(np.pi * s * 0.5) + 0.06 * s
                ant.append(([(a["cx"] + sgn * dd, yy) for dd, yy in zip(d2, y2)], a["rib_w"] * 0.8))
        s = np.linspace(0, 1, 20)
        d = 0.035 + s * 0.29
        y = a["clav"] + 0.015 - 0.04 * s + 0.015 * np.sin(2 * np.pi * s) + r.normal(0, 0.004)
        clav.append(([(a["cx"] + sgn * dd, yy) for dd, yy in zip(d, y)], 0.018))
    ribs = _draw_polyline_layer(size, post) + 0.45 * _draw_polyline_layer(size, ant)
    return ribs, _draw_polyline_layer(size, clav)


def _markings(a: dict, rng: np.random.Generator, size: int) -> np.ndarray:
    """Branching vascular lung markings radiating from each hilum."""
    lines = []
    for sgn in (-1, 1):
        hx, hy = a["cx"] + sgn * 0.1, a["apex"] + 0.45 * (a["base"] - a["apex"])
        for _ in range(22):
            ang = rng.uniform(-1.2, 1.3) * np.pi / 2  # 0 = lateral, +/- = down/up
            stack = [((hx, hy), ang, 0.005, 0)]
            while stack:
                (x, y), ang, w, depth = stack.pop()
                n = int(rng.integers(3, 6))
                pts = [(x, y)]
                for _ in range(n):
                    ang += rng.normal(0, 0.2)
                    x += sgn * np.cos(ang) * 0.016
                    y += np.sin(ang) * 0.016
                    pts.append((x, y))
                lines.append((pts, w))
                if depth < 2:
                    for off in (-0.4, 0.4):
                        if rng.random() < 0.7:
                            stack.append(((x, y), ang + off + rng.normal(0, 0.15), w * 0.6, depth + 1))
    return _draw_polyline_layer(size, lines)


# ----------------------------------------------------------------------------------------------- findings

def _zone_point(a, find_rng, spec, lung_side, heart, radius, size):
    """A point inside the spec's lung and zone, with its disc clear of the lung edges where possible."""
    t_rng = {"upper": (0.14, 0.36), "middle": (0.4, 0.6), "lower": (0.62, 0.8)}[spec.zone or "middle"]
    sgn = -1 if spec.side == "right" else 1
    best, best_score = None, -1.0
    for _ in range(40):
        t = find_rng.uniform(*t_rng)
        y = a["apex"] + t * (a["base"] - a["apex"])
        g = min(1.0, t / 0.85) ** 0.45
        med = a["med0"] + 0.07 * (1 - g) ** 2
        lat = 0.125 + (a["lung_w"] - 0.125) * g
        x = a["cx"] + sgn * (med + find_rng.uniform(0.2, 0.8) * (lat - med))
        px, py = int(x * size), int(y * size)
        rr = max(1, int(radius * size))
        sl = (slice(max(0, py - rr), py + rr + 1), slice(max(0, px - rr), px + rr + 1))
        score = float(lung_side[sl].min() * (1 - heart[sl].max()))
        if score > best_score:
            best, best_score = (x, y), score
        if score > 0.8:
            break
    return best


def _apply_findings(a, specs, find_seed, X, Y, size, lungs, heart):
    """Opacity (added attenuation), lucency and marking-suppression layers plus a box per finding."""
    S = size
    opacity = np.zeros_like(X)
    lucency = np.zeros_like(X)
    no_marks = np.zeros_like(X)
    air_fill = np.zeros_like(X)  # fraction of the lung's air replaced by fluid
    boxes: list[Box] = []
    for spec in specs:
        rng = np.random.default_rng([find_seed, FINDINGS.index(spec.label)])
        sev = _SEV[spec.severity]
        sgn = -1 if spec.side == "right" else 1
        lung_side = lungs.get(spec.side) if spec.side else None
        if spec.label == "cardiomegaly":
            dome_l = _lung_geometry(a, X, Y, -1)[4]
            dome_r = _lung_geometry(a, X, Y, 1)[4]
            dome = np.where(X < a["cx"], dome_l, dome_r)
            boxes.append(Box(spec.label, _bbox((heart > 0.5) & (Y < dome), S)))
        elif spec.label.endswith("pleural effusion"):
            D, _, med, lat, _ = _lung_geometry(a, X, Y, sgn)
            h = (0.16, 0.3, 0.48)[sev] + rng.uniform(-0.03, 0.03)
            level = a["base"] - h * (a["base"] - a["apex"])
            d_rel = np.clip((D - med) / np.maximum(lat - med, 1e-3), 0, 1)
            men = level + 0.04 - 0.07 * d_rel ** 2  # meniscus climbs the lateral chest wall
            fill = _sig((Y - men) / 0.008) * (D > 0)
            air_fill += fill
            opacity += 0.06 * fill * lung_side
            boxes.append(Box(spec.label, _bbox(fill * lung_side > 0.5, S)))
        elif spec.label in ("nodule", "mass"):
            if spec.label == "nodule":
                diam = ((10, 14), (14, 19), (19, 25))[sev]
                amp = (0.16, 0.2, 0.24)[sev]
            else:
                diam = ((40, 52), (52, 66), (66, 80))[sev]
                amp = (0.22, 0.27, 0.32)[sev]
            rad = rng.uniform(*diam) / 2 / 512
            cx, cy = _zone_point(a, rng, spec, lung_side, heart, rad, S)
            ang = np.arctan2(Y - cy, X - cx)
            r = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2)
            rr = np.full_like(X, rad)
            if spec.label == "mass":  # lobulated outline
                for k in (2, 3, 5):
                    rr = rr * (1 + rng.uniform(0.03, 0.08) * np.sin(k * ang + rng.uniform(0, 2 * np.pi)))
            prof = np.sqrt(np.clip(1 - (r / rr) ** 2, 0, 1)) * 0.85 + 0.15 * _sig((rr - r) * S / 1.0)
            prof = prof * (r < rr)
            opacity += amp * prof
            boxes.append(Box(spec.label, _bbox(prof > 0.05, S)))
        elif spec.label == "pneumothorax":
            D, t, _, lat, _ = _lung_geometry(a, X, Y, sgn)
            wall = (D < lat) & (t > 0)  # only the apical and lateral pleura count as "wall"
            dist = distance_transform_edt(wall) / S
            depth = (0.025, 0.05, 0.085)[sev] * rng.uniform(0.85, 1.15)
            y_cut = a["apex"] + (0.45, 0.65, 0.85)[sev] * (a["base"] - a["apex"])
            taper = np.sqrt(np.clip((y_cut - Y) / (0.3 * (a["base"] - a["apex"])), 0, 1))
            inside = lung_side > 0.5
            region = (inside & (dist < depth * taper)).astype(np.float32)
            line = inside & (np.abs(dist - depth * taper) < 1.2 / S) & (taper > 0.15)
            line = gaussian_filter(line.astype(np.float32), 0.6)
            lucency += 0.24 * region * lung_side
            no_marks = np.maximum(no_marks, region)
            opacity += 0.3 * line
            boxes.append(Box(spec.label, _bbox((region > 0) | (line > 0.1), S)))
        elif spec.label == "consolidation":
            ext = (0.05, 0.075, 0.1)[sev]
            cx, cy = _zone_point(a, rng, spec, lung_side, heart, ext * 0.6, S)
            patch = np.zeros_like(X)
            for _ in range(int(rng.integers(7, 13))):
                bx, by = cx + rng.normal(0, ext * 0.45), cy + rng.normal(0, ext * 0.35)
                s = ext * rng.uniform(0.25, 0.45)
                patch += np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / (2 * s * s))
            patch = np.clip((patch / patch.max() - 0.25) / 0.5, 0, 1)
            tex = gaussian_filter(rng.normal(size=X.shape).astype(np.float32), 2.0 * S / 512)
            tex = (tex - tex.min()) / (tex.max() - tex.min() + 1e-6)
            patch = patch * (0.55 + 0.45 * tex) * lung_side
            opacity += (0.2, 0.26, 0.32)[sev] * patch
            boxes.append(Box(spec.label, _effect_box(patch, S)))
        elif spec.label == "atelectasis":
            span = a["base"] - a["apex"]
            y_a, y_b = a["apex"] + rng.uniform(0.74, 0.8) * span, a["apex"] + rng.uniform(0.68, 0.74) * span
            lw = a["lung_w"]
            x_a, x_b = a["cx"] + sgn * 0.12, a["cx"] + sgn * (lw - rng.uniform(0.03, 0.06))
            ln = [(x_a, y_a), ((x_a + x_b) / 2, (y_a + y_b) / 2 + rng.normal(0, 0.006)), (x_b, y_b)]
            layer = _draw_polyline_layer(S, [(ln, (0.011, 0.015, 0.019)[sev])])
            if sev == 2:  # wedge down to the base
                img = Image.new("L", (S, S), 0)
                ImageDraw.Draw(img).polygon([(x * S, y * S) for x, y in
                                             [ln[0], ln[2], (x_b - sgn * 0.03, a["base"] + 0.01)]],
                                            fill=120)
                layer = np.maximum(layer, np.asarray(img, np.float32) / 255.0)
            layer = gaussian_filter(layer, 1.0 * S / 512) * lung_side
            opacity += (0.26, 0.28, 0.3)[sev] * layer
            boxes.append(Box(spec.label, _effect_box(layer, S)))
    return opacity, lucency, no_marks, np.clip(air_fill, 0, 1), boxes


# ----------------------------------------------------------------------------------------------- render

def _as_specs(findings_spec, rng: np.random.Generator) -> list[FindingSpec]:
    out = []
    for f in findings_spec or []:
        if isinstance(f, FindingSpec):
            spec = f
        elif isinstance(f, str):
            spec = FindingSpec(f)
        elif isinstance(f, dict):
            spec = FindingSpec(**f)
        else:
            spec = FindingSpec(*f)
        out.append(text.complete_spec(rng, spec))
    labels = [s.label for s in out]
    if len(set(labels)) != len(labels):
        raise InputError(f"duplicate finding in {labels}")
    return out


def render_study(rng: np.random.Generator, findings_spec=(), size: int = 512, view: str = "PA", *,
                 patient_seed: int | None = None, landmarks: list | None = None) -> tuple[Image.Image, list[Box]]:
    """Draw one frontal chest radiograph with the given findings; returns the "L" image and one Box per finding.

    ``findings_spec`` items are FindingSpec, label strings, ``(label, severity[, side, zone])`` tuples or dicts.
    ``rng`` is consumed by a fixed amount whatever the findings, and the anatomy and noise do not depend on them,
    so rendering from equal generator states with and without a finding differs only by that finding.
    ``patient_seed`` fixes the patient's anatomy across studies (the rng then only jitters positioning).
    ``landmarks``, when given a list, receives the image's anatomy as boxes: ``right lung``, ``left lung`` (the
    patient's sides: the right lung is on the image's left) and ``heart``, each around where its mask is drawn.
    """
    if view not in ("PA", "AP"):
        raise InputError(f"view must be 'PA' or 'AP', got {view!r}")
    if size < 64:
        raise InputError(f"size must be at least 64 pixels, got {size}")
    anat_seed, find_seed, noise_seed = (int(v) for v in rng.integers(0, 2**62, size=3))
    anat_rng = np.random.default_rng(anat_seed)
    base_rng = np.random.default_rng(patient_seed) if patient_seed is not None else anat_rng
    a = _anatomy(base_rng, anat_rng, view)
    specs = _as_specs(findings_spec, np.random.default_rng([find_seed, 99]))
    S = size
    ys, xs = np.mgrid[0:S, 0:S].astype(np.float32)
    X, Y = (xs + 0.5) / S, (ys + 0.5) / S

    sev_cm = next((_SEV[s.severity] for s in specs if s.label == "cardiomegaly"), None)
    heart_scale = 1.0 if sev_cm is None else (0.56, 0.63, 0.71)[sev_cm] / a["ctr"]
    heart = _heart(a, X, Y, max(heart_scale, 1.12) if sev_cm is not None else 1.0)

    # body: soft-tissue thickness; shoulders run off the top corners, the neck rises in the middle
    sh = _sig((0.15 - Y) / 0.05)
    T = a["body_hw"] + 0.2 * sh
    body = np.sqrt(np.clip(1 - ((X - a["cx"]) / T) ** 2, 0, 1))
    A = 0.95 * body ** 0.6 * (1 - 0.25 * sh * _sig((np.abs(X - a["cx"]) - 0.1) / 0.03) * _sig((0.1 - Y) / 0.03))
    lungs, air = {}, np.zeros_like(X)
    for side, sgn in (("right", -1), ("left", 1)):
        D, t, med, lat, dome = _lung_geometry(a, X, Y, sgn)
        m = (_sig((D - med) / 0.004) * _sig((lat - D) / 0.005) * _sig((Y - a["apex"]) / 0.005)
             * _sig((dome - Y) / 0.003)) * (1 - heart)
        lungs[side] = m
        # air thickness: thin at the chest wall and apex, full in the middle of the lung
        thick = (np.clip((lat - D) / 0.06, 0, 1) ** 0.5 * np.clip((Y - a["apex"]) / 0.06, 0, 1) ** 0.5
                 * np.clip((D - med) / 0.03, 0, 1) ** 0.3)
        air += m * (0.35 + 0.65 * thick) * (1 - 0.25 * np.clip(t - 0.6, 0, 1))
    if landmarks is not None:
        landmarks.extend([Box("right lung", _bbox(lungs["right"] > 0.5, S)),
                          Box("left lung", _bbox(lungs["left"] > 0.5, S)), Box("heart", _bbox(heart > 0.5, S))])
        below = _sig((Y - dome) / 0.004) * (D > 0) * body
        if side == "right":
            A += 0.06 * below  # liver
        else:  # gastric bubble under the left hemidiaphragm
            gb = ((X - a["cx"] - 0.15) / 0.04) ** 2 + ((Y - dome.min() - 0.045) / 0.022) ** 2
            A -= 0.12 * _sig((1 - gb) / 0.2) * below
    A += 0.04 * heart
    A += 0.1 * np.exp(-(((X - a["cx"]) / 0.03) ** 6)) * (Y > 0.05)  # spine
    A -= 0.14 * np.exp(-(((X - a["cx"] - 0.004) / 0.011) ** 4)) * _sig((a["apex"] + 0.13 - Y) / 0.01)  # trachea

    opacity, lucency, no_marks, air_fill, boxes = _apply_findings(
        a, specs, find_seed, X, Y, S, lungs, heart)
    lung_any = lungs["right"] + lungs["left"]
    marks = gaussian_filter(_markings(a, anat_rng, S), 1.4 * S / 512)
    for sgn in (-1, 1):  # hila
        A += 0.07 * np.exp(-(((X - a["cx"] - sgn * 0.095) / 0.03) ** 2
                             + ((Y - a["apex"] - 0.45 * (a["base"] - a["apex"])) / 0.06) ** 2))
    air = air * (1 - air_fill)
    A -= 0.55 * air
    A += 0.13 * marks * lung_any * (1 - no_marks) * (1 - air_fill)
    ribs, clav = _ribs_and_clavicles(a, S)
    ribs = gaussian_filter(ribs, 1.2 * S / 512)
    A += (0.16 * ribs * (0.35 + 0.65 * lung_any) + 0.18 * gaussian_filter(clav, 1.5 * S / 512)) * (body > 0)
    if view == "AP":  # scapulae projecting over the upper lateral lungs
        for sgn in (-1, 1):
            sc = (((X - a["cx"] - sgn * 0.33) / 0.09) ** 2 + ((Y - a["apex"] - 0.14) / 0.13) ** 2)
            A += 0.07 * _sig((1 - sc) / 0.08) * (body > 0)
    A += opacity - lucency

    nrng = np.random.default_rng(noise_seed)
    img = np.clip(A, 0, 1.3) / 1.3
    img = img ** (1.1 if view == "PA" else 0.95)
    if view == "AP":
        img = 0.1 + 0.82 * img  # flatter contrast
    img = gaussian_filter(img, (0.7 if view == "PA" else 1.3) * S / 512)
    mottle = gaussian_filter(nrng.normal(size=(S, S)).astype(np.float32), 4 * S / 512)
    img = img + 0.012 * nrng.normal(size=(S, S)) + 0.12 * mottle * (0.5 + img)
    arr = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L"), boxes
