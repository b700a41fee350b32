"""Header robustness in every public adapter that reads CSV (issue 21, item 2).

Public releases spell their headers differently between files and versions (VinDr-CXR's image-label file says
``rad_ID`` where its annotations say ``rad_id``). Every CSV of each fixture dataset, written in the published
format, is rewritten with its columns in reverse order and every header cell re-cased and re-spaced; the adapter
must give exactly the same records and quarantine entries. A header without a required column stops the source
with one error naming the file, the missing columns and the columns it found, never a quarantine per row.

(IU X-ray's reports are XML and MIMIC-CXR-VQA's questions JSON: no header to vary there.)
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import fx_mimic
import fx_public
import pytest

from deepmedix.data.sources import Item, Quarantine, Root, get_source
from deepmedix.data.sources.base import HeaderError, column_key, match_columns


def run(name: str, root: Path, **options) -> tuple[list[tuple], list[tuple]]:
    out = list(get_source(name)(Root(str(root)), **options).items())
    items = sorted((it.record_id, it.patient_id, it.task, it.prompt, it.answer, it.split, it.view,
                    it.question_type, tuple(i.path for i in it.images), tuple(sorted(it.findings)),
                    tuple((b.label, tuple(b.box)) for b in it.boxes)) for it in out if isinstance(it, Item))
    bad = sorted((q.file, q.reason, q.record) for q in out if isinstance(q, Quarantine))
    return items, bad


def _respell(i: int, name: str) -> str:
    if not name.strip():
        return name
    name = name.upper() if i % 2 else name.lower()
    return f"  {name.replace(' ', '   ')}\t"


def vary(path: Path) -> None:
    """Reverse the column order and re-case / re-space every header cell of one CSV (.csv or .csv.gz)."""
    raw = path.read_bytes()
    text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    order = list(reversed(range(width)))
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([_respell(k, rows[0][j]) for k, j in enumerate(order)])
    for r in rows[1:]:
        w.writerow([r[j] for j in order])
    data = out.getvalue().encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def vary_all(root: Path) -> list[str]:
    files = sorted(p for p in root.rglob("*") if p.name.endswith((".csv", ".csv.gz")))
    for p in files:
        vary(p)
    return [p.relative_to(root).as_posix() for p in files]


def _vindr(root):
    fx_public.write_vindr(root)
    return root, {}


def _nih2017(root):
    fx_public.write_chestxray14(root)
    return root, {}


def _nih2020(root):
    fx_public.write_chestxray14(root, v2020=True)
    return root, {}


def _mimic(root):
    fx_mimic.write_mimic_cxr_jpg(root)
    fx_mimic.write_mimic_reports(root)
    return root, {}


def _ms_cxr(root):
    fx_mimic.write_ms_cxr(root / "ms", images_root=root / "jpg")
    fx_mimic.write_mimic_cxr_jpg(root / "jpg", images=False)
    return root / "ms", {"images_root": str(root / "jpg")}


def _medical(root):
    fx_mimic.write_medical_cxr_vqa(root / "q", images_root=root / "jpg")
    return root / "q", {"images_root": str(root / "jpg")}


def _medical_from_metadata(root):  # no mimic_all.csv: the images come from MIMIC-CXR-JPG's metadata CSV
    fx_mimic.write_mimic_cxr_jpg(root / "jpg")
    fx_mimic.write_medical_cxr_vqa(root / "q", images_root=root / "jpg", with_mimic_all=False)
    return root / "q", {"images_root": str(root / "jpg")}


def _mimic_vqa(root):
    fx_mimic.write_mimic_cxr_vqa(root / "vqa", images_root=root / "jpg")
    fx_mimic.write_mimic_cxr_jpg(root / "jpg", images=False)
    return root / "vqa", {"images_root": str(root / "jpg")}


CASES = {"vindr_cxr": _vindr, "chestxray14": _nih2017, "chestxray14-v2020": _nih2020, "mimic_cxr": _mimic,
         "ms_cxr": _ms_cxr, "medical_cxr_vqa": _medical, "medical_cxr_vqa-metadata": _medical_from_metadata,
         "mimic_cxr_vqa": _mimic_vqa}


@pytest.mark.parametrize("case", sorted(CASES))
def test_header_case_spacing_and_order_change_nothing(tmp_path, case):
    source = case.split("-")[0]
    root, options = CASES[case](tmp_path)
    before = run(source, root, **options)
    assert before[0], f"{case}: the fixture gives no records"
    varied = vary_all(tmp_path)
    assert varied, f"{case}: no CSV to vary"
    after = run(source, root, **options)
    assert after == before, f"{case}: records or quarantines changed with the header variant of {varied}"


def test_vindr_rad_ID_in_the_label_file_is_rad_id(tmp_path):
    """The reported miss: image_labels_train.csv spelled ``rad_ID``; every valid row was quarantined as 'not 0/1'."""
    root = tmp_path
    fx_public.write_vindr(root)
    before = run("vindr_cxr", root)
    labels = root / "annotations" / "image_labels_train.csv"
    text = labels.read_text()
    assert text.startswith("image_id,rad_id,")
    labels.write_text(text.replace("image_id,rad_id,", "image_id,rad_ID,", 1))
    after = run("vindr_cxr", root)
    assert after == before
    assert not [b for b in after[1] if "not 0/1" in b[1]]


REQUIRED = [  # (case, file to damage, a required column it loses)
    ("vindr_cxr", "annotations/annotations_train.csv", "class_name"),
    ("vindr_cxr", "annotations/image_labels_train.csv", "image_id"),
    ("chestxray14", "BBox_List_2017.csv", "Finding Label"),
    ("chestxray14", "Data_Entry_2017.csv", "Patient ID"),
    ("mimic_cxr", "mimic-cxr-2.0.0-metadata.csv", "ViewPosition"),
    ("mimic_cxr", "mimic-cxr-2.0.0-split.csv", "split"),
    ("mimic_cxr", "mimic-cxr-2.0.0-chexpert.csv", "study_id"),
    ("ms_cxr", "ms/MS_CXR_Local_Alignment_v1.1.0.csv", "label_text"),
    ("medical_cxr_vqa", "q/medical_cxr_vqa_questions.csv", "question_type"),
    ("medical_cxr_vqa", "q/mimic_all.csv", "dicom_id"),
]


@pytest.mark.parametrize("case, rel, column", REQUIRED, ids=[f"{c}:{r.split('/')[-1]}" for c, r, _ in REQUIRED])
def test_a_missing_required_column_stops_the_source_naming_the_file(tmp_path, case, rel, column):
    root, options = CASES[case](tmp_path)
    path = tmp_path / rel
    rows = list(csv.reader(io.StringIO(path.read_text(), newline="")))
    keys = [column_key(h) for h in rows[0]]
    drop = keys.index(column_key(column))
    kept = [r[:drop] + r[drop + 1:] for r in rows]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(kept)
    path.write_text(out.getvalue())
    with pytest.raises(HeaderError) as err:
        run(case, root, **options)
    message = str(err.value)
    assert rel.split("/")[-1] in message and f"missing required column(s) ['{column}']" in message
    assert f"found {[c.strip() for c in kept[0]]}" in message


def test_match_columns_renames_to_the_published_spelling():
    assert match_columns("f.csv", [" IMAGE_id", "Rad_ID ", "x min", "Extra"], ("image_id",), ("rad_id",)) == \
        ["image_id", "rad_id", "x min", "Extra"]  # "x min" is not "x_min": only case and whitespace are ignored
    with pytest.raises(HeaderError, match=r"f\.csv: missing required column\(s\) \['x_min'\]; found \['image_id'\]"):
        match_columns("f.csv", ["image_id"], ("image_id", "x_min"))


def test_curate_stops_with_the_header_error_and_commits_nothing(tmp_path):
    import subprocess
    import sys

    root, _ = _nih2017(tmp_path / "nih")
    path = root / "Data_Entry_2017.csv"
    path.write_text(path.read_text().replace("Patient ID", "Patient", 1))
    proc = subprocess.run([sys.executable, "-m", "deepmedix.cli", "curate", "--no-card", "--source", "chestxray14",
                           "--root", str(root), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Data_Entry_2017.csv: missing required column(s) ['Patient ID']; found ['Image Index'" in proc.stderr
    assert not (tmp_path / "out" / "lineage.json").exists()  # no dataset committed
