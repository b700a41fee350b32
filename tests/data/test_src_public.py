"""The public-dataset adapters (VinDr-CXR, ChestX-ray14, IU X-ray) on tiny native-format fixtures."""

from __future__ import annotations

import shutil

import fx_public
import pytest

from deepmedix.data.prompts import findings_prompt, grounding_prompt, impression_prompt
from deepmedix.data.sources import Item, Quarantine, Root, get_source
from deepmedix.data.sources.base import HeaderError
from deepmedix.data.sources.vindr import fuse_boxes
from deepmedix.grounding import iou


def run(name: str, root, **options) -> tuple[list[Item], list[Quarantine]]:
    out = list(get_source(name)(Root(str(root)), **options).items())
    assert all(isinstance(o, (Item, Quarantine)) for o in out)
    return [o for o in out if isinstance(o, Item)], [o for o in out if isinstance(o, Quarantine)]


def by_id(items: list[Item]) -> dict[str, Item]:
    d = {it.record_id: it for it in items}
    assert len(d) == len(items), "record ids must be unique"
    return d


def boxes(it: Item) -> list[list[float]]:
    return [b.box for b in it.boxes]


# ------------------------------------------------------------------------------------------------ VinDr-CXR
@pytest.fixture(scope="module")
def vindr(tmp_path_factory):
    root = tmp_path_factory.mktemp("vindr")
    return root, fx_public.write_vindr(root)


def test_vindr_both_readers_counts_and_fields(vindr):
    root, info = vindr
    items, bad = run("vindr_cxr", root)
    assert bad == []
    assert len(items) == info["counts"]["both"] == 17
    ids = info["ids"]
    for it in items:
        iid = it.record_id.split("-grounding-")[0]
        assert it.task == "grounding"
        assert it.patient_id == it.study_id == f"vindr:{iid}"
        folder = "test" if iid in (ids["t_boxes"], ids["t_normal"]) else "train"
        assert it.split == folder
        assert [im.path for im in it.images] == [f"{folder}/{iid}.dicom"]
        assert it.box_frame is None and it.view == "PA"
        assert it.prompt == grounding_prompt(it.answer)
        assert it.boxes and all(b.label == it.answer for b in it.boxes)
        assert it.answer in it.findings and "No finding" not in it.findings
        assert it.file.startswith(f"annotations/annotations_{folder}.csv (rows ")
    # images whose readers all said "No finding" give nothing
    assert not any(ids["normal"] in it.record_id or ids["t_normal"] in it.record_id for it in items)


def test_vindr_consensus_fuses_agreeing_readers(vindr):
    root, info = vindr
    ids = info["ids"]
    items, bad = run("vindr_cxr", root, readers="consensus")
    assert bad == []
    got = by_id(items)
    assert len(got) == info["counts"]["consensus"] == 5
    m, t, a = ids["merge"], ids["two"], ids["apart"]
    assert sorted(got) == sorted([f"{m}-grounding-cardiomegaly", f"{t}-grounding-pleural-effusion",
                                  f"{a}-grounding-calcification", f"{ids['t_boxes']}-grounding-aortic-enlargement",
                                  f"{ids['t_boxes']}-grounding-nodule-mass"])
    # three readers' Cardiomegaly boxes -> their mean
    assert boxes(got[f"{m}-grounding-cardiomegaly"]) == [info["merged_box"]]
    # R1 boxed both sides, R2 the left, R3 the right: two clusters of two readers each
    assert boxes(got[f"{t}-grounding-pleural-effusion"]) == info["two_boxes"]
    # IoU 0.4286 >= 0.4: merged
    assert boxes(got[f"{a}-grounding-calcification"]) == [info["calcification_box"]]
    # consensus findings: labels given by >= 2 readers (COPD by R1 and R2, Nodule/Mass by R1 only)
    assert got[f"{m}-grounding-cardiomegaly"].findings == ["Cardiomegaly", "COPD"]
    # no consensus for: a lone reader (Nodule/Mass), disjoint boxes (Atelectasis), one reader's two boxes
    assert not any("nodule-mass" in r and m in r for r in got)
    assert not any("atelectasis" in r or "rib-fracture" in r for r in got)


