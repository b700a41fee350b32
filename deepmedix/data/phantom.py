"""Phantom chest X-rays: a procedurally drawn frontal radiograph dataset with ground-truth boxes.

Deterministic from a seed: every random draw comes from a seeded ``numpy.random.Generator`` (no ``hash()``, no
global random state), so the same seed gives byte-identical PNGs and identical Records. ``plan_patients`` and
``assign_splits`` lay out the patients, their studies and patient-disjoint splits; ``iter_studies`` streams the
set one study at a time; ``generate`` writes a whole dataset's images and returns its Records (the caller writes
the Parquet shards). The drawing lives in :mod:`deepmedix.data.phantom_render` (``render_study`` draws one image),
report and VQA text in :mod:`deepmedix.data.phantom_text`.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from deepmedix.data import phantom_text as text
from deepmedix.data.phantom_render import render_study
from deepmedix.data.phantom_text import FINDINGS, FindingSpec, plan_findings
from deepmedix.data.schema import SPLITS, Record
from deepmedix.errors import InputError

__all__ = ["generate", "assign_splits"]

SOURCE = "phantom"


def assign_splits(n_patients: int, split_ratios=(0.7, 0.15, 0.15), seed: int = 0) -> list[str]:
    """Split name per patient index: counts by largest remainder (each split with a positive ratio gets at least
    one patient when there are enough), patients shuffled deterministically from the seed."""
    r = np.asarray(split_ratios, dtype=float)
    if r.shape != (len(SPLITS),) or (r < 0).any() or r.sum() <= 0:
        raise InputError(f"split_ratios must be {len(SPLITS)} non-negative numbers, got {split_ratios}")
    r = r / r.sum()
    counts = np.floor(r * n_patients).astype(int)
    for i in np.argsort(-(r * n_patients - counts), kind="stable")[: n_patients - counts.sum()]:
        counts[i] += 1
    if n_patients >= int((r > 0).sum()):
        for i in np.nonzero((r > 0) & (counts == 0))[0]:
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    order = np.random.default_rng([seed, 7]).permutation(n_patients)
    out = [""] * n_patients
    names = np.repeat(np.arange(len(SPLITS)), counts)
    for pos, p in enumerate(order):
        out[int(p)] = SPLITS[int(names[pos])]
    return out


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def plan_patients(n_patients: int, studies_per_patient: tuple[int, int] = (1, 3), seed: int = 0,
                  n_studies: int = 0) -> list[tuple[int, int]]:
    """(number of studies, anatomy seed) per patient. With ``n_studies`` > 0, patients are added until that many
    studies are planned (the last patient's count is cut to fit) and ``n_patients`` is ignored."""
    lo, hi = studies_per_patient
    if not (1 <= lo <= hi):
        raise InputError(f"studies_per_patient must be (lo, hi) with 1 <= lo <= hi, got {studies_per_patient}")
    plans: list[tuple[int, int]] = []
    total = 0
    p = 0
    while (n_studies > 0 and total < n_studies) or (n_studies <= 0 and p < n_patients):
        prng = np.random.default_rng([seed, 1, p])
        k = int(prng.integers(lo, hi + 1))
        if n_studies > 0:
            k = min(k, n_studies - total)
        plans.append((k, int(prng.integers(2**62))))
        total += k
        p += 1
    return plans


def iter_studies(n_patients: int = 40, studies_per_patient: tuple[int, int] = (1, 3), size: int = 512,
                 seed: int = 0, split_ratios=(0.7, 0.15, 0.15), vqa_per_study: int = 3,
                 n_studies: int = 0) -> Iterator[tuple[bytes, list[dict]]]:
    """Stream the phantom set one study at a time: the study's PNG bytes and its records' fields (everything
    but ``images``/``image_sizes``). Every patient's studies share one split."""
    plans = plan_patients(n_patients, studies_per_patient, seed, n_studies)
    splits = assign_splits(len(plans), split_ratios, seed)
    done = 0
    for p, (n, patient_seed) in enumerate(plans):
        pid = f"phantom-p{p:04d}"
        for j in range(n):
            sid = f"phantom-s{done:06d}"
            rng = np.random.default_rng([seed, 2, p, j])
            if rng.random() < 0.3:
                specs: list[FindingSpec] = []
            else:
                k = int(rng.integers(1, 4))
                specs = plan_findings(rng, rng.choice(FINDINGS, size=k, replace=False).tolist())
            view = "AP" if rng.random() < 0.3 else "PA"
            marks: list = []  # the image's anatomy (render_study fills it)
            img, boxes = render_study(rng, specs, size=size, view=view, patient_seed=patient_seed, landmarks=marks)
            labels = [s.label for s in specs]
            common = dict(patient_id=pid, study_id=sid, source=SOURCE, split=splits[p], view=view,
                          findings=list(labels), landmarks=list(marks))
            recs = [
                dict(record_id=f"{sid}-findings", task="report_findings",
                     prompt=text.pick(rng, text.FINDINGS_PROMPTS), answer=text.findings_text(rng, specs, view),
                     boxes=list(boxes), **common),
                dict(record_id=f"{sid}-impression", task="report_impression",
                     prompt=text.pick(rng, text.IMPRESSION_PROMPTS), answer=text.impression_text(rng, specs),
                     boxes=list(boxes), **common),
            ]
            # a VQA record's boxes are its evidence: the regions of the findings its answer rests on
            for q, (qt, question, ans, ev) in enumerate(text.vqa_items(rng, specs, view, vqa_per_study)):
                recs.append(dict(record_id=f"{sid}-vqa-{q}", task="vqa", question_type=qt, prompt=question,
                                 answer=ans, boxes=[b for b in boxes if b.label in ev], **common))
            for i, spec in enumerate(specs):
                recs.append(dict(record_id=f"{sid}-grounding-{i}", task="grounding",
                                 prompt=text.grounding_prompt(spec.label), answer=spec.label,
                                 boxes=[b for b in boxes if b.label == spec.label], **common))
            done += 1
            yield _png_bytes(img), recs


def generate(out_dir: str | Path, n_patients: int = 40, studies_per_patient: tuple[int, int] = (1, 3),
             size: int = 512, seed: int = 0, split_ratios=(0.7, 0.15, 0.15), vqa_per_study: int = 3,
             progress: Callable[[int, int], None] | None = None) -> list[Record]:
    """Draw the phantom dataset in memory: PNGs under ``out_dir/images/`` (content-addressed) and the Records
    (returned, not written). The curation engine streams the same studies through ``iter_studies``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    total = sum(n for n, _ in plan_patients(n_patients, studies_per_patient, seed))
    records: list[Record] = []
    for done, (data, recs) in enumerate(iter_studies(n_patients, studies_per_patient, size, seed, split_ratios,
                                                     vqa_per_study), start=1):
        rel = f"images/{hashlib.sha256(data).hexdigest()[:16]}.png"
        if not (out / rel).exists():
            (out / rel).write_bytes(data)
        records.extend(Record(images=[rel], image_sizes=[[size, size]], **r).validate() for r in recs)
        if progress is not None:
            progress(done, total)
    return records
