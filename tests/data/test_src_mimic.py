"""The MIMIC-family source adapters on tiny native-format fixtures: ids, order, splits, sections, boxes, answers,
``.csv.gz`` variants, and the quarantine of bad inputs (no images are opened — the engine does that)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fx_mimic import (
    IMG_H,
    IMG_W,
    MSCXR_COLS_11,
    MSCXR_SIZE,
    dicom_id,
    hostile_sources,
    jpg_rel,
    write_csv,
    write_medical_cxr_vqa,
    write_mimic_cxr_jpg,
    write_mimic_cxr_vqa,
    write_mimic_hostile,
    write_mimic_reports,
    write_ms_cxr,
)
from PIL import Image

from deepmedix.data import prompts
from deepmedix.data.schema import QUESTION_TYPES, SPLITS
from deepmedix.data.sources import get_source
from deepmedix.data.sources.base import SOURCES, HeaderError, Item, Quarantine, Root
from deepmedix.data.sources.mimic import MimicCxrSource
from deepmedix.data.sources.mimic_vqa import MedicalCxrVqaSource, MimicCxrVqaSource
from deepmedix.data.sources.ms_cxr import MsCxrSource

MINE = {c.name: c for c in (MimicCxrSource, MsCxrSource, MimicCxrVqaSource, MedicalCxrVqaSource)}


def run(name: str, root, **options):
    out = list(MINE[name](Root(str(root)), **options).items())
    items = [x for x in out if isinstance(x, Item)]
    bad = [x for x in out if isinstance(x, Quarantine)]
    assert len(items) + len(bad) == len(out)
    return items, bad


def by_id(items):
    d = {it.record_id: it for it in items}
    assert len(d) == len(items), "record ids must be unique within a source"
    return d


# ------------------------------------------------------------------------------------------------ registry

def test_all_four_registered_with_their_options():
    assert all(SOURCES[n] is c for n, c in MINE.items())
    assert get_source("mimic_cxr") is MimicCxrSource
    assert get_source("mimic_cxr").option_names == ("reports_root", "labels", "tasks", "official_split")
    for name in ("ms_cxr", "mimic_cxr_vqa", "medical_cxr_vqa"):
        assert set(MINE[name].option_names) == {"images_root", "official_split"}
    with pytest.raises(ValueError, match="unknown option"):
        MimicCxrSource(Root("/"), images_root="x")
    with pytest.raises(ValueError, match="labels"):
        MimicCxrSource(Root("/"), labels="chexbert")
    with pytest.raises(ValueError, match="tasks"):
        MimicCxrSource(Root("/"), tasks=["vqa"])
    with pytest.raises(ValueError, match="official_split"):
        MsCxrSource(Root("/"), official_split="maybe")


# ------------------------------------------------------------------------------------------------ MIMIC-CXR

@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic-cxr-jpg")
    info = write_mimic_cxr_jpg(root)
    reports = write_mimic_reports(root)
    return root, info, reports


def test_mimic_cxr_items_ids_and_counts(mimic):
    root, info, reports = mimic
    items, bad = run("mimic_cxr", root)
    assert bad == []
    expected = {f"s{st}-{k}" for st, r in reports.items() for k in ("findings", "impression") if r[k]}
    assert set(by_id(items)) == expected
    assert len(items) == 6  # 4 studies: two with both sections, one impression-only, one findings-only
    for it in items:
        st = it.study_id.split(":s")[1]
        s = info["studies"][st]
        assert it.patient_id == f"mimic:{s['subject']}" and it.study_id == f"mimic:s{st}"
        assert it.split == s["split"] and it.split in SPLITS
        assert it.findings == s["labels"]
        assert it.file.endswith(f"s{st}.txt")


def test_mimic_cxr_frontal_first_and_view(mimic):
    root, info, _ = mimic
    items, _ = run("mimic_cxr", root)
    for it in items:
        st = it.study_id.split(":s")[1]
        s = info["studies"][st]
        assert [Path(r.path).stem for r in it.images] == s["dicoms"]
        assert it.view == s["views"][0]
        assert all(r.root is None and r.data is None for r in it.images)
        for r in it.images:  # the paths point at the real JPEGs (the adapter itself never opens them)
            assert Image.open(root / r.path).size == (IMG_W, IMG_H)
    d = by_id(items)
    assert [Path(r.path).stem for r in d["s50000101-findings"].images][0] == info["studies"]["50000101"]["dicoms"][0]
    assert d["s50000101-findings"].view == "PA"                      # file order was LATERAL, PA
    assert [v for v in info["studies"]["50000203"]["views"]] == ["PA", "AP", "LL"]
    assert d["s50000203-findings"].view == "PA" and len(d["s50000203-findings"].images) == 3
    assert d["s50000102-impression"].view == "AP"


def test_mimic_cxr_sections_prompts_and_deid_spans(mimic):
    root, _, reports = mimic
    d = by_id(run("mimic_cxr", root)[0])
    assert d["s50000101-findings"].answer == reports["50000101"]["findings"]
    assert d["s50000101-impression"].answer == "Cardiomegaly with mild edema."
    assert d["s50000101-findings"].task == "report_findings"
    assert d["s50000101-impression"].task == "report_impression"
    assert d["s50000101-findings"].prompt == prompts.findings_prompt("s50000101-findings")
    assert d["s50000101-impression"].prompt == prompts.impression_prompt("s50000101-impression")
    assert "___" in d["s50000203-findings"].answer                   # MIMIC's de-identified spans are kept
    assert d["s50000203-findings"].answer == reports["50000203"]["findings"]
    assert "s50000102-findings" not in d and "s50000203-impression" not in d
    for it in d.values():  # nothing from the other sections leaks in
        assert "INDICATION" not in it.answer and "COMPARISON" not in it.answer and "\n" not in it.answer


def test_mimic_cxr_deterministic_sorted_stream(mimic):
    root, _, _ = mimic
    a = [(x.record_id, x.answer, [r.path for r in x.images]) for x in run("mimic_cxr", root)[0]]
    b = [(x.record_id, x.answer, [r.path for r in x.images]) for x in run("mimic_cxr", root)[0]]
    assert a == b
    keys = [(int(x.patient_id.split(":")[1]), int(x.study_id.split(":s")[1])) for x in run("mimic_cxr", root)[0]]
    assert keys == sorted(keys)


def test_mimic_cxr_options_tasks_labels_split(mimic):
    root, info, _ = mimic
    items, _ = run("mimic_cxr", root, tasks="report_impression")
    assert {it.task for it in items} == {"report_impression"} and len(items) == 3
    items, _ = run("mimic_cxr", root, tasks=["report_findings"], labels="negbio")
    assert {it.task for it in items} == {"report_findings"} and len(items) == 3
    for it in items:
        assert it.findings == info["studies"][it.study_id.split(":s")[1]]["negbio"]
    assert by_id(items)["s50000101-findings"].findings == ["Cardiomegaly"]  # negbio fixture lacks Edema
    items, _ = run("mimic_cxr", root, official_split=False)
    assert items and all(it.split == "" for it in items)


def test_mimic_cxr_csv_gz_and_separate_reports_root(tmp_path):
    jpg, rep = tmp_path / "mimic-cxr-jpg" / "2.1.0", tmp_path / "mimic-cxr" / "2.0.0"
    info = write_mimic_cxr_jpg(jpg, gz=True)
    write_mimic_reports(rep, prefix="mimic-cxr-reports/")
    assert (jpg / "mimic-cxr-2.0.0-metadata.csv.gz").is_file() and not (jpg / "mimic-cxr-2.0.0-metadata.csv").exists()
    items, bad = run("mimic_cxr", jpg, reports_root=str(rep))
    assert bad == [] and len(items) == 6
    d = by_id(items)
    assert d["s50000304-impression"].split == "test"
    assert d["s50000304-impression"].findings == info["studies"]["50000304"]["labels"]
    assert d["s50000304-impression"].file.startswith("mimic-cxr-reports/files/p10/")
    # reports_root given as the unzipped files/ folder itself
    items, bad = run("mimic_cxr", jpg, reports_root=str(rep / "mimic-cxr-reports" / "files"))
    assert bad == [] and len(items) == 6


def test_mimic_cxr_missing_files(tmp_path):
    with pytest.raises(ValueError, match="mimic-cxr-2.0.0-metadata"):
        run("mimic_cxr", tmp_path)
    write_mimic_cxr_jpg(tmp_path, skip=("split", "chexpert"))
    write_mimic_reports(tmp_path)
    items, bad = run("mimic_cxr", tmp_path)
    assert len(items) == 6
    assert all(it.split == "" and it.findings == [] for it in items)  # seeded split; no labels
    reasons = {q.file: q.reason for q in bad}
    assert set(reasons) == {"mimic-cxr-2.0.0-split.csv(.gz)", "mimic-cxr-2.0.0-chexpert.csv(.gz)"}
    assert "seeded" in reasons["mimic-cxr-2.0.0-split.csv(.gz)"]
    assert "findings left empty" in reasons["mimic-cxr-2.0.0-chexpert.csv(.gz)"]


def test_mimic_cxr_metadata_without_required_column(tmp_path):
    """A header without a required column stops the source with one error naming the file and what it found."""
    write_mimic_cxr_jpg(tmp_path)
    write_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id"],
              [[dicom_id("x"), "10000011", "50000101"]])
    with pytest.raises(HeaderError, match=r"mimic-cxr-2\.0\.0-metadata\.csv: missing required column\(s\) "
                                          r"\['ViewPosition'\]; found \['dicom_id', 'subject_id', 'study_id'\]"):
        run("mimic_cxr", tmp_path)


def test_mimic_cxr_non_utf8_split_file(tmp_path):
    write_mimic_cxr_jpg(tmp_path)
    write_mimic_reports(tmp_path)
    (tmp_path / "mimic-cxr-2.0.0-split.csv").write_bytes(b"dicom_id,study_id,subject_id,split\n\xff\xfe,1,2,3\n")
    items, bad = run("mimic_cxr", tmp_path)
    assert [q.file for q in bad] == ["mimic-cxr-2.0.0-split.csv"] and "UTF-8" in bad[0].reason
    assert len(items) == 6 and all(it.split == "" for it in items)


# ------------------------------------------------------------------------------------------------ MS-CXR

def test_ms_cxr_items_boxes_and_frame(tmp_path):
    jpg = tmp_path / "mimic-cxr-jpg"
    ms = write_ms_cxr(tmp_path / "ms-cxr", images_root=jpg)
    items, bad = run("ms_cxr", tmp_path / "ms-cxr", images_root=str(jpg))
    assert bad == []
    assert len(items) == len(ms["items"]) == 4
    got = {(it.images[0].path, it.prompt): it for it in items}
    for e in ms["items"]:
        it = got[(jpg_rel(e["subject"], e["study"], e["dicom"]), prompts.phrase_grounding_prompt(e["phrase"]))]
        assert it.task == "grounding"
        assert it.patient_id == f"mimic:{e['subject']}" and it.study_id == f"mimic:s{e['study']}"
        assert it.box_frame == MSCXR_SIZE == e["frame"]
        assert [b.box for b in it.boxes] == e["boxes"]                  # x, y, w, h -> x1, y1, x2, y2
        assert {b.label for b in it.boxes} == {e["category"]}
        assert it.answer == e["category"]
        assert it.split == e["split"]
        assert it.images[0].root is not None and Path(it.images[0].root.uri) == jpg
        assert (jpg / it.images[0].path).is_file()
    edema = [it for it in items if it.answer == "Edema"][0]
    assert len(edema.boxes) == 2                                          # a phrase with two rows -> one item
    assert edema.boxes[0].box == [30.0, 60.0, 180.0, 360.0]
    assert {it.split for it in items} == {"train", "validate", "test"}   # "val" normalised
    assert len({it.record_id for it in items}) == 4


def test_ms_cxr_v100_gz_dcm_paths_same_root(tmp_path):
    ms = write_ms_cxr(tmp_path, version="1.0.0", gz=True, path_ext=".dcm")
    assert ms["csv"] == "MS_CXR_Local_Alignment_v1.0.0.csv.gz"
    items, bad = run("ms_cxr", tmp_path)
    assert bad == [] and len(items) == 4
    for it in items:
        assert it.split == ""                                           # v1.0.0 has no split column
        assert it.images[0].root is None and it.images[0].path.endswith(".jpg")
        assert (tmp_path / it.images[0].path).is_file()
    items, _ = run("ms_cxr", tmp_path, official_split=False)
    assert all(it.split == "" for it in items)


def test_ms_cxr_missing_csv_raises(tmp_path):
    with pytest.raises(ValueError, match="MS_CXR_Local_Alignment"):
        run("ms_cxr", tmp_path)


# ------------------------------------------------------------------------------------------------ MIMIC-CXR-VQA

def test_mimic_cxr_vqa_items(tmp_path):
    jpg = tmp_path / "jpg"
    info = write_mimic_cxr_vqa(tmp_path / "vqa", images_root=jpg)
    items, bad = run("mimic_cxr_vqa", tmp_path / "vqa", images_root=str(jpg))
    assert bad == []
    d = by_id(items)
    assert set(d) == set(info["items"]) == {"train-0", "train-3", "train-7", "validate-2", "test-0", "test-1"}
    assert [it.record_id for it in items] == ["train-0", "train-3", "train-7", "validate-2", "test-0", "test-1"]
    for rid, e in info["items"].items():
        it = d[rid]
        assert it.task == "vqa" and it.prompt == e["question"]
        assert it.question_type == e["question_type"] and it.question_type in QUESTION_TYPES
        assert it.answer == e["answer"] and it.split == e["split"]
        assert it.images[0].path == e["image"] and (jpg / e["image"]).is_file()
        assert it.patient_id == f"mimic:{e['subject']}" and it.study_id == f"mimic:s{e['study']}"
    assert d["train-0"].answer == "yes"
    assert d["train-7"].answer == "lung opacity | pulmonary edema/hazy opacity"   # list -> set-compared " | "
    assert d["train-3"].answer == "female"
    assert d["validate-2"].answer == "none"                                 # empty list
    items, _ = run("mimic_cxr_vqa", tmp_path / "vqa", images_root=str(jpg), official_split=False)
    assert all(it.split == "" for it in items)


def test_mimic_cxr_vqa_ids_from_fields_when_no_image_path(tmp_path):
    info = write_mimic_cxr_vqa(tmp_path, folder="dataset")
    p = tmp_path / "dataset" / "test.json"
    data = json.loads(p.read_text())
    for e in data:
        del e["image_path"]
        e["subject_id"], e["study_id"] = int(e["subject_id"]), int(e["study_id"])  # ints, as pandas may write
    p.write_text(json.dumps(data))
    items, bad = run("mimic_cxr_vqa", tmp_path)
    assert bad == []
    d = by_id(items)
    assert d["test-0"].images[0].path == info["items"]["test-0"]["image"]
    assert (tmp_path / d["test-0"].images[0].path).is_file()


def test_mimic_cxr_vqa_missing_everything_raises(tmp_path):
    with pytest.raises(ValueError, match="train/valid/test.json"):
        run("mimic_cxr_vqa", tmp_path)


# ------------------------------------------------------------------------------------------------ Medical-CXR-VQA

def test_medical_cxr_vqa_items(tmp_path):
    jpg = tmp_path / "jpg"
    info = write_medical_cxr_vqa(tmp_path / "q", images_root=jpg)
    items, bad = run("medical_cxr_vqa", tmp_path / "q", images_root=str(jpg))
    assert bad == []
    assert len(items) == len(info["rows"]) == 6
    for it, e in zip(items, info["rows"]):                              # file order
        assert it.task == "vqa" and it.prompt == e["question"]
        assert it.question_type == e["question_type"] and it.answer == e["answer"]
        assert it.split == e["split"] and it.view == e["view"]
        assert it.images[0].path == e["image"] and (jpg / e["image"]).is_file()
        assert it.patient_id == f"mimic:{e['subject']}" and it.study_id == f"mimic:s{e['study']}"
    assert items[0].answer == "cardiomegaly | edema"
    assert {it.split for it in items} == {"train", "validate", "test"}
    assert len({it.record_id for it in items}) == 6
    assert items[0].view == "PA"                                         # mimic_all's "postero-anterior"


def test_medical_cxr_vqa_without_split_or_mimic_all(tmp_path):
    """No split column -> seeded split; no mimic_all.csv -> the frontal image from MIMIC-CXR-JPG's metadata."""
    jpg = tmp_path / "jpg"
    write_mimic_cxr_jpg(jpg, gz=True)
    info = write_medical_cxr_vqa(tmp_path / "q", images_root=jpg, with_split=False, with_mimic_all=False,
                                 name="medical-cxr-vqa-questions.csv")
    items, bad = run("medical_cxr_vqa", tmp_path / "q", images_root=str(jpg))
    assert [q.file for q in bad] == ["mimic_all.csv"]
    assert len(items) == 6
    for it, e in zip(items, info["rows"]):
        assert it.split == "" and it.images[0].path == e["image"] and it.view == e["view"]


