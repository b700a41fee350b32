"""Hostile inputs through the whole engine: every bad input quarantined with its file and reason, every good
record kept, no crash. The suite mixes the adapters' own bad metadata (fx_mimic, fx_public) with bad image
files (JPEG, PNG, DICOM) generated here, and runs them all as one mixed config through the CLI."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import fx_dicom
import fx_mimic
import fx_public
import numpy as np
import pytest
import yaml
from PIL import Image

from deepmedix.data.schema import load_records
from deepmedix.data.sources import Item, Root, get_source

REPO = Path(__file__).resolve().parents[2]
DEEPMEDIX = str(Path(sys.executable).with_name("deepmedix"))


def _gray(seed: int, w: int = 64, h: int = 72) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    return (90 + 50 * np.sin(x / (3 + seed % 5)) + 40 * np.cos(y / (2 + seed % 7)) + rng.normal(0, 25, (h, w))
            ).clip(0, 255).astype(np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_with_size(w: int, h: int) -> bytes:
    """A syntactically valid PNG whose header claims w x h (a decompression bomb if decoded)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


def _jpeg_with_size(base: bytes, w: int, h: int) -> bytes:
    i = base.index(b"\xff\xc0")  # baseline SOF0: length(2) precision(1) height(2) width(2)
    return base[:i + 5] + struct.pack(">HH", h, w) + base[i + 9:]


TRUNC = "truncated|undecodable"


