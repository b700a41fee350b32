"""The trained chain: the embedded default's data and the tiny model through stages 1 and 2 (instruction SFT, cold
start) with their tiny configs, built once for this file (about 3 minutes), and what needs it:

- stages 1 and 2 learn the task, not only token statistics: greedy generations of each stage's model against the
  model the stage started from, on held-out (validate) records. A falling validation loss can come from token
  frequencies alone; these tests read what the models write. Each compares a trained model with its own starting
  point on this host, so no threshold is tuned on another machine's floating point;
- GRPO learns from the cold-start model, and a SIGKILLed GRPO run resumes to the weights of an unbroken one.

`make test` keeps a file on one xdist worker (`--dist loadfile`), so the chain is built once per run."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import kill_at_first_checkpoint, nonfinite

from deepmedix import stages
from deepmedix.data.records import load_split, record_images
from deepmedix.grounding import parse, user_message
from deepmedix.model.generate import eos_token_ids, generate_on
from deepmedix.model.load import load
from deepmedix.train.checkpoints import committed_checkpoints

BIN = Path(sys.executable).parent
BOX = re.compile(r"\[\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\]")
# The learning run: grounding prompts, the paper's reward plus grounding against the reference boxes, advantages
# r - group mean (scale_rewards none) at temperature 0.5, lr 3e-4. From the cold start whose steps name their finding
# first, on the development host: reward t = 2.1 to 5.5 (slope / its standard error). Group-std advantages at
# temperature 0.7 and lr 5e-4 (the setting before) diverged there (KL up to 65, reward 0.57 -> 0.51); at lr 2e-4 flat.
# The grounding IoU is logged, not asserted to rise: under this combined reward the model may trade it for the paper
# reward's accuracy term. From one cold-start model it rose with two threads (0.024 -> 0.056, t 4.0) and fell with
# one (0.016, t -0.8); a fresh-clone `make test` saw 0.034 -> 0.007 while the reward rose 0.60 -> 0.76. Whether GRPO
# raises held-out IoU is the learning benchmark's grounded run, with intervals (`make bench-learning`).
LEARN = ["tasks=[grounding]", "reward=grounded_paper", "max_steps=80", "learning_rate=0.0003", "logging_steps=1",
         "per_device_train_batch_size=16", "eval_records=8", "scale_rewards=none", "temperature=0.5"]


def trend(values: list[float]) -> tuple[float, float]:
    """Least-squares slope of ``values`` over their index, and its t statistic (slope / its standard error)."""
    import math

    n = len(values)
    mx, my = (n - 1) / 2, sum(values) / n
    sxx = sum((i - mx) ** 2 for i in range(n))
    slope = sum((i - mx) * (v - my) for i, v in enumerate(values)) / sxx
    resid = sum((v - my - slope * (i - mx)) ** 2 for i, v in enumerate(values)) / (n - 2)
    return slope, slope / math.sqrt(resid / sxx) if resid > 0 else math.inf


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Folders ``data``, ``base``, ``sft``, ``traces``, ``coldstart`` of the chain (the demo's tiny configs)."""
    root = tmp_path_factory.mktemp("chain")
    c = SimpleNamespace(**{k: root / k for k in ("data", "base", "sft", "traces", "coldstart")})
    stages.curate(str(c.data), "tiny")
    stages.base_model(str(c.data), str(c.base), "tiny")
    stages.sft(str(c.data), str(c.base), str(c.sft), "tiny")
    stages.coldstart_synth(str(c.data), str(c.traces), "tiny")
    stages.coldstart_sft(str(c.traces), str(c.sft), str(c.coldstart), "tiny")
    return c


@pytest.fixture(scope="module")
def coldstart_chain(chain):
    """(data folder, cold-start model folder): what GRPO starts from."""
    return chain.data, chain.coldstart


