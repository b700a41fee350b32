"""The output grammar, the prompt, box frames and box matching — one module used by every stage.

Grammar (the paper's)::

    <think> step 1 with [x1, y1, x2, y2]; step 2 ... </think> The answer is: \\boxed{answer}

Boxes inside the reasoning live in the model's frame, one per image (:class:`Frame`). Records keep boxes in the
stored image's pixels; a frame converts per axis between the two.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

# Verbatim: the released DeepMedix-R1 checkpoint expects exactly this after the task text.
INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. During this reasoning process, "
    "prioritize analyzing the local regions of the image by leveraging the bounding box coordinates in the format "
    "[x_min, y_min, x_max, y_max]. The final answer MUST BE put in \\boxed{}. An example is like: <think> reasoning "
    "process 1 with [x_min1, y_min1, x_max1, y_max1]; reasoning process 2 with [x_min2, y_min2, x_max2, y_max2] "
    "</think>. The answer is: \\boxed{answer}."
)

LIST_SEP = " | "

_NUM = r"[-+]?\d+(?:\.\d+)?"
BOX_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)
STRICT_RE = re.compile(r"^\s*<think>.*</think>.*\\boxed\{.*\}.*$", re.S)


def build_prompt(task_text: str) -> str:
    """The user text for one query, byte for byte as the release's training rendered it: its format template
    (DeepReasoning/DeepMedix-R1 ``src/xray_format.jinja``: ``{{ content | trim }}``, a blank line, the
    instruction) is loaded by EasyR1 as ``Template(format_prompt.strip())`` (``verl/utils/dataset.py``
    ``_build_messages``), so the file's final newline is stripped: the task trimmed, two newlines, the
    instruction, nothing after it."""
    return f"{task_text.strip()}\n\n{INSTRUCTION}"


def user_content(task_text: str, n_images: int = 1, reasoning: bool = True, image_part=None) -> list[dict]:
    """A ``user`` turn's content parts: the images first, then the task text (plus the instruction when
    ``reasoning``). ``image_part(i)`` makes the i-th image's part (default ``{"type": "image"}``).

    Several images (the views of a study) are each preceded by a text part ``Picture N: ``: what the stock
    Qwen2.5-VL chat template writes with ``add_vision_id`` (``{% if add_vision_id %}Picture {{ image_count.value
    }}: {% endif %}`` before each ``<|vision_start|>``), written as text so that every template and every caller
    (TRL's trainers, vLLM's OpenAI server, which passes a template that iterates over ``message['content']`` its
    parts in order: ``vllm/entrypoints/chat_utils.py``, content-format detection) renders the same prompt. The
    model names a view by that number in its reasoning (:func:`step_views`). One image: no name, the prompt the
    release was trained on."""
    image_part = image_part or (lambda i: {"type": "image"})
    content: list[dict] = []
    for i in range(n_images):
        if n_images > 1:
            content.append({"type": "text", "text": f"Picture {i + 1}: "})
        content.append(image_part(i))
    content.append({"type": "text", "text": build_prompt(task_text) if reasoning else task_text.strip()})
    return content


def user_message(task_text: str, n_images: int = 1, reasoning: bool = True) -> dict:
    """A chat ``user`` turn (:func:`user_content`)."""
    return {"role": "user", "content": user_content(task_text, n_images, reasoning)}


@dataclass
class Step:
    text: str
    boxes: list[list[float]] = field(default_factory=list)


@dataclass
class Parsed:
    raw: str
    steps: list[Step]
    answer: str | None
    format_ok: bool

    @property
    def boxes(self) -> list[list[float]]:
        return [b for s in self.steps for b in s.boxes]

    def answer_items(self) -> list[str]:
        return split_list(self.answer or "")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{`` up to its matching brace (nested braces counted); None if absent/unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def find_boxes(text: str) -> list[list[float]]:
    return [[float(v) for v in m.groups()] for m in BOX_RE.finditer(text)]


def parse(text: str) -> Parsed:
    """Parse one model output: reasoning steps with their boxes, the boxed answer, and format compliance."""
    m = THINK_RE.search(text)
    steps: list[Step] = []
    if m:
        for chunk in re.split(r";|\n", m.group(1)):
            chunk = chunk.strip()
            if chunk:
                steps.append(Step(text=chunk, boxes=find_boxes(chunk)))
    answer = last_boxed(text)
    return Parsed(raw=text, steps=steps, answer=answer, format_ok=bool(STRICT_RE.match(text)) and answer is not None)


def format_output(steps: list[Step] | list[tuple[str, list[list[float]]]], answer: str) -> str:
    """Write steps and an answer in the grammar. Boxes are written as integers in the model frame."""
    parts = []
    for s in steps:
        text, boxes = (s.text, s.boxes) if isinstance(s, Step) else s
        if boxes:
            text = f"{text} with " + ", ".join(box_str(b) for b in boxes)
        parts.append(text)
    return f"<think> {'; '.join(parts)} </think> The answer is: \\boxed{{{answer}}}"


def box_str(box: list[float]) -> str:
    return "[" + ", ".join(str(int(round(v))) for v in box) + "]"


def split_list(answer: str) -> list[str]:
    return [a.strip().lower() for a in answer.split("|") if a.strip()]


def join_list(items: list[str]) -> str:
    return LIST_SEP.join(items)


# ---------------------------------------------------------------- frames

PAPER_PIXELS = 512 * 512  # the paper's min_pixels = max_pixels


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) of the grid Qwen2-VL's image processor resizes an image to: each side a multiple of
    ``factor`` (patch x merge), the area brought into [min_pixels, max_pixels]. The same arithmetic as
    ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`` (which vLLM also calls); a test holds
    the two equal over many sizes, and against the grid the processor really produces."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def budget_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size EasyR1 hands the processor (``verl/utils/dataset.py`` ``process_image``): the image scaled,
    aspect kept, down to ``max_pixels`` or up to ``min_pixels``, each side truncated to an integer."""
    for bound, needs in ((max_pixels, width * height > max_pixels), (min_pixels, width * height < min_pixels)):
        if needs:
            s = math.sqrt(bound / (width * height))
            width, height = int(width * s), int(height * s)
    return max(width, 1), max(height, 1)


