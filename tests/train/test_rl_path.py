"""The RL path's own checks (issue 22, item 3), on TRL's real ``GRPOTrainer`` built as ``train_grpo`` builds it:
one generation batch through ``_generate_and_score_completions`` (trl/trainer/grpo_trainer.py), then what it
hands the loss is compared with what our rewards say about the very completions it generated.

* advantages have the sign and scale of the group-normalised reward (TRL's ``sum_then_normalize``: the weighted
  sum of the components, minus its group mean, over the group's unbiased std + 1e-4, ``scale_rewards: group``);
* the completion mask covers exactly the generated tokens (through the first end-of-sequence token, nothing after)
  and those tokens decode to the text the reward scored;
* the reward sees boxes in the frame the targets are in: the image the policy sees is the frame's grid
  (``image_grid_thw`` x patch size) and the reference boxes are the record's boxes in that frame;
* a one-prompt run drives its reward to the maximum (the policy's greedy answer becomes the right trace).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepmedix.config import load_config
from deepmedix.data.records import load_split
from deepmedix.model.load import load
from deepmedix.model.processor import resolve_frame
from deepmedix.rewards.spec import RewardSpec
from deepmedix.train import grpo
from deepmedix.train.common import lazy_image_dataset
from deepmedix.train.grpo_rewards import trl_reward_functions


def warm_up(loaded, root, recs, frame, steps: int) -> None:
    """``steps`` plain SFT steps on the records' template traces (what a cold start teaches), so that sampled
    completions start to follow the grammar and rewards differ within a group. The random base model's completions
    all score the same (no ``\\boxed{}``: 0), which leaves TRL nothing to normalise."""
    from deepmedix.data.records import record_images, trace_in_frame
    from deepmedix.model.generate import chat_prompts
    from deepmedix.synth.template import template_trace

    proc, model = loaded.processor, loaded.model
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(steps):
        rec = recs[step % len(recs)]
        imgs = record_images(root, rec, frame)
        prompt = chat_prompts(proc, [rec.prompt], [len(imgs)])[0]
        sft_step(model, opt, sft_batch(proc, prompt, imgs, trace_in_frame(template_trace(rec), rec, frame)))


def sft_batch(proc, prompt: str, imgs, target: str) -> tuple[dict, torch.Tensor]:
    """One SFT example: the chat prompt and the target through the processor, the loss on the target only."""
    full = proc(text=[prompt + target + "<|im_end|>"], images=imgs, return_tensors="pt")
    labels = full["input_ids"].clone()
    labels[:, :proc(text=[prompt], images=imgs, return_tensors="pt")["input_ids"].shape[1]] = -100
    return full, labels


def sft_step(model, opt, batch: tuple[dict, torch.Tensor]) -> None:
    full, labels = batch
    loss = model(**full, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def varied_groups(scores: dict, spec: RewardSpec, g: int) -> torch.Tensor:
    """Each completion's total reward (the weighted sum of the components that apply), and which groups vary."""
    parts = scores["scores"]
    total = torch.tensor([sum(w * (parts[name][k]["overall"] if parts[name][k] else 0.0)
                              for name, w in spec.weights.items()) for k in range(len(scores["completions"]))])
    return total, total.view(-1, g).std(1) > 0


@pytest.fixture(scope="module")
def rollout(small_data, base_model_dir, tmp_path_factory):
    """One generation batch of 4 prompts (2 grounding, 2 VQA) x 4 completions, with the scores our reward
    functions gave it, from the tiny model warmed up (on this host, until a group's rewards differ) by SFT."""
    from trl import GRPOTrainer

    cfg = load_config("grpo", "tiny", ["tasks=[grounding, vqa]", "max_completion_length=96", "temperature=1.0",
                                       "reward=grounded_paper"])
    cfg = dataclasses.replace(cfg, frame=resolve_frame(cfg.frame, base_model_dir))
    root, recs = load_split(str(small_data), "train", ["grounding"], None, 2, 0)
    _, vqa = load_split(str(small_data), "train", ["vqa"], None, 2, 0)
    recs = recs + vqa
    loaded = load(base_model_dir, device="cpu", dtype="float32", min_pixels=cfg.min_pixels,
                  max_pixels=cfg.max_pixels)
    frame = loaded.frame(cfg.frame)
    spec = RewardSpec.from_config(cfg)
    seen: list[dict] = []
    funcs, weights = trl_reward_functions(spec, on_scores=seen.append)
    rows, skipped = grpo.make_rows(root, recs, cfg, loaded.processor, frame)
    assert not skipped and len(rows) == 4
    dataset = lazy_image_dataset(rows, frame)
    trainer = grpo.ratio_logged(GRPOTrainer)(
        model=loaded.model, reward_funcs=funcs, args=grpo.trl_args(cfg, tmp_path_factory.mktemp("t"), weights),
        train_dataset=dataset, processing_class=loaded.processor)
    # a generation batch as TRL's RepeatSampler lays it out: each prompt num_generations times, in a row
    inputs = [dataset[i] for i in range(len(rows)) for _ in range(cfg.num_generations)]
    torch.manual_seed(0)
    for _ in range(20):  # at most 400 warm-up steps
        warm_up(loaded, root, recs, frame, 20)
        trainer.model.train()
        out = trainer._generate_and_score_completions(inputs)
        _, varied = varied_groups(seen[-1], spec, cfg.num_generations)
        if varied.any():
            break
    else:
        pytest.fail(f"after 400 warm-up steps no group's rewards differ on this host: {seen[-1]['completions'][:4]}")
    return {"out": out, "scores": seen[-1], "rows": rows, "recs": recs, "cfg": cfg, "spec": spec, "frame": frame,
            "loaded": loaded, "trainer": trainer}


