"""Fixtures for the serving tests: a tiny Qwen2.5-VL taught one grounded answer, and test images."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from deepmedix.grounding import Frame

# What the taught model says for any chest X-ray and question: one step with one box, in the model's native frame
# (the tiny model's 168 x 168 pixel budget: each image's processor grid, at least 84 x 112 for the test images).
TAUGHT = r"<think> the heart with [28, 56, 84, 112] is enlarged </think> The answer is: \boxed{cardiomegaly}"
TAUGHT_BOX_FRAME = [28, 56, 84, 112]
# Asked about two views of one study (the prompt names them ``Picture 1``/``Picture 2``), it grounds one finding in
# each: the second box is in the second view's frame.
TAUGHT_TWO = (r"<think> Picture 1 shows the heart with [28, 56, 84, 112]; Picture 2 shows the effusion with "
              r"[56, 28, 112, 84] </think> The answer is: \boxed{cardiomegaly | effusion}")
TAUGHT_TWO_BOXES_FRAME = [[28, 56, 84, 112], [56, 28, 112, 84]]  # on view 0, view 1
FRAME = Frame.parse("native", 28, 168 * 168, 168 * 168)  # the tiny model's processor: patch 14 x merge 2
QUESTIONS = ("Is the heart enlarged?", "Findings?", "Which abnormality is seen?", "Describe the image.")


def image(width: int = 300, height: int = 200, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (np.add.outer(np.arange(height), np.arange(width)) % 256).astype(np.float32)
    arr = (arr * rng.uniform(0.3, 1.0) + rng.normal(0, 20, arr.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def png_bytes(width: int = 300, height: int = 200, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def png_b64(width: int = 300, height: int = 200, seed: int = 0) -> str:
    return base64.b64encode(png_bytes(width, height, seed)).decode()


# What the serving tests ask the taught model: (width, height, seed, question, system prompt); (0, 0, 0, ...) is the
# DICOM image of ``dicom_pixels()``. Each must be answered with ``TAUGHT``, alone and in one batch, before the
# fixture hands the model out.
PROBES = [(300, 200, 0, QUESTIONS[0], "You are a radiologist."), (300, 200, 3, QUESTIONS[1], None),
          (640, 480, 5, QUESTIONS[2], None), (0, 0, 0, QUESTIONS[3], None), (100, 400, 2, QUESTIONS[1], None),
          (100, 400, 0, QUESTIONS[1], None), (300, 200, 7, QUESTIONS[0], None), (640, 480, 11, QUESTIONS[2], None)]
SYSTEMS = (None, "You are a radiologist.")
# Two-view probes: ((width, height, seed) per view, question); each must be answered with ``TAUGHT_TWO``, alone and
# batched with the one-view probes.
PROBES_TWO = [(((300, 200, 1), (200, 300, 4)), QUESTIONS[1]), (((640, 480, 6), (480, 640, 9)), QUESTIONS[0])]


class NotTaught(AssertionError):
    """The tiny model did not learn ``TAUGHT`` within the step bound on this host."""


def taught_model(out: Path, check_every: int = 40, max_steps: int = 1200) -> Path:
    """The tiny model, trained (full fine-tuning, plain torch loop) until greedy decoding gives ``TAUGHT`` for every
    probe in ``PROBES`` and ``TAUGHT_TWO`` for every two-view probe in ``PROBES_TWO``, one at a time and batched: a
    real model whose output the server must ground.

    Floating-point results differ between CPUs, so the behaviour is established here, on this host: the loop checks
    the probes every ``check_every`` steps and stops as soon as they all hold (about 240 steps here), and fails with
    what the model said if they do not hold after ``max_steps``. Every third step is a two-view study; the question's
    form cycles on another period, so that neither predicts the other."""
    import torch

    from deepmedix.data.records import open_image
    from deepmedix.model.generate import chat_prompts
    from deepmedix.model.load import load
    from deepmedix.model.tiny import build_tiny

    build_tiny(out, texts=[TAUGHT] * 20 + [TAUGHT_TWO] * 10)
    loaded = load(out, device="cpu")
    proc, model = loaded.processor, loaded.model
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    wrong: list[str] = []
    for step in range(max_steps):
        model.train()
        k = step % len(QUESTIONS)
        imgs = [open_image(image(64 + 40 * k, 48 + 30 * k, seed=step), FRAME)]
        if step % 3 == 2:  # a two-view study (every third step): the second view portrait
            imgs.append(open_image(image(48 + 30 * k, 64 + 40 * k, seed=step + 1), FRAME))
        mixed = f"{QUESTIONS[k]} {step} {QUESTIONS[(k + step) % len(QUESTIONS)]}"
        question = QUESTIONS[k] if (step // 3) % 2 else mixed
        prompt = chat_prompts(proc, [question], [len(imgs)], [SYSTEMS[(step // 2) % len(SYSTEMS)]])[0]
        target = TAUGHT if len(imgs) == 1 else TAUGHT_TWO
        full = proc(text=[prompt + target + "<|im_end|>"], images=imgs, return_tensors="pt")
        n_prompt = proc(text=[prompt], images=imgs, return_tensors="pt")["input_ids"].shape[1]
        labels = full["input_ids"].clone()
        labels[:, :n_prompt] = -100
        loss = model(**full, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % check_every == 0:
            model.eval()
            wrong = probe_failures(loaded)
            if not wrong:
                model.save_pretrained(out)
                return out
    raise NotTaught(f"the tiny model did not learn the taught answer in {max_steps} steps on this host; "
                    f"it still said: {wrong[:3]}")


def probe_failures(loaded) -> list[str]:
    """What the model says, for each probe (alone, then all in one batch: one-view and two-view rows together),
    that is not ``TAUGHT`` (``TAUGHT_TWO`` for the two-view probes)."""
    from deepmedix.model.generate import generate_batch

    imgs = [[image(w, h, seed) if w else dicom_image()] for w, h, seed, _, _ in PROBES]
    imgs += [[image(*view) for view in views] for views, _ in PROBES_TWO]
    questions = [q for _, _, _, q, _ in PROBES] + [q for _, q in PROBES_TWO]
    systems = [s for _, _, _, _, s in PROBES] + [None] * len(PROBES_TWO)
    want = [TAUGHT] * len(PROBES) + [TAUGHT_TWO] * len(PROBES_TWO)
    alone = [generate_batch(loaded, [i], [q], 64, systems=[s])[0].text for i, q, s in zip(imgs, questions, systems)]
    batched = [g.text for g in generate_batch(loaded, imgs, questions, 64, systems=systems)]
    return [t for t, w in zip(alone + batched, want + want) if t != w]


def dicom_pixels():
    """The 320 x 240 16-bit ramp the DICOM serving tests send."""
    return (np.add.outer(np.arange(240), np.arange(320)) * 9 % 4096).astype(np.uint16)


def dicom_image() -> Image.Image:
    """``dicom_pixels()`` as the server sees it: written as DICOM, decoded by the library's DICOM reader."""
    from deepmedix.data.dicom import decode_dicom

    return Image.fromarray(decode_dicom(make_dicom(dicom_pixels()), "probe.dcm"), "L").convert("RGB")


def make_dicom(pixels):
    """A DICOM Part 10 file's bytes (the curation tests' writer, tests/data/fx_dicom.py)."""
    import sys

    data_tests = str(Path(__file__).resolve().parents[1] / "data")
    if data_tests not in sys.path:
        sys.path.insert(0, data_tests)
    from fx_dicom import make_dicom as make

    return make(pixels)
