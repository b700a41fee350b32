"""Boxes drawn on images: the overlay PNGs of serving (``overlay: true``), the demo and the reader study."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = [(255, 0, 0), (0, 200, 0), (0, 128, 255), (255, 160, 0), (200, 0, 255), (0, 220, 220)]


def draw_boxes(image: Image.Image, boxes: list[list[float]], labels: list[str] | None,
               colors: list[int] | None = None) -> Image.Image:
    """An RGB copy of ``image`` with ``boxes`` (original pixels) drawn as coloured, labelled rectangles; box ``k``
    in colour ``colors[k]`` (an index into ``COLORS``; default ``k``)."""
    img = image.convert("RGB")
    draw = ImageDraw.Draw(img)
    width = max(2, round(min(img.size) / 150))
    font = ImageFont.load_default()
    for k, box in enumerate(boxes):
        color = COLORS[(colors[k] if colors else k) % len(COLORS)]
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        label = labels[k] if labels and k < len(labels) else None
        if label:
            tx, ty = x1 + width, (y1 - 12 if y1 >= 12 else y1 + width)
            left, top, right, bottom = draw.textbbox((tx, ty), label, font=font)
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
            draw.text((tx, ty), label, fill=color, font=font)
    return img


def draw_overlay(image: Image.Image, boxes: list[list[float]], labels: list[str] | None, path) -> Path:
    """Write ``image`` as an RGB PNG at ``path`` with ``boxes`` (original pixels) drawn as coloured rectangles."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_boxes(image, boxes, labels).save(out, format="PNG")
    return out


def overlay_png(images, ground: dict, sizes=None, max_side: int = 2048) -> str:
    """Base64 PNG of ``images`` (one image, or the views of one query) with the grounding's boxes drawn on the view
    each belongs to (``box_views``), labelled by step; several views side by side, in order, at the first one's
    height (scaled down when the strip would be wider than ``max_side`` per view). ``sizes``: a list of the
    (width, height) the boxes refer to, per image, when ``images`` are reduced copies (boxes are scaled to them)."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    views = ground.get("box_views") or [0] * len(ground["boxes"])
    labels = [f"step {i + 1}" for i, s in enumerate(ground["steps"]) for _ in s["boxes"]]
    # one height for all views (the first one's), the whole strip at most max_side x views wide: a view of an
    # extreme aspect ratio must not blow the canvas up (a request chooses the images)
    height = images[0].height
    width = sum(im.width * height / im.height for im in images)
    if width > max_side * len(images):
        height = max(1, int(height * max_side * len(images) / width))
    drawn = []
    for j, image in enumerate(images):
        if image.height != height:  # scaled before drawing, so that every view's lines are as crisp
            image = image.resize((max(1, round(image.width * height / image.height)), height))
        ref = sizes[j] if sizes else images[j].size
        sx, sy = image.width / ref[0], image.height / ref[1]
        mine = [k for k, v in enumerate(views) if v == j]
        boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in (ground["boxes"][k] for k in mine)]
        drawn.append(draw_boxes(image, boxes, [labels[k] for k in mine], mine))  # a box's colour: its place in all
    out = drawn[0]
    if len(drawn) > 1:
        out = Image.new("RGB", (sum(d.width for d in drawn), height))
        x = 0
        for d in drawn:
            out.paste(d, (x, 0))
            x += d.width
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
