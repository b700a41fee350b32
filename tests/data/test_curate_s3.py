"""Curation against a real S3 server (SeaweedFS ``weed``): every adapter reading its dataset from an ``s3://``
prefix in one mixed config, the dataset written to S3, and the server killed in the middle of a write."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fx_mimic
import fx_public
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import cli, weed_s3

from deepmedix import store
from deepmedix.data.schema import load_records

REPO = Path(__file__).resolve().parents[2]
DEEPMEDIX = str(Path(sys.executable).with_name("deepmedix"))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with weed_s3(tmp_path_factory.mktemp("weed")) as server:
        yield server


def _upload(client, folder: Path, bucket: str, prefix: str) -> None:
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            client.fput_object(bucket, f"{prefix}/{p.relative_to(folder).as_posix()}", str(p))


def _write_all(root: Path) -> list[dict]:
    """Good native-format fixtures of every adapter; returns the mix's sources relative to ``root``."""
    jpg = root / "mimic-cxr-jpg"
    fx_mimic.write_mimic_cxr_jpg(jpg, gz=True)
    fx_mimic.write_mimic_reports(root / "mimic-cxr-reports", prefix="")
    fx_mimic.write_ms_cxr(root / "ms-cxr", images_root=jpg)
    fx_mimic.write_mimic_cxr_vqa(root / "mimic-cxr-vqa", images_root=jpg)
    fx_mimic.write_medical_cxr_vqa(root / "medical-cxr-vqa", images_root=jpg)
    fx_public.write_vindr(root / "vindr-cxr")
    fx_public.write_chestxray14(root / "chestxray14")
    fx_public.write_iu_xray(root / "iu-xray")
    shared = {"official_split": False}  # MIMIC-derived sets: one seeded split over the shared patient ids
    return [
        {"name": "mimic_cxr", "root": "mimic-cxr-jpg", "options": {"reports_root": "mimic-cxr-reports"}},
        {"name": "ms_cxr", "root": "ms-cxr", "options": {"images_root": "mimic-cxr-jpg", **shared}},
        {"name": "mimic_cxr_vqa", "root": "mimic-cxr-vqa", "options": {"images_root": "mimic-cxr-jpg", **shared}},
        {"name": "medical_cxr_vqa", "root": "medical-cxr-vqa",
         "options": {"images_root": "mimic-cxr-jpg", **shared}},
        {"name": "vindr_cxr", "root": "vindr-cxr"},
        {"name": "chestxray14", "root": "chestxray14"},
        {"name": "iu_xray", "root": "iu-xray", "ratio": 1.0},
        {"name": "phantom", "options": {"n_studies": 4, "image_size": 96}},
    ]


def _mix(sources: list[dict], base: str) -> list[dict]:
    out = []
    for s in sources:
        s = json.loads(json.dumps(s))
        if "root" in s:
            s["root"] = f"{base}/{s['root']}"
        for k in ("reports_root", "images_root"):
            if k in s.get("options", {}):
                s["options"][k] = f"{base}/{s['options'][k]}"
        out.append(s)
    return out


