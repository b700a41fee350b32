"""The serving benchmark runs end to end (small settings here; `make bench-serve` runs the real one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_serve_bench_smoke(tmp_path):
    r = subprocess.run([sys.executable, "bench/serve_bench.py", "--max-new-tokens", "8", "--requests", "3",
                        "--rounds", "1", "--concurrency", "1,4", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "serve_bench.json").read_text())
    assert res["concurrency"] == [1, 4] and res["max_new_tokens"] == 8
    for c in ("1", "4"):
        for kind in ("in_process", "server"):
            row = res["levels"][c][kind]
            assert row["throughput"] > 0 and 0 < row["p50"] <= row["p95"]
    assert res["goals"]["overhead_c1"]["goal"] == 0.15 and res["goals"]["throughput_scaling"]["at"] == 4
    assert "goal: overhead at concurrency 1" in r.stdout and "goal: server throughput at concurrency 4" in r.stdout
    assert res["levels"]["4"]["server"]["n"] == 8  # 3 per client at c=1; at least 2 per client
    png = (tmp_path / "serve_bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
