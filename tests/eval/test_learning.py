"""The learning benchmark's statistics (deepmedix.eval.learning): per-record values, the two image-blind baselines,
bootstrap intervals, paired differences and the targets; and the plain prompt mode a stage-1 model is scored in."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepmedix.data.schema import Box, Record
from deepmedix.eval import learning
from deepmedix.eval.scoring import row_answer, row_boxes, score_predictions

TRACE = "<think> The heart is enlarged [100, 200, 300, 400]. </think> The answer is: \\boxed{moderate}"


def row(rid, task, raw, reference="", qt="", refs=None, mode="reasoning", labels=None):
    return {"record_id": rid, "task": task, "question_type": qt, "raw_output": raw, "reference": reference,
            "ref_boxes_frame": refs or [], "ref_labels": labels or [], "frame_size": [512, 512], "n_images": 1,
            "prompt_mode": mode}


def rec(rid, task, answer, qt="", boxes=(), size=(256, 128), prompt="q"):
    return Record(record_id=rid, patient_id="p", study_id="s", source="phantom", images=["i.png"],
                  image_sizes=[list(size)], task=task, prompt=prompt, answer=answer, split="train", question_type=qt,
                  boxes=[Box(label, list(b)) for label, b in boxes])


def test_plain_rows_are_read_as_a_stage_one_model_writes_them():
    plain = row("a", "grounding", "cardiomegaly [100, 200, 300, 400]", "cardiomegaly", mode="plain",
                refs=[[100, 200, 300, 400]])
    assert row_boxes(plain) == ([[100.0, 200.0, 300.0, 400.0]], 0)
    # the same text from a reasoning prompt has no reasoning block, so no boxes and no answer
    assert row_boxes({**plain, "prompt_mode": "reasoning"}) == ([], 0)
    assert row_answer(row("b", "vqa", " Moderate ", mode="plain")) == "Moderate"
    assert row_answer(row("b", "vqa", "Moderate")) is None
    assert row_answer(row("c", "vqa", TRACE)) == "moderate"
    scores = score_predictions([plain, row("b", "vqa", "moderate", "moderate", "level", mode="plain")])
    assert scores["grounding_miou"] == 1.0 and scores["vqa_accuracy"] == 1.0 and scores["format_compliance"] == 0.0


def test_record_values_per_record_and_per_question_type():
    rows = [row("v1", "vqa", TRACE, "moderate", "level", refs=[[100, 200, 300, 400]]),
            row("v2", "vqa", TRACE, "mild", "level"),
            row("g1", "grounding", TRACE, "cardiomegaly", refs=[[100, 200, 300, 400]]),
            row("g2", "grounding", "<think> none </think> The answer is: \\boxed{x}", "x", refs=[[0, 0, 10, 10]])]
    v = learning.record_values(rows)
    assert v["vqa_accuracy"] == {"v1": 1.0, "v2": 0.0} == v["vqa_accuracy/level"]
    assert v["grounding_miou"] == {"g1": 1.0, "g2": 0.0} and v["grounding_acc@0.5"] == {"g1": 1.0, "g2": 0.0}
    assert v["format_compliance"] == {"v1": 1.0, "v2": 1.0, "g1": 1.0, "g2": 1.0}
    assert set(v["paper_reward"]) == {"v1", "v2", "g1", "g2"} and v["paper_reward"]["v1"] > v["paper_reward"]["v2"]
    # its terms, unweighted: the answer (exact match x 1.5), the format, 0.05 per box of the reasoning block
    assert v["paper_reward/accuracy"]["v1"] == 1.5 and v["paper_reward/accuracy"]["v2"] == 0.0
    assert v["paper_reward/format"]["v2"] == 1.0
    assert v["paper_reward/coordinate"] == {"v1": 0.05, "v2": 0.05, "g1": 0.05, "g2": 0.0}  # g2 cites no box
    for k, total in v["paper_reward"].items():
        assert total == pytest.approx(0.9 * v["paper_reward/accuracy"][k] + 0.1 * v["paper_reward/format"][k]
                                      + v["paper_reward/coordinate"][k])
    # the grounded reward only where there are reference boxes; one box matched exactly: iou 1, counts agree
    assert v["grounded_reward"] == {"v1": 1.0, "g1": 1.0, "g2": 0.0}


def test_the_baselines_see_no_image():
    train = [rec("1", "vqa", "no", "presence"), rec("2", "vqa", "No", "presence"), rec("3", "vqa", "yes", "presence"),
             rec("4", "vqa", "PA", "view"),
             rec("5", "grounding", "cardiomegaly", boxes=[("cardiomegaly", (64, 32, 128, 96))]),
             rec("6", "grounding", "cardiomegaly", boxes=[("cardiomegaly", (128, 32, 192, 96))])]
    assert learning.majority_answers(train) == {"presence": "no", "view": "pa"}
    assert learning.label_prior(train) == {"cardiomegaly": [0.375, 0.25, 0.625, 0.75]}
    test = [row("t1", "vqa", "whatever", "no", "presence"), row("t2", "vqa", "x", "yes", "presence"),
            row("t3", "vqa", "x", "AP", "view"), row("t4", "vqa", "x", "mild", "level"),
            row("t5", "grounding", "x", "cardiomegaly", refs=[[192, 128, 320, 384]], labels=["cardiomegaly"]),
            row("t6", "report_findings", "x", "text")]
    rows = learning.baseline_rows(test, learning.majority_answers(train), learning.label_prior(train))
    assert [r["record_id"] for r in rows] == ["t1", "t2", "t3", "t4", "t5"]  # reports are not the baselines' task
    assert rows[4]["raw_output"] == "cardiomegaly [192, 128, 320, 384]"  # the prior box in the row's 512 frame
    v = learning.baseline_values(test, train)
    assert v["vqa_accuracy"] == {"t1": 1.0, "t2": 0.0, "t3": 0.0, "t4": 0.0}  # an unseen type answers nothing
    assert v["grounding_miou"] == {"t5": 1.0}
    assert "format_compliance" not in v and "paper_reward" not in v


def test_the_question_text_baseline_answers_what_the_train_split_answers_to_that_question():
    """It reads the whole question (no image): "Where is the right pleural effusion?" has one answer on the phantom
    set, which the question-type majority misses."""
    q = "Where is the right pleural effusion?"
    train = [rec("1", "vqa", "right base", "location", prompt=q), rec("2", "vqa", "Right  base", "location", prompt=q),
             rec("3", "vqa", "left apex", "location", prompt="Where is the pneumothorax?"),
             rec("4", "vqa", "left apex", "location", prompt="Where is the pneumothorax located?"),
             rec("5", "vqa", "left apex", "location", prompt="In which region is the pneumothorax?")]
    assert learning.question_answers(train)[q.lower()] == "right base"
    test = [{**row("t1", "vqa", "x", "right base", "location"), "prompt": "where is the RIGHT pleural effusion?"},
            {**row("t2", "vqa", "x", "left apex", "location"), "prompt": "A question the train split never asked"},
            {**row("t3", "vqa", "x", "right base", "location"), "prompt": q},
            row("t4", "grounding", "x", "cardiomegaly", refs=[[192, 128, 320, 384]], labels=["cardiomegaly"])]
    assert learning.baseline_values(test, train)["vqa_accuracy"] == {"t1": 0.0, "t2": 1.0, "t3": 0.0}
    v = learning.text_only_values(test, train)
    assert v == {"vqa_accuracy": {"t1": 1.0, "t2": 1.0, "t3": 1.0},  # an unseen text: its type's majority
                 "vqa_accuracy/location": {"t1": 1.0, "t2": 1.0, "t3": 1.0}}


def test_intervals_and_the_paired_bootstrap():
    rng = np.random.default_rng(1)
    hard = rng.random(400)  # how hard each record is: shared by both models
    a = {str(i): float(h > 0.5) for i, h in enumerate(hard)}
    b = {str(i): float(h > 0.45) for i, h in enumerate(hard)}  # b gets every record a gets, and ~5 % more
    ia, ib = learning.interval(a), learning.interval(b)
    assert ia["ci_low"] < ia["value"] < ia["ci_high"] and ia["n"] == 400
    assert ia["ci_high"] > ib["ci_low"]  # unpaired, the intervals overlap...
    d = learning.paired(a, b)
    assert d["value"] == pytest.approx(ib["value"] - ia["value"]) and d["ci_low"] > 0.02  # ...paired, clearly > 0
    assert learning.paired(a, a) == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 400}
    # only the records both models have are compared
    assert learning.paired({"x": 1.0, "y": 0.0}, {"y": 1.0, "z": 0.0})["n"] == 1
    assert learning.interval({})["n"] == 0
    assert learning.interval(a, seed=3) == learning.interval(a, seed=3)  # seeded


def _values(sft_acc, cs_fmt, cs_acc, miou_gain, paper_gain, n=200):
    ids = [str(i) for i in range(n)]
    flip = lambda p: {k: float(i < p * n) for i, k in enumerate(ids)}  # noqa: E731
    return {
        "baseline": {"vqa_accuracy": flip(0.4), "grounding_miou": {k: 0.2 for k in ids}},
        "sft": {"vqa_accuracy": flip(sft_acc), "grounding_miou": {k: 0.3 for k in ids}},
        "coldstart": {"vqa_accuracy": flip(cs_acc), "format_compliance": flip(cs_fmt),
                      "grounding_miou": {k: 0.3 for k in ids}, "paper_reward": {k: 1.0 for k in ids}},
        "grpo_grounded": {"grounding_miou": {k: 0.3 + miou_gain for k in ids}},
        "grpo_paper": {"paper_reward": {k: 1.0 + paper_gain for k in ids}},
    }


def test_targets_met_and_not_met():
    names = ["sft_vqa_accuracy_minus_majority_baseline", "sft_grounding_miou_minus_label_prior",
             "coldstart_format_compliance", "coldstart_vqa_accuracy_keeps_sft",
             "grpo_grounded_test_miou_minus_coldstart", "grpo_paper_test_paper_reward_minus_coldstart"]
    good = learning.targets(_values(0.8, 1.0, 0.8, 0.05, 0.1))
    assert [t["name"] for t in good] == names and all(t["met"] for t in good), good
    assert all(set(t) >= {"name", "met", "value", "ci_low", "ci_high", "threshold", "rule"} for t in good)
    assert [t["threshold"] for t in good][:3] == [0.15, 0.0, 0.95]
    json.dumps(good)  # learning.json takes them as they are
    bad = {t["name"]: t for t in learning.targets(_values(0.5, 0.9, 0.3, 0.0, -0.1))}
    assert not any(t["met"] for n, t in bad.items() if n != "sft_grounding_miou_minus_label_prior")
    assert bad["sft_vqa_accuracy_minus_majority_baseline"]["value"] == pytest.approx(0.1)
    # the paper-reward difference is split into its terms: here all of it is the coordinate term
    vals = _values(0.8, 1.0, 0.8, 0.05, 0.1)
    ids = list(vals["coldstart"]["paper_reward"])
    for model, coord in (("coldstart", 0.0), ("grpo_paper", 0.1)):
        vals[model].update({"paper_reward/accuracy": dict.fromkeys(ids, 1.0), "paper_reward/format": dict.fromkeys(
            ids, 1.0), "paper_reward/coordinate": dict.fromkeys(ids, coord)})
    terms = learning.targets(vals, rounds=100)[-1]["terms"]
    assert {k: round(e["value"], 6) for k, e in terms.items()} == {"accuracy": 0.0, "format": 0.0, "coordinate": 0.1}
    # a stage that was not evaluated meets nothing
    missing = learning.targets({"baseline": _values(0.8, 1, 0.8, 0.1, 0.1)["baseline"]})
    assert not any(t["met"] for t in missing) and all(t["n"] == 0 for t in missing)


def test_table_lists_every_model_that_has_the_metric():
    tab = learning.table(_values(0.8, 1.0, 0.8, 0.05, 0.1), rounds=100)
    assert list(tab)[:2] == ["vqa_accuracy", "grounding_miou"]
    assert set(tab["vqa_accuracy"]) == {"baseline", "sft", "coldstart"}
    assert tab["vqa_accuracy"]["sft"]["value"] == pytest.approx(0.8)


def test_prompt_mode_follows_the_model_folders_stage(tmp_path):
    from deepmedix.errors import InputError
    from deepmedix.eval.run import prompt_mode

    for stage, mode in (("sft", "plain"), ("coldstart", "reasoning"), ("grpo", "reasoning"),
                        ("base_model", "reasoning")):
        folder = tmp_path / stage
        folder.mkdir()
        (folder / "lineage.json").write_text(json.dumps({"stage": stage}))
        assert prompt_mode("auto", str(folder)) == mode
        assert prompt_mode("reasoning", str(folder)) == "reasoning" and prompt_mode("plain", str(folder)) == "plain"
    for source, mode in (("sft", "plain"), ("coldstart", "reasoning"), ("grpo", "reasoning")):
        folder = tmp_path / f"checkpoint-of-{source}"  # a checkpoint a run published: prompted as its stage
        folder.mkdir()
        (folder / "lineage.json").write_text(json.dumps({"stage": "checkpoint", "source_stage": source, "step": 2}))
        assert prompt_mode("auto", str(folder)) == mode
    (tmp_path / "released").mkdir()  # a checkpoint without lineage: the paper's prompt
    assert prompt_mode("auto", str(tmp_path / "released")) == "reasoning"
    with pytest.raises(InputError, match="key 'prompt' must be one of"):
        prompt_mode("thinking", str(tmp_path / "released"))