def _curate(config: Path, out: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([DEEPMEDIX, "curate", "--config", str(config), "--out", out, *extra],
                       capture_output=True, text=True, cwd=REPO, timeout=600, env=dict(os.environ))
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _key(recs):
    return [(r.record_id, r.images, r.prompt, r.answer, r.split, [(b.label, b.box) for b in r.boxes]) for r in recs]


def test_every_adapter_reads_from_s3_into_one_store(s3, tmp_path):
    sources = _write_all(tmp_path / "datasets")
    _upload(s3.client, tmp_path / "datasets", "datasets", "public")
    local_cfg = tmp_path / "local.yaml"
    local_cfg.write_text(yaml.safe_dump({"sources": _mix(sources, str(tmp_path / "datasets")), "workers": 2}))
    s3_cfg = tmp_path / "s3.yaml"
    s3_cfg.write_text(yaml.safe_dump({"sources": _mix(sources, "s3://datasets/public"), "workers": 2}))

    _curate(local_cfg, str(tmp_path / "local-out"))
    r = _curate(s3_cfg, "s3://curated/mix")
    summary = json.loads(r.stdout)
    # the card was drawn from the records and the few images it shows: the dataset was not copied to the cache
    assert not (store.cache_root() / "s3" / "curated" / "mix").exists()
    ds = store.fetch("s3://curated/mix")
    recs = load_records(ds)
    assert summary["after"] == len(recs) and summary["quarantined"] == 0
    assert _key(recs) == _key(load_records(tmp_path / "local-out"))  # same dataset from S3 as from disk
    man = json.loads((ds / "manifest.json").read_text())
    per_source = {s["name"]: s["kept"] for s in man["sources"]}
    assert set(per_source) == {"mimic_cxr", "ms_cxr", "mimic_cxr_vqa", "medical_cxr_vqa", "vindr_cxr",
                               "chestxray14", "iu_xray", "phantom"}
    assert all(v > 0 for v in per_source.values()), per_source
    tasks = {k.split("/")[1] for k in man["counts"]}
    assert tasks == {"report_findings", "report_impression", "vqa", "grounding"}
    split_of = {}
    for rec in recs:
        assert split_of.setdefault(rec.patient_id, rec.split) == rec.split
    # MIMIC-CXR-JPG images shared by MS-CXR and the VQA sets are stored once
    assert man["images"] == len({i for rec in recs for i in rec.images})
    # the dataset card, written into the dataset by default: here under the S3 prefix, with every source counted
    assert summary["card"] == "s3://curated/mix/card"
    md = (ds / "card" / "card.md").read_text()
    assert all(f"| {name} |" in md for name in per_source), md[:2000]
    assert (tmp_path / "local-out" / "card" / "counts.png").is_file()


@pytest.fixture
def s3_alone(tmp_path):
    """A server of its own for the crash test."""
    with weed_s3(tmp_path / "weed") as server:
        yield server


def test_killing_the_s3_server_mid_write_leaves_no_partial_shard_and_rerun_completes(s3_alone, tmp_path):
    s3 = s3_alone
    args = ["data", "phantom", "--n", "90", "--workers", "1", "--set", "image_size=96", "--set", "shard_size=8",
            "--set", "vqa_per_study=1"]
    ref = tmp_path / "ref"
    assert cli(*args, "--out", ref).returncode == 0  # the reference and the rerun in this process; the killed run
    out = "s3://crash/phantom"                       # is a process of its own
    proc = subprocess.Popen([DEEPMEDIX, *args, "--out", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=dict(os.environ))

    def markers() -> int:
        try:
            return sum(1 for _ in s3.client.list_objects("crash", prefix="phantom/_work/", recursive=True))
        except Exception:
            return 0

    deadline = time.time() + 180
    while markers() < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    s3.kill()  # SIGKILL: the server dies in the middle of the run's writes
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert "S3 request failed" in err and "s3://crash/phantom" in err

    s3.start()
    deadline = time.time() + 30
    while not (names := [o.object_name for o in s3.client.list_objects("crash", prefix="phantom/", recursive=True)]):
        assert time.time() < deadline, "the restarted server lists nothing of the killed run"
        time.sleep(0.5)
    assert "phantom/lineage.json" not in names
    shards = [n for n in names if n.startswith("phantom/records/")]
    assert shards
    for n in shards:  # whatever is visible is a whole shard
        body = s3.client.get_object("crash", n).read()
        assert pq.read_table(io.BytesIO(body)).num_rows > 0
    with pytest.raises(store.StoreError, match="incomplete artifact"):  # readers refuse the unfinished dataset
        store.fetch(out)

    done = cli(*args, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["resumed_chunks"] >= 1
    assert _key(load_records(store.fetch(out))) == _key(load_records(ref))
    left = [o.object_name for o in s3.client.list_objects("crash", prefix="phantom/_work/", recursive=True)]
    assert left == []
