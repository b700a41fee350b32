"""The curation engine: streaming, workers, dedupe, splits, box rescaling, quarantine, atomic shards, resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepmedix.config import ConfigError, load_config
from deepmedix.data.curate import curate
from deepmedix.data.curate_state import seeded_split
from deepmedix.data.schema import Box, RecordError, load_records, read_shard
from deepmedix.data.sources import ImageRef, Item, Source

REPO = Path(__file__).resolve().parents[2]
DEEPMEDIX = str(Path(sys.executable).with_name("deepmedix"))


def _cfg(**kw):
    base = {"n_studies": 10, "image_size": 96, "vqa_per_study": 1, "shard_size": 8, "workers": 1}
    base.update(kw)
    return load_config("curate", "tiny", [f"{k}={json.dumps(v)}" for k, v in base.items()])


def _png_chunks(data: bytes) -> list[bytes]:
    pos, out = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        out.append(data[pos + 4:pos + 8])
        pos += 12 + n
    return out


def test_phantom_streams_through_the_engine(tmp_path):
    out = tmp_path / "ds"
    seen = []
    r = curate(_cfg(workers=2), str(out), progress=lambda done, total: seen.append(done))
    recs = load_records(out)
    assert r["after"] == len(recs) > 0 and r["quarantined"] == 0
    assert seen == sorted(seen) and seen[-1] == r["after"]  # progress per chunk, monotone
    assert (out / "lineage.json").exists() and not (out / "_work").exists()
    man = json.loads((out / "manifest.json").read_text())
    assert sum(man["counts"].values()) == len(recs) == man["total"]
    assert man["sources"][0]["name"] == "phantom" and len(man["sources"][0]["input_hash"]) == 64
    lin = json.loads((out / "lineage.json").read_text())
    assert lin["config_hash"] == man["config_hash"] and lin["manifest"]["total"] == len(recs)
    # images: stored once, content-addressed, 8-bit grayscale PNG without metadata chunks
    refs = {i for rec in recs for i in rec.images}
    on_disk = {p.relative_to(out).as_posix() for p in (out / "images").iterdir()}
    assert refs == on_disk
    for rel in list(refs)[:5]:
        data = (out / rel).read_bytes()
        assert _png_chunks(data) == [b"IHDR", b"IDAT", b"IEND"]
        assert Image.open(io.BytesIO(data)).mode == "L"
    assert all(rec.record_id.startswith("phantom/") for rec in recs)
    splits = {}
    for rec in recs:
        assert splits.setdefault(rec.patient_id, rec.split) == rec.split
    # shards are named per split, source and chunk
    names = sorted(p.name for p in (out / "records").iterdir())
    assert names and all(n.split("-")[0] in ("train", "validate", "test") and "-00-phantom-" in n for n in names)


def test_workers_do_not_change_the_dataset(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    curate(_cfg(workers=1), str(a))
    curate(_cfg(workers=2), str(b))
    ra, rb = load_records(a), load_records(b)
    assert [(r.record_id, r.images, r.answer, r.split) for r in ra] == [(r.record_id, r.images, r.answer, r.split)
                                                                         for r in rb]
    assert (json.loads((a / "lineage.json").read_text())["sha256"]
            == json.loads((b / "lineage.json").read_text())["sha256"])


def test_rerun_skips_a_complete_dataset_and_a_new_config_rewrites_it(tmp_path):
    out = tmp_path / "ds"
    first = curate(_cfg(), str(out))
    again = curate(_cfg(), str(out))
    assert "skipped" in again and again["after"] == first["after"]
    smaller = curate(_cfg(n_studies=4, shard_size=3), str(out))
    recs = load_records(out)
    assert len(recs) == smaller["after"] < first["after"]
    refs = {i for rec in recs for i in rec.images}
    assert {p.relative_to(out).as_posix() for p in (out / "images").iterdir()} == refs  # old images removed
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["n_studies"] == 4


def test_limit_and_ratio_sample_deterministically(tmp_path):
    full = load_records(Path(curate(_cfg(), str(tmp_path / "f")) and tmp_path / "f"))
    curate(_cfg(limit=7), str(tmp_path / "l"))
    assert len(load_records(tmp_path / "l")) == 7
    curate(_cfg(ratio=0.5), str(tmp_path / "r1"))
    curate(_cfg(ratio=0.5), str(tmp_path / "r2"))
    r1 = [r.record_id for r in load_records(tmp_path / "r1")]
    assert r1 == [r.record_id for r in load_records(tmp_path / "r2")]
    assert 0.25 * len(full) < len(r1) < 0.75 * len(full)


@pytest.mark.parametrize("override, match", [
    ({"ratio": 0}, "'ratio' must be a number in \\(0, 1\\]"),
    ({"source": "nope"}, "unknown source 'nope'"),
    ({"source": "iu_xray"}, "'root' .* is required"),
    ({"sources": [{"name": "phantom", "rooot": "x"}]}, "sources\\[0\\]: unknown key"),
    ({"phash_distance": 99}, "phash_distance"),
])
def test_bad_config_names_the_key(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        curate(_cfg(**override), str(tmp_path / "x"))


# ------------------------------------------------------------------ engine rules, on a source made in memory

def _png(seed: int, size=(120, 100), shift: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    a = (100 + 60 * np.sin((x + shift) / (5 + seed % 7)) * np.cos(y / (4 + seed % 5))
         + rng.normal(0, 20, (size[1], size[0])))
    buf = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_copy(png: bytes, scale: float) -> bytes:
    im = Image.open(io.BytesIO(png))
    im = im.resize((int(im.width * scale), int(im.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


class MemSource(Source):
    """A source whose Items are given to it (the engine's own rules are what is tested here)."""
    name = "memtest"
    option_names = ("case",)
    needs_root = False
    CASES: dict[str, list] = {}

    def items(self):
        for x in self.CASES[self.options["case"]]:
            if isinstance(x, Exception):
                raise x  # the adapter dies mid-stream
            yield x


def _item(rid, pid, sid, img, task="report_findings", answer="The lungs are clear.", split="", **kw):
    return Item(record_id=rid, patient_id=pid, study_id=sid, task=task, prompt="Describe the findings.",
                answer=answer, images=[ImageRef(data=img, name=f"img-{rid}")], split=split, file=f"meta.csv:{rid}",
                **kw)


def _mem_cfg(case, **kw):
    return load_config("curate", "tiny", ["source=memtest", f"options={{case: {case}}}",
                                          f"shard_size={kw.pop('shard_size', 50)}", "workers=1"]
                       + [f"{k}={json.dumps(v)}" for k, v in kw.items()])


def _run_mem(tmp_path, case, items, **kw):
    MemSource.CASES[case] = items
    out = tmp_path / case
    r = curate(_mem_cfg(case, **kw), str(out))
    q = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    return r, load_records(out), q


def test_duplicate_images_across_patients_are_dropped_within_a_study_kept(tmp_path):
    a, b = _png(1), _png(2)
    items = [
        _item("s1-f", "p1", "s1", a), _item("s1-i", "p1", "s1", a, task="report_impression", answer="Normal."),
        _item("s2-f", "p2", "s2", a),                       # same pixels, another patient: a leak
        _item("s3-f", "p3", "s3", _jpeg_copy(a, 0.8)),      # re-encoded, rescaled copy: near duplicate
        _item("s4-f", "p4", "s4", b),
        _item("s5-f", "p1", "s5", _jpeg_copy(a, 0.9)),      # follow-up of the same patient that looks alike: kept
    ]
    r, recs, q = _run_mem(tmp_path, "dups", items)
    assert sorted(x.record_id for x in recs) == ["memtest/s1-f", "memtest/s1-i", "memtest/s4-f", "memtest/s5-f"]
    reasons = {x["record"]: x["reason"] for x in q}
    assert reasons["memtest/s2-f"].startswith("duplicate image: identical to an image of study s1")
    assert reasons["memtest/s3-f"].startswith("near-duplicate image (perceptual hash distance")
    assert len({i for x in recs for i in x.images}) == 3  # s1's image stored once for two records


def _dup_items(case):
    a, b = _png(1), _png(2)
    return [
        _item("s1-f", "p1", "s1", a), _item("s1-i", "p1", "s1", a, task="report_impression", answer="Normal."),
        _item("s4-f", "p4", "s4", b),
        _item("s6-f", "p6", "s6", _png(5), answer="The lungs are clear."),
        _item("s2-f", "p2", "s2", a),                       # exact copy, in a later chunk
        _item("s3-f", "p3", "s3", _jpeg_copy(a, 0.8)),      # near duplicate, in a later chunk
        _item("s7-f", "p6", "s6", _png(5), answer="the lungs are clear"),  # same record as s6-f
        _item("s5-f", "p1", "s5", _jpeg_copy(a, 0.9)),      # same patient: kept
    ]


def test_duplicates_are_found_across_chunks_and_after_a_resume(tmp_path):
    def outcome(case, **kw):
        r, recs, q = _run_mem(tmp_path, case, _dup_items(case), **kw)
        return sorted(x.record_id for x in recs), sorted((x["record"], x["reason"].split(" (")[0]) for x in q)

    whole = outcome("dupwhole", shard_size=50)
    assert whole == outcome("dupchunks", shard_size=2)  # the state carried from chunk to chunk
    assert whole[0] == ["memtest/s1-f", "memtest/s1-i", "memtest/s4-f", "memtest/s5-f", "memtest/s6-f"]
    assert [r for r, _ in whole[1]] == ["memtest/s2-f", "memtest/s3-f", "memtest/s7-f"]
    # interrupted after the first two chunks: the rerun replays them from their markers, then finds the same
    out = tmp_path / "dupresume"
    MemSource.CASES["dupresume"] = _dup_items("dupresume")[:6] + [RuntimeError("interrupted")]
    with pytest.raises(RuntimeError):
        curate(_mem_cfg("dupresume", shard_size=2), str(out))
    MemSource.CASES["dupresume"] = _dup_items("dupresume")
    assert curate(_mem_cfg("dupresume", shard_size=2), str(out))["resumed_chunks"] == 2
    q = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert (sorted(x.record_id for x in load_records(out)),
            sorted((x["record"], x["reason"].split(" (")[0]) for x in q)) == whole
    assert {x["record"]: x["reason"] for x in q}["memtest/s7-f"].endswith("as memtest/s6-f")
    man = json.loads((out / "manifest.json").read_text())
    assert man["images"] == 4 == len(list((out / "images").iterdir()))


def test_duplicate_texts_ids_and_empty_texts(tmp_path):
    a, b = _png(3), _png(4)
    items = [
        _item("x1", "p1", "s1", a, answer="No acute   cardiopulmonary process."),
        _item("x2", "p1", "s1", a, answer="no acute cardiopulmonary process"),   # same record after normalising
        _item("x1", "p1", "s1", a, answer="Something else."),                     # duplicate id
        _item("x3", "p2", "s2", b, answer="   "),                                 # empty
        _item("x4", "p2", "s2", b, answer="No acute cardiopulmonary process."),   # same text, other image: kept
    ]
    r, recs, q = _run_mem(tmp_path, "texts", items)
    assert sorted(x.record_id for x in recs) == ["memtest/x1", "memtest/x4"]
    got = sorted((x["record"], x["reason"].split(":")[0].split(" (")[0]) for x in q)
    assert got == [("memtest/x1", "duplicate record id memtest/x1"), ("memtest/x2", "duplicate record"),
                   ("memtest/x3", "empty answer text")]
    assert all(x["file"].startswith("meta.csv:") for x in q)


def test_boxes_follow_the_resize_and_the_box_frame(tmp_path):
    big = _png(5, size=(1000, 800))
    items = [
        _item("g1", "p1", "s1", big, task="grounding", answer="nodule", boxes=[Box("nodule", [100, 200, 300, 400])]),
        # boxes given on a 2000x1600 frame (like MS-CXR's image_width/height for a downsized JPEG)
        _item("g2", "p1", "s1", big, task="grounding", answer="mass", boxes=[Box("mass", [200, 400, 600, 800])],
              box_frame=(2000, 1600)),
        _item("g3", "p1", "s1", big, task="grounding", answer="x", boxes=[Box("x", [1200, 10, 1300, 20])]),
        _item("g4", "p1", "s1", big, task="grounding", answer="y", boxes=[Box("y", [50, 50, 40, 60])]),
    ]
    r, recs, q = _run_mem(tmp_path, "boxes", items, max_pixels=250 * 200)
    by = {x.record_id: x for x in recs}
    assert by["memtest/g1"].image_sizes == [[250, 200]]
    assert by["memtest/g1"].boxes[0].box == [25.0, 50.0, 75.0, 100.0]
    assert by["memtest/g2"].boxes[0].box == [25.0, 50.0, 75.0, 100.0]
    reasons = {x["record"]: x["reason"] for x in q}
    assert "lies outside the 1000x800 image" in reasons["memtest/g3"]
    assert "has no area" in reasons["memtest/g4"]


def test_splits_official_seeded_and_patient_disjoint(tmp_path):
    items = [_item(f"o{i}", f"p{i}", f"s{i}", _png(10 + i), split="test") for i in range(3)]
    items += [_item(f"n{i}", f"q{i}", f"t{i}", _png(20 + i)) for i in range(12)]
    items.append(_item("late", "p0", "s9", _png(40), split="train"))  # p0 is already in test: stays there
    r, recs, q = _run_mem(tmp_path, "splits", items, split_ratios=[0.5, 0.25, 0.25])
    by = {x.record_id: x for x in recs}
    assert all(by[f"memtest/o{i}"].split == "test" for i in range(3))
    assert by["memtest/late"].split == "test"
    assert json.loads((tmp_path / "splits" / "manifest.json").read_text())["split_reassigned"] == 1
    for i in range(12):
        assert by[f"memtest/n{i}"].split == seeded_split(f"q{i}", 0, [0.5, 0.25, 0.25])
    assert len({by[f"memtest/n{i}"].split for i in range(12)}) >= 2


def test_phi_is_scrubbed_from_texts(tmp_path):
    items = [_item("t1", "p1", "s1", _png(50), answer="Compared to 03/14/2019, Dr. John Smith was paged at "
                                                         "555-123-4567. Small left effusion, 3.2 cm.")]
    r, recs, q = _run_mem(tmp_path, "phi", items)
    ans = recs[0].answer
    for phi in ("03/14/2019", "John", "Smith", "555-123-4567"):
        assert phi not in ans
    assert "___" in ans and "Small left effusion, 3.2 cm." in ans


# ----------------------------------------------------------------------- crash in the middle, then resume

def _markers(out: Path) -> list[Path]:
    return list((out / "_work").rglob("*.json")) if (out / "_work").exists() else []


def test_killed_run_leaves_no_partial_shard_and_the_rerun_completes(tmp_path):
    args = ["data", "phantom", "--n", "60", "--workers", "1", "--set", "image_size=96", "--set", "shard_size=10",
            "--set", "vqa_per_study=1"]
    ref = tmp_path / "ref"
    subprocess.run([DEEPMEDIX, *args, "--out", str(ref)], check=True, capture_output=True, cwd=REPO)
    out = tmp_path / "ds"
    proc = subprocess.Popen([DEEPMEDIX, *args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO, start_new_session=True)
    deadline = time.time() + 120
    while len(_markers(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(_markers(out)) < 20, "the run should have been killed part-way"
    assert not (out / "lineage.json").exists()
    for p in (out / "records").glob("*"):  # every visible shard is whole (temporary names start with '.')
        assert p.name.startswith(".") or read_shard(p)
    with pytest.raises(RecordError, match="curation has not finished"):
        load_records(out)
    done = subprocess.run([DEEPMEDIX, *args, "--out", str(out)], check=True, capture_output=True, text=True, cwd=REPO)
    summary = json.loads(done.stdout)
    assert summary["resumed_chunks"] >= 2

    def key(rs):
        return [(r.record_id, r.images, r.prompt, r.answer, r.split, [b.box for b in r.boxes]) for r in rs]

    assert key(load_records(out)) == key(load_records(ref))
    assert not list((out / "records").glob(".*"))


# ------------------------------------------------------------------------------------------------------ CLI

def test_cli_curate_one_source_with_limit_and_workers(tmp_path):
    import fx_public

    fx_public.write_iu_xray(tmp_path / "iu")
    r = subprocess.run([DEEPMEDIX, "curate", "--no-card", "--source", "iu_xray", "--root", str(tmp_path / "iu"),
                        "--out", str(tmp_path / "out"), "--limit", "4", "--workers", "2"], capture_output=True,
                       text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["after"] == 4
    assert "curate: 4 records kept, 0 quarantined" in r.stderr
    assert "━" in r.stderr and "0:00:" in r.stderr  # the progress bar (bar and elapsed time)
    recs = load_records(tmp_path / "out")
    assert {x.source for x in recs} == {"iu_xray"} and len(recs) == 4


@pytest.mark.parametrize("args, message", [
    (["--source", "iu_xray", "--root", "/no/such/folder"], "dataset root is not a folder"),
    (["--source", "nope", "--root", "."], "unknown source 'nope'"),
    (["--config", "configs/curate/missing.yaml"], "config file not found"),
])
def test_cli_curate_errors_are_one_line_and_exit_2(tmp_path, args, message):
    r = subprocess.run([DEEPMEDIX, "curate", "--no-card", *args, "--out", str(tmp_path / "o")], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "lineage.json").exists()


def test_cli_phantom_streams_n_studies(tmp_path):
    r = subprocess.run([DEEPMEDIX, "data", "phantom", "--n", "12", "--out", str(tmp_path / "p"), "--set",
                        "image_size=96", "--set", "shard_size=5"], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    recs = load_records(tmp_path / "p")
    assert len({x.study_id for x in recs}) == 12
    assert len(list((tmp_path / "p" / "records").glob("*.parquet"))) >= 3  # several chunks, streamed


def test_shipped_public_mix_config_resolves():
    from deepmedix.data.curate_state import resolve_sources

    cfg = load_config("curate", "7b")
    names = [s.name for s in resolve_sources(cfg)]
    assert names == ["mimic_cxr", "iu_xray", "medical_cxr_vqa", "mimic_cxr_vqa", "ms_cxr", "vindr_cxr", "chestxray14"]


def test_malformed_items_and_boxes_are_quarantined_not_fatal(tmp_path):
    a = _png(60)
    items = [
        _item("b1", "p1", "s1", a, task="grounding", answer="x", boxes=[Box("x", [1, 2, 3])]),
        _item("b2", "p1", "s1", a, task="grounding", answer="y", boxes=[Box("y", ["a", 2, 3, 4])]),
        _item("b3", "p1", "s1", a, task="grounding", answer="z", boxes=[Box("z", [1, 2, float("nan"), 4])]),
        _item("t1", "p1", "s1", a, answer=42),
        _item("ok", "p1", "s1", a),
    ]
    r, recs, q = _run_mem(tmp_path, "malformed", items)
    assert [x.record_id for x in recs] == ["memtest/ok"]
    reasons = {x["record"]: x["reason"] for x in q}
    assert "is not a label with [x1, y1, x2, y2]" in reasons["memtest/b1"]
    assert "malformed box" in reasons["memtest/b2"]
    assert "not a finite number" in reasons["memtest/b3"]
    assert "field 'answer' is int" in reasons["memtest/t1"]


def test_an_adapter_dying_mid_run_leaves_a_folder_readers_refuse_and_the_old_dataset_withdrawn(tmp_path):
    out = tmp_path / "ds"
    MemSource.CASES["die0"] = [_item(f"d{i}", f"p{i}", f"s{i}", _png(70 + i)) for i in range(4)]
    curate(_mem_cfg("die0", shard_size=2), str(out))
    assert len(load_records(out)) == 4
    MemSource.CASES["die1"] = [_item("e0", "p0", "s0", _png(80)), RuntimeError("adapter bug")]
    with pytest.raises(RuntimeError, match="adapter bug"):
        curate(_mem_cfg("die1", shard_size=2), str(out))
    assert not (out / "lineage.json").exists()
    with pytest.raises(RecordError, match="curation has not finished"):
        load_records(out)


def test_a_bad_source_is_refused_before_an_existing_dataset_is_touched(tmp_path):
    out = tmp_path / "ds"
    curate(_cfg(), str(out))
    before = (out / "lineage.json").read_text()
    bad = _cfg(sources=[{"name": "phantom", "options": {"n_studies": 3}},
                        {"name": "iu_xray", "root": str(tmp_path / "missing")}])
    with pytest.raises(ConfigError, match="source 'iu_xray'.*not a folder"):
        curate(bad, str(out))
    assert (out / "lineage.json").read_text() == before and load_records(out)


def test_a_relative_out_under_the_working_folder_is_fine_for_the_phantom(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert curate(_cfg(n_studies=2), "runs/ds")["after"] > 0  # the phantom has no root to overlap


def test_out_overlapping_an_input_is_refused(tmp_path):
    from deepmedix.errors import CurationError

    (tmp_path / "nih").mkdir()
    for out in (tmp_path / "nih", tmp_path / "nih" / "curated", tmp_path):
        with pytest.raises(CurationError, match="overlaps the input"):
            curate(_cfg(source="chestxray14", root=str(tmp_path / "nih")), str(out))


def test_limit_and_ratio_apply_to_every_source_of_a_mix():
    from deepmedix.data.curate_state import resolve_sources

    cfg = _cfg(limit=5, ratio=0.5, sources=[{"name": "phantom"}, {"name": "phantom", "limit": 2}])
    assert [(s.limit, s.ratio) for s in resolve_sources(cfg)] == [(5, 0.5), (2, 0.5)]


def test_resume_redoes_a_chunk_whose_input_changed(tmp_path):
    out = tmp_path / "ds"
    items = [_item(f"r{i}", f"p{i}", f"s{i}", _png(90 + i)) for i in range(6)]
    MemSource.CASES["resume"] = items[:5] + [RuntimeError("interrupted")]
    with pytest.raises(RuntimeError):
        curate(_mem_cfg("resume", shard_size=2), str(out))
    assert list((out / "_work").rglob("*-00000.json"))  # the first chunk was committed
    MemSource.CASES["resume"] = items
    assert curate(_mem_cfg("resume", shard_size=2), str(out))["resumed_chunks"] >= 1
    # same config, but the source's first record changed: that chunk is redone, not replayed
    out2 = tmp_path / "ds2"
    MemSource.CASES["resume2"] = items[:5] + [RuntimeError("interrupted")]
    with pytest.raises(RuntimeError):
        curate(_mem_cfg("resume2", shard_size=2), str(out2))
    changed = [_item("r0", "p0", "s0", _png(90), answer="Changed text.")] + items[1:]
    MemSource.CASES["resume2"] = changed
    r = curate(_mem_cfg("resume2", shard_size=2), str(out2))
    assert r["resumed_chunks"] == 0
    assert {x.record_id: x.answer for x in load_records(out2)}["memtest/r0"] == "Changed text."


def test_large_images_under_the_limit_are_not_called_bombs():
    from deepmedix.data import images
    from deepmedix.data.sources import BadInput

    head = _png_header(10_000, 10_000)  # 1e8 pixels: under the default 1.5e8 limit, over Pillow's own 8.9e7
    with pytest.raises(BadInput) as e:
        images.process(head, "big.png")
    assert "decompression bomb" not in e.value.reason
    with pytest.raises(BadInput, match="decompression bomb"):
        images.process(head, "big.png", max_image_pixels=50_000_000)


def _png_header(w, h):
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def test_cli_unreachable_s3_source_is_a_clear_error(tmp_path):
    env = dict(os.environ, S3_ENDPOINT="127.0.0.1:1", S3_USE_HTTPS="0", AWS_ACCESS_KEY_ID="k",
               AWS_SECRET_ACCESS_KEY="s")
    r = subprocess.run([DEEPMEDIX, "curate", "--no-card", "--source", "iu_xray", "--root", "s3://datasets/iu", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "S3 request failed" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_resume_recomputes_every_chunk_after_one_whose_input_changed(tmp_path):
    """Chunk 1 is unchanged, but its result depends on chunk 0 (here: which patient owns an image first)."""
    shared = _png(120)
    first = [_item("a0", "p0", "s0", _png(121)), _item("a1", "p1", "s1", _png(122)),
             _item("b0", "p2", "s2", shared), _item("b1", "p3", "s3", _png(123))]
    MemSource.CASES["chain"] = first + [RuntimeError("interrupted")]
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        curate(_mem_cfg("chain", shard_size=2), str(out))
    # chunk 0 now gives patient p1 the image that chunk 1 gives p2: p2's record must become a duplicate
    changed = [_item("a0", "p0", "s0", _png(121)), _item("a1", "p1", "s1", shared)] + first[2:]
    MemSource.CASES["chain"] = changed
    curate(_mem_cfg("chain", shard_size=2), str(out))
    MemSource.CASES["chain-fresh"] = changed
    curate(_mem_cfg("chain-fresh", shard_size=2), str(tmp_path / "fresh"))
    got = sorted(r.record_id.split("/")[1] for r in load_records(out))
    assert got == sorted(r.record_id.split("/")[1] for r in load_records(tmp_path / "fresh"))
    assert "b0" not in got


def test_sigterm_stops_the_workers_too(tmp_path):
    import psutil

    proc = subprocess.Popen([DEEPMEDIX, "data", "phantom", "--n", "400", "--workers", "2", "--set", "image_size=96",
                             "--set", "shard_size=5", "--out", str(tmp_path / "ds")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 120
    while len(_markers(tmp_path / "ds")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the workers should be running"
    proc.terminate()
    proc.communicate(timeout=60)  # returns only when no worker holds the output pipes
    assert proc.returncode != 0
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not (tmp_path / "ds" / "lineage.json").exists()


def test_resume_does_not_trust_an_emptied_image(tmp_path):
    items = [_item(f"z{i}", f"p{i}", f"s{i}", _png(140 + i)) for i in range(6)]
    MemSource.CASES["empty"] = items[:4] + [RuntimeError("interrupted")]  # chunk 0 committed, chunk 1 not
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        curate(_mem_cfg("empty", shard_size=2), str(out))
    victim = sorted((out / "images").iterdir())[0]
    victim.write_bytes(b"")  # what a power cut can leave of an unflushed file
    MemSource.CASES["empty"] = items
    r = curate(_mem_cfg("empty", shard_size=2), str(out))
    assert r["resumed_chunks"] == 0
    assert all((out / i).stat().st_size > 0 for rec in load_records(out) for i in rec.images)