def test_vindr_fusion_threshold_and_min_readers(vindr):
    root, info = vindr
    ids = info["ids"]
    m, t, a, s = ids["merge"], ids["two"], ids["apart"], ids["self"]
    strict, _ = run("vindr_cxr", root, readers="consensus", fusion_iou=0.5)
    assert f"{a}-grounding-calcification" not in by_id(strict)  # IoU 0.43 < 0.5: two one-reader clusters
    assert f"{m}-grounding-cardiomegaly" in by_id(strict)

    one, _ = run("vindr_cxr", root, readers="consensus", min_readers=1)
    got = by_id(one)
    assert boxes(got[f"{a}-grounding-atelectasis"]) == [[2.0, 2.0, 12.0, 12.0], [30.0, 25.0, 44.0, 38.0]]
    assert boxes(got[f"{m}-grounding-nodule-mass"]) == [[2.0, 2.0, 6.0, 6.0]]
    # a reader never joins its own cluster: the two overlapping R1 boxes stay apart
    assert boxes(got[f"{s}-grounding-rib-fracture"]) == [[5.0, 5.0, 15.0, 15.0], [6.0, 6.0, 16.0, 16.0]]

    three, _ = run("vindr_cxr", root, readers="consensus", min_readers=3)
    train = sorted(r for r in by_id(three) if ids["t_boxes"] not in r)
    assert train == [f"{m}-grounding-cardiomegaly"]
    assert f"{t}-grounding-pleural-effusion" not in by_id(three)


def test_vindr_each_reader(vindr):
    root, info = vindr
    ids = info["ids"]
    m, t, s = ids["merge"], ids["two"], ids["self"]
    items, bad = run("vindr_cxr", root, readers="each")
    assert bad == []
    got = by_id(items)
    assert len(got) == info["counts"]["each"] == 14
    assert {f"{m}-grounding-cardiomegaly-R{k}" for k in (1, 2, 3)} <= set(got)
    assert boxes(got[f"{m}-grounding-cardiomegaly-R2"]) == [[11.0, 21.0, 31.0, 35.0]]
    assert boxes(got[f"{t}-grounding-pleural-effusion-R1"]) == [[2.0, 10.0, 14.0, 30.0], [30.0, 10.0, 44.0, 30.0]]
    assert boxes(got[f"{s}-grounding-rib-fracture-R1"]) == [[5.0, 5.0, 15.0, 15.0], [6.0, 6.0, 16.0, 16.0]]
    # each reader's own findings: boxes plus that reader's image labels
    assert got[f"{m}-grounding-cardiomegaly-R1"].findings == ["Cardiomegaly", "COPD", "Nodule/Mass"]
    assert got[f"{m}-grounding-cardiomegaly-R3"].findings == ["Cardiomegaly"]
    # the test set has no readers: same Items whatever the option
    assert f"{ids['t_boxes']}-grounding-nodule-mass" in got


def test_vindr_test_split_and_label_spelling(vindr):
    root, info = vindr
    tb = info["ids"]["t_boxes"]
    items, _ = run("vindr_cxr", root)
    got = by_id(items)
    nod = got[f"{tb}-grounding-nodule-mass"]
    assert nod.split == "test"
    assert boxes(nod) == [[2.0, 2.0, 6.0, 6.0], [40.0, 30.0, 46.0, 38.0]]
    # "Other disease" in image_labels_test.csv is the train file's "Other diseases"
    assert nod.findings == ["Aortic enlargement", "Nodule/Mass", "Other diseases"]


def test_vindr_is_deterministic(vindr):
    root, _ = vindr
    a, _ = run("vindr_cxr", root)
    b, _ = run("vindr_cxr", root)
    assert [(i.record_id, boxes(i), i.findings) for i in a] == [(i.record_id, boxes(i), i.findings) for i in b]
    # the annotation rows are shuffled in the file; Items come image by image in sorted order, train first
    images = [i.record_id.split("-grounding-")[0] for i in a]
    train, test = images[:15], images[15:]
    assert {i.split for i in a[:15]} == {"train"} and {i.split for i in a[15:]} == {"test"}
    assert train == sorted(train) and test == sorted(test)


