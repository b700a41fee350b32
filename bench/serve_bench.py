"""Serving benchmark: the KServe model server (a real process, v1 over HTTP) against in-process ``generate``,
in the same run, at concurrency 1, 4 and 16.

    python bench/serve_bench.py [--model PATH] [--max-new-tokens 128] [--requests 16] [--rounds 2] [--out DIR]

Without ``--model`` the tiny Qwen2.5-VL is built (random weights: it never stops early, so every query costs
exactly ``--max-new-tokens`` tokens). Per concurrency level c, each round runs

* in process: the same queries through :func:`deepmedix.model.generate.generate_batch`, c at a time (c queries in
  one batch: what perfect batching would reach; c = 1 is one query per call), and
* over HTTP: c client threads, each sending v1 requests (base64 PNG + question) back to back,

and reports p50/p95 latency per request and throughput (requests/s); medians over rounds. Goals (the serving
issue): overhead at c = 1 (server p50 / in-process p50 - 1) <= 15 %; server throughput at 16 >= 3x that at 1.
Writes ``serve_bench.json`` and ``serve_bench.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def image_png(seed: int, size=(320, 256)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.normal(128, 40, size[::-1]).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def in_process(loaded, images, question: str, c: int, n: int, budget: int) -> dict:
    """``n`` queries, ``c`` per generate call; every query in a call shares the call's latency."""
    from PIL import Image

    from deepmedix.model.generate import generate_batch

    lat = []
    t0 = time.perf_counter()
    for start in range(0, n, c):
        k = min(c, n - start)
        t = time.perf_counter()
        # decode the PNGs here too: the server decodes each request's image
        ims = [[Image.open(io.BytesIO(images[(start + j) % len(images)])).convert("RGB")] for j in range(k)]
        generate_batch(loaded, ims, [question] * k, budget)
        lat += [time.perf_counter() - t] * k
    wall = time.perf_counter() - t0
    return {"p50": pct(lat, 50), "p95": pct(lat, 95), "throughput": n / wall, "n": n}


def over_http(url: str, name: str, images, question: str, c: int, n: int, budget: int) -> dict:
    import requests

    bodies = [json.dumps({"instances": [{"image": base64.b64encode(im).decode(), "question": question,
                                         "max_new_tokens": budget}]}) for im in images]
    lat, errors, lock = [], [], threading.Lock()
    counter = iter(range(n))

    def client():
        s = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            r = s.post(f"{url}/v1/models/{name}:predict", data=bodies[i % len(bodies)],
                       headers={"Content-Type": "application/json"}, timeout=600)
            dt = time.perf_counter() - t
            with lock:
                (lat if r.status_code == 200 else errors).append(dt if r.status_code == 200 else r.status_code)

    threads = [threading.Thread(target=client) for _ in range(c)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"server answered errors at concurrency {c}: {errors[:5]}")
    return {"p50": pct(lat, 50), "p95": pct(lat, 95), "throughput": n / wall, "n": n}


