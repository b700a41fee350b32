"""Curation benchmark: full-size CXR-like JPEGs to model-ready images, against a naive PIL loop timed in the same
run.

It writes a MIMIC-CXR-JPG-shaped dataset (``files/pNN/pSUBJECT/sSTUDY/DICOM.jpg``, metadata, split CSVs and report
texts; one 2500x3000 grayscale JPEG per study, quality 95 like MIMIC-CXR-JPG, CXR-like content: phantom anatomy,
each image under its own affine pose, plus film-grain noise) once under ``--dir`` (reused by later runs), then:

* naive: ``Image.open(p).convert("L").resize(size, BICUBIC)`` over the first ``--naive`` images — the same output
  size, mode and filter as ours (``--rgb`` also times the common ``convert("RGB")`` variant, for information);
* ours: ``deepmedix curate --source mimic_cxr`` on the first ``--small`` studies with 1 and with 2 workers
  (images/s = images stored / the run's own wall time; this includes reading, decoding, the PHI guard, dedupe,
  hashing, PNG encoding and writing shards);
* memory: peak RSS of the whole process tree (main + workers, sampled every 20 ms) for ``--small`` and ``--large``
  studies.

The speed runs are repeated ``--rounds`` times, interleaved (naive, 1 worker, 2 workers, naive, ...). The machine's
speed drifts by several per cent over minutes, so the ratios are paired: each round's 1-worker figure against the
mean of the naive runs just before and after it, each round's 2-worker figure against the same round's 1-worker
one; the goals use the medians of these per-round ratios. Each timed run first reads its own inputs, so that all
start with them in the page cache.

Goals (issue 3): ours with one worker >= 2x the naive loop (per core), two workers >= 1.8x one worker, peak RSS at
``--large`` within 10 % of ``--small``. Prints a table and writes ``curate_bench.json`` and ``curate_bench.png``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------- the dataset

def _study(i: int) -> tuple[str, str, str]:
    subject = f"{10000000 + i // 3:08d}"
    return subject, f"{50000000 + i:08d}", hashlib.md5(f"bench-{i}".encode()).hexdigest()


def _rel(subject: str, study: str, dicom: str) -> str:
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"


_BASES: list[Image.Image] = []
_NOISE: np.ndarray | None = None


def _init_gen(size: tuple[int, int]) -> None:
    global _NOISE
    from deepmedix.data.phantom_render import render_study

    for k in range(32):
        img, _ = render_study(np.random.default_rng([7, k]), ["nodule", "cardiomegaly"][: k % 3], size=512,
                              view="PA")
        _BASES.append(img)
    w, h = size
    _NOISE = np.random.default_rng(1).normal(0, 2.5, (h + 200, w + 200)).astype(np.int16)


def _make(job: tuple[int, str, tuple[int, int]]) -> None:
    i, path, (w, h) = job
    rng = np.random.default_rng([11, i])
    base = _BASES[i % len(_BASES)]
    ang = float(rng.uniform(-6, 6))
    s = float(rng.uniform(0.9, 1.1))
    dx, dy = (float(v) for v in rng.uniform(-25, 25, 2))
    c, sn = math.cos(math.radians(ang)) / s, math.sin(math.radians(ang)) / s
    cx = cy = 256
    posed = base.transform((512, 512), Image.AFFINE,
                           (c, sn, cx - c * cx - sn * cy - dx, -sn, c, cy + sn * cx - c * cy - dy),
                           Image.BILINEAR, fillcolor=int(rng.integers(0, 30)))
    big = np.asarray(posed.resize((w, h), Image.BICUBIC), dtype=np.int16)
    ox, oy = (int(v) for v in rng.integers(0, 200, 2))
    big = big + _NOISE[oy:oy + h, ox:ox + w]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path + ".tmp"
    Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=95)
    os.replace(tmp, path)


def build_dataset(root: Path, n: int, size: tuple[int, int], procs: int) -> None:
    stamp = root / ".complete.json"
    want = {"n": n, "size": list(size), "version": 3}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        print(f"dataset: reusing {n} JPEGs in {root}", flush=True)
        return
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    jobs = [(i, str(root / _rel(*_study(i))), size) for i in range(n)]
    t0 = time.time()
    with Pool(procs, initializer=_init_gen, initargs=(size,)) as pool:
        for k, _ in enumerate(pool.imap_unordered(_make, jobs, chunksize=8), 1):
            if k % 500 == 0 or k == n:
                print(f"dataset: {k}/{n} JPEGs ({time.time() - t0:.0f} s)", flush=True)
    meta = [["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
             "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
             "PatientOrientationCodeSequence_CodeMeaning"]]
    split = [["dicom_id", "study_id", "subject_id", "split"]]
    labels = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
              "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
              "Pneumothorax", "Support Devices"]
    chex = [["subject_id", "study_id"] + labels]
    for i in range(n):
        subject, study, dicom = _study(i)
        meta.append([dicom, subject, study, "CHEST (PA AND LAT)", "PA", size[1], size[0], 21800506, "213045.0",
                     "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
        split.append([dicom, study, subject, "train"])
        chex.append([subject, study] + ["1.0" if k == "No Finding" else "" for k in labels])
        rep = root / f"files/p{subject[:2]}/p{subject}/s{study}.txt"
        rep.write_text(f"                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
                       f" FINDINGS:\n\n Study {study}: heart size is normal. No focal consolidation, pleural effusion"
                       f" or pneumothorax.\n\n IMPRESSION:\n\n No acute cardiopulmonary process ({i}).\n")
    for name, rows in (("mimic-cxr-2.0.0-metadata.csv", meta), ("mimic-cxr-2.0.0-split.csv", split),
                       ("mimic-cxr-2.0.0-chexpert.csv", chex)):
        with open(root / name, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    stamp.write_text(json.dumps(want))


# ------------------------------------------------------------------------------------------- measurements

def warm(paths: list[Path]) -> None:
    """Read the inputs of the next timed run, so that each run starts with its inputs in the page cache (this VM
    drops pages it has not touched for a while; a file read back from disk costs about 1 ms more)."""
    for p in paths:
        p.read_bytes()


def naive(paths: list[Path], max_pixels: int, mode: str) -> float:
    from deepmedix.data.images import target_size

    warm(paths)
    t0 = time.perf_counter()
    for p in paths:
        im = Image.open(p)
        im.convert(mode).resize(target_size(*im.size, max_pixels), Image.BICUBIC)
    return len(paths) / (time.perf_counter() - t0)


def _rss(procs) -> int:
    import psutil

    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def ours(root: Path, out: Path, studies: int, workers: int, max_pixels: int, warm_inputs: bool = True) -> dict:
    import psutil

    if out.exists():
        shutil.rmtree(out)
    if warm_inputs:  # the images, reports and CSVs this run reads
        ids = [_study(i) for i in range(studies)]
        warm([root / _rel(*i) for i in ids] + [root / f"files/p{subj[:2]}/p{subj}/s{st}.txt" for subj, st, _ in ids]
             + sorted(root.glob("*.csv")))
    cmd = [str(Path(sys.executable).with_name("deepmedix")), "curate", "--source", "mimic_cxr", "--root", str(root),
           "--out", str(out), "--limit", str(2 * studies), "--workers", str(workers), "--set",
           f"max_pixels={max_pixels}", "--set", "shard_size=500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    ps = psutil.Process(proc.pid)
    peak = [0]
    done = threading.Event()

    # RSS every 20 ms, but the process tree (a scan of /proc, about 0.5 ms) only every 0.5 s: on 2 cores, a
    # sampler scanning /proc 50 times a second takes CPU away from the 2-worker run it measures
    def sample():
        procs, listed = [ps], 0.0
        while not done.is_set():
            if time.monotonic() - listed > 0.5:
                try:
                    procs, listed = [ps] + ps.children(recursive=True), time.monotonic()
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], _rss(procs))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"curate failed ({proc.returncode}): {stderr[-2000:]}")
    s = json.loads(stdout)
    if s["quarantined"]:
        print(f"  note: {s['quarantined']} quarantined: {s['quarantine_by_reason']}", flush=True)
    return {"images": s["images"], "records": s["after"], "wall_s": s["wall_s"], "ips": s["images"] / s["wall_s"],
            "peak_rss_mb": peak[0] / 2**20, "quarantined": s["quarantined"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(REPO / "runs" / "bench" / "curate"))
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=10000)
    ap.add_argument("--naive", type=int, default=300)
    ap.add_argument("--size", default="2500x3000", help="JPEG width x height")
    ap.add_argument("--max-pixels", type=int, default=512 * 512)
    ap.add_argument("--rgb", action="store_true", help="also time the naive loop with convert('RGB')")
    ap.add_argument("--build-only", action="store_true", help="write the dataset and stop")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved repeats of the speed runs (medians used)")
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    work = Path(args.dir)
    root = work / "mimic-cxr-jpg"
    build_dataset(root, args.large, size, procs=os.cpu_count() or 2)
    if args.build_only:
        return 0
    small_paths = [root / _rel(*_study(i)) for i in range(args.small)]

    res: dict = {"cpu_count": os.cpu_count(), "size": list(size), "max_pixels": args.max_pixels,
                 "rounds": args.rounds}
    naive_runs, w1_runs, w2_runs = [], [], []
    for r in range(args.rounds):  # interleaved, so that drift in machine speed hits everyone alike
        print(f"round {r + 1}/{args.rounds}: naive loop over {args.naive} images ...", flush=True)
        naive_runs.append(naive(small_paths[: args.naive], args.max_pixels, "L"))
        for w, runs in ((1, w1_runs), (2, w2_runs)):
            print(f"round {r + 1}/{args.rounds}: ours, {w} worker(s), {args.small} images ...", flush=True)
            runs.append(ours(root, work / f"out-w{w}", args.small, w, args.max_pixels))
    naive_runs.append(naive(small_paths[: args.naive], args.max_pixels, "L"))
    if args.rgb:
        res["naive_rgb_ips"] = naive(small_paths[: args.naive], args.max_pixels, "RGB")
    print(f"ours, 2 workers, {args.large} images (memory) ...", flush=True)
    res["ours_large"] = ours(root, work / "out-large", args.large, 2, args.max_pixels, warm_inputs=False)

    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    res["naive_runs_ips"] = naive_runs
    res["naive_ips"] = med(naive_runs)
    for w, runs in ((1, w1_runs), (2, w2_runs)):
        res[f"ours_w{w}_runs_ips"] = [x["ips"] for x in runs]
        res[f"ours_w{w}"] = sorted(runs, key=lambda x: x["ips"])[len(runs) // 2]
    # paired per round: the 1-worker run against the naive runs that bracket it, 2 workers against 1 worker
    res["per_core_vs_naive_rounds"] = [w1["ips"] / ((naive_runs[r] + naive_runs[r + 1]) / 2)
                                       for r, w1 in enumerate(w1_runs)]
    res["two_vs_one_worker_rounds"] = [w2["ips"] / w1["ips"] for w1, w2 in zip(w1_runs, w2_runs)]
    res["per_core_vs_naive"] = med(res["per_core_vs_naive_rounds"])
    res["two_vs_one_worker"] = med(res["two_vs_one_worker_rounds"])
    res["rss_large_vs_small"] = res["ours_large"]["peak_rss_mb"] / res["ours_w2"]["peak_rss_mb"]
    goals = {"per_core_vs_naive": (res["per_core_vs_naive"], ">=", 2.0),
             "two_vs_one_worker": (res["two_vs_one_worker"], ">=", 1.8),
             "rss_large_vs_small": (res["rss_large_vs_small"], "<=", 1.10)}
    res["goals"] = {k: {"value": v, "goal": f"{op} {g}", "met": (v >= g if op == ">=" else v <= g)}
                    for k, (v, op, g) in goals.items()}

    print()
    print(f"curation benchmark ({size[0]}x{size[1]} JPEG q95 -> <= {args.max_pixels} px PNG; {os.cpu_count()} CPUs)")
    print(f"  naive PIL open->convert('L')->resize   {res['naive_ips']:8.1f} images/s   (median of "
          f"{', '.join(f'{x:.1f}' for x in res['naive_runs_ips'])})")
    if args.rgb:
        print(f"  naive PIL open->convert('RGB')->resize {res['naive_rgb_ips']:8.1f} images/s")
    for w in (1, 2):
        r = res[f"ours_w{w}"]
        print(f"  deepmedix curate, {w} worker(s)          {r['ips']:8.1f} images/s   (median of "
              f"{', '.join(f'{x:.1f}' for x in res[f'ours_w{w}_runs_ips'])}; {r['images']} images, "
              f"peak RSS {r['peak_rss_mb']:.0f} MiB)")
    r = res["ours_large"]
    print(f"  deepmedix curate, 2 workers, {r['images']:>6} images: peak RSS {r['peak_rss_mb']:.0f} MiB "
          f"({r['ips']:.1f} images/s)")
    for k, g in res["goals"].items():
        rounds = res.get(f"{k}_rounds")
        per_round = f"   (median of rounds {', '.join(f'{x:.2f}' for x in rounds)})" if rounds else ""
        print(f"  {k:<22} {g['value']:6.2f}  goal {g['goal']:<7} {'MET' if g['met'] else 'NOT MET'}{per_round}")
    (work / "curate_bench.json").write_text(json.dumps(res, indent=2) + "\n")
    _plot(res, work / "curate_bench.png")
    print(f"  wrote {work / 'curate_bench.json'} and {work / 'curate_bench.png'}")
    return 0


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["naive L", "ours 1 worker", "ours 2 workers"]
    vals = [res["naive_ips"], res["ours_w1"]["ips"], res["ours_w2"]["ips"]]
    if "naive_rgb_ips" in res:
        names.insert(1, "naive RGB")
        vals.insert(1, res["naive_rgb_ips"])
    a.bar(names, vals, color=["#999"] * (len(names) - 2) + ["#2a7", "#185"])
    a.set_ylabel("images / s")
    a.tick_params(axis="x", labelrotation=15)
    a.set_title("throughput")
    small, large = res["ours_w2"], res["ours_large"]
    b.bar([f"{small['images']} images", f"{large['images']} images"], [small["peak_rss_mb"], large["peak_rss_mb"]],
          color="#36c")
    b.set_ylabel("peak RSS, MiB (main + workers)")
    b.set_title("memory")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