def inside(box: list[float], width: float, height: float) -> bool:
    """``box`` is a proper box (x1 < x2, y1 < y2) inside a ``width x height`` image."""
    x1, y1, x2, y2 = box
    return 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


def rescale(box: list[float], src: tuple[int, int], dst: tuple[int, int], clip: bool = True) -> list[float]:
    """A box in pixels of a ``src`` (width, height) image -> pixels of ``dst``, per axis; ``clip`` keeps it inside."""
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    out = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
    if not clip:
        return out
    return [min(max(out[0], 0.0), dst[0]), min(max(out[1], 0.0), dst[1]),
            min(max(out[2], 0.0), dst[0]), min(max(out[3], 0.0), dst[1])]


@dataclass(frozen=True)
class Frame:
    """How an image becomes the model's input and in which pixels its boxes are written.

    ``native`` (Qwen2.5-VL's own convention, the default): the image is scaled keeping its aspect ratio to the
    pixel budget (as EasyR1 and LLaMA-Factory do), the processor rounds that to whole ``factor`` cells, and boxes
    are absolute pixels of that grid — a different (width, height) per image. ``square``: the image is squashed
    to ``side x side`` and boxes are pixels of that square whatever the processor makes of it (``square512``, the
    convention this project used before; kept for checkpoints trained that way). Conversions are per axis."""

    kind: str = "native"
    side: int = 512
    factor: int = 28
    min_pixels: int = PAPER_PIXELS
    max_pixels: int = PAPER_PIXELS

    @classmethod
    def parse(cls, spec, factor: int = 28, min_pixels: int = PAPER_PIXELS,
              max_pixels: int = PAPER_PIXELS) -> "Frame":
        """``native``, ``squareN`` (or a bare integer N, the old setting) for a processor of this patch x merge
        ``factor`` and pixel budget."""
        if isinstance(spec, Frame):
            return cls(spec.kind, spec.side, factor, min_pixels, max_pixels)
        text = str(spec).strip().lower()
        if text == "native":
            return cls("native", 512, factor, min_pixels, max_pixels)
        digits = text[len("square"):] if text.startswith("square") else text
        if digits.isdigit() and int(digits) > 0:
            return cls("square", int(digits), factor, min_pixels, max_pixels)
        raise ValueError(f"frame {spec!r}: expected 'native' or 'squareN' (e.g. 'square512')")

    @property
    def spec(self) -> str:
        return "native" if self.kind == "native" else f"square{self.side}"

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the image is resized to before the processor sees it."""
        if self.kind == "square":
            return self.side, self.side
        return budget_size(width, height, self.min_pixels, self.max_pixels)

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) boxes are written in, for an image stored at ``width x height``."""
        if self.kind == "square":
            return self.side, self.side
        w, h = self.input_size(width, height)
        fh, fw = smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)
        return fw, fh

    def to_frame(self, box: list[float], width: int, height: int) -> list[float]:
        """Stored-image pixels -> model frame."""
        return rescale(box, (width, height), self.size(width, height), clip=False)

    def from_frame(self, box: list[float], width: int, height: int) -> list[float]:
        """Model frame -> stored-image pixels, clipped to the image."""
        return rescale(box, self.size(width, height), (width, height))

    def contains(self, box: list[float], width: int, height: int) -> bool:
        """``box`` is a proper box (x1 < x2, y1 < y2) inside this image's frame."""
        return inside(box, *self.size(width, height))


DEFAULT_FRAME = Frame()


# ---------------------------------------------------------------- IoU and matching