# ------------------------------------------------------------------------------------------------ hostile

@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    adapter, engine = write_mimic_hostile(root)
    out = {}
    for name, uri, opts in hostile_sources(root):
        out[name] = run(name, uri, **opts)
    return root, adapter, engine, out


def _matches(q: Quarantine, key: str, reason: str) -> bool:
    return (key in q.file or key in q.record) and reason.lower() in q.reason.lower()


def _one_to_one(expected: list[tuple[str, str]], got: list[Quarantine]) -> dict[int, int]:
    """A maximum matching expected pair -> Quarantine (augmenting paths), so no Quarantine is counted twice."""
    owner: dict[int, int] = {}

    def place(i: int, seen: set[int]) -> bool:
        for j, q in enumerate(got):
            if j not in seen and _matches(q, *expected[i]):
                seen.add(j)
                if j not in owner or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    for i in range(len(expected)):
        place(i, set())
    return {i: j for j, i in owner.items()}


def test_hostile_every_bad_input_quarantined_exactly(hostile):
    _, adapter, engine, out = hostile
    assert len(adapter) >= 40
    quarantined = [q for _, (_, bad) in out.items() for q in bad]
    match = _one_to_one(adapter, quarantined)
    assert [adapter[i] for i in range(len(adapter)) if i not in match] == []          # every bad input caught
    assert [q for j, q in enumerate(quarantined) if j not in match.values()] == []   # and nothing else
    assert len(quarantined) == len(adapter)
    for q in quarantined:
        assert q.reason and q.file and q.source in out
    # the engine-only inputs are not the adapters' business
    for key, _ in engine:
        assert not any(key in q.file or key in q.record for q in quarantined)


