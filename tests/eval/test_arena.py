"""The Report Arena: the real openai client against a stub OpenAI-compatible judge (tests/eval/judge_stub_server.py,
a uvicorn subprocess), on synthetic prediction files in the evaluation's format; the Bradley–Terry fit alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import server_process

from deepmedix.config import ConfigError, load_config
from deepmedix.eval.arena import run_arena
from deepmedix.eval.arena_judging import build_messages, parse_verdict
from deepmedix.eval.arena_ratings import bradley_terry
from deepmedix.grounding import parse

KEY_ENV = "DEEPMEDIX_TEST_JUDGE_KEY"
SECRET = "sk-judge-secret-0123456789abcdef"
SERVER = Path(__file__).with_name("judge_stub_server.py")
MODELS = ("alpha-best", "beta-mid", "gamma-worst")
PAIRS = 3  # model pairs among MODELS

REFERENCES = [
    "Small right pleural effusion. Mild cardiomegaly. No pneumothorax.",
    "Left lower lobe consolidation. No pleural effusion. Heart size normal.",
    "Right upper lobe nodule measuring 8 mm. Lungs otherwise clear.",
    "Bilateral interstitial opacities. Moderate pulmonary edema. Cardiomegaly.",
    "Large left pneumothorax with mediastinal shift. Emergent decompression advised.",
    "Atelectasis at the right base. Degenerative changes of the thoracic spine.",
]
WRONG = "Unremarkable radiograph without acute abnormality."  # no word in common with any reference


# ---------------------------------------------------------------- the stub judge and the predictions

@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    with server_process(SERVER, ["--key", SECRET], tmp_path_factory.mktemp("judge")) as url:
        yield url


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def stats(stub: str) -> dict:
    return httpx.get(f"{stub}/stats", timeout=5).json()


def requests(stub: str) -> int:
    return stats(stub)["total"]


def pred_row(rid: str, task: str, prompt: str, reference: str, answer: str) -> dict:
    """One line of ``predictions.jsonl`` exactly as ``deepmedix eval run`` writes it."""
    raw = (f"<think> the lung fields are reviewed with [64, 64, 448, 448]; the findings are summarised </think> "
           f"The answer is: \\boxed{{{answer}}}")
    p = parse(raw)
    return {"record_id": rid, "task": task, "question_type": "", "source": "phantom", "prompt": prompt,
            "raw_output": raw, "answer": p.answer, "boxes": p.boxes, "format_ok": p.format_ok, "reference": reference,
            "ref_boxes_frame": [[100.0, 120.0, 200.0, 260.0]]}


def answers_for(n: int, reference: str) -> dict[str, str]:
    """alpha: the reference; beta: its first sentence; gamma: wrong. On record 0 alpha and beta trade places."""
    first = reference.split(". ")[0] + "."
    alpha, beta = (first, reference) if n == 0 else (reference, first)
    return {"alpha-best": alpha, "beta-mid": beta, "gamma-worst": WRONG}


def write_predictions(folder: Path, edit: dict[tuple[str, int], str] | None = None) -> dict[str, str]:
    """A predictions file per model: 6 report records (in the arena) and 2 VQA records (not, by default).
    ``edit[(model, record)]`` replaces that model's answer on that record."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for model in MODELS:
        rows = []
        for n, ref in enumerate(REFERENCES):
            task = "report_findings" if n % 2 else "report_impression"
            answer = (edit or {}).get((model, n), answers_for(n, ref)[model])
            rows.append(pred_row(f"phantom/s{n:03d}-{task}", task, "What are the findings on this chest X-ray?",
                                 ref, answer))
        for n in range(2):
            rows.append(pred_row(f"phantom/s{n:03d}-vqa-0", "vqa", "Is there a pleural effusion?", "yes",
                                 "yes" if model != "gamma-worst" else "no"))
        path = folder / model / "predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[model] = str(path.parent if model == "alpha-best" else path)  # an evaluation folder or the file
    return out