def test_advantages_are_the_group_normalised_reward(rollout):
    cfg, spec, scores = rollout["cfg"], rollout["spec"], rollout["scores"]
    g = cfg.num_generations
    # the total each completion got from our components (None: the component does not apply to that task)
    total, varied = varied_groups(scores, spec, g)
    groups = total.view(-1, g)
    expected = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    adv = rollout["out"]["advantages"].float()
    assert adv.shape == expected.shape
    assert torch.allclose(adv, expected, atol=1e-4), (adv, expected, total)
    # the sign: clearly above its group's mean is pushed up, clearly below pushed down (TRL sums in float32), a
    # group with one value is not pushed at all
    gap = total - groups.mean(1).repeat_interleave(g)
    flat = groups.std(1).repeat_interleave(g) == 0
    assert bool((adv[(gap > 1e-5) & ~flat] > 0).all()) and bool((adv[(gap < -1e-5) & ~flat] < 0).all())
    assert bool((adv[flat] == 0).all())
    # and the scale: each varied group has mean 0 and std s / (s + 1e-4) (s: its reward std), 1 for large s
    assert varied.any(), f"no group with different rewards: {total}"
    for k in torch.nonzero(varied).flatten().tolist():
        a, spread = adv.view(-1, g)[k], groups[k].std().item()
        assert abs(a.mean().item()) < 1e-4 and a.std().item() == pytest.approx(spread / (spread + 1e-4), abs=1e-3)


def test_completion_mask_covers_exactly_the_generated_tokens(rollout):
    out, scores, tok = rollout["out"], rollout["scores"], rollout["loaded"].processor.tokenizer
    ids, mask = out["completion_ids"], out["completion_mask"]
    eos = set(rollout["trainer"].eos_token_ids)
    pad = tok.pad_token_id
    for k in range(ids.shape[0]):
        row, m = ids[k].tolist(), mask[k].tolist()
        end = next((i for i, t in enumerate(row) if t in eos), None)
        n = end + 1 if end is not None else len(row)  # through the first end-of-sequence token
        assert m == [1] * n + [0] * (len(row) - n), (k, m, row)
        assert all(t == pad for t in row[n:])  # after it: padding only
        generated = tok.decode([t for t, on in zip(row, m) if on], skip_special_tokens=True)
        assert generated == scores["completions"][k]  # what the reward scored is what the loss trains on
    # the prompt mask and the prompt ids line up too: left padding, then the prompt
    pm = out["prompt_mask"]
    assert bool((pm.sum(1) > 0).all()) and bool((pm[:, -1] == 1).all())


def test_the_reward_sees_boxes_in_the_frame_the_policy_sees_the_image_in(rollout):
    out, rows, recs, frame = rollout["out"], rollout["rows"], rollout["recs"], rollout["frame"]
    ip = rollout["loaded"].processor.image_processor
    grid = out["image_grid_thw"]  # one (t, h, w) of patches per completion's image, in the batch's order
    g = rollout["cfg"].num_generations
    assert grid.shape[0] == len(rows) * g
    for i, (row, rec) in enumerate(zip(rows, recs)):
        w, h = rec.image_sizes[0]
        _, gh, gw = grid[i * g].tolist()
        assert (gw * ip.patch_size, gh * ip.patch_size) == frame.size(w, h)  # the image as the policy sees it
        assert row["ref_boxes_frame"] == [frame.to_frame(b.box, w, h) for b in rec.boxes]
        assert all(frame.contains(b, w, h) for b in row["ref_boxes_frame"])
    assert any(r.boxes for r in recs)  # the grounding prompts carry reference boxes
    # The grounded component scores in that frame: the cold-start target for a grounding record (its reference
    # box in the frame, written as integers) gets the IoU of the rounded box, and the same numbers read as stored
    # pixels (the wrong frame) get less.
    from deepmedix.data.records import trace_in_frame
    from deepmedix.grounding import iou
    from deepmedix.rewards.grounded import grounded_components
    from deepmedix.synth.template import template_trace

    k, rec = next((k, r) for k, r in enumerate(recs) if r.boxes and r.task == "grounding")
    ref = rows[k]["ref_boxes_frame"]
    target = trace_in_frame(template_trace(rec), rec, frame)
    rounded = [[float(round(v)) for v in b] for b in ref]
    got = grounded_components(target, ref, iou_weight=1.0, count_weight=0.0)["iou"]
    assert got == pytest.approx(sum(iou(a, b) for a, b in zip(rounded, ref)) / len(ref))
    stored = template_trace(rec)  # the same trace with its boxes in stored pixels
    w, h = rec.image_sizes[0]
    if frame.size(w, h) != (w, h):
        assert grounded_components(stored, ref, iou_weight=1.0, count_weight=0.0)["iou"] < got