def image_cases() -> tuple[list[tuple[str, bytes, str]], list[tuple[str, bytes]]]:
    """(name, bytes, reason regex) for bad image files, (name, bytes) for good ones in unusual encodings."""
    bad: list[tuple[str, bytes, str]] = []
    png = _save(Image.fromarray(_gray(1)), "PNG")
    jpg = _save(Image.fromarray(_gray(2)), "JPEG", quality=90)
    for i, frac in enumerate(np.linspace(0.1, 0.9, 12)):
        bad.append((f"trunc-png-{i}", png[:int(len(png) * frac)], TRUNC))
        bad.append((f"trunc-jpg-{i}", jpg[:int(len(jpg) * frac)], TRUNC))
    for i in range(12):
        bad.append((f"random-{i}", np.random.default_rng(i).bytes(200 + 97 * i), "undecodable"))
        bad.append((f"jpeg-head-random-{i}", jpg[:20] + np.random.default_rng(100 + i).bytes(800), TRUNC))
    bad += [("zero", b"", "zero-byte"), ("text", b"not an image\n", "undecodable"),
            ("html", b"<html><body>403 Forbidden</body></html>", "undecodable"),
            ("json", b'{"error": "not found"}', "undecodable"),
            ("pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "undecodable"),
            ("zip", b"PK\x03\x04" + b"\x00" * 60, "undecodable"), ("gz-png", gzip.compress(png), "undecodable"),
            ("png-signature-only", png[:8], TRUNC)]
    for i, (w, h) in enumerate([(100_000, 100_000), (20_000, 20_000), (150_000, 2_000), (65_000, 65_000)]):
        bad.append((f"bomb-png-{i}", _png_with_size(w, h), "decompression bomb"))
    for i, (w, h) in enumerate([(65_000, 65_000), (30_000, 20_000)]):
        bad.append((f"bomb-jpg-{i}", _jpeg_with_size(jpg, w, h), "decompression bomb"))
    img = Image.fromarray(_gray(3))
    for fmt in ("GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM"):
        bad.append((f"format-{fmt.lower()}", _save(img.resize((48, 48)) if fmt == "ICO" else img, fmt),
                    "unsupported image format"))
    for i, (w, h) in enumerate([(8, 8), (1, 1), (16, 200), (300, 20)]):
        bad.append((f"tiny-{i}", _save(Image.fromarray(_gray(4, w, h)), "PNG"), "too small"))
    crc = bytearray(png)
    crc[29] ^= 0xFF  # inside IHDR's CRC
    bad.append(("png-bad-crc", bytes(crc), "undecodable|truncated"))
    for i in range(4):
        broken = bytearray(png)
        start = png.index(b"IDAT") + 8
        broken[start + 2 + i: start + 40 + i] = b"\xff" * 38  # wreck the zlib stream
        bad.append((f"png-bad-zlib-{i}", bytes(broken), "undecodable|truncated"))

    good: list[tuple[str, bytes]] = []
    g16 = (_gray(5).astype(np.uint16) * 257)
    good += [("png16", _save(Image.fromarray(g16), "PNG")),
             ("rgba", _save(Image.fromarray(_gray(6)).convert("RGBA"), "PNG")),
             ("palette", _save(Image.fromarray(_gray(7)).convert("P"), "PNG")),
             ("la", _save(Image.fromarray(_gray(8)).convert("LA"), "PNG")),
             ("bilevel", _save(Image.fromarray(_gray(9)).convert("1"), "PNG")),
             ("rgb-jpeg", _save(Image.fromarray(_gray(10)).convert("RGB"), "JPEG", quality=90)),
             ("cmyk-jpeg", _save(Image.fromarray(_gray(11)).convert("CMYK"), "JPEG", quality=90)),
             ("progressive", _save(Image.fromarray(_gray(12)), "JPEG", quality=90, progressive=True)),
             ("big-jpeg", _save(Image.fromarray(_gray(13, 1400, 1100)), "JPEG", quality=85))]
    return bad, good


def dicom_cases() -> tuple[list[tuple[str, bytes, str]], list[tuple[str, bytes]]]:
    px = (_gray(20).astype(np.uint16) * 16)
    ok = fx_dicom.make_dicom(px)
    bad = [("dcm-zero", b"", "zero-byte|no bytes"),
           ("dcm-no-pixels", fx_dicom.make_dicom(px, pixel_data=False), "no Pixel Data"),
           ("dcm-burned-in", fx_dicom.make_dicom(px, burned_in="YES"), "burned-in annotation"),
           ("dcm-random", np.random.default_rng(7).bytes(3000), "not a DICOM"),
           ("dcm-garbage-after-magic", b"\x00" * 128 + b"DICM" + np.random.default_rng(8).bytes(500),
            "DICOM"),
           ("dcm-bomb", fx_dicom.make_dicom(px, extra_tags={"Rows": 60000, "Columns": 60000}), "decompression bomb"),
           ("dcm-size-mismatch", fx_dicom.make_dicom(px, extra_tags={"Rows": 90}), "pixel data is"),
           ("dcm-png-inside", _save(Image.fromarray(_gray(21)), "PNG"), "not a DICOM"),
           ("dcm-unsupported-syntax", fx_dicom.relabel_transfer_syntax(ok, "1.2.840.10008.1.2.4.100"),
            "transfer syntax")]
    for i, frac in enumerate((0.3, 0.6, 0.9)):
        bad.append((f"dcm-trunc-{i}", ok[:int(len(ok) * frac)], "truncated|corrupt"))
    good = [("dcm-mono1", fx_dicom.make_dicom(px, photometric="MONOCHROME1")),
            ("dcm-16bit", fx_dicom.make_dicom(_gray(22).astype(np.uint16) * 250, bits_stored=16)),
            ("dcm-8bit", fx_dicom.make_dicom(_gray(23), bits_stored=8)),
            ("dcm-window", fx_dicom.make_dicom(px, window=(2000, 3000))),
            ("dcm-rle", fx_dicom.make_dicom(_gray(24).astype(np.uint16) * 16, transfer_syntax="rle")),
            ("dcm-j2k", fx_dicom.make_dicom(_gray(25).astype(np.uint16) * 16, transfer_syntax="jpeg2000"))]
    return bad, good


def write_iu_images(root: Path, cases: list[tuple[str, bytes]]) -> None:
    """An IU X-ray root with one report per case, its single image holding the case's bytes."""
    for k, (name, data) in enumerate(cases, start=1):
        img_id = f"CXR{5000 + k}_IM-{name}"
        (root / "ecgen-radiology").mkdir(parents=True, exist_ok=True)
        (root / "ecgen-radiology" / f"{5000 + k}.xml").write_text(
            fx_public.iu_xml(f"CXR{5000 + k}", 5000 + k, f"Findings of case {name}.", f"Impression {name}.", [img_id]))
        (root / "NLMCXR_png").mkdir(parents=True, exist_ok=True)
        (root / "NLMCXR_png" / f"{img_id}.png").write_bytes(data)


def write_vindr_dicoms(root: Path, cases: list[tuple[str, bytes]]) -> None:
    """A VinDr-CXR root: one training image per case, one reader's box on it."""
    rows = ["image_id,rad_id,class_name,x_min,y_min,x_max,y_max"]
    for name, data in cases:
        iid = fx_public.vindr_id(name)
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "train" / f"{iid}.dicom").write_bytes(data)
        rows.append(f"{iid},R1,Nodule/Mass,10,12,30,40")
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "annotations_train.csv").write_text("\n".join(rows) + "\n")
    (root / "annotations" / "annotations_test.csv").write_text("image_id,class_name,x_min,y_min,x_max,y_max\n")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    expected: list[tuple[str, str]] = []       # (substring of file or record, reason regex)
    m_adapter, m_engine = fx_mimic.write_mimic_hostile(root / "mimic")
    p_adapter, p_engine = fx_public.write_public_hostile(root / "public")
    for where, why in m_adapter + p_adapter + m_engine + p_engine:
        expected.append((where, re.escape(why) if why else "."))
    img_bad, img_good = image_cases()
    write_iu_images(root / "iu_img", [(n, d) for n, d, _ in img_bad] + img_good)
    expected += [(f"IM-{n}.png", why) for n, _, why in img_bad]
    dcm_bad, dcm_good = dicom_cases()
    write_vindr_dicoms(root / "vindr_dcm", [(n, d) for n, d, _ in dcm_bad] + dcm_good)
    expected += [(fx_public.vindr_id(n), why) for n, _, why in dcm_bad]
    # paths that are not files: a folder in place of an image, a symlink out of the dataset root
    (root / "iu_img" / "ecgen-radiology" / "9001.xml").write_text(
        fx_public.iu_xml("CXR9001", 9001, "Folder case.", "Folder.", ["CXR9001_IM-folder"]))
    (root / "iu_img" / "NLMCXR_png" / "CXR9001_IM-folder.png").mkdir()
    expected.append(("CXR9001_IM-folder", "is a folder"))
    outside = root / "outside.png"
    outside.write_bytes(_save(Image.fromarray(_gray(30)), "PNG"))
    (root / "iu_img" / "ecgen-radiology" / "9002.xml").write_text(
        fx_public.iu_xml("CXR9002", 9002, "Symlink case.", "Symlink.", ["CXR9002_IM-link"]))
    os.symlink(outside, root / "iu_img" / "NLMCXR_png" / "CXR9002_IM-link.png")
    expected.append(("CXR9002_IM-link", "escapes the dataset root"))
    bad_images = ([w for w, _ in m_engine + p_engine] + [f"IM-{n}.png" for n, _, _ in img_bad]
                  + [fx_public.vindr_id(n) for n, _, _ in dcm_bad] + ["CXR9001_IM-folder", "CXR9002_IM-link"])

    sources = [{"name": n, "root": r, "options": o} for n, r, o in fx_mimic.hostile_sources(root / "mimic")]
    sources += [{"name": n, "root": str(root / "public" / n)} for n in ("vindr_cxr", "chestxray14", "iu_xray")]
    sources += [{"name": "iu_xray", "root": str(root / "iu_img")},
                {"name": "vindr_cxr", "root": str(root / "vindr_dcm"), "options": {"readers": "each"}}]
    # The suite's sources share nothing across patients; near-duplicate search stays on (default distance)
    cfg = {"sources": sources, "workers": 2, "shard_size": 40}
    (root / "mix.yaml").write_text(yaml.safe_dump(cfg))
    out = root / "out"
    run = subprocess.run([DEEPMEDIX, "curate", "--no-card", "--config", str(root / "mix.yaml"), "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    return {"root": root, "out": out, "run": run, "expected": expected, "sources": sources, "bad_images": bad_images,
            "good_images": [f"IM-{n}.png" for n, _ in img_good] + [fx_public.vindr_id(n) for n, _ in dcm_good]}


def test_suite_is_big_enough_and_runs_without_crashing(hostile):
    assert len(hostile["expected"]) >= 200
    run = hostile["run"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "quarantined" in run.stderr  # the counts are printed


def test_every_bad_input_is_quarantined_with_its_file_and_reason(hostile):
    q = [json.loads(line) for line in (hostile["out"] / "quarantine.jsonl").read_text().splitlines()]
    assert all(x["file"] and x["reason"] and x["source"] for x in q)
    missing = []
    for where, why in hostile["expected"]:
        if not [x for x in q if where in f"{x['file']} {x['record']}" and re.search(why, x["reason"])]:
            missing.append((where, why, [x["reason"] for x in q if where in x["file"] + " " + x["record"]][:1]))
    assert missing == []
    man = json.loads((hostile["out"] / "manifest.json").read_text())
    assert man["quarantine"]["total"] == len(q)
    assert sum(man["quarantine"]["by_source"].values()) == len(q)


def test_every_good_record_is_kept(hostile):
    """Everything the adapters yield is kept unless one of its images is a listed bad input."""
    recs = {r.record_id for r in load_records(hostile["out"])}
    bad_keys = hostile["bad_images"]
    want = set()
    for s in hostile["sources"]:
        for x in get_source(s["name"])(Root(s["root"]), **s.get("options", {})).items():
            if isinstance(x, Item) and not any(k in im.path for im in x.images for k in bad_keys):
                want.add(f"{s['name']}/{x.record_id}")
    assert want and want <= recs, sorted(want - recs)[:10]
    assert recs <= want  # nothing invented
    kept_images = " ".join(i for r in load_records(hostile["out"]) for i in r.images)
    assert kept_images
    for r in load_records(hostile["out"]):
        assert r.prompt and r.answer and all(s >= 32 for wh in r.image_sizes for s in wh)
    n_good = sum(1 for r in load_records(hostile["out"]) if r.source in ("iu_xray", "vindr_cxr"))
    assert n_good >= len(hostile["good_images"])