def cfg_for(stub: str, cache: Path, *judges: str, overrides: tuple[str, ...] = ()):
    js = [{"model": j, "base_url": f"{stub}/v1", "api_key_env": KEY_ENV} for j in judges]
    return load_config("arena", "tiny", [f"judges={json.dumps(js)}", f"cache={cache}", "max_records=0",
                                         "bootstrap_rounds=200", "backoff_s=0.01", "timeout_s=5", "concurrency=8",
                                         *overrides])


def arena(stub: str, tmp_path: Path, *judges: str, overrides: tuple[str, ...] = (), preds=None, out="arena"):
    cfg = cfg_for(stub, tmp_path / "cache", *judges, overrides=overrides)
    preds = preds or write_predictions(tmp_path / "preds")
    result = run_arena(cfg, preds, str(tmp_path / out), log=lambda line: None)
    report = json.loads((tmp_path / out / "arena.json").read_text())
    judgments = [json.loads(line) for line in (tmp_path / out / "judgments.jsonl").read_text().splitlines()]
    return result, report, judgments


# ---------------------------------------------------------------- the arena end to end

def test_three_models_two_judges_rank_the_best_first(stub, tmp_path):
    before = requests(stub)
    seen: list[tuple[int, int]] = []
    cfg = cfg_for(stub, tmp_path / "cache", "good", "fenced")
    preds = write_predictions(tmp_path / "preds")
    result = run_arena(cfg, preds, str(tmp_path / "arena"), progress=lambda d, t: seen.append((d, t)),
                       log=lambda line: None)
    n_judgments = len(REFERENCES) * PAIRS * 2 * 2  # records x pairs x orders x judges
    assert requests(stub) - before == n_judgments
    assert seen[-1] == (n_judgments, n_judgments)
    out = tmp_path / "arena"
    report = json.loads((out / "arena.json").read_text())
    c = report["counts"]
    assert c["judgments"] == n_judgments and c["games"] == n_judgments // 2 and c["failed"] == 0
    assert c["inconsistent"] == 0 and c["incomplete"] == 0 and c["requests"] == n_judgments and c["cache_hits"] == 0
    board = report["leaderboard"]
    assert [r["model"] for r in board] == list(MODELS) and result["leader"] == "alpha-best"
    best, worst = board[0], board[-1]
    assert best["ci_low"] > worst["ci_high"]  # the interval excludes the worst
    assert best["ci_low"] <= best["rating"] <= best["ci_high"]
    assert abs(sum(r["rating"] for r in board) / 3 - 1000) < 0.2  # mean-anchored
    assert (best["wins"], best["ties"], best["losses"], best["n"]) == (22, 0, 2, 24)  # 2 judges x 6 records x 2
    m = report["win_rate"]["matrix"]  # alpha, beta, gamma
    assert m[0][0] is None and m[0][2] == 1.0 and m[2][0] == 0.0 and m[0][1] == pytest.approx(5 / 6, abs=1e-3)
    # both orders of every pair, by each judge, agreeing; anonymous prompts
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == n_judgments and all(j["status"] == "ok" for j in judgments)
    by_pair: dict[tuple, dict] = {}
    for j in judgments:
        by_pair.setdefault((j["record_id"], frozenset((j["model_a"], j["model_b"])), j["judge"]), {})[j["order"]] = j
    assert len(by_pair) == n_judgments // 2 and all(set(v) == {"AB", "BA"} for v in by_pair.values())
    for v in by_pair.values():
        assert v["AB"]["model_a"] == v["BA"]["model_b"] and v["AB"]["winner"] == v["BA"]["winner"]
        assert {v["AB"]["verdict"], v["BA"]["verdict"]} == {"A", "B"}
    assert all(j["reason"] and j["latency_s"] >= 0 for j in judgments)
    prompts = stats(stub)["prompts"][-n_judgments:]
    assert all("### Answer A" in p and "### Reference report" in p for p in prompts)
    assert not any(name in p for p in prompts for name in ("alpha", "beta", "gamma"))
    # the leaderboard, the plot, the lineage; the key is nowhere
    md = (out / "leaderboard.md").read_text()
    assert "| 1 | alpha-best |" in md and "| 3 | gamma-worst |" in md and "Win rate" in md
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "lineage.json").read_text())["stage"] == "arena"
    assert all(SECRET not in p.read_text(errors="replace") for p in out.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["arena.json", "judgments.jsonl", "leaderboard.md",
                                                     "leaderboard.png", "lineage.json"]


def test_rerun_and_resume_come_from_the_cache(stub, tmp_path):
    before = requests(stub)
    _, first, _ = arena(stub, tmp_path, "good", overrides=("max_records=2",), out="a")
    assert requests(stub) - before == 2 * PAIRS * 2
    # a run cut short (here: two records) resumes: only the other records are asked
    _, full, _ = arena(stub, tmp_path, "good", out="b")
    assert requests(stub) - before == len(REFERENCES) * PAIRS * 2
    assert full["counts"]["cache_hits"] == 2 * PAIRS * 2
    n = requests(stub)
    _, again, judgments = arena(stub, tmp_path, "good", out="c")
    assert requests(stub) == n  # nothing asked
    assert again["counts"]["requests"] == 0 and again["counts"]["cache_hits"] == len(judgments)
    assert all(j["cached"] for j in judgments) and again["leaderboard"] == full["leaderboard"]


KILLABLE = """
import json, sys
from deepmedix.config import load_config
from deepmedix.eval.arena import run_arena
overrides, preds, out = json.loads(sys.argv[1])
run_arena(load_config("arena", "tiny", overrides), preds, out)
"""


def test_a_killed_run_resumes_from_the_cache(stub, tmp_path):
    preds = write_predictions(tmp_path / "preds")
    cache = tmp_path / "cache"
    js = [{"model": "sleepy", "base_url": f"{stub}/v1", "api_key_env": KEY_ENV}]
    overrides = [f"judges={json.dumps(js)}", f"cache={cache}", "max_records=0", "concurrency=1"]
    before = requests(stub)
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, json.dumps([overrides, preds, str(tmp_path / "a")])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while requests(stub) - before < 6 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    asked = requests(stub) - before
    total = len(REFERENCES) * PAIRS * 2
    cached = len(list(cache.rglob("*.json")))
    assert 5 <= cached < total and asked in (cached, cached + 1)  # at most one reply was in flight
    assert not (tmp_path / "a").exists()  # nothing published
    _, report, judgments = arena(stub, tmp_path, "sleepy")
    assert requests(stub) - before == asked + total - cached
    assert report["counts"]["cache_hits"] == cached and len(judgments) == total


def test_inconsistent_verdicts_are_ties(stub, tmp_path):
    _, report, judgments = arena(stub, tmp_path, "positional")
    assert {j["verdict"] for j in judgments} == {"A"}
    c = report["counts"]
    assert c["games"] == len(REFERENCES) * PAIRS and c["inconsistent"] == c["games"]
    assert all(r["ties"] == r["n"] == 12 and r["rating"] == pytest.approx(1000, abs=0.5)
               for r in report["leaderboard"])
    assert all(v == 0.5 for row in report["win_rate"]["matrix"] for v in row if v is not None)


def test_malformed_and_invalid_verdicts_are_retried_then_recorded(stub, tmp_path):
    # beta's answers on records 1-3 carry markers: its two pairs there get bad replies (4 judgments a record)
    edit = {("beta-mid", 1): "JUDGE:malformed", ("beta-mid", 2): "JUDGE:badverdict", ("beta-mid", 3): "JUDGE:fixonce"}
    preds = write_predictions(tmp_path / "preds", edit)
    before = requests(stub)
    _, report, judgments = arena(stub, tmp_path, "good", overrides=("malformed_retries=2",), preds=preds)
    ok = len(REFERENCES) * PAIRS * 2 - 3 * 4
    assert requests(stub) - before == ok + 2 * 4 * 3 + 4 * 2  # failed: 3 asks each; fixonce: 2
    failed = [j for j in judgments if j["status"] == "failed"]
    assert len(failed) == 8 and all(j["asks"] == 3 and j["raw"] for j in failed)
    assert {j["record_id"] for j in failed} == {"phantom/s001-report_findings", "phantom/s002-report_impression"}
    assert any("no JSON object" in j["error"] for j in failed) and any('"C"' in j["error"] for j in failed)
    fixed = [j for j in judgments if j["record_id"] == "phantom/s003-report_findings" and "beta-mid" in
             (j["model_a"], j["model_b"])]
    assert len(fixed) == 4 and all(j["status"] == "ok" and j["asks"] == 2 for j in fixed)
    c = report["counts"]
    assert c["failed"] == 8 and c["incomplete"] == 4 and c["games"] == len(REFERENCES) * PAIRS - 4
    assert len(report["failed_examples"]) == 5
    assert "8 failed)" in (tmp_path / "arena" / "leaderboard.md").read_text()
    # a judge that never answers properly: every judgment failed, still a (flat) leaderboard
    _, report, _ = arena(stub, tmp_path, "malformed", overrides=("malformed_retries=0", "max_records=1"), out="all")
    assert report["counts"]["failed"] == PAIRS * 2 and report["counts"]["games"] == 0
    assert all(r["n"] == 0 and r["rating"] == 1000 for r in report["leaderboard"])


def test_http_errors_are_retried_and_timeouts_recorded(stub, tmp_path):
    before = stats(stub)["by_model"]
    _, report, judgments = arena(stub, tmp_path, "flaky", "ratelimit", overrides=("max_records=2",))
    after = stats(stub)["by_model"]
    n = 2 * PAIRS * 2  # judgments per judge
    assert after["flaky"] - before.get("flaky", 0) == 3 * n  # two 500s, then the verdict
    assert after["ratelimit"] - before.get("ratelimit", 0) == 2 * n  # a 429, then the verdict
    assert report["counts"]["failed"] == 0 and report["counts"]["retries"] == 3 * n
    # a judge slower than the timeout on beta's answers: a try and a retry, then the judgment is recorded as
    # failed and not cached (a rerun asks again); the alpha-gamma pair is judged and cached
    preds = write_predictions(tmp_path / "slow", {("beta-mid", n): "JUDGE:slow" for n in range(len(REFERENCES))})
    for out, asked in (("s1", 4 * 2 + 2), ("s2", 4 * 2)):
        start = requests(stub)
        _, report, judgments = arena(stub, tmp_path, "good", preds=preds, out=out,
                                     overrides=("max_records=1", "timeout_s=0.5", "max_retries=1"))
        failed = [j for j in judgments if j["status"] == "failed"]
        assert len(failed) == 4 and all("Timeout" in j["error"] for j in failed)
        assert report["counts"]["incomplete"] == 2 and report["counts"]["games"] == 1
        assert requests(stub) - start == asked


def test_refused_or_unreachable_judge_stops_with_a_clear_error(stub, tmp_path, monkeypatch):
    from serving.local import free_port

    preds = write_predictions(tmp_path / "preds")
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(ValueError, match=rf"judge 'good' at {stub}/v1 refused.*AuthenticationError.*{KEY_ENV}"):
        run_arena(cfg_for(stub, tmp_path / "cache", "good"), preds, str(tmp_path / "a"), log=lambda line: None)
    monkeypatch.setenv(KEY_ENV, SECRET)
    with pytest.raises(ValueError, match=r"refused.*NotFoundError.*judges\[0\]\.model"):
        run_arena(cfg_for(stub, tmp_path / "cache", "no-such-judge"), preds, str(tmp_path / "a"),
                  log=lambda line: None)
    dead = f"http://user:pw@127.0.0.1:{free_port()}/v1"
    cfg = cfg_for(stub, tmp_path / "cache", "good", overrides=("max_retries=1",))
    cfg.judges[0]["base_url"] = dead
    with pytest.raises(ValueError, match=r"cannot reach judge 'good' at http://127\.0\.0\.1:\d+/v1") as exc:
        run_arena(cfg, preds, str(tmp_path / "a"), log=lambda line: None)
    assert "pw" not in str(exc.value)
    assert not (tmp_path / "a").exists()


def test_identical_answers_are_ties_without_asking(stub, tmp_path):
    same = {("beta-mid", n): answers_for(n, ref)["alpha-best"] for n, ref in enumerate(REFERENCES)}
    before = requests(stub)
    _, report, judgments = arena(stub, tmp_path, "good", preds=write_predictions(tmp_path / "preds", same))
    # the alpha-beta pair is never asked, and alpha-gamma and beta-gamma are the same question: asked once
    assert requests(stub) - before == report["counts"]["prompts"] == len(REFERENCES) * 2
    assert report["counts"]["identical"] == len(REFERENCES) * 2
    assert all(j["status"] == "ok" for j in judgments if j["status"] != "identical")
    ab = [r for r in report["leaderboard"] if r["model"] != "gamma-worst"]
    assert ab[0]["rating"] == ab[1]["rating"]


# ---------------------------------------------------------------- config, inputs, prompt, parsing, the fit

def test_config_errors_name_the_key(stub, tmp_path, monkeypatch):
    cfg = load_config("arena", "tiny")
    assert cfg.judges[0]["api_key_env"] == "OPENAI_API_KEY" and cfg.tasks == ["report_findings", "report_impression"]
    preds = write_predictions(tmp_path / "preds")

    def fails(match: str, *overrides: str, judges=None) -> None:
        c = cfg_for(stub, tmp_path / "cache", "good", overrides=overrides)
        if judges is not None:
            c.judges = judges
        with pytest.raises(ConfigError, match=match):
            run_arena(c, preds, str(tmp_path / "a"), log=lambda line: None)

    fails(r"'concurrency' must be >= 1", "concurrency=0")
    fails(r"'tasks' must be a non-empty list", "tasks=[]")
    fails(r"'bootstrap_rounds' must be >= 0", "bootstrap_rounds=-1")
    fails(r"'anchor_model' is 'nope'", "anchor_model=nope")
    fails(r"'judges' needs at least one judge", judges=[])
    fails(r"judges\[0\]\.model is required", judges=[{"base_url": f"{stub}/v1"}])
    fails(r"judges\[0\]: unknown key\(s\) \['url'\]", judges=[{"model": "good", "url": "x"}])
    fails(r"judge name 'good' is used twice", judges=[{"model": "good", "base_url": f"{stub}/v1",
                                                        "api_key_env": KEY_ENV}] * 2)
    monkeypatch.delenv(KEY_ENV)
    fails(rf"env var {KEY_ENV} \(judges\[0\]\.api_key_env\)")
    with pytest.raises(ConfigError, match=r"key 'judges'"):
        load_config("arena", "tiny", ["judges=5"])
    with pytest.raises(ConfigError, match=r"key 'max_records'"):
        load_config("arena", "tiny", ["max_records=lots"])
    assert not (tmp_path / "a").exists()


def test_inputs_are_joined_checked_and_sampled(stub, tmp_path):
    preds = write_predictions(tmp_path / "preds")
    # only records every model answered; tasks from the config
    lines = Path(preds["gamma-worst"]).read_text().splitlines(True)
    Path(preds["gamma-worst"]).write_text("".join(lines[:1] + lines[2:]))  # no record 1 (report_findings)
    _, report, judgments = arena(stub, tmp_path, "good", overrides=("tasks=[vqa, report_findings]",), preds=preds)
    assert report["records"] == 2 + 3 - 1 and {j["task"] for j in judgments} == {"vqa", "report_findings"}
    _, report, _ = arena(stub, tmp_path, "good", overrides=("max_records=3",), preds=preds, out="s")
    assert report["records"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"record_id": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1 lacks"):
        arena(stub, tmp_path, "good", preds={**preds, "gamma-worst": str(bad)})
    with pytest.raises(FileNotFoundError, match="no predictions file"):
        arena(stub, tmp_path, "good", preds={**preds, "gamma-worst": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="at least two models"):
        arena(stub, tmp_path, "good", preds={"alpha-best": preds["alpha-best"]})


def test_prompt_and_verdict_parsing():
    system, user = build_messages("report_findings", "What are the findings?", "Small effusion.", "ans one", "two")
    assert '"verdict"' in system["content"] and "Answer A" in system["content"]
    text = user["content"]
    assert "### Reference report\nSmall effusion." in text and "### Answer A\nans one" in text
    assert "### Reference answer" in build_messages("vqa", "q?", "yes", "a", "b")[1]["content"]
    assert parse_verdict('{"verdict": "A", "reason": "more complete"}') == ("A", "more complete", None)
    assert parse_verdict('Sure.\n```json\n{"verdict": "tie", "reason": "same"}\n```') == ("tie", "same", None)
    assert parse_verdict('My answer: {"reason": "x", "verdict": " answer b "} done')[:2] == ("B", "x")
    assert parse_verdict('{"verdict": "TIE"}') == ("tie", "", None)
    assert parse_verdict('{"foo": {"verdict": "A"}}')[0] == "A"
    assert parse_verdict("Answer A is better.")[2] == 'no JSON object with a "verdict" key'
    assert parse_verdict('{"verdict": "C"}')[2] == 'the verdict "C" is not "A", "B" or "tie"'
    assert parse_verdict('{"verdict": 1}')[0] is None and parse_verdict("")[0] is None


def test_bradley_terry_recovers_known_strengths():
    rng = np.random.default_rng(0)
    theta = np.array([0.0, 0.4, 1.0, 1.8])
    wins = np.zeros((4, 4))
    for a in range(4):
        for b in range(a + 1, 4):
            n = 3000
            a_wins = rng.binomial(n, 1 / (1 + math.exp(theta[b] - theta[a])))
            wins[a, b], wins[b, a] = a_wins, n - a_wins
    fit = bradley_terry(wins)
    assert list(np.argsort(fit)) == [0, 1, 2, 3] and abs(fit.mean()) < 1e-9
    diffs = fit[:, None] - fit[None, :]
    expected = theta[:, None] - theta[None, :]
    assert np.abs(diffs - expected).max() < 0.15
    # one model winning every game stays finite with virtual ties: log((10 + 0.5) / 0.5) apart
    t = bradley_terry(np.array([[0.0, 10.0], [0.0, 0.0]]), prior_ties=1.0)
    assert t[0] - t[1] == pytest.approx(math.log(21), abs=1e-3)


def test_the_cli_runs_an_arena(stub, tmp_path):
    import os
    import subprocess
    import sys

    preds = write_predictions(tmp_path / "preds")
    js = [{"model": "good", "base_url": f"{stub}/v1", "api_key_env": KEY_ENV}]
    cmd = [str(Path(sys.executable).with_name("deepmedix")), "arena", "run", "--out", str(tmp_path / "cli"),
           *[x for name, path in preds.items() for x in ("-p", f"{name}={path}")],
           "--set", f"judges={json.dumps(js)}", "--set", f"cache={tmp_path / 'cache'}", "--set", "bootstrap_rounds=50",
           "--set", "backoff_s=0.01"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["leader"] == "alpha-best"
    assert (tmp_path / "cli" / "leaderboard.md").is_file() and (tmp_path / "cli" / "leaderboard.png").is_file()
    bad = subprocess.run(cmd[:5] + ["-p", "only=x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_a_report_without_a_box_is_shown_as_the_metrics_score_it():
    from deepmedix.eval.arena_judging import NO_ANSWER, shown_answer

    row = {"task": "report_findings", "answer": None, "raw_output": "<think>look [1, 2, 3, 4]</think> Heart normal."}
    assert shown_answer(row, False) == "Heart normal."
    assert shown_answer({**row, "task": "vqa"}, False) == NO_ANSWER
    assert shown_answer({**row, "answer": "x"}, False) == "x"