def test_hostile_good_inputs_still_come_through(hostile):
    root, _, engine, out = hostile
    items = {name: by_id(it) for name, (it, _) in out.items()}
    # the good MIMIC-CXR studies and the studies that only the engine can reject (absent / broken JPEG)
    assert {"s50000101-findings", "s50000304-impression", "s50000501-findings", "s50000601-findings",
            "s50000901-findings", "s50001101-findings", "s50001701-findings", "s50001801-findings",
            "s50001901-findings"} <= set(items["mimic_cxr"])
    assert "s50000601-findings" in items["mimic_cxr"] and len(items["mimic_cxr"]["s50000601-findings"].images) == 1
    assert items["mimic_cxr"]["s50000901-findings"].split == "train"
    assert items["mimic_cxr"]["s50001701-findings"].findings == []
    assert not any("50000801" in k or "50001201" in k or "50001501" in k for k in items["mimic_cxr"])
    assert len(items["ms_cxr"]) == 4 + 2                               # 4 good + dupbox (deduped) + gone
    dupbox = [it for it in items["ms_cxr"].values() if "opacity dupbox" in it.prompt][0]
    assert len(dupbox.boxes) == 1
    assert set(items["mimic_cxr_vqa"]) == {"train-0", "train-3", "train-7", "train-100", "train-109"}
    assert len(items["medical_cxr_vqa"]) == 6 + 2                      # 6 good + first "is there edema?" + gone
    # every engine-only bad input is still streamed as an Item, pointing at the bad JPEG
    paths = [r.path for it in (x for d in items.values() for x in d.values()) for r in it.images]
    for key, _ in engine:
        assert any(p.endswith(key) for p in paths), key
    for it in (x for d in items.values() for x in d.values()):
        for r in it.images:
            assert ".." not in r.path and not r.path.startswith("/")


