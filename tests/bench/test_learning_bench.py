"""``make bench-learning`` end to end on a miniature setting (the real one takes up to an hour): every stage runs,
every model is evaluated on the same test records, the table and the targets come out as text, JSON and PNG, a
rerun reuses the finished stages, and a rerun with other settings runs again only the stages those settings (or a
stage that ran again) feed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

from PIL import Image

MINI = ["--set", "curate.n_patients=10", "--set", "sft.max_steps=4", "--set", "coldstart.max_steps=4",
        "--set", "grpo.max_steps=1", "--set", "grpo.per_device_train_batch_size=8", "--set", "eval.max_records=10",
        "--set", "eval.max_new_tokens=24", "--set", "grpo.max_completion_length=24", "--rounds", "50"]


def reused(proc) -> set[str]:
    """The stages and evaluations a bench run logged as reused."""
    return {m.group(1) for m in re.finditer(r"\] (.+?): reusing ", proc.stdout)}


def run(args, tmp_path):
    return subprocess.run([sys.executable, "bench/learning_bench.py", "--out", str(tmp_path / "b"), *args],
                          capture_output=True, text=True, timeout=600)


def test_learning_bench_runs_every_stage_and_reports_every_target(tmp_path):
    r = run(MINI, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "b"
    result = json.loads((out / "learning.json").read_text())
    names = [t["name"] for t in result["targets"]]
    assert names == ["sft_vqa_accuracy_minus_majority_baseline", "sft_grounding_miou_minus_label_prior",
                     "coldstart_format_compliance", "coldstart_vqa_accuracy_keeps_sft",
                     "grpo_grounded_test_miou_minus_coldstart", "grpo_paper_test_paper_reward_minus_coldstart"]
    for t in result["targets"]:
        assert isinstance(t["met"], bool) and t["ci_low"] <= t["value"] <= t["ci_high"], t
    # every model and the baseline in the table, on the same records
    assert set(result["table"]["vqa_accuracy"]) == {"baseline", "text_only", "base", "sft", "coldstart",
                                                     "grpo_grounded", "grpo_paper"}
    assert "text_only" not in result["table"]["grounding_miou"]  # the question-text baseline answers VQA only
    assert len({e["n"] for e in result["table"]["vqa_accuracy"].values()}) == 1
    assert result["n_test"]["vqa"] == result["table"]["vqa_accuracy"]["sft"]["n"]
    for stage in ("base", "sft", "coldstart", "grpo_grounded", "grpo_paper"):
        assert (out / stage / "config.json").exists() and (out / "eval" / stage / "predictions.jsonl").exists()
    # the stage-1 model was asked in the plain prompt it was trained on, the others with the instruction
    modes = {s: json.loads((out / "eval" / s / "predictions.jsonl").read_text().splitlines()[0])["prompt_mode"]
             for s in ("sft", "coldstart")}
    assert modes == {"sft": "plain", "coldstart": "reasoning"}
    # the GRPO runs used the reward they are named for
    for reward in ("grounded", "paper"):
        lineage = json.loads((out / f"grpo_{reward}" / "lineage.json").read_text())
        assert lineage["config"]["reward"] == reward
    assert "| target | rule |" in r.stdout and ("NOT MET" in r.stdout or "MET" in r.stdout)
    # the paper-reward target's difference, term by term, in the JSON and the text
    paper = result["targets"][-1]
    assert set(paper["terms"]) == {"accuracy", "format", "coordinate"} and "paper_reward/coordinate" in result["table"]
    assert "grpo_paper_test_paper_reward_minus_coldstart, by term" in r.stdout
    assert f"of {len(names)} targets met" in r.stdout
    assert (out / "learning.md").read_text() in r.stdout
    with Image.open(out / "learning.png") as im:
        assert im.width > 800 and im.height > 600
    # a rerun reuses every finished stage and evaluation, also from a folder an older bench wrote (one settings
    # object for the whole run)...
    marker = out / "bench-settings.json"
    assert set(json.loads(marker.read_text())["stages"]) == set(result["stage_wall_s"])
    marker.write_text(json.dumps({"config": "bench", "sets": MINI[1:16:2], "configs": result["config"],
                                  "grounded_run": result["grounded_run"]}))
    again = run(MINI, tmp_path)
    assert again.returncode == 0 and reused(again) == set(result["stage_wall_s"]), again.stdout[-2000:]
    # ...and keeps the wall times those stages took when they ran
    rerun = json.loads((out / "learning.json").read_text())
    assert rerun["stage_wall_s"] == result["stage_wall_s"] and len(result["stage_wall_s"]) == 12
    assert rerun["wall_s"] < sum(rerun["stage_wall_s"].values())
    # another GRPO setting runs the two GRPO runs and their evaluations again, and nothing upstream
    grpo = {"grpo (grounded reward)", "grpo (paper reward)", "evaluate grpo_grounded", "evaluate grpo_paper"}
    other = run(MINI + ["--set", "grpo.beta=0.2"], tmp_path)
    assert other.returncode == 0 and reused(other) == set(result["stage_wall_s"]) - grpo, other.stdout[-2000:]
    assert "made with other settings" in other.stdout
    for reward in ("grounded", "paper"):
        assert json.loads((out / f"grpo_{reward}" / "lineage.json").read_text())["config"]["beta"] == 0.2
    walls = json.loads((out / "learning.json").read_text())["stage_wall_s"]
    assert {k: v for k, v in walls.items() if k not in grpo} == {k: v for k, v in result["stage_wall_s"].items()
                                                                 if k not in grpo}
    # a stage that runs again (its folder gone) takes everything made from it along, though no setting changed
    shutil.rmtree(out / "coldstart")
    redo = run(MINI + ["--set", "grpo.beta=0.2"], tmp_path)
    assert redo.returncode == 0 and "coldstart_sft ran again" in redo.stdout, redo.stdout[-2000:]
    assert reused(redo) == set(result["stage_wall_s"]) - grpo - {"coldstart_sft", "evaluate coldstart"}
    # an older bench's settings file without every stage's config cannot be read stage by stage: refused, no work
    old = tmp_path / "old" / "b"
    old.mkdir(parents=True)
    (old / "bench-settings.json").write_text(json.dumps({"config": "bench", "sets": ["sft.max_steps=5"]}))  # no configs
    refused = run(MINI, tmp_path / "old")
    assert refused.returncode == 2 and "--fresh" in refused.stderr and not (old / "data").exists()
    bad = run(["--set", "sft:max_steps=5"], tmp_path)
    assert bad.returncode != 0 and "STAGE.KEY=VALUE" in bad.stderr
    typo = run(["--set", "sft.max_steps=lots"], tmp_path / "other")
    assert typo.returncode == 1 and "max_steps" in typo.stderr and "Traceback" not in typo.stderr, typo.stderr
    assert not (tmp_path / "other" / "b").exists()  # refused before any work