def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(pred: list[list[float]], ref: list[list[float]]) -> list[tuple[int, int, float]]:
    """Hungarian matching on IoU: (pred index, ref index, IoU) for each matched pair."""
    if not pred or not ref:
        return []
    from scipy.optimize import linear_sum_assignment

    m = np.array([[iou(p, r) for r in ref] for p in pred])
    rows, cols = linear_sum_assignment(-m)
    return [(int(i), int(j), float(m[i, j])) for i, j in zip(rows, cols)]


def mean_matched_iou(pred: list[list[float]], ref: list[list[float]], unmatched: int = 0) -> float:
    """Mean IoU over reference boxes (an unmatched reference box counts 0); 0 when there are none. ``unmatched``:
    further predicted boxes that can match nothing (they only raise the count divided by)."""
    if not ref:
        return 0.0
    return sum(v for _, _, v in match_boxes(pred, ref)) / max(len(ref), len(pred) + unmatched)


# ---------------------------------------------------------------- a raw output, read

VIEW_RE = re.compile(r"\b(?:picture|image|view)\s*#?\s*(\d+)\b", re.I)


def step_views(parsed: Parsed, n_images: int) -> list[list[int | None]]:
    """For each reasoning step, the view (0-based index into the query's images) each of its boxes is drawn on.

    With one image every box is on it. With several, a box is on the last picture the reasoning named before it
    (``Picture 2``, ``image 2`` or ``view 2``, numbered from 1 as :func:`user_content` names them; a name holds
    into later steps), and on Picture 1 before any is named. A box after a number that names no image of the query
    gets ``None``."""
    if n_images <= 1:
        return [[0] * len(s.boxes) for s in parsed.steps]
    out, current = [], 1
    for s in parsed.steps:
        marks = sorted([(m.start(), "view", int(m.group(1))) for m in VIEW_RE.finditer(s.text)]
                       + [(m.start(), "box", 0) for m in BOX_RE.finditer(s.text)])
        views = []
        for _, kind, number in marks:
            if kind == "view":
                current = number
            else:
                views.append(current - 1 if 1 <= current <= n_images else None)
        out.append(views)
    return out


def placed_boxes(parsed: Parsed, n_images: int) -> list[tuple[list[float], int | None]]:
    """Every box of the reasoning with its view (:func:`step_views`), in order."""
    return [(b, v) for s, views in zip(parsed.steps, step_views(parsed, n_images)) for b, v in zip(s.boxes, views)]


def as_sizes(sizes) -> list[tuple[int, int]]:
    """One image's (width, height) or a list of them -> a list of (width, height)."""
    if len(sizes) == 2 and all(isinstance(v, (int, float)) for v in sizes):
        sizes = [sizes]
    return [(int(w), int(h)) for w, h in sizes]


def reference_view_boxes(text: str, n_images: int = 1) -> tuple[list[list[float]], int]:
    """The boxes of an output that are on the first image (model frame), the view a record's reference boxes are
    drawn on (``Record.boxes`` are on ``images[0]``), and how many boxes name a picture the query does not have.
    With one image, every box and 0. With several, a box the reasoning put on another view (:func:`step_views`) is
    not compared with references it was never meant to match; a box on no view of the query is a prediction that
    matches nothing (so naming a missing picture cannot hide extra boxes from the mIoU and count)."""
    placed = placed_boxes(parse(text), n_images)
    return [b for b, v in placed if v == 0], sum(1 for _, v in placed if v is None)


def grounding_object(raw: str, sizes, frame: Frame = DEFAULT_FRAME) -> dict:
    """The grounded reading of one raw output for a query of one or more images, ``sizes`` their original
    (width, height) (one pair for a single image): steps with boxes in the pixels of the ORIGINAL image each is
    drawn on (``views``: that image's 0-based index, per box; :func:`step_views`), the answer. ``boxes`` and
    ``box_views`` list every placed box; ``views`` groups them per image; ``unplaced``: boxes whose named picture
    the query did not have (model-frame numbers, as written)."""
    sizes = as_sizes(sizes)
    parsed = parse(raw)
    steps, unplaced = [], []
    for i, (s, placed) in enumerate(zip(parsed.steps, step_views(parsed, len(sizes)))):
        boxes, views = [], []
        for box, view in zip(s.boxes, placed):
            if view is None:
                unplaced.append({"step": i, "box": box})
                continue
            boxes.append(frame.from_frame(box, *sizes[view]))
            views.append(view)
        steps.append({"text": s.text, "boxes": boxes, "views": views})
    out = {
        "answer": parsed.answer,
        "format_ok": parsed.format_ok,
        "steps": steps,
        "boxes": [b for s in steps for b in s["boxes"]],
        "box_views": [v for s in steps for v in s["views"]],
        "image_size": list(sizes[0]),
        "image_sizes": [list(s) for s in sizes],
        "views": [{"image_size": list(size), "boxes": [b for s in steps for b, v in zip(s["boxes"], s["views"])
                                                        if v == j]} for j, size in enumerate(sizes)],
    }
    if unplaced:
        out["unplaced"] = unplaced
    return out
