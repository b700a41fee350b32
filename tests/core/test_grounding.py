from __future__ import annotations

import pytest

from deepmedix.grounding import (
    INSTRUCTION,
    Step,
    build_prompt,
    format_output,
    from_frame,
    in_frame,
    iou,
    last_boxed,
    match_boxes,
    mean_matched_iou,
    parse,
    split_list,
    to_frame,
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


def test_frame_conversion_both_ways_non_square():
    box = [30.0, 20.0, 150.0, 100.0]  # in a 300x200 image
    f = to_frame(box, 300, 200, 512)
    assert f == pytest.approx([51.2, 51.2, 256.0, 256.0])
    assert from_frame(f, 300, 200, 512) == pytest.approx(box)
    assert from_frame([-10, -10, 600, 600], 300, 200) == [0.0, 0.0, 300.0, 200.0]
    assert in_frame(f) and not in_frame([0, 0, 513, 10])


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
