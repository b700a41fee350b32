"""Each stage on a handful of records: real training, generation and scoring at toy size."""

from __future__ import annotations

import json

import pytest
from conftest import nonfinite

from deepmedix import stages, store
from deepmedix.data.schema import load_records
from deepmedix.grounding import BOX_RE, Frame, parse
from deepmedix.model.load import load
from deepmedix.synth.filter import keep_trace
from deepmedix.synth.template import template_trace

FAST = ["max_steps=3", "per_device_train_batch_size=4", "eval_records=4", "max_records=24", "logging_steps=1"]


def test_curate_writes_records_split_by_patient(small_data):
    recs = load_records(small_data)
    assert recs and {r.task for r in recs} == {"report_findings", "report_impression", "vqa", "grounding"}
    by_patient = {}
    for r in recs:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
        assert (small_data / r.images[0]).exists()
    assert all(len(s) == 1 for s in by_patient.values())
    manifest = json.loads((small_data / "manifest.json").read_text())
    assert manifest["total"] == len(recs)
    assert store.read_lineage(small_data)["stage"] == "curate"


def test_template_teacher_traces_pass_the_filter_and_cite_only_reference_boxes(small_data):
    """No template regions: a trace's boxes are the record's reference boxes (its image's pixels), or where it has
    none its own landmarks (the lungs and heart the phantom drew); the cold-start SFT target moves them to the
    model's frame, per axis."""
    from deepmedix.data.records import trace_in_frame

    recs = load_records(small_data, "train")[:40]
    assert any(r.boxes for r in recs) and any(not r.boxes for r in recs)
    tiny = Frame.parse("native", 28, 168 * 168, 168 * 168)
    for rec in recs:
        trace = template_trace(rec)
        assert keep_trace(trace, rec) is None
        p = parse(trace)
        assert p.answer == rec.answer
        cited = rec.boxes or rec.landmarks
        # a step names its finding first, so a trace never commits to "there is a finding" before naming one (the
        # phantom's VQA records carry only the boxes their answer rests on: tests/data/test_phantom.py)
        assert all(f"; {b.label} is seen in this region" in trace.replace("<think> ", "; ") for b in rec.boxes)
        assert rec.landmarks and set(map(tuple, p.boxes)) == {tuple(round(v) for v in b.box) for b in cited}
        target = trace_in_frame(trace, rec, tiny)
        w, h = rec.image_sizes[0]
        assert set(map(tuple, parse(target).boxes)) == {
            tuple(round(v) for v in tiny.to_frame([round(c) for c in b.box], w, h)) for b in cited}
        assert BOX_RE.sub("[]", target) == BOX_RE.sub("[]", trace)  # only the boxes change


