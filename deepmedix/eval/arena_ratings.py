"""The Report Arena's outcomes and ratings (Bradley-Terry on an Elo-like scale, bootstrap intervals over records)
and its reports (leaderboard table, win rates, the PNG). See :mod:`deepmedix.eval.arena`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from deepmedix.config import ArenaConfig
from deepmedix.eval.arena_judging import Judge

# ---------------------------------------------------------------- outcomes and ratings

def outcomes(judgments: list[dict], models: list[str], judges: list[Judge]) -> tuple[np.ndarray, dict, dict]:
    """The games (record index, model i, model j, i's score: 1, 0.5 or 0), overall counts and counts per judge."""
    index = {m: n for n, m in enumerate(models)}
    by_pair: dict[tuple[str, str, str, str], dict[str, dict]] = {}
    for r in judgments:
        a, b = sorted((r["model_a"], r["model_b"]), key=index.__getitem__)
        by_pair.setdefault((r["record_id"], a, b, r["judge"]), {})[r["order"]] = r
    rec_index: dict[str, int] = {}
    games: list[tuple[int, int, int, float]] = []
    zero = {"games": 0, "inconsistent": 0, "incomplete": 0, "failed": 0}
    per_judge = {j.name: dict(zero) for j in judges}
    for (rid, a, b, judge), orders in by_pair.items():
        c = per_judge[judge]
        c["failed"] += sum(r["status"] == "failed" for r in orders.values())
        winners = {r["winner"] for r in orders.values()}
        if len(orders) < 2 or None in winners:
            c["incomplete"] += 1
            continue
        c["games"] += 1
        if len(winners) > 1:
            c["inconsistent"] += 1
        winner = winners.pop() if len(winners) == 1 else "tie"
        score = 0.5 if winner == "tie" else float(winner == a)
        games.append((rec_index.setdefault(rid, len(rec_index)), index[a], index[b], score))
    counts = {k: sum(c[k] for c in per_judge.values()) for k in zero}
    return np.array(games, dtype=float).reshape(-1, 4), counts, per_judge


def win_matrix(games: np.ndarray, n_models: int, weights: np.ndarray | None = None) -> np.ndarray:
    """``W[a, b]``: a's wins over b, a tie counting half for each."""
    w = np.ones(len(games)) if weights is None else weights
    i, j, s = games[:, 1].astype(int), games[:, 2].astype(int), games[:, 3]
    out = np.zeros((n_models, n_models))
    np.add.at(out, (i, j), s * w)
    np.add.at(out, (j, i), (1 - s) * w)
    return out


def bradley_terry(wins: np.ndarray, prior_ties: float = 0.0, l2: float = 1e-6) -> np.ndarray:
    """Bradley–Terry log-strengths (mean 0) by maximum likelihood, ``P(a beats b) = sigmoid(t_a - t_b)``, from
    ``wins[a, b]`` (ties as half wins) plus ``prior_ties`` virtual ties per pair; Newton's method with step
    halving on the log-likelihood. The tiny ``l2`` term pins the mean and keeps the Hessian invertible."""
    m = len(wins)
    w = wins + prior_ties / 2 * (1 - np.eye(m))
    n = w + w.T

    def loss(t: np.ndarray) -> float:
        return float(np.sum(w * np.logaddexp(0.0, t[None, :] - t[:, None]))) + 0.5 * l2 * float(t @ t)

    t = np.zeros(m)
    current = loss(t)
    for _ in range(100):
        p = 0.5 * (1 + np.tanh((t[:, None] - t[None, :]) / 2))  # P(a beats b)
        grad = (n * p - w).sum(1) + l2 * t
        if np.abs(grad).max() < 1e-9 * (1 + n.sum()):
            break
        h = n * p * p.T
        hess = np.diag(h.sum(1) + l2) - h
        step = np.linalg.solve(hess, grad)
        size = 1.0
        while size > 1e-6 and loss(t - size * step) > current:
            size /= 2
        t = t - size * step
        current = loss(t)
    return t - t.mean()


def to_elo(theta: np.ndarray, cfg: ArenaConfig, models: list[str]) -> np.ndarray:
    elo = cfg.elo_scale * theta / math.log(10)
    shift = elo[models.index(cfg.anchor_model)] if cfg.anchor_model else elo.mean()
    return elo - shift + cfg.elo_anchor


def ratings(games: np.ndarray, models: list[str], cfg: ArenaConfig) -> tuple[np.ndarray, np.ndarray]:
    """Elo-scale ratings and their 95 % percentile-bootstrap intervals (shape (2, models)), records resampled."""
    m = len(models)
    elo = to_elo(bradley_terry(win_matrix(games, m), cfg.prior_ties), cfg, models)
    n_rec = int(games[:, 0].max()) + 1 if len(games) else 0
    if not n_rec or not cfg.bootstrap_rounds:
        return elo, np.vstack([elo, elo])
    rng = np.random.default_rng(cfg.seed)
    rec = games[:, 0].astype(int)
    boot = np.empty((cfg.bootstrap_rounds, m))
    for b in range(cfg.bootstrap_rounds):
        weights = np.bincount(rng.integers(0, n_rec, n_rec), minlength=n_rec)[rec]
        boot[b] = to_elo(bradley_terry(win_matrix(games, m, weights), cfg.prior_ties), cfg, models)
    return elo, np.percentile(boot, [2.5, 97.5], axis=0)


# ---------------------------------------------------------------- reports

def leaderboard(games: np.ndarray, models: list[str], elo: np.ndarray, ci: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for n, model in enumerate(models):
        as_i, as_j = games[games[:, 1] == n][:, 3], games[games[:, 2] == n][:, 3]
        wins = int(np.sum(as_i == 1) + np.sum(as_j == 0))
        losses = int(np.sum(as_i == 0) + np.sum(as_j == 1))
        ties = int(np.sum(as_i == 0.5) + np.sum(as_j == 0.5))
        rows.append({"model": model, "rating": round(float(elo[n]), 1), "ci_low": round(float(ci[0, n]), 1),
                     "ci_high": round(float(ci[1, n]), 1), "wins": wins, "ties": ties, "losses": losses,
                     "n": wins + ties + losses})
    rows.sort(key=lambda r: -r["rating"])
    for rank, r in enumerate(rows, start=1):
        r["rank"] = rank
    return rows


def _md(text: str) -> str:
    """A name as one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def win_rates(games: np.ndarray, n_models: int) -> list[list[float | None]]:
    """Row model against column model: (wins + half the ties) / games; None on the diagonal and without games."""
    w = win_matrix(games, n_models)
    n = w + w.T
    return [[round(float(w[a, b] / n[a, b]), 3) if a != b and n[a, b] else None for b in range(n_models)]
            for a in range(n_models)]


def markdown(report: dict[str, Any]) -> str:
    c = report["counts"]
    judges = ", ".join(f"{j['name']} ({j['endpoint']})" for j in report["judges"])
    lines = ["# Report Arena leaderboard", "",
             f"Judges: {judges}. Records: {report['records']} ({', '.join(report['tasks'])}). Games: {c['games']} "
             f"(one per record, model pair and judge; both orders judged).", "",
             f"Judgments: {c['judgments']} ({c['identical']} on identical answers: ties, not asked; {c['failed']} "
             f"failed). Inconsistent pairs (counted as ties): {c['inconsistent']}. Incomplete pairs (left out): "
             f"{c['incomplete']}.", "",
             f"Ratings: Bradley–Terry, ties as half wins, {report['scale']['elo_scale']:g} points per factor 10 in "
             f"the odds, {report['scale']['anchor']}; 95 % CI from {report['scale']['bootstrap_rounds']} bootstrap "
             f"resamples of the records.", "",
             "| Rank | Model | Rating | 95 % CI | W / T / L | n |", "|---:|---|---:|---|---|---:|"]
    for r in report["leaderboard"]:
        lines.append(f"| {r['rank']} | {_md(r['model'])} | {r['rating']:.0f} | {r['ci_low']:.0f} – {r['ci_high']:.0f} "
                     f"| {r['wins']} / {r['ties']} / {r['losses']} | {r['n']} |")
    models = report["win_rate"]["models"]
    lines += ["", "## Win rate (row against column: wins + ½ ties over games)", "",
              "| | " + " | ".join(map(_md, models)) + " |", "|---|" + "---:|" * len(models)]
    for model, row in zip(models, report["win_rate"]["matrix"]):
        lines.append(f"| {_md(model)} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Ratings with their 95 % intervals, and the win-rate heatmap, in one PNG."""
    from matplotlib.figure import Figure

    board = report["leaderboard"][::-1]  # best at the top
    models = report["win_rate"]["models"]
    rates = np.array([[np.nan if v is None else v for v in row] for row in report["win_rate"]["matrix"]])
    size = len(models)
    fig = Figure(figsize=(12, 2.5 + 0.5 * size), layout="constrained")
    ax, hm = fig.subplots(1, 2, width_ratios=[1.2, 1])
    y = np.arange(len(board))
    ratings_ = np.array([r["rating"] for r in board])
    err = np.array([[r["rating"] - r["ci_low"] for r in board], [r["ci_high"] - r["rating"] for r in board]])
    ax.errorbar(ratings_, y, xerr=err, fmt="o", color="tab:blue", ecolor="tab:gray", capsize=4)
    ax.set_yticks(y, [r["model"] for r in board])
    ax.set_ylim(-0.6, len(board) - 0.4)
    ax.axvline(report["scale"]["elo_anchor"], color="lightgray", lw=1, zorder=0)
    ax.set_xlabel("rating (95 % CI)")
    ax.set_title("Report Arena: Bradley–Terry ratings")
    im = hm.imshow(rates, cmap="RdYlGn", vmin=0, vmax=1)
    hm.set_xticks(range(size), models, rotation=30, ha="right")
    hm.set_yticks(range(size), models)
    for a in range(size):
        for b in range(size):
            if not np.isnan(rates[a, b]):
                hm.text(b, a, f"{rates[a, b]:.2f}", ha="center", va="center", fontsize=9)
    hm.set_title("win rate, row against column")
    fig.colorbar(im, ax=hm, shrink=0.8)
    fig.savefig(path, dpi=120)