def plain_greedy(model_dir, root, records, max_new_tokens: int) -> list[str]:
    """Greedy outputs for ``records`` with stage 1's prompt: the task text without the reasoning instruction (the
    library's generation always adds it; see ``generate_on`` for that form)."""
    loaded = load(model_dir, device="cpu")
    proc, outs = loaded.processor, []
    for rec in records:
        images = record_images(root, rec, loaded.frame())  # the native frame the stages train in
        text = proc.apply_chat_template([user_message(rec.prompt, len(images), reasoning=False)],
                                        add_generation_prompt=True, tokenize=False)
        inputs = proc(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            seq = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = [t for t in seq[0, inputs["input_ids"].shape[1]:].tolist() if t not in eos_token_ids(loaded)]
        outs.append(proc.decode(new, skip_special_tokens=True).strip())
    return outs


def test_instruction_sft_answers_what_the_base_model_cannot(chain):
    """Stage 1 on VQA (the validate split's questions): the SFT model answers with an answer of the task (one that
    the training split has) and gets some right; the base model it started from writes neither. (At the tiny size
    stage 1 mostly learns each question's commonest answer; what each stage learns at larger sizes is measured by
    the learning benchmark, not here.)"""
    from deepmedix.data.schema import load_records

    root, vqa = load_split(str(chain.data), "validate", ["vqa"], None, 64, 0)
    vocab = {r.answer.strip().lower() for r in load_records(chain.data, "train") if r.task == "vqa"}
    rates = {}
    for name in ("base", "sft"):
        outs = [o.strip().lower() for o in plain_greedy(getattr(chain, name), root, vqa, 24)]
        rates[name] = (sum(o in vocab for o in outs) / len(vqa),
                       sum(o == r.answer.strip().lower() for o, r in zip(outs, vqa)) / len(vqa))
    print(f"\nstage 1 on {len(vqa)} validate VQA questions (answers of the task, exact answers): base {rates['base']}, "
          f"SFT {rates['sft']}")
    assert len(vqa) >= 30
    assert rates["sft"][0] >= 0.8 and rates["base"][0] <= 0.2, rates
    assert rates["sft"][1] >= rates["base"][1] + 0.1, rates


def test_cold_start_writes_the_grounded_grammar_the_sft_model_does_not(chain):
    root, records = load_split(str(chain.data), "validate", ["report_impression", "vqa", "grounding"], None, 16, 0)
    # 192 new tokens: a trace that reviews the anatomy cites three landmark boxes (about 330 characters)
    before = [parse(o).format_ok for o in generate_on(load(chain.sft, device="cpu"), root, records, 192)]
    after_out = generate_on(load(chain.coldstart, device="cpu"), root, records, 192)
    after = [parse(o).format_ok for o in after_out]
    rate = (sum(before) / len(before), sum(after) / len(after))
    print(f"\ncold-start format compliance on {len(records)} validate records: SFT {rate[0]:.2f}, "
          f"cold start {rate[1]:.2f}")
    assert rate[1] >= 0.75 and rate[1] >= rate[0] + 0.5, (rate, after_out[:3])
    # the grounded answers carry boxes in their reasoning, as the traces taught
    grounded = [parse(o) for o, r in zip(after_out, records) if r.task == "grounding"]
    assert grounded and sum(bool(p.boxes) for p in grounded) >= len(grounded) / 2


def test_grpo_learns_on_phantom_data_from_the_cold_start_model(coldstart_chain, tmp_path):
    data, model = coldstart_chain
    out = tmp_path / "grpo"
    m = stages.grpo(str(data), str(model), str(out), "tiny", LEARN)
    reward = (m["train_reward_first"], m["train_reward_last"])
    iou = (m["train_iou_first"], m["train_iou_last"])
    print(f"\nGRPO learning test (tiny cold-start model, {m['steps']} steps, {m['n_train']} grounding prompts): "
          f"mean total reward {reward[0]:.3f} -> {reward[1]:.3f}, mean grounding IoU {iou[0]:.3f} -> {iou[1]:.3f} "
          f"(first vs last quarter of the steps); held-out greedy reward {m['before']:.3f} -> {m['after']:.3f}")
    assert not nonfinite(m), nonfinite(m)
    assert reward[1] > reward[0] and 0 <= min(iou) <= max(iou) <= 1
    hist = json.loads((out / "log_history.json").read_text())
    # the margin: over all 80 steps the per-step reward rises by at least two standard errors of the slope (judged
    # against this run's own step-to-step noise, so on any host); a run that does not learn has t ~ 0
    trends = {key: trend([h[key] for h in hist if key in h]) for key in ("reward", "rewards/grounded/iou")}
    print("; ".join(f"{key}: slope {slope:.5f} per step, t = {t:.2f}" for key, (slope, t) in trends.items()))
    slope, t = trends["reward"]
    assert t >= 2.0, f"the reward does not rise clearly: slope {slope:.5f} per step, t = {t:.2f}"
    # the held-out greedy reward is generated before and after on the validate split (8 prompts): it is computed
    # and real, but at this size GRPO does not raise it (1.06 -> 0.86 on 8 prompts here), so no rise is asserted
    assert m["before"] >= 0 and m["after"] >= 0 and m["n_val"] == 8

    logged = {k for h in hist for k in h}
    assert {"reward", "rewards/paper/mean", "rewards/grounded/mean", "rewards/grounded/iou", "rewards/grounded/count",
            "rewards/paper/accuracy", "rewards/paper/format", "rewards/paper/coordinate", "kl",
            "completions/mean_length"} <= logged
    png = (out / "reward_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    rows = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 80 and {r["step"] for r in rows} == set(range(1, 81))
    for r in rows[:8]:
        assert set(r["rewards"]) == {"paper", "grounded"} and r["task"] == "grounding" and r["completion"]
        expect = r["rewards"]["paper"]["overall"] + r["rewards"]["grounded"]["overall"]
        assert r["total"] == pytest.approx(expect)
    assert load(out).model is not None  # a stock model folder


def test_several_updates_per_generation_move_the_ratio_and_clipping_engages(coldstart_chain, tmp_path):
    """EasyR1's update structure at toy size: one generation batch feeds two updates (steps_per_generation = 2 x
    the accumulation steps), so the second update scores completions the policy sampled before the first update:
    pi / pi_old departs from 1 and, with a narrow clip range, clipping engages. One update per generation (TRL's
    default) keeps the ratio at exactly 1, whatever epsilon says. (The cold-start model: its grounded rewards
    differ within a group, so the advantages, and the updates, are not zero.)"""
    data, model = coldstart_chain
    common = ["tasks=[grounding]", "reward=grounded_paper", "max_steps=4", "per_device_train_batch_size=8",
              "num_generations=4", "eval_records=2", "max_records=16", "learning_rate=0.001", "epsilon=0.01",
              "epsilon_high=0.01", "logging_steps=1", "save_steps=0"]

    def history(name, *extra):
        stages.grpo(str(data), str(model), str(tmp_path / name), "tiny", common + list(extra))
        return [h for h in json.loads((tmp_path / name / "log_history.json").read_text()) if "ratio/max" in h]

    on = history("on")
    assert len(on) == 4 and all(h["ratio/min"] == h["ratio/max"] == 1.0 for h in on), on
    assert all(h["clip_ratio/region_mean"] == 0 for h in on)
    off = history("off", "steps_per_generation=2")
    assert len(off) == 4
    assert max(h["ratio/max"] - h["ratio/min"] for h in off) > 1e-3, off  # the ratio departs from 1...
    assert max(h["clip_ratio/region_mean"] for h in off) > 0, off          # ...and the clip bites


def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(coldstart_chain, tmp_path):
    """Only the run that is killed is a process of its own (the CLI, SIGKILLed at its first committed checkpoint);
    the uninterrupted run and the resume run in this process, through the same stage function the CLI calls."""
    data, model = coldstart_chain
    # grounding prompts, whose traces end within 64 tokens: cut ones would all score alike and the group-normalised
    # advantage, hence the update, would be zero (anatomy-reviewing VQA traces run past 100 tokens)
    sets = ["max_steps=6", "save_steps=2", "save_total_limit=2", "eval_records=1", "logging_steps=2",
            "max_completion_length=64", "per_device_train_batch_size=4", "tasks=[grounding]"]
    whole = tmp_path / "whole"
    stages.grpo(str(data), str(model), str(whole), "tiny", sets)
    assert [n for _, n in committed_checkpoints(str(tmp_path / "whole-checkpoints"))] == ["checkpoint-4",
                                                                                        "checkpoint-6"]
    out, ck = tmp_path / "killed", str(tmp_path / "killed-checkpoints")
    cli = [str(BIN / "deepmedix"), "train", "grpo", "--data", str(data), "--model", str(model), "--out", str(out),
           *[x for s in sets for x in ("--set", s)]]
    done = kill_at_first_checkpoint(cli, ck)
    assert done and done[-1][0] < 6 and not out.exists()

    m = stages.grpo(str(data), str(model), str(out), "tiny", sets, resume=True)
    assert m["resumed_from"].endswith(done[-1][1]) and m["steps"] == 6
    a, b, start = load(whole).model.state_dict(), load(out).model.state_dict(), load(model).model.state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained: the equality below is not vacuous
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["step"] for h in json.loads((out / "log_history.json").read_text()) if "reward" in h] == [2, 4, 6]
    steps = [json.loads(x)["step"] for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and set(steps) == set(range(1, 7))  # the kill lost none and repeated none
    assert (whole / "rollouts.jsonl").read_text() == (out / "rollouts.jsonl").read_text()


@pytest.mark.parametrize("stage", ["sft", "coldstart"])
def test_each_stage_reports_finite_metrics(chain, stage):
    """Every number a stage wrote in metrics.json is finite (a NaN loss fails here), and its loss fell."""
    m = json.loads((getattr(chain, stage) / "metrics.json").read_text())
    assert not nonfinite(m), nonfinite(m)
    assert m["after"] < m["before"]
