from __future__ import annotations

import pytest

from deepmedix.grounding import (
    INSTRUCTION,
    Frame,
    Step,
    build_prompt,
    format_output,
    iou,
    last_boxed,
    match_boxes,
    mean_matched_iou,
    parse,
    rescale,
    smart_resize,
    split_list,
)


def test_instruction_is_verbatim_and_follows_the_task():
    assert INSTRUCTION.startswith("You FIRST think about the reasoning process as an internal monologue")
    assert INSTRUCTION.endswith("</think>. The answer is: \\boxed{answer}.")
    assert build_prompt("Is there a nodule? ") == "Is there a nodule?\n\n" + INSTRUCTION


def test_prompt_is_easyr1s_rendering_of_the_release_format_template():
    """The release's format file (DeepReasoning/DeepMedix-R1 src/xray_format.jinja) is ``{{ content | trim }}``, a
    blank line, the instruction and a final newline; EasyR1 renders it as ``Template(text.strip())
    .render(content=prompt)`` (verl/utils/dataset.py). Rendered here with jinja2 exactly so."""
    from jinja2 import Template

    release_file = "{{ content | trim }}\n\n" + INSTRUCTION + "\n"
    for task in ["Is there a nodule? ", "\n  Describe the findings of this chest X-ray.\n", "What is at [1, 2, 3, 4]?"]:
        rendered = Template(release_file.strip()).render(content=task)
        assert build_prompt(task) == rendered
        assert not rendered.endswith("\n") and "\n\nYou FIRST think" in rendered


def test_round_trip_steps_boxes_answer():
    steps = [Step("the heart is enlarged", [[100, 200, 300, 400]]), Step("no effusion"),
             Step("two regions", [[1, 2, 3, 4], [5, 6, 7, 8]])]
    text = format_output(steps, "cardiomegaly | nodule")
    assert text.startswith("<think> ") and "</think> The answer is: \\boxed{cardiomegaly | nodule}" in text
    p = parse(text)
    assert p.format_ok
    assert p.answer == "cardiomegaly | nodule"
    assert p.answer_items() == ["cardiomegaly", "nodule"]
    assert [s.boxes for s in p.steps] == [[[100.0, 200.0, 300.0, 400.0]], [], [[1, 2, 3, 4], [5, 6, 7, 8]]]
    assert p.steps[0].text.startswith("the heart is enlarged")


@pytest.mark.parametrize("text,ok,answer", [
    ("<think> a </think> The answer is: \\boxed{yes}", True, "yes"),
    ("The answer is: \\boxed{yes}", False, "yes"),
    ("<think> a </think> no box", False, None),
    ("<think> a </think> \\boxed{a {b} c}", True, "a {b} c"),
    ("<think> a </think> \\boxed{unclosed", False, None),
])
def test_parse_format_and_answer(text, ok, answer):
    p = parse(text)
    assert p.format_ok is ok
    assert p.answer == answer


def test_last_boxed_takes_the_last():
    assert last_boxed("\\boxed{a} then \\boxed{b}") == "b"
    assert split_list(" A | b |") == ["a", "b"]


def test_square_frame_conversion_both_ways_non_square():
    sq = Frame.parse("square512")
    box = [30.0, 20.0, 150.0, 100.0]  # in a 300x200 image
    f = sq.to_frame(box, 300, 200)
    assert f == pytest.approx([51.2, 51.2, 256.0, 256.0])
    assert sq.from_frame(f, 300, 200) == pytest.approx(box)
    assert sq.from_frame([-10, -10, 600, 600], 300, 200) == [0.0, 0.0, 300.0, 200.0]
    assert sq.contains(f, 300, 200) and not sq.contains([0, 0, 513, 10], 300, 200)
    assert sq.input_size(300, 200) == sq.size(300, 200) == (512, 512)
    assert Frame.parse(512) == sq and Frame.parse(" Square512 ").spec == "square512"  # the old int setting
    assert Frame.parse("native").spec == "native" and Frame.parse(sq, 28, 100, 100).kind == "square"
    for bad in ("square", "square0", "native512", "", "512px"):
        with pytest.raises(ValueError, match="native"):
            Frame.parse(bad)


def test_native_frame_is_qwens_per_image_grid():
    """Qwen2.5-VL's own convention: the image scaled to the pixel budget keeping its aspect ratio (EasyR1's
    process_image, int truncation), the processor's smart_resize rounding to 28-pixel cells; boxes in that grid."""
    fr = Frame()  # the paper's min = max = 262144
    assert fr.input_size(2544, 3056) == (467, 561)  # a portrait film: 2544 x 3056 * sqrt(262144 / 7774464)
    assert fr.size(2544, 3056) == (448, 560)  # 467x561 rounds to 476x560 > budget, so smart_resize floors
    assert fr.size(512, 512) == (532, 532)  # the 512 square becomes the 19 x 19 cell grid (361 tokens)
    assert fr.size(300, 200) == (644, 420) and fr.input_size(300, 200) == (627, 418)  # small images are scaled up
    assert Frame.parse("native", 28, 168 * 168, 168 * 168).size(512, 512) == (168, 168)  # the tiny model's budget
    for w, h in [(2544, 3056), (3056, 2544), (300, 200), (1000, 1000), (640, 2000)]:
        fw, fh = fr.size(w, h)
        assert fw % 28 == 0 and fh % 28 == 0
        assert abs(fw / fh - w / h) < 0.1 * w / h  # the aspect ratio kept (to a cell), not squashed
        box = [0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h]
        f = fr.to_frame(box, w, h)
        assert f == pytest.approx([0.1 * fw, 0.2 * fh, 0.6 * fw, 0.9 * fh])  # per axis
        assert fr.from_frame(f, w, h) == pytest.approx(box) and fr.contains(f, w, h)
        assert not fr.contains([0, 0, fw + 1, fh], w, h)
    assert rescale([10, 10, 50, 30], (100, 50), (200, 200)) == [20, 40, 100, 120]
    assert rescale([-5, 0, 500, 10], (100, 50), (100, 50)) == [0, 0, 100, 10]
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000, 28, 262144, 262144)


def test_iou_and_hungarian_matching():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    pred = [[100, 100, 200, 200], [0, 0, 10, 10]]
    ref = [[0, 0, 10, 10], [100, 100, 200, 200]]
    assert sorted(match_boxes(pred, ref)) == [(0, 1, 1.0), (1, 0, 1.0)]
    assert mean_matched_iou(pred, ref) == 1.0
    assert mean_matched_iou([], ref) == 0.0
    assert mean_matched_iou([[0, 0, 10, 10]], ref) == 0.5
