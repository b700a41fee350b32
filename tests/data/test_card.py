"""``deepmedix data card`` (issue 21, item 3): card.md and every PNG it names, on the phantom set and on a
hospital manifest with quarantined rows and a near-duplicate (the real CLI, the real files)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import fx_manifest
import fx_public
import numpy as np
import pytest
from PIL import Image

from deepmedix.data.schema import load_records

DEEPMEDIX = [sys.executable, "-m", "deepmedix.cli"]


def cli(*args: str) -> dict:
    proc = subprocess.run([*DEEPMEDIX, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def check_card(out: Path, result: dict | None = None) -> str:
    """card.md names every PNG in the folder (and those ``data card`` reported), each a real picture."""
    md = (out / "card.md").read_text()
    named = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert named and sorted(named) == sorted(p.name for p in out.glob("*.png"))
    if result is not None:
        assert sorted(named) == sorted(result["pngs"])
    for name in named:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= 200 and im.height >= 100, name
            px = np.asarray(im.convert("L"), dtype=float)
        assert px.std() > 5, f"{name} is blank"
    return md


def test_card_of_the_phantom_set(tmp_path):
    data = tmp_path / "phantom"
    cli("data", "phantom", "--out", str(data), "--n", "24")
    res = cli("data", "card", str(data), "--out", str(tmp_path / "card"))
    md = check_card(tmp_path / "card", res)
    recs = load_records(data)
    assert res["records"] == len(recs) and f"{len(recs)} records" in md
    table = re.findall(r"^\| phantom \| (\w+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", md, re.M)
    assert {t for t, *_ in table} == {"report_findings", "report_impression", "vqa", "grounding"}
    assert sum(int(row[-1]) for row in table) == len(recs)
    labels = {b.label for r in recs for b in r.boxes}
    assert labels and {f"boxes-{re.sub('[^a-z0-9]+', '-', lab.lower())}.png" for lab in labels} <= set(res["pngs"])
    assert {"counts.png", "vqa.png", "samples-grounding.png", "samples-vqa.png"} <= set(res["pngs"])
    assert "None dropped." in md  # no near-duplicates in the phantom set


@pytest.fixture()
def hospital(tmp_path):
    """The manifest fixture plus a near-duplicate: another patient's image, one pixel changed."""
    root = tmp_path / "export"
    fx_manifest.write_manifest_jsonl(root)
    with Image.open(root / "img/p1.png") as im:
        px = np.array(im)
    px[0, 0] = 255 - px[0, 0]
    Image.fromarray(px).save(root / "img/p1-copy.png")
    rows = [json.dumps({"id": "copy", "patient_id": "P99", "study_id": "S99", "image": "img/p1-copy.png",
                        "task": "report_findings", "answer": "A copy."})]
    with open(root / "manifest.jsonl", "a") as f:
        f.write("\n".join(rows) + "\n")
    out = tmp_path / "curated"
    result = cli("curate", "--source", "manifest", "--root", str(root), "--out", str(out))
    return root, out, result


def test_curation_writes_the_card_of_a_hospital_manifest_with_quarantine_and_a_near_duplicate(hospital):
    """``deepmedix curate`` writes the card into the dataset by default (``--no-card`` skips it)."""
    root, data, result = hospital
    assert result["card"] == f"{data}/card"
    md = check_card(data / "card")
    assert {"quarantine.png", "near-duplicates.png", "boxes-nodule.png", "boxes-opacity.png"} <= {
        p.name for p in (data / "card").glob("*.png")}
    assert int(re.search(r"; (\d+) inputs quarantined", md).group(1)) >= 30
    assert "- **manifest**: " in md and "path escapes the dataset root (3)" in md  # reasons counted by kind
    assert re.search(r"- p1-copy\.png dropped for study S1 \(distance \d+\)", md), md
    with Image.open(data / "card" / "near-duplicates.png") as im:
        assert im.width > 400  # the pair side by side
    assert len(load_records(data)) == result["after"]  # the card is beside the records, not among them
    lineage = json.loads((data / "lineage.json").read_text())
    assert lineage["card"] == "card" and lineage["manifest"]["total"] == result["after"]  # named in the commit


def test_a_rerun_with_another_config_withdraws_the_old_card(tmp_path):
    """The card describes the dataset it was drawn from: curating another dataset into the same folder (here
    without a card) leaves no card of the old one behind."""
    out = tmp_path / "data"
    first = cli("curate", "--source", "phantom", "--out", str(out), "--set", "n_patients=4", "--set", "image_size=96")
    assert first["card"] and (out / "card" / "card.md").is_file()
    cli("curate", "--no-card", "--source", "phantom", "--out", str(out), "--set", "n_patients=5",
        "--set", "image_size=96")
    assert not (out / "card").exists() and "card" not in json.loads((out / "lineage.json").read_text())


def test_card_of_public_format_fixtures(tmp_path):
    """VinDr-CXR and ChestX-ray14 fixtures in their native formats, curated as one mix, then carded."""
    fx_public.write_vindr(tmp_path / "vindr")
    fx_public.write_chestxray14(tmp_path / "nih")
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  - {{name: vindr_cxr, root: {tmp_path / 'vindr'}}}\n"
                   f"  - {{name: chestxray14, root: {tmp_path / 'nih'}}}\n")
    cli("curate", "--no-card", "--config", str(mix), "--out", str(tmp_path / "data"))
    assert not (tmp_path / "data" / "card").exists()
    res = cli("data", "card", str(tmp_path / "data"), "--out", str(tmp_path / "card"), "--sample", "3")
    md = check_card(tmp_path / "card", res)
    assert "| vindr_cxr | grounding |" in md and "| chestxray14 | grounding |" in md
    assert sum(1 for p in res["pngs"] if p.startswith("boxes-")) >= 3


def test_a_missing_dataset_is_a_clear_error(tmp_path):
    proc = subprocess.run([*DEEPMEDIX, "data", "card", str(tmp_path / "nope"), "--out", str(tmp_path / "card")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "nope" in proc.stderr
    assert not (tmp_path / "card").exists()


def test_card_html_is_one_page_a_browser_shows_whole(tmp_path, browser):
    """The HTML the pipeline's curate step logs for KFP's UI: self-contained (PNGs inlined), every image decoded
    by a real browser, the counts table rendered."""
    from deepmedix.stages import card_html

    data = tmp_path / "phantom"
    cli("data", "phantom", "--out", str(data), "--n", "12")
    page = tmp_path / "card.html"
    card_html(str(data), str(page))
    html = page.read_text()
    assert "src=\"data:image/png;base64," in html and ".png)" not in html  # nothing left to fetch
    driver = browser()
    driver.get(page.as_uri())
    images = driver.execute_script("return [...document.images].map(i => [i.alt, i.complete, i.naturalWidth])")
    assert len(images) >= 5 and all(done and width >= 200 for _, done, width in images), images
    cells = driver.execute_script("return [...document.querySelectorAll('td')].map(c => c.textContent)")
    assert "phantom" in cells and "vqa" in cells
