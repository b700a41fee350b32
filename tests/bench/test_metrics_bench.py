"""The report-metrics benchmark runs end to end (200 pairs here; `make bench-metrics` runs the real one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_metrics_bench_smoke(tmp_path):
    pytest.importorskip("pycocoevalcap")
    r = subprocess.run([sys.executable, "bench/metrics_bench.py", "--pairs", "200", "--rounds", "1", "--out",
                        str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "metrics_bench.json").read_text())
    assert res["pairs"] == 200 and res["coco"]["s"] > 0 and res["ours"]["s"] > 0
    assert set(res["coco"]["per_scorer_s"]) == {"bleu", "meteor", "rouge_l", "cider"}
    assert res["values"]["same"] and res["coco"]["values"].keys() == res["ours"]["values"].keys()
    for k, v in res["values"]["max_abs_diff"].items():
        assert v <= (0.005 if k == "meteor" else 1e-9), k
    assert res["goal"]["ratio"] == pytest.approx(res["coco"]["s"] / res["ours"]["s"])
    assert res["coco_ptb"]["ptb_equals_tokenize"] == 1.0
    assert "goal: ours >= 5x faster" in r.stdout
    png = (tmp_path / "metrics_bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
