import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer

from deepmedix.train import rewards as R


def comps(output, truth="yes"):
    return R.paper_components(output, truth)


# ---------------------------------------------------------------- completion_text

def test_completion_text_string_and_conversational():
    text = "<think> a </think> \\boxed{x}"
    assert R.completion_text(text) == text
    assert R.completion_text([{"role": "assistant", "content": text}]) == text
    assert R.completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]) == text
    assert R.completion_text([{"role": "assistant", "content": [{"type": "text", "text": text}]}]) == text


# ---------------------------------------------------------------- format

@pytest.mark.parametrize("output,expected", [
    ("<think> reasoning </think> The answer is: \\boxed{yes}", 1.0),
    ("< think > reasoning < /think > The answer is: \\boxed{yes}", 1.0),  # whitespace normalised
    ("<think>\nline 1\nline 2\n</think>\\boxed{yes}", 1.0),
    ("The answer is: \\boxed{yes}", 0.0),  # no think block
    ("<think> reasoning </think> The answer is: yes", 0.0),  # no boxed answer
    ("\\boxed{yes} <think> reasoning </think>", 0.0),  # wrong order
])
def test_format(output, expected):
    assert comps(output)["format"] == expected


# ---------------------------------------------------------------- coordinate

@pytest.mark.parametrize("think,expected", [
    ("no boxes", 0.0),
    ("a [1, 2, 3, 4]", 0.05),
    ("a [1, 2, 3, 4]; b [5,6,7,8]", 0.10),
    ("a [-1.5, 2, 3.0, 4]", 0.05),  # signed decimals
    ("[1, 2, 3, 4] [1, 2, 3, 4] [1, 2, 3, 4] [1, 2, 3, 4] [1, 2, 3, 4]", 0.15),  # capped
    ("[0, 0, 512, 512]", 0.05),  # 512 itself is inside the frame
    ("[0, 0, 600, 10]", -0.2),
    ("[0, 0, 600, 10] [1, 2, 3, 4]", -0.15),
    ("[0, 0, 600, 10] [0, 0, 513, 10] [0, 900, 1, 1]", -0.6),  # no floor
])
def test_coordinate(think, expected):
    assert comps(f"<think> {think} </think> \\boxed{{yes}}")["coordinate"] == pytest.approx(expected)


def test_coordinate_only_counts_first_think_block():
    out = "<think> [1, 2, 3, 4] </think> [0, 0, 900, 900] <think> [1, 2, 3, 4] </think> \\boxed{yes}"
    assert comps(out)["coordinate"] == pytest.approx(0.05)
    assert comps("[1, 2, 3, 4] \\boxed{yes}")["coordinate"] == 0.0


# ---------------------------------------------------------------- answer extraction

def test_boxed_answer():
    assert R.boxed_answer("<think>x</think> \\boxed{a{b}c}") == "a{b}c"
    assert R.boxed_answer("\\boxed{first} then \\boxed{ second }") == "second"
    assert R.boxed_answer("\\boxed{abc") == "None"
    assert R.boxed_answer("no answer") == "None"
    assert R.boxed_answer("\\boxed{}") == " "
    assert R.boxed_answer("\\boxed{   }") == " "


def test_nested_braces_and_unclosed_in_accuracy():
    assert comps("<think>x</think> \\boxed{a{b}c}", "a{b}c")["accuracy"] == 1.5
    assert comps("<think>x</think> \\boxed{abc", "abc")["accuracy"] == 0.0
    assert comps("<think>x</think> \\boxed{abc", "none")["accuracy"] == 1.5  # the release's quirk


# ---------------------------------------------------------------- accuracy

def test_list_f1():
    # A = {a, b}, G = {a, c}: precision 1/2, recall 1/2 -> F1 0.5 -> 0.75
    assert comps("\\boxed{a | b}", "a | c")["accuracy"] == pytest.approx(0.75)
    assert comps("\\boxed{B|A}", "a | b")["accuracy"] == pytest.approx(1.5)
    # A = {a}, G = {a, b, c}: P 1, R 1/3 -> F1 0.5
    assert comps("\\boxed{a}", "a | b | c")["accuracy"] == pytest.approx(0.75)
    assert comps("\\boxed{x}", "a | b")["accuracy"] == 0.0


def test_short_exact_match_case_insensitive():
    assert comps("\\boxed{Yes}", "yes")["accuracy"] == 1.5
    assert comps("\\boxed{ LEFT lung }", "left lung")["accuracy"] == 1.5
    assert comps("\\boxed{no}", "yes")["accuracy"] == 0.0
    assert comps("\\boxed{left}", "left lung")["accuracy"] == 0.0


