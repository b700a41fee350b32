"""The phantom chest X-ray generator: determinism, boxes on findings, splits, tasks and text."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepmedix.data.phantom import assign_splits, generate
from deepmedix.data.phantom_render import render_study
from deepmedix.data.phantom_text import FINDINGS, SEVERITIES, TYPE_WORD, FindingSpec
from deepmedix.data.schema import QUESTION_TYPES, SPLITS, TASKS

SIZE = 256


def _render_pair(seed: int, spec, size: int = SIZE, view: str = "PA"):
    with_img, boxes = render_study(np.random.default_rng(seed), [spec], size=size, view=view)
    without_img, none = render_study(np.random.default_rng(seed), [], size=size, view=view)
    assert none == []
    return np.asarray(with_img, dtype=float), np.asarray(without_img, dtype=float), boxes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    calls = []
    recs = generate(out, n_patients=14, size=128, seed=3, progress=lambda d, t: calls.append((d, t)))
    return out, recs, calls


# ------------------------------------------------------------------------------------------------ rendering

def test_render_returns_grayscale_image_of_size():
    img, boxes = render_study(np.random.default_rng(0), [], size=SIZE)
    assert img.mode == "L" and img.size == (SIZE, SIZE)
    assert boxes == []
    a = np.asarray(img, dtype=float)
    # dark lung fields on both sides of a brighter mediastinum
    row = a[int(SIZE * 0.4)]
    left_lung, right_lung = row[int(SIZE * 0.3)], row[int(SIZE * 0.7)]
    mediastinum = row[int(SIZE * 0.5) - 3:int(SIZE * 0.5) + 3].mean()
    assert mediastinum > left_lung + 40 and mediastinum > right_lung + 40


@pytest.mark.parametrize("label", FINDINGS)
def test_each_box_lies_on_its_finding(label):
    for seed, sev in zip((11, 12, 13), SEVERITIES):
        a, b, boxes = _render_pair(seed, FindingSpec(label, sev))
        assert [bx.label for bx in boxes] == [label]
        x1, y1, x2, y2 = boxes[0].box
        assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
        xs, ys = slice(int(x1), int(x2)), slice(int(y1), int(y2))
        diff = np.abs(a - b)
        inside = diff[ys, xs]
        # the finding changes the pixels inside its box measurably...
        assert inside.mean() > 2.0, (label, sev, inside.mean())
        # ...and the box holds (nearly) all of the change: it is on the finding, not beside it
        assert inside.sum() / diff.sum() > 0.9, (label, sev)
        signed = (a - b)[ys, xs].mean()
        if label == "pneumothorax":
            assert signed < 0  # lucent
        else:
            assert signed > 1.0  # opaque


def test_box_sizes_follow_the_finding():
    for seed in range(3):
        _, _, (nod,) = _render_pair(seed, FindingSpec("nodule", "moderate"), size=512)
        w = nod.box[2] - nod.box[0]
        assert 10 <= w <= 27, w
        _, _, (mass,) = _render_pair(seed, FindingSpec("mass", "severe"), size=512)
        w = mass.box[2] - mass.box[0]
        assert 55 <= w <= 95, w
    mild = [render_study(np.random.default_rng(5), [("right pleural effusion", s)], size=SIZE)[1][0]
            for s in SEVERITIES]
    heights = [b.box[3] - b.box[1] for b in mild]
    assert heights[0] < heights[1] < heights[2]


def test_sides_follow_radiological_convention():
    # the patient's right is on the image's left
    for seed in range(3):
        for label, side in (("nodule", "right"), ("nodule", "left"), ("pneumothorax", "right"),
                            ("pneumothorax", "left"), ("consolidation", "right"), ("atelectasis", "left")):
            _, (bx,) = render_study(np.random.default_rng(seed), [FindingSpec(label, "moderate", side)], size=SIZE)
            cx = (bx.box[0] + bx.box[2]) / 2
            assert (cx < SIZE / 2) == (side == "right"), (label, side, bx.box)
        _, (right,) = render_study(np.random.default_rng(seed), ["right pleural effusion"], size=SIZE)
        _, (left,) = render_study(np.random.default_rng(seed), ["left pleural effusion"], size=SIZE)
        assert right.box[2] <= SIZE / 2 + 5 and left.box[0] >= SIZE / 2 - 5


def test_cardiomegaly_enlarges_the_heart_with_severity():
    widths = []
    for sev in SEVERITIES:
        _, (bx,) = render_study(np.random.default_rng(2), [("cardiomegaly", sev)], size=SIZE)
        widths.append(bx.box[2] - bx.box[0])
    assert widths[0] < widths[1] < widths[2]
    assert widths[0] / SIZE > 0.32  # beyond a normal cardiothoracic ratio


def test_ap_view_differs_from_pa():
    pa, _ = render_study(np.random.default_rng(4), [], size=SIZE, view="PA")
    ap, _ = render_study(np.random.default_rng(4), [], size=SIZE, view="AP")
    assert np.abs(np.asarray(pa, float) - np.asarray(ap, float)).mean() > 3


def test_render_is_deterministic():
    spec = [("mass", "severe", "left", "lower"), ("pneumothorax", "mild", "right")]
    a = render_study(np.random.default_rng(9), spec, size=SIZE)
    b = render_study(np.random.default_rng(9), spec, size=SIZE)
    c = render_study(np.random.default_rng(10), spec, size=SIZE)
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1]
    assert a[0].tobytes() != c[0].tobytes()


def test_render_rejects_bad_specs():
    with pytest.raises(ValueError):
        render_study(np.random.default_rng(0), ["fracture"], size=SIZE)
    with pytest.raises(ValueError):
        render_study(np.random.default_rng(0), [("nodule", "extreme")], size=SIZE)
    with pytest.raises(ValueError):
        render_study(np.random.default_rng(0), [], size=SIZE, view="LAT")
    with pytest.raises(ValueError):
        render_study(np.random.default_rng(0), [], size=32)
    with pytest.raises(ValueError):
        render_study(np.random.default_rng(0), ["nodule", "nodule"], size=SIZE)


# ------------------------------------------------------------------------------------------------ dataset

def test_generate_is_deterministic_and_seed_dependent(tmp_path):
    kw = dict(n_patients=4, size=96, vqa_per_study=2)
    r1 = generate(tmp_path / "a", seed=1, **kw)
    r2 = generate(tmp_path / "b", seed=1, **kw)
    r3 = generate(tmp_path / "c", seed=2, **kw)
    assert [r.to_row() for r in r1] == [r.to_row() for r in r2]
    imgs_a = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert imgs_a == sorted(p.name for p in (tmp_path / "b" / "images").iterdir())
    for name in imgs_a:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    assert [r.to_row() for r in r1] != [r.to_row() for r in r3]
    assert set(imgs_a) != {p.name for p in (tmp_path / "c" / "images").iterdir()}


def test_records_validate_and_point_at_content_addressed_images(dataset):
    out, recs, _ = dataset
    ids = [r.record_id for r in recs]
    assert len(ids) == len(set(ids))
    for r in recs:
        r.validate()
        assert r.source == "phantom" and r.image_sizes == [[128, 128]] and r.view in ("PA", "AP")
        assert r.patient_id.startswith("phantom-p") and r.study_id.startswith("phantom-s")
        assert len(r.images) == 1 and r.images[0].startswith("images/")
    for rel in {r.images[0] for r in recs}:
        data = (out / rel).read_bytes()
        assert Path(rel).stem == hashlib.sha256(data).hexdigest()[:16]
        with Image.open(out / rel) as im:
            assert im.mode == "L" and im.size == (128, 128)


def test_progress_counts_studies(dataset):
    _, recs, calls = dataset
    n_studies = len({r.study_id for r in recs})
    assert calls == [(i + 1, n_studies) for i in range(n_studies)]


def test_split_by_patient(dataset):
    _, recs, _ = dataset
    split_of: dict[str, set[str]] = {}
    for r in recs:
        split_of.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in split_of.values())
    assert {next(iter(s)) for s in split_of.values()} == set(SPLITS)
    names = assign_splits(40, (0.7, 0.15, 0.15), seed=0)
    assert [names.count(s) for s in SPLITS] == [28, 6, 6]
    assert names == assign_splits(40, (0.7, 0.15, 0.15), seed=0)
    assert names != assign_splits(40, (0.7, 0.15, 0.15), seed=1)


def test_every_task_and_study_structure(dataset):
    _, recs, _ = dataset
    assert {r.task for r in recs} == set(TASKS)
    by_study: dict[str, list] = {}
    for r in recs:
        by_study.setdefault(r.study_id, []).append(r)
    n_normal = 0
    for _sid, rs in by_study.items():
        tasks = [r.task for r in rs]
        findings = rs[0].findings
        assert all(r.findings == findings for r in rs)
        assert tasks.count("report_findings") == 1 and tasks.count("report_impression") == 1
        assert tasks.count("vqa") == 3
        assert tasks.count("grounding") == len(findings)
        assert set(findings) <= set(FINDINGS) and len(findings) <= 3
        study_boxes = rs[0].boxes
        assert sorted(b.label for b in study_boxes) == sorted(findings)
        for r in rs:
            if r.task == "grounding":
                assert r.answer in findings and r.prompt == f"Locate the {r.answer} in this image."
                assert r.boxes and all(b.label == r.answer for b in r.boxes)
            elif r.task == "vqa":
                assert r.boxes == [b for b in study_boxes if b.label in vqa_evidence(r)], r
            else:
                assert r.boxes == study_boxes
        n_normal += not findings
    assert 0 < n_normal < len(by_study)


def vqa_evidence(r) -> set[str]:
    """The findings a phantom VQA answer rests on, read back from the question and answer: the record's boxes must
    be exactly theirs (so a grounded trace cites only what the question is about)."""
    if r.question_type == "abnormality":
        return set(r.findings)
    if r.question_type == "view" or r.answer == "no":
        return set()
    if r.question_type == "type":  # the finding of that type at the place asked (an effusion: the side asked)
        return {f for f in r.findings
                if TYPE_WORD[f] == r.answer and (not f.endswith("effusion") or f.split()[0] in r.prompt.split())}
    # presence "yes", location, level: the finding the question names (an unsided effusion: both sides present)
    named = {f for f in r.findings if f in r.prompt}
    return named or {f for f in r.findings if f.endswith("pleural effusion") and "pleural effusion" in r.prompt}


def test_vqa_answers(dataset):
    _, recs, _ = dataset
    vqa = [r for r in recs if r.task == "vqa"]
    assert {r.question_type for r in vqa} == set(QUESTION_TYPES[:6])  # the six Medical-CXR-VQA types
    saw_list = False
    for r in vqa:
        assert r.record_id.startswith(r.study_id + "-vqa-")
        if r.question_type == "presence":
            assert r.answer in ("yes", "no")
        elif r.question_type == "abnormality":
            assert r.answer == (" | ".join(r.findings) if r.findings else "no finding")
            saw_list |= " | " in r.answer
        elif r.question_type == "level":
            assert r.answer in SEVERITIES and r.findings
        elif r.question_type == "view":
            assert r.answer == r.view
        elif r.question_type == "location":
            assert r.findings and r.answer.split()[0] in ("right", "left")
        else:
            assert r.findings and 1 <= len(r.answer.split()) <= 2
    assert saw_list


def test_presence_answers_match_findings(dataset):
    _, recs, _ = dataset
    for r in recs:
        if r.task == "vqa" and r.question_type == "presence":
            present = " ".join(r.findings)
            for concept in ("cardiomegaly", "nodule", "mass", "pneumothorax", "consolidation", "atelectasis"):
                if f" {concept}?" in r.prompt:
                    assert r.answer == ("yes" if concept in r.findings else "no"), (r.prompt, r.findings)
            if "pleural effusion?" in r.prompt:
                words = r.prompt.split()
                side = next((w for w in words if w in ("left", "right")), None)
                expect = f"{side} pleural effusion" in r.findings if side else "pleural effusion" in present
                assert r.answer == ("yes" if expect else "no"), (r.prompt, r.findings)


def test_report_text(dataset):
    _, recs, _ = dataset
    for r in recs:
        if r.task == "report_impression" and not r.findings:
            assert r.answer == "No acute cardiopulmonary process."
        if r.task == "report_impression" and r.findings:
            assert "no acute" not in r.answer.lower()
        if r.task == "report_findings":
            text = r.answer.lower()
            assert "no " in text  # at least one explicit negation
            assert any(w in text for w in ("heart", "cardiac", "cardiomediastinal", "cardiomegaly"))  # heart size
            for f in r.findings:
                core = "pleural effusion" if f.endswith("pleural effusion") else f
                assert core in text or (f == "cardiomegaly" and "enlarged" in text), (f, r.answer)
                if f.endswith("pleural effusion"):
                    assert f.split()[0] in text
            if "pneumothorax" in r.findings:
                assert "no pneumothorax" not in text
            if not r.findings:
                assert "clear" in text


def test_findings_text_states_severity_and_negations_are_true(dataset):
    _, recs, _ = dataset
    negated_somewhere = set()
    for r in recs:
        if r.task != "report_findings":
            continue
        text = r.answer.lower()
        assert any(s in text for s in SEVERITIES) == bool(r.findings)
        for concept in ("pneumothorax", "pleural effusion", "consolidation"):
            if f"no {concept}" in text or f"no focal {concept}" in text or f"no focal airspace {concept}" in text:
                negated_somewhere.add(concept)
                assert not any(f.endswith(concept) for f in r.findings), (concept, r.answer)
    assert {"pneumothorax", "pleural effusion"} <= negated_somewhere


def test_landmarks_are_the_anatomy_drawn():
    """render_study hands back the lungs and heart it drew, the patient's right lung on the image's left."""
    marks = []
    img, _ = render_study(np.random.default_rng(3), [], size=SIZE, landmarks=marks)
    got = {b.label: b.box for b in marks}
    assert list(got) == ["right lung", "left lung", "heart"]
    right, left, heart = got["right lung"], got["left lung"], got["heart"]
    assert all(0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE for x1, y1, x2, y2 in got.values())
    assert right[2] <= SIZE * 0.6 and left[0] >= SIZE * 0.4 and right[0] < heart[0] < heart[2] < left[2]
    assert (right[3] - right[1]) > SIZE / 3 and (left[3] - left[1]) > SIZE / 3  # lung fields, not specks
    arr = np.asarray(img, dtype=np.float32)
    x1, y1, x2, y2 = (int(v) for v in right)
    assert arr[y1:y2, x1:x2].mean() < arr.mean()  # air: darker than the film as a whole
    again = []
    render_study(np.random.default_rng(3), [], size=SIZE, landmarks=again)
    assert [b.box for b in again] == [b.box for b in marks]