def test_hostile_stream_is_deterministic(hostile):
    root, _, _, out = hostile
    for name, uri, opts in hostile_sources(root):
        again = run(name, uri, **opts)
        assert [(x.record_id, x.answer) for x in again[0]] == [(x.record_id, x.answer) for x in out[name][0]]
        assert [(q.file, q.reason) for q in again[1]] == [(q.file, q.reason) for q in out[name][1]]


# ------------------------------------------------------------------------------------------------ edge cases

def test_adapters_never_look_at_images(tmp_path):
    """No JPEG on disk at all: every adapter still streams its Items (finding a missing image is the engine's job)."""
    write_mimic_cxr_jpg(tmp_path, images=False)
    write_mimic_reports(tmp_path)
    assert not list(tmp_path.rglob("*.jpg"))
    items, bad = run("mimic_cxr", tmp_path)
    assert bad == [] and len(items) == 6


def test_ms_cxr_box_on_the_edge_is_clipped_beyond_is_refused(tmp_path):
    W, H = MSCXR_SIZE
    d1, d2 = dicom_id("edge"), dicom_id("beyond")
    rows = [dict(dicom_id=d, category_name="Edema", label_text=f"phrase {d[:4]}",
                 path=jpg_rel("10000011", "50000101", d), x=x, y=0, w=w, h=10, image_width=W, image_height=H,
                 split="test") for d, x, w in ((d1, W - 20, 20.5), (d2, W - 20, 22))]
    write_csv(tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv", MSCXR_COLS_11, rows)
    items, bad = run("ms_cxr", tmp_path)
    assert [it.boxes[0].box for it in items] == [[W - 20.0, 0.0, float(W), 10.0]]
    assert len(bad) == 1 and d2 in bad[0].record and "outside" in bad[0].reason


def test_mimic_cxr_vqa_train_in_parts(tmp_path):
    info = write_mimic_cxr_vqa(tmp_path, folder="dataset")
    train = json.loads((tmp_path / "dataset" / "train.json").read_text())
    (tmp_path / "dataset" / "train.json").unlink()
    (tmp_path / "dataset" / "train_part1.json").write_text(json.dumps(train[:1]))
    (tmp_path / "dataset" / "train_part2.json").write_text(json.dumps(train[1:]))
    items, bad = run("mimic_cxr_vqa", tmp_path)
    assert bad == []
    assert set(by_id(items)) == set(info["items"])


def test_medical_cxr_vqa_dicom_id_column_wins(tmp_path):
    write_medical_cxr_vqa(tmp_path)
    d = dicom_id("chosen-by-row")
    rows = [dict(study_id="50000101", subject_id="10000011", dicom_id=d, question_type="presence",
                 question="is there edema?", answer="yes", split="train")]
    write_csv(tmp_path / "medical_cxr_vqa_questions.csv",
              ["study_id", "subject_id", "dicom_id", "question_type", "question", "answer", "split"], rows)
    items, bad = run("medical_cxr_vqa", tmp_path)
    assert bad == [] and [it.images[0].path for it in items] == [jpg_rel("10000011", "50000101", d)]