def test_long_answer_branch_matches_direct_computation():
    truth = "Small left pleural effusion with basal atelectasis."
    answer = "Left pleural effusion and atelectasis."
    smooth = SmoothingFunction().method2
    b1 = sentence_bleu([truth], answer, weights=(1, 0, 0, 0), smoothing_function=smooth)
    b4 = sentence_bleu([truth], answer, weights=(0.25, 0.25, 0.25, 0.25), smoothing_function=smooth)
    r1 = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(truth, answer)["rouge1"].fmeasure
    expected = 1.5 * (b1 + b4 + r1) / 3
    assert 0 < expected < 1.5
    assert comps(f"<think>x</think> \\boxed{{{answer}}}", truth)["accuracy"] == pytest.approx(expected)
    assert comps(f"\\boxed{{{truth}}}", truth)["accuracy"] == pytest.approx(1.5)


def test_long_list_answer_uses_text_branch():
    truth = " | ".join(f"finding number {i}" for i in range(8))  # > 20 words
    answer = truth
    assert comps(f"\\boxed{{{answer}}}", truth)["accuracy"] == pytest.approx(1.5)
    smooth = SmoothingFunction().method2
    ans = "finding number 0"
    b1 = sentence_bleu([truth], ans, weights=(1, 0, 0, 0), smoothing_function=smooth)
    b4 = sentence_bleu([truth], ans, weights=(0.25,) * 4, smoothing_function=smooth)
    r1 = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(truth, ans)["rouge1"].fmeasure
    assert comps(f"\\boxed{{{ans}}}", truth)["accuracy"] == pytest.approx(1.5 * (b1 + b4 + r1) / 3)


# ---------------------------------------------------------------- overall

def test_overall_formula():
    c = comps("<think> look at [10, 20, 30, 40] </think> The answer is: \\boxed{Yes}", "yes")
    assert c == pytest.approx({"accuracy": 1.5, "format": 1.0, "coordinate": 0.05, "overall": 1.5})
    c = comps("<think> [0, 0, 999, 10] </think> \\boxed{a | b}", "a | c")
    assert c["overall"] == pytest.approx(0.9 * 0.75 + 0.1 * 1.0 - 0.2)
    c = comps("just text", "yes")
    assert c == {"accuracy": 0.0, "format": 0.0, "coordinate": 0.0, "overall": 0.0}


def test_reward_functions_accept_strings_and_conversations():
    text = "<think> look at [10, 20, 30, 40] </think> The answer is: \\boxed{Yes}"
    conv = [{"role": "assistant", "content": text}]
    answers = ["yes", "no"]
    for completions in ([text, text], [conv, conv], [text, conv]):
        assert R.paper_reward(completions, answer=answers, extra=[1, 2]) == pytest.approx([1.5, 0.15])
        assert R.paper_accuracy(completions, answer=answers) == pytest.approx([1.5, 0.0])
        assert R.paper_format(completions, answer=answers) == [1.0, 1.0]
        assert R.paper_coordinate(completions, answer=answers) == pytest.approx([0.05, 0.05])


def test_paper_reward_length_mismatch():
    with pytest.raises(ValueError):
        R.paper_reward(["a", "b"], answer=["a"])


# ---------------------------------------------------------------- grounded IoU

def test_grounded_iou_reward():
    text = "<think> the lesion [10, 10, 50, 50] </think> \\boxed{effusion}"
    conv = [{"role": "assistant", "content": text}]
    refs = [
        [[10, 10, 50, 50]],             # perfect
        [[100, 100, 200, 200]],         # disjoint
        [],                             # no reference: neutral
        None,                           # no reference: neutral
        [[10, 10, 50, 90]],             # half overlap: 1600 / 3200
        [[10, 10, 50, 50], [300, 300, 400, 400]],  # one of two matched
    ]
    out = R.grounded_iou_reward([text, conv, text, conv, text, text], ref_boxes_frame=refs)
    assert out == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.5, 0.5])


def test_grounded_iou_reward_no_predicted_boxes():
    assert R.grounded_iou_reward(["<think> none </think> \\boxed{x}"], ref_boxes_frame=[[[0, 0, 5, 5]]]) == [0.0]


# ---------------------------------------------------------------- registry

def test_registry():
    assert R.get_reward("paper") is R.paper_reward
    assert R.get_reward("grounded_iou") is R.grounded_iou_reward
    assert set(R.REWARDS) >= {"paper", "paper_accuracy", "paper_format", "paper_coordinate", "grounded_iou"}
    with pytest.raises(ValueError, match=r"nope.*paper"):
        R.get_reward("nope")
