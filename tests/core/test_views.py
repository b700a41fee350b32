"""Several views of one study in one query: how the prompt names them and how each box finds its view's pixels."""

from __future__ import annotations

import jinja2
import pytest

from deepmedix.grounding import Frame, build_prompt, grounding_object, parse, step_views, user_content, user_message
from deepmedix.model.processor import CHAT_TEMPLATE

VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def render(messages, template: str = CHAT_TEMPLATE, **kw) -> str:
    return jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True, **kw)


def test_one_image_keeps_the_release_prompt():
    assert user_message("Findings?") == {"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": build_prompt("Findings?")}]}
    assert f"user\n{VISION}Findings?\n\n" in render([user_message("Findings?")])


def test_several_views_are_named_as_the_stock_template_names_them_with_add_vision_id():
    """Qwen2.5-VL's own chat template writes ``Picture N: `` before each image when called with ``add_vision_id``.
    The prompt builder writes the same names as text parts, so that every template renders them, with no keyword
    a trainer or vLLM would have to pass: the two renderings are equal."""
    ours = render([user_message("Compare the views.", 2)])
    assert f"user\nPicture 1: {VISION}Picture 2: {VISION}Compare the views.\n\n" in ours
    # the stock template's clause, in a copy of ours, fed image parts only
    stock = CHAT_TEMPLATE.replace(VISION, "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}" + VISION)
    assert stock != CHAT_TEMPLATE
    plain = {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": build_prompt("Compare the views.")}]}
    assert render([plain], stock, add_vision_id=True) == ours
    assert render([plain], stock) == render([plain])  # and without the keyword nothing changes
    parts = user_content("q", 3, image_part=lambda i: {"type": "image_url", "image_url": {"url": f"u{i}"}})
    assert [p.get("text") or p["image_url"]["url"] for p in parts[:-1]] == [
        "Picture 1: ", "u0", "Picture 2: ", "u1", "Picture 3: ", "u2"]


@pytest.mark.parametrize("reasoning, n, views", [
    # one image: every box is on it, whatever the text says
    ("<think> image 2 heart [1, 1, 5, 5] </think> \\boxed{x}", 1, [[0]]),
    # no view named: Picture 1
    ("<think> heart [1, 1, 5, 5]; lung [2, 2, 6, 6] </think> \\boxed{x}", 2, [[0], [0]]),
    # named before the box, held into the next step, named again
    ("<think> Picture 2 shows the effusion [1, 1, 5, 5]; the angle [2, 2, 6, 6]; in picture 1 the heart "
     "[3, 3, 7, 7] </think> \\boxed{x}", 2, [[1], [1], [0]]),
    # two boxes in one step, either side of a name; "image 2" and "view 2" name views too
    ("<think> heart [1, 1, 5, 5] and on image 2 [2, 2, 6, 6]; View 1 again [3, 3, 7, 7] </think> \\boxed{x}", 2,
     [[0, 1], [0]]),
    # a picture the query does not have
    ("<think> Picture 3 shows [1, 1, 5, 5]; picture 2 [2, 2, 6, 6] </think> \\boxed{x}", 2, [[None], [1]]),
])
def test_each_box_is_on_the_last_view_named_before_it(reasoning, n, views):
    assert step_views(parse(reasoning), n) == views


def test_grounding_object_maps_each_box_through_its_own_views_frame():
    frame = Frame.parse("native", 28, 168 * 168, 168 * 168)
    sizes = [(300, 200), (200, 300)]
    assert frame.size(*sizes[0]) == (224, 140) and frame.size(*sizes[1]) == (140, 224)  # not one frame for both
    raw = ("<think> Picture 1 shows the heart with [28, 56, 84, 112]; Picture 2 shows the effusion with "
           "[56, 28, 112, 84]; Picture 3 [1, 1, 2, 2] </think> The answer is: \\boxed{cardiomegaly | effusion}")
    g = grounding_object(raw, sizes, frame)
    heart = frame.from_frame([28, 56, 84, 112], *sizes[0])
    effusion = frame.from_frame([56, 28, 112, 84], *sizes[1])
    assert heart == pytest.approx([300 * 28 / 224, 200 * 56 / 140, 300 * 84 / 224, 200 * 112 / 140])
    assert effusion == pytest.approx([200 * 56 / 140, 300 * 28 / 224, 200 * 112 / 140, 300 * 84 / 224])
    assert g["boxes"] == [heart, effusion] and g["box_views"] == [0, 1]
    assert [s["views"] for s in g["steps"]] == [[0], [1], []]
    assert g["views"] == [{"image_size": [300, 200], "boxes": [heart]}, {"image_size": [200, 300], "boxes": [effusion]}]
    assert g["image_sizes"] == [[300, 200], [200, 300]] and g["image_size"] == [300, 200]
    assert g["unplaced"] == [{"step": 2, "box": [1.0, 1.0, 2.0, 2.0]}]  # left in the model's numbers, not guessed
    assert g["answer"] == "cardiomegaly | effusion" and g["format_ok"]
    # one image: the same object as before several views were possible, plus its one view
    one = grounding_object(raw, (300, 200), frame)
    assert one["box_views"] == [0, 0, 0] and "unplaced" not in one and one["image_sizes"] == [[300, 200]]


def test_only_boxes_on_the_first_view_meet_the_references():
    """A record's reference boxes are on its first image; a box the reasoning puts on the second view is not scored
    against them — in the grounded reward (as TRL calls it, with the prompt's decoded images) and in evaluation."""
    from PIL import Image

    from deepmedix.eval.scoring import score_predictions
    from deepmedix.grounding import reference_view_boxes
    from deepmedix.rewards.grounded import grounded_components
    from deepmedix.rewards.spec import RewardSpec
    from deepmedix.train.grpo_rewards import ComponentReward

    ref = [[10, 10, 50, 50]]
    on_second = "<think> Picture 2 shows it with [10, 10, 50, 50] </think> The answer is: \\boxed{x}"
    on_first = "<think> Picture 1 shows it with [10, 10, 50, 50] </think> The answer is: \\boxed{x}"
    assert reference_view_boxes(on_second, 2) == ([], 0) and reference_view_boxes(on_second, 1) == (ref, 0)
    assert grounded_components(on_second, ref, n_images=2)["iou"] == 0.0
    assert grounded_components(on_first, ref, n_images=2)["iou"] == 1.0
    # boxes put on a picture the query does not have are predictions that match nothing: they cost, as extra
    # boxes do on one image
    sprayed = on_first.replace("</think>", "; Picture 7 [1, 1, 2, 2]; Picture 8 [3, 3, 4, 4] </think>")
    assert reference_view_boxes(sprayed, 2) == (ref, 2)
    assert grounded_components(sprayed, ref, n_images=2)["iou"] == pytest.approx(1 / 3)
    assert grounded_components(sprayed, ref, n_images=2)["count"] == pytest.approx(1 / 3)
    assert grounded_components(on_second, ref)["iou"] == 1.0  # one image: every box is on it
    reward = ComponentReward(RewardSpec.parse("grounded"), "grounded")
    one, two = [Image.new("RGB", (8, 8))], [Image.new("RGB", (8, 8))] * 2
    got = reward([on_second, on_second, on_first], ["x"] * 3, [ref] * 3, ["grounding"] * 3, images=[one, two, two])
    assert got[0] > got[1] and got[2] == got[0]
    rows = [{"record_id": str(i), "task": "grounding", "raw_output": out, "reference": "x", "ref_boxes_frame": ref,
             "n_images": n} for i, (out, n) in enumerate(((on_second, 2), (on_first, 2)))]
    assert score_predictions(rows[:1])["grounding_miou"] == 0.0 and score_predictions(rows[1:])["grounding_miou"] == 1.0
    from deepmedix.eval.suite import evaluate_rows

    rows.append({**rows[1], "record_id": "2", "raw_output": sprayed})
    suite = [next(v["miou"]["value"] for k, v in evaluate_rows([r], rounds=0).items() if k.endswith("grounding"))
             for r in rows]  # the evaluation suite's mIoU, one row at a time
    assert suite == pytest.approx([0.0, 1.0, 1 / 3])


def test_teacher_traces_and_reader_overlays_place_boxes_on_their_views(tmp_path):
    """The cold-start filter checks each cited box against the image its step names, and the reader study (which
    shows a record's first image) draws only the boxes on that image."""
    from PIL import Image

    from deepmedix.data.schema import Box, Record
    from deepmedix.reader.study import candidate_view
    from deepmedix.synth.filter import keep_trace

    rec = Record(record_id="r", patient_id="p", study_id="s", source="manifest", images=["pa.png", "lat.png"],
                 image_sizes=[[300, 200], [200, 300]], task="grounding", prompt="Where is the effusion?",
                 answer="effusion", split="train", boxes=[Box("effusion", [20, 120, 90, 190])]).validate()

    def trace(second: str) -> str:
        return (f"<think> Picture 1 shows the effusion with [20, 120, 90, 190]; {second} the fluid tracks up with "
                f"[10, 250, 50, 290] </think> The answer is: \\boxed{{effusion}}")
    assert keep_trace(trace("Picture 2 shows"), rec) is None  # inside the 200 x 300 lateral view
    assert keep_trace(trace("Picture 1 shows"), rec) == "box_outside_image"  # below the 300 x 200 frontal one
    assert keep_trace(trace("Picture 3 shows"), rec) == "box_outside_image"  # no such view
    img = Image.new("RGB", (300, 200))
    _, steps, _ = candidate_view(trace("Picture 2 shows"), img, img, (300, 200), tmp_path, n_images=2)
    assert [len(s["boxes"]) for s in steps] == [1, 0]
    _, steps, _ = candidate_view(trace("Picture 2 shows"), img, img, (300, 200), tmp_path)
    assert [len(s["boxes"]) for s in steps] == [1, 1]  # one image: every box is on it
