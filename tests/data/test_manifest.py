"""The ``manifest`` source (issue 21, item 1): a hospital's own studies in ``manifest.jsonl`` / ``manifest.csv``.

Curated with the real CLI (``deepmedix curate --source manifest --root DIR``): every good row (PNG, JPEG, DICOM,
two views, given and derived ids, official and seeded splits) becomes a record; each of 34 hostile rows is
quarantined with its line number and reason, and the rows the engine refuses when it decodes the image (a box
outside it, an undecodable file) are named by line or by record.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import fx_manifest
import pytest

from deepmedix.data.schema import load_records
from deepmedix.data.sources import Item, Quarantine, Root, get_source
from deepmedix.data.sources.base import HeaderError

DEEPMEDIX = [sys.executable, "-m", "deepmedix.cli"]


def curate(root: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*DEEPMEDIX, "curate", "--no-card", "--source", "manifest", "--root", str(root), "--out",
                           str(out)], capture_output=True, text=True, timeout=600)


def quarantine(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "quarantine.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospital") / "export"
    info = fx_manifest.write_manifest_jsonl(root)
    out = root.parent / "curated"
    proc = curate(root, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info["summary"] = json.loads(proc.stdout)
    return root, out, info


def test_every_hostile_row_is_quarantined_by_line(jsonl):
    root, out, info = jsonl
    assert len(info["bad"]) >= 30
    q = [x for x in quarantine(out) if x["source"] == "manifest"]
    by_line = {}
    for x in q:
        if x["file"] == "manifest.jsonl":
            line = int(x["reason"].split(":")[0].removeprefix("line "))
            by_line.setdefault(line, []).append(x["reason"])
    for line, why in info["bad"].items():
        assert line in by_line, f"line {line} ({why}) was not quarantined"
        assert any(why in r for r in by_line[line]), (line, why, by_line[line])
    assert set(by_line) == set(info["bad"]), "only the hostile lines are quarantined by line"
    # the run's summary counts them by kind, not all under "line"
    kinds = info["summary"]["quarantine_by_reason"]
    assert "line" not in kinds and sum(kinds.values()) == len(quarantine(out)), kinds
    assert kinds.get("not valid JSON") == 1 and kinds.get("image not found under the manifest's folder") == 1, kinds
    # the engine's refusals: a box outside the image names the line; an undecodable image its file and record
    for line, (rid, why) in info["engine"].items():
        hits = [x for x in q if x["record"] == f"manifest/{rid}"]
        assert len(hits) == 1 and why in hits[0]["reason"], (rid, hits)
        if rid == "r-outside":
            assert hits[0]["file"] == f"manifest.jsonl line {line}"
        else:
            assert hits[0]["file"].endswith("img/broken.png")


def test_no_good_row_is_lost(jsonl):
    root, out, info = jsonl
    recs = {r.record_id.removeprefix("manifest/"): r for r in load_records(out)}
    named = {rid for rid in info["good"].values() if rid}
    assert named <= set(recs), sorted(named - set(recs))
    assert len(recs) == len(info["good"])  # the derived id too, and nothing else
    derived = [r for r in recs if r not in named]
    assert len(derived) == 1 and derived[0].startswith("s7-report_findings-")
    two = recs["r-two-views"]
    assert len(two.images) == 2 and two.view == "PA"  # every view of the study
    assert recs["r-dicom-vqa"].question_type == "location" and recs["r-yesno"].question_type == "presence"
    assert recs["r-impression"].split == "validate" and recs["r-ground"].split == "test"
    assert recs["r-impression"].view == "AP"
    g = recs["r-ground"]
    assert [b.label for b in g.boxes] == ["Nodule"] and g.prompt == "Locate the nodule in this image."
    sx, sy = g.image_sizes[0][0] / 48, g.image_sizes[0][1] / 40
    assert g.boxes[0].box == pytest.approx([4 * sx, 5 * sy, 20 * sx, 22.5 * sy], abs=0.02)
    assert recs["r-ground-q"].prompt == "Where is the opacity?" and len(recs["r-ground-q"].boxes) == 2
    assert recs["r-findings"].prompt and recs["r-findings"].answer == "Heart size is normal. Lungs are clear."
    assert all(r.patient_id.startswith("manifest:") for r in recs.values())


def _csv_root(tmp_path: Path, header_map=lambda h: h) -> tuple[Path, list]:
    root = tmp_path / "export"
    fx_manifest.write_images(root)
    fields = ["patient_id", "study_id", "image", "view", "task", "question", "answer", "question_type", "boxes",
              "split", "id"]
    rows = [[fx_manifest.csv_cell(row.get(f)) for f in fields] for row, _ in fx_manifest.GOOD]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([header_map(f) for f in fields])
    w.writerows(rows)
    text = out.getvalue().encode()
    bad = [
        b'PQ,SQ,img/p6.png,,caption,,x,,,,bad-task\n',                      # unknown task
        b'PQ,SQ,../secret.png,,report_findings,,x,,,,bad-path\n',           # path traversal
        b'PQ,SQ,img/p6.png,,report_findings,,caf\xe9,,,,bad-utf8\n',        # not UTF-8
        b'PQ,SQ,img/p6.png,,report_findings\n',                             # too few fields
        b'PQ,SQ,img/p6.png|img/gone.png,,report_findings,,x,,,,bad-view\n',  # the second view is missing
    ]
    (root / "manifest.csv").write_bytes(text + b"".join(bad))
    return root, [len(fx_manifest.GOOD) + 2 + k for k in range(len(bad))]


def test_csv_manifest_with_pipe_separated_views(tmp_path):
    root, bad_lines = _csv_root(tmp_path)
    out = list(get_source("manifest")(Root(str(root))).items())
    items = {x.record_id: x for x in out if isinstance(x, Item)}
    q = [x for x in out if isinstance(x, Quarantine)]
    assert len(items) == len(fx_manifest.GOOD)
    assert [i.path for i in items["r-two-views"].images] == ["img/p3.png", "img/lat1.png"]
    assert items["r-ground"].boxes[0].box == [4.0, 5.0, 20.0, 22.5]
    assert sorted(int(x.reason.split(":")[0][5:]) for x in q) == bad_lines
    reasons = " | ".join(x.reason for x in q)
    for why in ("task 'caption'", "path escapes", "not UTF-8", "5 fields, the header has 11", "img/gone.png"):
        assert why in reasons


def test_csv_header_variants_and_header_errors(tmp_path):
    root, _ = _csv_root(tmp_path / "a", header_map=lambda h: f" {h.upper()} ")
    assert len([x for x in get_source("manifest")(Root(str(root))).items() if isinstance(x, Item)]) == \
        len(fx_manifest.GOOD)
    root, _ = _csv_root(tmp_path / "b", header_map=lambda h: "questoin" if h == "question" else h)
    with pytest.raises(HeaderError, match=r"manifest\.csv: unknown column\(s\) \['questoin'\]"):
        list(get_source("manifest")(Root(str(root))).items())
    root, _ = _csv_root(tmp_path / "c", header_map=lambda h: "img" if h == "image" else h)
    with pytest.raises(HeaderError, match=r"manifest\.csv: missing required column\(s\) \['image'\]"):
        list(get_source("manifest")(Root(str(root))).items())


def test_a_folder_without_a_manifest_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = curate(tmp_path / "empty", tmp_path / "out")
    assert proc.returncode == 2 and "holds no manifest.jsonl or manifest.csv" in proc.stderr
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_quarantine_keeps_ids_not_text_and_boxes_make_rows_distinct(tmp_path):
    root = tmp_path / "export"
    fx_manifest.write_images(root)
    rows = [{"patient_id": "P1", "study_id": "S1", "image": "img/p1.png", "task": "grounding", "answer": "Nodule",
             "boxes": [{"label": "Nodule", "box": [1, 1, 9, 9]}]},
            {"patient_id": "P1", "study_id": "S1", "image": "img/p1.png", "task": "grounding", "answer": "Nodule",
             "boxes": [{"label": "Nodule", "box": [20, 20, 30, 30]}]},  # same finding, another box: kept too
            {"patient_id": "P2", "study_id": "S2", "image": "img/p2.png", "task": "caption",
             "answer": "Mr Smith, DOB 01/02/1950: clear lungs."}]
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = list(get_source("manifest")(Root(str(root))).items())
    items = [x for x in out if isinstance(x, Item)]
    (bad,) = [x for x in out if isinstance(x, Quarantine)]
    assert len(items) == 2 and items[0].record_id != items[1].record_id
    assert bad.reason.startswith("line 3: task 'caption'") and "Smith" not in bad.record and "S2" in bad.record


def test_two_manifests_or_a_repeated_column_stop_the_source(tmp_path):
    root, _ = _csv_root(tmp_path / "a")
    (root / "manifest.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds both manifest.jsonl and manifest.csv"):
        list(get_source("manifest")(Root(str(root))).items())
    root, _ = _csv_root(tmp_path / "b", header_map=lambda h: "Image" if h == "view" else h)
    with pytest.raises(HeaderError, match=r"column\(s\) \['image'\] appear more than once"):
        list(get_source("manifest")(Root(str(root))).items())