def start_server(model: str, port: int, args, log_path: Path) -> subprocess.Popen:
    from serving.local import wait_ready

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--model", model, "--port", str(port),
                             "--name", "bench", "--max-batch-size", str(args.max_batch_size), "--max-wait-ms",
                             str(args.max_wait_ms), "--max-queue", "256", "--max-new-tokens-limit",
                             str(max(args.max_new_tokens, 2048))],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models/bench", proc, timeout=300)
    except Exception as exc:
        proc.kill()
        raise SystemExit(f"{exc}: {log_path.read_text()[-3000:]}") from None
    return proc


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [str(c) for c in res["concurrency"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(levels))
    for off, kind in ((-0.2, "in_process"), (0.2, "server")):
        axes[0].bar(x + off, [res["levels"][c][kind]["throughput"] for c in levels], 0.4, label=kind)
        axes[1].bar(x + off, [res["levels"][c][kind]["p50"] for c in levels], 0.4, label=f"{kind} p50")
    axes[0].set(title="throughput (requests/s)", xlabel="concurrency", xticks=x, xticklabels=levels)
    axes[1].set(title="latency p50 (s)", xlabel="concurrency", xticks=x, xticklabels=levels)
    for ax in axes:
        ax.legend()
    fig.suptitle(f"serving: {res['max_new_tokens']} new tokens per request ({res['model']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: build the tiny model)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=16, help="requests per client thread at concurrency 1; "
                   "more clients send proportionally more (at least 2 per client)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]

    from deepmedix.model.load import load
    from serving.local import free_port, stop_process

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        from deepmedix.model.tiny import build_tiny

        model = str(build_tiny(Path(tmp.name) / "tiny"))
    loaded = load(model)
    images = [image_png(s) for s in range(8)]
    question = "Findings?"
    port = free_port()
    proc = start_server(model, port, args, out / "serve_bench.server.log")
    url = f"http://127.0.0.1:{port}"
    rows: dict[str, dict[str, list[dict]]] = {str(c): {"in_process": [], "server": []} for c in levels}
    try:
        for c in levels:  # warm up both sides at every batch shape (first calls of a shape are slower)
            over_http(url, "bench", images, question, c, c, args.max_new_tokens)
            in_process(loaded, images, question, c, c, args.max_new_tokens)
        for r in range(args.rounds):
            for c in levels:
                n = max(args.requests * max(1, c // 2), 2 * c)
                rows[str(c)]["in_process"].append(in_process(loaded, images, question, c, n, args.max_new_tokens))
                rows[str(c)]["server"].append(over_http(url, "bench", images, question, c, n, args.max_new_tokens))
                s, i = rows[str(c)]["server"][-1], rows[str(c)]["in_process"][-1]
                print(f"round {r + 1} c={c:<3} in-process p50 {i['p50']:.3f} s {i['throughput']:.2f} req/s | "
                      f"server p50 {s['p50']:.3f} s p95 {s['p95']:.3f} s {s['throughput']:.2f} req/s", flush=True)
        import psutil

        rss = psutil.Process(proc.pid).memory_info().rss / 2**20
    finally:
        stop_process(proc, 20)
        tmp.cleanup()

    def med(kind: str, c: str, key: str) -> float:
        return statistics.median(x[key] for x in rows[c][kind])

    res = {"model": "tiny (random init)" if args.model is None else args.model, "max_new_tokens": args.max_new_tokens,
           "concurrency": levels, "rounds": args.rounds, "server_rss_mb": rss,
           "levels": {c: {k: {m: med(k, c, m) for m in ("p50", "p95", "throughput")} | {"n": rows[c][k][0]["n"]}
                          for k in ("in_process", "server")} for c in rows}}
    print(f"\nserving benchmark: {res['model']}, {args.max_new_tokens} new tokens per request, medians of "
          f"{args.rounds} rounds; server --max-batch-size {args.max_batch_size} --max-wait-ms {args.max_wait_ms:g}, "
          f"RSS {rss:.0f} MB")
    print(f"{'concurrency':>11} | {'in-process p50':>14} {'p95':>7} {'req/s':>7} | {'server p50':>10} {'p95':>7} "
          f"{'req/s':>7} | {'server/in-process req/s':>23}")
    for c in map(str, levels):
        i, s = res["levels"][c]["in_process"], res["levels"][c]["server"]
        print(f"{c:>11} | {i['p50']:>14.3f} {i['p95']:>7.3f} {i['throughput']:>7.2f} | {s['p50']:>10.3f} "
              f"{s['p95']:>7.3f} {s['throughput']:>7.2f} | {s['throughput'] / i['throughput']:>22.2f}x")
    goals = {}
    if 1 in levels:
        one = res["levels"]["1"]
        overhead = one["server"]["p50"] / one["in_process"]["p50"] - 1
        goals["overhead_c1"] = {"value": overhead, "goal": 0.15, "pass": overhead <= 0.15}
        print(f"goal: overhead at concurrency 1 (server p50 / in-process p50 - 1) <= 15 %: {100 * overhead:.1f} % "
              f"{'PASS' if overhead <= 0.15 else 'FAIL'}")
        top = str(max(levels))
        if top != "1":
            scale = res["levels"][top]["server"]["throughput"] / one["server"]["throughput"]
            goals["throughput_scaling"] = {"value": scale, "goal": 3.0, "pass": scale >= 3.0, "at": int(top)}
            print(f"goal: server throughput at concurrency {top} >= 3x that at 1: {scale:.2f}x "
                  f"{'PASS' if scale >= 3.0 else 'FAIL'}")
    res["goals"] = goals
    (out / "serve_bench.json").write_text(json.dumps(res, indent=2))
    plot(res, out / "serve_bench.png")
    print(f"wrote {out / 'serve_bench.json'} and {out / 'serve_bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
