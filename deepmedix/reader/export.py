"""The study's expert table: per model (unblinded), per-axis means and preference shares, as CSV, markdown, PNG.

Means are over every saved (reader, case) rating of the model. A preference share is the model's wins plus an
equal split of the ties (a tie gives each of the study's M models 1/M of a vote), over all saved ratings, so the
shares of the models sum to 1 as in the paper's table; the tie counts are reported beside them.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from deepmedix.reader.db import AXES, ReaderError, connect

PREFS = ("grounded", "overall")
COLUMNS = ("model", "n", *AXES, *(f"{p}_{k}" for p in PREFS for k in ("wins", "ties", "share")))


def summarise(db_path: str | os.PathLike) -> dict[str, Any]:
    """The numbers of :func:`export`, without writing files."""
    conn = connect(db_path)
    try:
        n = conn.execute("SELECT count(*) FROM rating").fetchone()[0]
        if n == 0:
            raise ReaderError(f"{db_path}: no ratings saved yet, nothing to export")
        models = conn.execute("SELECT id, name FROM model ORDER BY id").fetchall()
        votes = {p: dict(conn.execute(f"SELECT {p}_model_id, count(*) FROM rating GROUP BY {p}_model_id").fetchall())
                 for p in PREFS}
        rows = []
        for m in models:
            stats = conn.execute("SELECT count(*), avg(relevance), avg(correctness), avg(completeness) FROM score "
                                 "WHERE model_id = ?", (m["id"],)).fetchone()
            row: dict[str, Any] = {"model": m["name"], "n": stats[0], **dict(zip(AXES, stats[1:]))}
            for p in PREFS:
                wins, ties = votes[p].get(m["id"], 0), votes[p].get(None, 0)
                row.update({f"{p}_wins": wins, f"{p}_ties": ties, f"{p}_share": (wins + ties / len(models)) / n})
            rows.append(row)
        readers = dict(conn.execute("SELECT r.name, count(t.case_id) FROM reader r LEFT JOIN rating t "
                                    "ON t.reader_id = r.id GROUP BY r.id ORDER BY r.name").fetchall())
        n_cases = conn.execute("SELECT count(*) FROM study_case").fetchone()[0]
    finally:
        conn.close()
    return {"n_ratings": n, "n_cases": n_cases, "models": rows, "ties": {p: votes[p].get(None, 0) for p in PREFS},
            "readers": readers}


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_markdown(s: dict[str, Any], path: Path) -> None:
    esc = lambda t: str(t).replace("|", "\\|")  # noqa: E731
    lines = ["# Reader study", "",
             f"{s['n_ratings']} ratings (reader x case) by {len(s['readers'])} readers over {s['n_cases']} cases; "
             f"models unblinded. Scores are 1-5 means; preference shares count a tie as an equal split "
             f"(ties: grounded {s['ties']['grounded']}, overall {s['ties']['overall']}).", "",
             "| Model | n | Relevance | Correctness | Completeness | Grounded preference | Overall preference |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in s["models"]:
        lines.append(f"| {esc(r['model'])} | {r['n']} | " + " | ".join(_fmt(r[a]) for a in AXES) + " | "
                     + " | ".join(_fmt(r[f"{p}_share"]) for p in PREFS) + " |")
    lines += ["", "| Reader | Cases rated |", "|---|---:|"]
    lines += [f"| {esc(name)} | {k} / {s['n_cases']} |" for name, k in s["readers"].items()]
    path.write_text("\n".join(lines) + "\n")


def write_chart(s: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    width = 0.8 / len(s["models"])
    for i, r in enumerate(s["models"]):
        for ax, keys in ((left, AXES), (right, [f"{p}_share" for p in PREFS])):
            bars = ax.bar([j + (i - (len(s["models"]) - 1) / 2) * width for j in range(len(keys))],
                          [r[k] for k in keys], width, label=r["model"])
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
    left.set(xticks=range(len(AXES)), xticklabels=[a.capitalize() for a in AXES], ylim=(0, 5.4),
             ylabel="mean score (1-5)", title="Reasoning quality")
    right.set(xticks=range(len(PREFS)), xticklabels=[f"{p.capitalize()} preference" for p in PREFS],
              ylim=(0, 1.08), ylabel="share of votes (ties split)", title="Preference")
    fig.legend(*left.get_legend_handles_labels(), loc="outside lower center", ncols=len(s["models"]))
    fig.suptitle(f"Reader study: {s['n_ratings']} ratings by {len(s['readers'])} readers")
    fig.savefig(path, dpi=120)


def export(db_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``reader_study.csv``, ``.md`` and ``.png`` into ``out_dir``; return the numbers and the file paths."""
    s = summarise(db_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {ext: out / f"reader_study.{ext}" for ext in ("csv", "md", "png")}
    # all three written under temporary names first, then renamed: no half-written or mixed export is left
    tmp = {ext: out / f".reader_study.{os.getpid()}.tmp.{ext}" for ext in files}
    try:
        with tmp["csv"].open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows([[_fmt(r[c]) for c in COLUMNS] for r in s["models"]])
        write_markdown(s, tmp["md"])
        write_chart(s, tmp["png"])
        for ext, path in files.items():
            os.replace(tmp[ext], path)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return {**s, "files": {k: str(v) for k, v in files.items()}}