def test_fuse_boxes_rules():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    # equal-weight mean of the cluster
    assert fuse_boxes([("A", [0, 0, 10, 10]), ("B", [2, 2, 12, 12])], 0.4, 2) == [[1.0, 1.0, 11.0, 11.0]]
    # below the IoU threshold: no merge, so no box has two readers
    assert fuse_boxes([("A", [0, 0, 10, 10]), ("B", [5, 0, 15, 10])], 0.4, 2) == []
    assert fuse_boxes([("A", [0, 0, 10, 10]), ("B", [5, 0, 15, 10])], 0.3, 2) == [[2.5, 0.0, 12.5, 10.0]]
    # one vote per reader per cluster
    assert fuse_boxes([("A", [0, 0, 10, 10]), ("A", [0, 0, 10, 11])], 0.4, 2) == []
    # a box joins the cluster it overlaps most
    got = fuse_boxes([("A", [0, 0, 10, 10]), ("A", [6, 0, 16, 10]), ("B", [5, 0, 15, 10])], 0.3, 2)
    assert got == [[5.5, 0.0, 15.5, 10.0]]
    # input order does not matter
    boxes_ = [("R2", [1, 1, 9, 9]), ("R1", [0, 0, 10, 10]), ("R3", [30, 30, 40, 40]), ("R3", [0, 1, 10, 9])]
    assert fuse_boxes(boxes_, 0.4, 2) == fuse_boxes(list(reversed(boxes_)), 0.4, 2)


def test_vindr_option_and_file_errors(tmp_path):
    root = Root(str(tmp_path))
    cls = get_source("vindr_cxr")
    for bad_opts in ({"readers": "all"}, {"fusion_iou": 0}, {"fusion_iou": 1.5}, {"min_readers": 0},
                     {"fusion_iou": "x"}, {"color": "red"}):
        with pytest.raises(ValueError):
            cls(root, **bad_opts)
    items, bad = run("vindr_cxr", tmp_path)  # an empty folder: both annotation files reported, nothing raised
    assert items == []
    assert sorted((q.file, q.reason) for q in bad) == [
        ("annotations/annotations_test.csv", "file not found"),
        ("annotations/annotations_train.csv", "file not found")]


def test_vindr_class_id_column_and_missing_label_files(tmp_path):
    """Extra columns (the Kaggle ``class_id``) are ignored; the image-label files are optional."""
    iid = fx_public.vindr_id("x")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/annotations_train.csv").write_text(
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
        f"{iid},Cardiomegaly,3,R9,1.5,2.5,20.25,30\n{iid},cardiomegaly,3,R10,2,3,21,31\n")
    (tmp_path / "annotations/annotations_test.csv").write_text("image_id,class_name,x_min,y_min,x_max,y_max\n")
    items, bad = run("vindr_cxr", tmp_path)
    assert bad == []
    got = by_id(items)
    assert sorted(got) == [f"{iid}-grounding-cardiomegaly", f"{iid}-grounding-cardiomegaly-R10",
                           f"{iid}-grounding-cardiomegaly-R9"]
    assert boxes(got[f"{iid}-grounding-cardiomegaly-R9"]) == [[1.5, 2.5, 20.25, 30.0]]
    assert got[f"{iid}-grounding-cardiomegaly"].answer == "Cardiomegaly"  # class names matched case-insensitively
    assert boxes(got[f"{iid}-grounding-cardiomegaly"]) == [[1.75, 2.75, 20.625, 30.5]]


