"""The curation benchmark script runs end to end (tiny sizes here; `make bench-curate` runs the real one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_curate_smoke(tmp_path):
    r = subprocess.run([sys.executable, "bench/curate_bench.py", "--dir", str(tmp_path), "--small", "6", "--large",
                        "12", "--naive", "4", "--rounds", "1", "--size", "800x900", "--max-pixels", "40000"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "curate_bench.json").read_text())
    assert res["ours_w1"]["images"] == res["ours_w2"]["images"] == 6 and res["ours_large"]["images"] == 12
    assert res["naive_ips"] > 0 and res["ours_w1"]["ips"] > 0
    assert set(res["goals"]) == {"per_core_vs_naive", "two_vs_one_worker", "rss_large_vs_small"}
    # paired ratios: the round's 1-worker run against the two naive runs around it, 2 workers against 1
    assert len(res["naive_runs_ips"]) == 2
    assert res["per_core_vs_naive_rounds"] == [res["ours_w1"]["ips"] / (sum(res["naive_runs_ips"]) / 2)]
    assert res["two_vs_one_worker_rounds"] == [res["ours_w2"]["ips"] / res["ours_w1"]["ips"]]
    assert res["goals"]["per_core_vs_naive"]["value"] == res["per_core_vs_naive_rounds"][0]
    assert "per_core_vs_naive" in r.stdout and (tmp_path / "curate_bench.png").stat().st_size > 1000