# the other answer a one-prompt run starts from, for the short VQA answers of the phantom set
OTHER = {"mild": "moderate", "moderate": "severe", "severe": "mild", "yes": "no", "no": "yes", "PA": "AP", "AP": "PA"}


def test_one_prompt_grpo_drives_its_reward_to_the_maximum(small_data, base_model_dir, tmp_path):
    """GRPO on one prompt reaches the reward's maximum. The tiny model is first taught the prompt's grounded trace
    with the WRONG answer three times for each time with the right one, until its greedy answer is the wrong trace
    (on this host: a bound, not a step count): a policy below the maximum whose samples sometimes hold it. TRL's
    GRPOTrainer with our paper reward must then make the right trace the greedy answer within a bound of 100 steps,
    and raise the sampled reward: accuracy and format at their maxima (1.5 and 1), the coordinate bonus that of the
    reference trace (the release's reward adds 0.05 per in-frame box up to three, without checking them; a trace
    citing one box gets 1.5 of the 1.6 that three boxes would)."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from deepmedix.data.records import record_images, trace_in_frame
    from deepmedix.model.generate import chat_prompts, generate
    from deepmedix.rewards import paper
    from deepmedix.synth.template import template_trace

    cfg = load_config("grpo", "tiny", ["tasks=[vqa]", "max_completion_length=160", "temperature=0.7",
                                       "reward=paper", "learning_rate=0.001", "max_steps=100",
                                       "per_device_train_batch_size=8", "num_generations=8", "logging_steps=1",
                                       "beta=0.0", "warmup_ratio=0", "lr_scheduler_type=constant",
                                       "rollout_samples=0"])
    cfg = dataclasses.replace(cfg, frame=resolve_frame(cfg.frame, base_model_dir))
    root, recs = load_split(str(small_data), "train", ["vqa"], None, None, 0)
    loaded = load(base_model_dir, device="cpu", dtype="float32", min_pixels=cfg.min_pixels,
                  max_pixels=cfg.max_pixels)
    frame, proc, model = loaded.frame(cfg.frame), loaded.processor, loaded.model
    spec = RewardSpec.from_config(cfg)
    # the shortest reference trace among the prompts with a short answer (a long one breaks often enough under
    # sampling that GRPO settles on a right answer with broken boxes: the coordinate bonus is small)
    target, right = min(((r, trace_in_frame(template_trace(r), r, frame)) for r in recs if r.answer in OTHER),
                        key=lambda rt: len(rt[1]))
    wrong = right.replace(f"\\boxed{{{target.answer}}}", f"\\boxed{{{OTHER[target.answer]}}}")
    best = spec.score(right, target.answer, None, "vqa")["overall"]
    assert wrong != right and spec.score(wrong, target.answer, None, "vqa")["overall"] < best
    parts = paper.paper_components(right, target.answer)
    assert parts["accuracy"] == paper.ACC_SCALE and parts["format"] == 1.0  # both at their maxima

    def greedy() -> tuple[float, str]:
        model.eval()
        out = generate(loaded, [record_images(root, target, None)], [target.prompt], max_new_tokens=160,
                       frame=frame)[0]
        model.train()
        return spec.score(out, target.answer, None, "vqa")["overall"], out

    imgs = record_images(root, target, frame)
    prompt = chat_prompts(proc, [target.prompt], [1])[0]
    batches = [sft_batch(proc, prompt, imgs, text) for text in (wrong, right)]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(1, 801):  # at least 150 steps (a sharp policy: samples keep the grammar), at most 800
        sft_step(model, opt, batches[1 if step % 4 == 0 else 0])
        if step >= 150 and step % 10 == 0 and greedy()[1].strip() == wrong.strip():
            break
    else:
        pytest.fail(f"after 800 steps the greedy answer is not the wrong trace on this host: {greedy()[1]!r}")
    start = greedy()[0]
    assert start < best

    reached: list[int] = []

    class AtMaximum(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if greedy()[0] >= best - 1e-9:
                reached.append(state.global_step)
                control.should_training_stop = True

    funcs, weights = trl_reward_functions(spec)
    rows, _ = grpo.make_rows(root, [target], cfg, proc, frame)
    trainer = grpo.ratio_logged(GRPOTrainer)(
        model=model, reward_funcs=funcs, args=grpo.trl_args(cfg, tmp_path / "t", weights),
        train_dataset=lazy_image_dataset(rows * 800, frame), processing_class=proc, callbacks=[AtMaximum()])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert reached, f"GRPO did not reach the maximum {best} in 100 steps: greedy {greedy()}, rewards {rewards}"
    assert greedy()[1].strip() == right.strip()  # the right trace, box and all
    parts = paper.paper_components(greedy()[1], target.answer)
    assert parts["accuracy"] == paper.ACC_SCALE and parts["format"] == 1.0
    assert rewards[-1] > rewards[0], rewards  # the sampled reward rose too