@pytest.fixture(scope="module")
def sft_model(small_data, base_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "model"
    m = stages.sft(str(small_data), str(base_model_dir), str(out), "tiny", FAST)
    return out, m


def test_sft_trains_and_saves_a_loadable_model(sft_model):
    out, m = sft_model
    assert m["stage"] == "sft" and m["steps"] == 3 and m["n_train"] == 24 and m["n_val"] == 4
    assert not nonfinite(m), nonfinite(m)
    assert m["after"] < m["before"]  # held-out loss falls (the task itself: tests/train/test_chain.py)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert store.read_lineage(out)["inputs"]["model"]["sha256"]
    assert load(out).model is not None


def test_coldstart_synth_and_sft(small_data, sft_model, tmp_path):
    traces = tmp_path / "traces"
    r = stages.coldstart_synth(str(small_data), str(traces), "tiny", ["max_records=20", "eval_records=4"])
    assert r["after"] == 24 and r["dropped"] == {}
    rep = json.loads((traces / "filter_report.json").read_text())
    # the template teacher cites every reference box as it is (IoU 1), and the record's landmarks where it has none
    assert rep["kept_citing_boxes"] == 24 and 0 < rep["kept_on_records_with_boxes"] < 24
    assert rep["cited_box_iou_mean"] == 1.0
    recs = load_records(traces)
    assert all(parse(x.trace).format_ok for x in recs)
    for x in recs:
        cited = {tuple(b) for b in parse(x.trace).boxes}
        assert cited == {tuple(float(round(v)) for v in b.box) for b in (x.boxes or x.landmarks)}
    # the traces artifact carries its own images, by relative URI, so a pod given only the traces can train
    assert all(not x.images[0].startswith("/") and (traces / x.images[0]).is_file() for x in recs)
    out = tmp_path / "cs"
    m = stages.coldstart_sft(str(traces), str(sft_model[0]), str(out), "tiny", FAST)
    assert m["stage"] == "coldstart" and m["steps"] == 3 and m["after"] < m["before"] and not nonfinite(m)
    # frame auto: the SFT model's recorded frame, resolved and recorded again (what evaluation and serving read)
    assert store.read_lineage(sft_model[0])["config"]["frame"] == "square512"
    assert store.read_lineage(out)["config"]["frame"] == "square512" and load(out).frame() == load(out).frame(
        "square512")


def test_synthesis_stops_once_max_kept_train_traces_passed_the_filter(small_data, tmp_path):
    every = ["max_records=20", "eval_records=4"]
    stages.coldstart_synth(str(small_data), str(tmp_path / "all"), "tiny", every)
    r = stages.coldstart_synth(str(small_data), str(tmp_path / "cap"), "tiny", every + ["max_kept=5", "synth_chunk=3"])
    rep = json.loads((tmp_path / "cap" / "filter_report.json").read_text())
    assert rep["target_train"] == 5 and rep["selected"] == 24
    assert rep["asked"] == 6 + 4  # two chunks of 3 train records (the fifth trace is kept in the second), then validate
    every_rec, capped = load_records(tmp_path / "all"), load_records(tmp_path / "cap")
    train = [x.record_id for x in capped if x.split == "train"]
    assert len(train) == 5 == r["after"] - 4
    # the first five of the seeded selection (the uncapped run keeps them all); the validate split is whole
    from deepmedix.config import load_config
    from deepmedix.data.records import select

    cfg = load_config("coldstart", "tiny", every)
    first = [x.record_id for x in select(load_records(small_data, "train"), cfg.tasks, None, 20, cfg.seed)][:5]
    assert sorted(train) == sorted(first) and set(first) <= {x.record_id for x in every_rec}
    assert {x.record_id for x in capped if x.split == "validate"} == {x.record_id for x in every_rec
                                                                       if x.split == "validate"}
    with pytest.raises(ValueError, match="synth_chunk >= 1"):
        stages.coldstart_synth(str(small_data), str(tmp_path / "bad"), "tiny", every + ["max_kept=5", "synth_chunk=0"])
    assert not (tmp_path / "bad").exists()


def test_grpo_runs_with_images_and_the_paper_reward(small_data, sft_model, tmp_path):
    out = tmp_path / "grpo"
    m = stages.grpo(str(small_data), str(sft_model[0]), str(out), "tiny",
                    ["max_steps=2", "per_device_train_batch_size=4", "num_generations=2", "max_completion_length=8",
                     "eval_records=2", "max_records=8"])
    assert m["stage"] == "grpo" and m["steps"] == 2 and m["metric"] == "val_reward_paper"
    assert isinstance(m["before"], float) and isinstance(m["after"], float) and not nonfinite(m), nonfinite(m)
    hist = json.loads((out / "log_history.json").read_text())
    assert any("reward" in h for h in hist)
    assert (out / "reward_curves.png").exists() and (out / "rollouts.jsonl").exists()
    assert load(out).model is not None


def test_evaluate_writes_predictions_and_metrics(small_data, sft_model, tmp_path):
    out = tmp_path / "eval"
    m = stages.evaluate(str(small_data), str(sft_model[0]), str(out), "tiny", ["max_records=10", "max_new_tokens=8"])
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == m["n"] == 10
    assert set(rows[0]) >= {"record_id", "task", "prompt", "raw_output", "answer", "boxes", "reference"}
    scores = m["scores"]
    assert not nonfinite(m), nonfinite(m)
    assert 0.0 <= scores["format_compliance"] <= 1.0
    assert sum(v for k, v in scores.items() if k.startswith("n/")) == 10
    assert (out / "metrics.md").read_text().startswith("|")
    subsets = m["subsets"]  # the suite: every subset with its 95 % bootstrap interval
    assert sum(e["n"] for k, e in subsets.items() if k.count("/") == 1 and not k.startswith("all/")) == 10
    assert all("ci_low" in v for e in subsets.values() for k, v in e.items() if k != "n")
    assert "95 % bootstrap intervals" in (out / "metrics.md").read_text()
    assert (out / "metrics_ci.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_resumes_from_partial_predictions(small_data, sft_model, tmp_path):
    out = tmp_path / "eval"
    partial = tmp_path / "eval.partial.jsonl"
    from deepmedix.config import load_config
    from deepmedix.data.records import load_split

    cfg = load_config("eval", "tiny")
    first = load_split(str(small_data), "test", cfg.tasks, None, 3, cfg.seed)[1][0]
    from deepmedix.eval.run import prompt_mode, resume_key

    overrides = ["max_records=3", "max_new_tokens=4"]
    cfg = load_config("eval", "tiny", overrides)
    # a stage-1 model is asked without the reasoning instruction (prompt: auto)
    assert prompt_mode(cfg.prompt, str(sft_model[0])) == "plain"
    key = resume_key(cfg, str(small_data), str(sft_model[0]), "plain")
    kept = json.dumps({"record_id": first.record_id, "task": first.task, "question_type": "",
                       "raw_output": "kept from before", "answer": None, "boxes": [],
                       "format_ok": False, "reference": first.answer, "ref_boxes_frame": []})
    # an interrupted run: one whole line, then one cut short
    partial.write_text(kept + "\n" + kept[:20])
    (tmp_path / "eval.partial.jsonl.meta.json").write_text(json.dumps(key))
    stages.evaluate(str(small_data), str(sft_model[0]), str(out), "tiny", overrides)
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and [r["record_id"] for r in rows][0] == first.record_id
    assert rows[0]["raw_output"] == "kept from before"
    assert all(r["raw_output"] != "kept from before" for r in rows[1:])
    # a partial file from another model or other settings is not reused
    partial.write_text(kept + "\n")
    (tmp_path / "eval.partial.jsonl.meta.json").write_text(json.dumps({**key, "max_new_tokens": 99}))
    stages.evaluate(str(small_data), str(sft_model[0]), str(out), "tiny", overrides)
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(r["raw_output"] != "kept from before" for r in rows)
    assert not partial.exists()


def test_stage_errors_name_the_problem(tmp_path, base_model_dir):
    with pytest.raises(FileNotFoundError, match="no records/ folder"):
        stages.sft(str(tmp_path), str(base_model_dir), str(tmp_path / "o"), "tiny", FAST)
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
def test_sft_in_bf16_on_the_gpu(small_data, base_model_dir, tmp_path):
    m = stages.sft(str(small_data), str(base_model_dir), str(tmp_path / "gpu"), "tiny", FAST + ["bf16=true"])
    assert m["steps"] == 3 and m["after"] < m["before"]
    assert next(load(tmp_path / "gpu").model.parameters()).is_cuda


@pytest.mark.parametrize("tower,merger", [(True, True), (True, False), (False, True)])
def test_freeze_vision_and_merger_keep_them_fixed(small_data, base_model_dir, tmp_path, tower, merger):
    import torch

    out = tmp_path / "frozen"
    stages.sft(str(small_data), str(base_model_dir), str(out), "tiny",
               FAST + [f"freeze_vision={str(tower).lower()}", f"freeze_merger={str(merger).lower()}"])
    before = dict(load(base_model_dir).model.model.visual.named_parameters())
    after = dict(load(out).model.model.visual.named_parameters())
    same = {n: torch.equal(before[n], after[n]) for n in before}
    for frozen, part in ((tower, [v for n, v in same.items() if not n.startswith("merger.")]),
                         (merger, [v for n, v in same.items() if n.startswith("merger.")])):
        assert all(part) if frozen else not all(part)


def test_the_trainers_dataset_decodes_images_per_batch_the_same_pixels_as_the_record(small_data):
    """The trainers' datasets hold the images' file names only; a batch taken from one decodes exactly the pixels
    the record's images have in the model frame (what evaluation and serving see)."""
    import numpy as np

    from deepmedix.data.records import record_images
    from deepmedix.train.common import lazy_image_dataset, sft_row

    root = small_data
    recs = load_records(root, "train")[:5]
    frame = Frame.parse("native", 28, 168 * 168, 168 * 168)  # the tiny model's
    ds = lazy_image_dataset([sft_row(root, r, r.answer, False) for r in recs], frame)
    assert {f: str(t) for f, t in ds.features.items()}["image_files"].startswith("List(Value('string')")
    for row, rec in zip(ds, recs):
        assert "image_files" not in row and "record_id" not in row and "image_sizes" not in row
        for got, want, (w, h) in zip(row["images"], record_images(root, rec, frame), rec.image_sizes):
            assert got.size == frame.input_size(w, h) and np.array_equal(np.asarray(got), np.asarray(want))
    assert [len(b["images"]) for b in ds.iter(batch_size=2)] == [2, 2, 1]


def test_a_missing_image_fails_when_its_batch_is_taken_naming_the_record(small_data, tmp_path):
    import shutil

    from deepmedix.train.common import lazy_image_dataset, sft_row

    shutil.copytree(small_data, tmp_path / "d")
    rec = load_records(tmp_path / "d", "train")[0]
    ds = lazy_image_dataset([sft_row(tmp_path / "d", rec, rec.answer, False)], Frame())
    (tmp_path / "d" / rec.images[0]).unlink()
    with pytest.raises(ValueError, match=f"record {rec.record_id}: image"):
        ds[0]



def test_the_streamed_train_split_is_the_selection_in_its_order(small_data, tmp_path):
    """SFT streams its train split: ids chosen from two columns, records read a shard at a time, samples written
    to disk in shard order, then put back in the selection's order — the same samples, in the same order, as
    selecting from every loaded record."""
    from deepmedix.data.records import iter_records, load_split, select_ids
    from deepmedix.train.common import lazy_image_dataset, sft_row

    tasks, ratios = ["vqa", "grounding", "report_findings"], {"vqa": 0.5}
    root, chosen = load_split(str(small_data), "train", tasks, ratios, 20, 7)
    ids = select_ids(root, "train", tasks, ratios, 20, 7)
    assert ids == [r.record_id for r in chosen]
    rows = (sft_row(root, r, r.answer, False) for r in iter_records(root, "train", ids))
    ds = lazy_image_dataset(rows, Frame(), tmp_path / "samples.arrow", ids)
    assert (tmp_path / "samples.arrow").is_file() and len(ds) == 20
    got = [(row["prompt"][0]["content"][-1]["text"], row["completion"][0]["content"][0]["text"]) for row in ds]
    assert got == [(r.prompt.strip(), r.answer) for r in chosen]
