"""Boxes drawn on images: the overlay PNGs of serving (``overlay: true``), the demo and the reader study."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = [(255, 0, 0), (0, 200, 0), (0, 128, 255), (255, 160, 0), (200, 0, 255), (0, 220, 220)]


def draw_boxes(image: Image.Image, boxes: list[list[float]], labels: list[str] | None) -> Image.Image:
    """An RGB copy of ``image`` with ``boxes`` (original pixels) drawn as coloured, labelled rectangles."""
    img = image.convert("RGB")
    draw = ImageDraw.Draw(img)
    width = max(2, round(min(img.size) / 150))
    font = ImageFont.load_default()
    for k, box in enumerate(boxes):
        color = COLORS[k % len(COLORS)]
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


def overlay_png(image: Image.Image, ground: dict, size: tuple[int, int] | None = None) -> str:
    """Base64 PNG of ``image`` with the grounding's boxes drawn, labelled by step. ``size``: the size the boxes
    refer to, when ``image`` is a reduced copy (boxes are scaled to it)."""
    labels = [f"step {i + 1}" for i, s in enumerate(ground["steps"]) for _ in s["boxes"]]
    sx, sy = (image.width / size[0], image.height / size[1]) if size else (1.0, 1.0)
    boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in ground["boxes"]]
    buf = io.BytesIO()
    draw_boxes(image, boxes, labels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