# ------------------------------------------------------------------------------------------------ ChestX-ray14
@pytest.mark.parametrize("v2020,layout", [(False, "kaggle"), (True, "flat")])
def test_chestxray14_items(tmp_path, v2020, layout):
    info = fx_public.write_chestxray14(tmp_path, v2020=v2020, layout=layout)
    items, bad = run("chestxray14", tmp_path)
    assert bad == []
    got = by_id(items)
    assert sorted(got) == info["record_ids"] and len(items) == info["count"]
    for it in items:
        name = it.record_id.split("-grounding-")[0] + ".png"
        assert it.task == "grounding" and it.box_frame == (1024, 1024)
        assert [im.path for im in it.images] == [info["paths"][name]]
        assert it.study_id == f"nih:{name[:-4]}"
        assert it.prompt == grounding_prompt(it.answer)
        assert it.file.startswith("BBox_List_2017.csv (rows ")
    card = got["00000001_000-grounding-cardiomegaly"]
    # [x, y, w, h] -> [x1, y1, x2, y2], in the 1024x1024 frame
    assert boxes(card) == [[100.5, 200.25, 400.5, 350.25]]
    assert card.patient_id == "nih:1" and card.view == "PA" and card.split == "test"
    assert card.findings == ["Cardiomegaly", "Effusion"]
    eff = got["00000001_000-grounding-effusion"]
    assert boxes(eff) == [[50.0, 520.0, 230.0, 760.0], [600.0, 500.0, 800.0, 750.0]]
    inf = got["00000002_001-grounding-infiltration"]  # "Infiltrate" in the bbox list
    assert inf.answer == "Infiltration" and inf.boxes[0].label == "Infiltration"
    assert inf.view == "AP" and inf.split == "train" and inf.patient_id == "nih:2"
    assert inf.findings == ["Infiltration", "Mass", "Nodule"]
    # "No Finding" in Data_Entry is dropped; the box label still counts as a finding
    assert got["00000003_000-grounding-pneumothorax"].findings == ["Pneumothorax"]
    # overshoot of 1.5 px past the frame: clipped to 1024
    assert boxes(got["00000005_002-grounding-atelectasis"]) == [[1000.0, 10.0, 1024.0, 30.0]]
    assert not any(r.startswith("00000004_000") for r in got)  # no box: no Item


def test_chestxray14_without_split_lists_uses_seeded_split(tmp_path):
    fx_public.write_chestxray14(tmp_path)
    (tmp_path / "test_list.txt").unlink()
    items, bad = run("chestxray14", tmp_path)
    assert len(items) == 6 and {it.split for it in items} == {""}
    assert [(q.file, q.reason.split(";")[0]) for q in bad] == [("test_list.txt", "file not found")]


def test_chestxray14_plain_bbox_header_and_option(tmp_path):
    fx_public.write_chestxray14(tmp_path)
    (tmp_path / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,x,y,w,h\n00000001_000.png,Mass,1,2,3,4\n")
    shutil.move(tmp_path / "Data_Entry_2017.csv", tmp_path / "meta.csv")
    items, bad = run("chestxray14", tmp_path, data_entry="meta.csv")
    assert bad == []
    assert [(it.record_id, boxes(it)) for it in items] == [("00000001_000-grounding-mass", [[1.0, 2.0, 4.0, 6.0]])]
    items, bad = run("chestxray14", tmp_path)  # default names: no Data_Entry file
    assert items == [] and [(q.file, q.reason) for q in bad] == [("Data_Entry_2017.csv", "file not found")]


def test_chestxray14_missing_bbox_column(tmp_path):
    fx_public.write_chestxray14(tmp_path)
    (tmp_path / "BBox_List_2017.csv").write_text("Image Index,Bbox [x,y,w,h],,,\n00000001_000.png,1,2,3,4,,,\n")
    with pytest.raises(HeaderError, match=r"BBox_List_2017\.csv: missing required column\(s\) \['Finding Label'\]; "
                                          r"found \['Image Index', 'Bbox \[x', 'y', 'w', 'h\]', '', '', ''\]"):
        run("chestxray14", tmp_path)


# ------------------------------------------------------------------------------------------------ IU X-ray
def test_iu_xray_items(tmp_path):
    info = fx_public.write_iu_xray(tmp_path)
    items, bad = run("iu_xray", tmp_path)
    assert bad == []
    got = by_id(items)
    assert len(items) == info["count"]
    assert sorted(got) == sorted(f"CXR{k}-{s}" for k in (1, 2, 10) for s in ("findings", "impression"))
    # report order: 1.xml, 2.xml, 10.xml
    assert [it.record_id for it in items][::2] == ["CXR1-findings", "CXR2-findings", "CXR10-findings"]
    for it in items:
        uid = it.record_id.rsplit("-", 1)[0]
        assert it.patient_id == it.study_id == f"iu:{uid}"
        assert it.split == "" and it.view == "" and it.boxes == [] and it.box_frame is None
        assert [im.path for im in it.images] == info["images"][uid]  # XML order, not sorted
        assert it.findings == info["mesh"][uid]
        want = findings_prompt(it.record_id) if it.task == "report_findings" else impression_prompt(it.record_id)
        assert it.prompt == want
        assert it.file.startswith("ecgen-radiology/")
    assert got["CXR1-findings"].task == "report_findings" and got["CXR1-impression"].task == "report_impression"
    assert got["CXR1-findings"].answer == info["findings"]["CXR1"]
    assert got["CXR10-findings"].answer == info["findings"]["CXR10"]  # whitespace normalised
    assert got["CXR10-impression"].answer == "Hyperexpanded lungs."
    assert got["CXR2-impression"].answer == "Borderline cardiomegaly. XXXX."  # de-identification spans kept


def test_iu_xray_folder_options_and_fallback(tmp_path):
    fx_public.write_iu_xray(tmp_path / "a", images_dir="pngs")
    shutil.move(tmp_path / "a/ecgen-radiology", tmp_path / "a/reports")
    items, bad = run("iu_xray", tmp_path / "a", reports_dir="reports", images_dir="pngs")
    assert bad == [] and len(items) == 6
    assert items[0].images[0].path == "pngs/CXR1_1_IM-0001-3001.png"
    # default images_dir absent: the PNGs are found anywhere under the root
    items, bad = run("iu_xray", tmp_path / "a", reports_dir="reports")
    assert bad == [] and items[0].images[0].path == "pngs/CXR1_1_IM-0001-3001.png"
    (tmp_path / "empty").mkdir()
    items, bad = run("iu_xray", tmp_path / "empty")
    assert items == [] and [q.reason for q in bad] == ["no XML reports found"]


# ------------------------------------------------------------------------------------------------ all three
def test_adapters_never_open_images(tmp_path, monkeypatch):
    fx_public.write_vindr(tmp_path / "v")
    fx_public.write_chestxray14(tmp_path / "c")
    fx_public.write_iu_xray(tmp_path / "i")
    real = Root.read_bytes

    def guarded(self, rel):
        if rel.lower().endswith((".png", ".dicom", ".dcm", ".jpg")):
            raise AssertionError(f"adapter opened image {rel}")
        return real(self, rel)

    monkeypatch.setattr(Root, "read_bytes", guarded)
    assert len(run("vindr_cxr", tmp_path / "v")[0]) == 17
    assert len(run("chestxray14", tmp_path / "c")[0]) == 6
    assert len(run("iu_xray", tmp_path / "i")[0]) == 6


def test_hostile_inputs_are_quarantined_exactly(tmp_path):
    adapter_expected, engine_expected = fx_public.write_public_hostile(tmp_path)
    assert len(adapter_expected) >= 40
    counts = {"vindr_cxr": 6, "chestxray14": 5, "iu_xray": 15}
    quarantined: list[Quarantine] = []
    paths: set[str] = set()
    for name, n_items in counts.items():
        items, bad = run(name, tmp_path / name)
        assert len(items) == n_items, name
        assert len({it.record_id for it in items}) == n_items
        assert all(q.source == name and q.reason for q in bad)
        quarantined += bad
        paths |= {im.path for it in items for im in it.images}

    def matches(q: Quarantine, where: str, why: str) -> bool:
        return where in f"{q.file} {q.record}" and why in q.reason

    for where, why in adapter_expected:
        hits = [q for q in quarantined if matches(q, where, why)]
        assert len(hits) == 1, f"expected one quarantine for ({where!r}, {why!r}), got {hits}"
    unexpected = [q for q in quarantined if not any(matches(q, w, y) for w, y in adapter_expected)]
    assert unexpected == []
    assert len(quarantined) == len(adapter_expected)
    # what only the engine can see is passed on as ordinary Items
    for where, _ in engine_expected:
        assert any(where in p for p in paths), where
        assert not any(where in f"{q.file} {q.record}" for q in quarantined)

