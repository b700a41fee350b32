import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer

from deepmedix.rewards.clinical import clinical_components, report_answer
from deepmedix.rewards.grounded import grounded_components
from deepmedix.rewards.paper import boxed_answer, paper_components
from deepmedix.rewards.spec import RewardSpec
from deepmedix.train.grpo_rewards import completion_text, trl_reward_functions


def comps(output, truth="yes", words=False):
    return paper_components(output, truth, words)


# ---------------------------------------------------------------- completion_text

def test_completion_text_string_and_conversational():
    text = "<think> a </think> \\boxed{x}"
    assert completion_text(text) == text
    assert completion_text([{"role": "assistant", "content": text}]) == text
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]) == text
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": text}]}]) == text


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
    assert boxed_answer("<think>x</think> \\boxed{a{b}c}") == "a{b}c"
    assert boxed_answer("\\boxed{first} then \\boxed{ second }") == "second"
    assert boxed_answer("\\boxed{abc") == "None"
    assert boxed_answer("no answer") == "None"
    assert boxed_answer("\\boxed{}") == " "
    assert boxed_answer("\\boxed{   }") == " "


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
    r1 = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(answer, truth)["rouge1"].fmeasure
    expected = (b1 + b4 + r1) / 3 * 1.5  # the release's order of operations: bit-exact
    assert 0 < expected < 1.5
    assert comps(f"<think>x</think> \\boxed{{{answer}}}", truth)["accuracy"] == expected
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


# ---------------------------------------------------------------- the release's quirks, exactly

@pytest.mark.parametrize("think,expected", [
    ("[ 1, 2, 3, 4]", 0.0),        # a space after "[" is not a box to the release's pattern
    ("[1, 2, 3, 4 ]", 0.0),        # nor one before "]"
    ("[1 , 2, 3, 4]", 0.0),        # nor one before a comma
    ("[1,2,3,4]", 0.05),           # no spaces at all is fine
    ("[.5, 1, 2, 3]", 0.05),       # ".5" is a number
    ("[1., 2, 3, 4]", 0.0),        # "1." is not
    ("[+1, -2, 3, 4]", 0.05),
    ("[1, 2, 3]", 0.0),            # three numbers
    ("[1, 2, 3, 4, 5]", 0.0),      # five numbers
])
def test_coordinate_uses_the_releases_box_pattern(think, expected):
    assert comps(f"<think> {think} </think> \\boxed{{yes}}")["coordinate"] == expected


def test_coordinate_cap_applies_to_the_final_sum_only():
    five_good_one_bad = " ".join(["[1, 2, 3, 4]"] * 5 + ["[0, 0, 600, 1]"])
    # summed in order (0.25 - 0.2), then capped: not 0.15 - 0.2
    assert comps(f"<think> {five_good_one_bad} </think> \\boxed{{yes}}")["coordinate"] == pytest.approx(0.05)
    assert comps("<think> [1, 2, 3, 4] [1, 2, 3, 4] [1, 2, 3, 4] </think> \\boxed{yes}")["coordinate"] == 0.15


def test_overall_is_bit_exact():
    c = comps("<think> look at [10, 20, 30, 40] </think> The answer is: \\boxed{Yes}", "yes")
    assert c["overall"] == (1 - 0.1) * 1.5 + 0.1 * 1.0 + 0.05 == 1.5000000000000002


def test_list_f1_divides_by_item_counts_duplicates_included():
    # the sets share {a, b}; precision 2 / 3 items, recall 2 / 2 -> F1 0.8 (a set-based F1 would say 1.0)
    assert comps("\\boxed{a | a | b}", "a | b")["accuracy"] == 2 * ((2 / 3) * 1.0) / ((2 / 3) + 1.0) * 1.5
    # an empty item counts as an item: "a |" is ["a", ""]
    assert comps("\\boxed{a |}", "a | b")["accuracy"] == pytest.approx(1.5 * 0.5)


def test_short_answer_compares_the_unstripped_truth():
    assert comps("\\boxed{yes}", "yes")["accuracy"] == 1.5
    assert comps("\\boxed{yes}", " yes")["accuracy"] == 0.0  # the release does not strip the ground truth
    assert comps("\\boxed{}", " ")["accuracy"] == 1.5        # empty answer reads " "


def test_normalisation_reaches_the_answer_and_the_format():
    out = "< think > see [1, 2, 3, 4] < / think > The answer is: \\boxed{a < b}"
    c = comps(out, "a<b")
    assert c["format"] == 1.0 and c["accuracy"] == 1.5 and c["coordinate"] == 0.05


def test_paper_words_scores_bleu_over_word_tokens():
    truth = "Small left pleural effusion with basal atelectasis."
    answer = "Left pleural effusion and atelectasis."
    smooth = SmoothingFunction().method2
    ref = ["Small", "left", "pleural", "effusion", "with", "basal", "atelectasis", "."]
    hyp = ["Left", "pleural", "effusion", "and", "atelectasis", "."]
    b1 = sentence_bleu([ref], hyp, weights=(1, 0, 0, 0), smoothing_function=smooth)
    b4 = sentence_bleu([ref], hyp, weights=(0.25,) * 4, smoothing_function=smooth)
    r1 = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(answer, truth)["rouge1"].fmeasure
    words = comps(f"\\boxed{{{answer}}}", truth, words=True)["accuracy"]
    assert words == (b1 + b4 + r1) / 3 * 1.5
    assert words != comps(f"\\boxed{{{answer}}}", truth)["accuracy"]
    # short and list answers are scored as in the paper
    assert comps("\\boxed{a | b}", "a | c", words=True)["accuracy"] == comps("\\boxed{a | b}", "a | c")["accuracy"]


# ---------------------------------------------------------------- grounded

GOOD = "<think> the lesion with [10, 10, 50, 50] </think> The answer is: \\boxed{nodule}"


def test_grounded_soft_and_neutral():
    g = grounded_components(GOOD, [[10, 10, 50, 50]])
    assert g == {"iou": 1.0, "count": 1.0, "overall": 1.0}
    assert grounded_components(GOOD, []) is None and grounded_components(GOOD, None) is None
    half = grounded_components(GOOD, [[10, 10, 50, 90]])  # 1600 / 3200
    assert half["iou"] == pytest.approx(0.5) and half["overall"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    two = grounded_components(GOOD, [[10, 10, 50, 50], [300, 300, 400, 400]], iou_weight=1.0, count_weight=0.0)
    assert two["iou"] == 0.5 and two["count"] == 0.5 and two["overall"] == 0.5  # the missed box counts 0
    none = grounded_components("<think> no boxes </think> \\boxed{x}", [[0, 0, 5, 5]])
    assert none == {"iou": 0.0, "count": 0.0, "overall": 0.0}


def test_grounded_spraying_boxes_does_not_pay():
    one_good = grounded_components("<think> a with [10, 10, 50, 45] </think> \\boxed{x}", [[10, 10, 50, 50]])
    spray = grounded_components("<think> a with [10, 10, 50, 50]; b with [0, 0, 5, 5]; c with [100, 100, 105, 105]"
                                  "; d with [200, 200, 205, 205] </think> \\boxed{x}", [[10, 10, 50, 50]])
    assert spray["iou"] == 0.25 and one_good["iou"] == pytest.approx(0.875)
    assert spray["overall"] < one_good["overall"]
    assert RewardSpec.parse("grounded_paper").score(
        "<think> a with [10, 10, 50, 50]; b with [0, 0, 5, 5]; c with [100, 100, 105, 105]; d with [200, 200, 205, "
        "205] </think> \\boxed{x}", "x", [[10, 10, 50, 50]])["overall"] < RewardSpec.parse("grounded_paper").score(
        "<think> a with [10, 10, 50, 45] </think> \\boxed{x}", "x", [[10, 10, 50, 50]])["overall"]


def test_grounded_uses_hungarian_matching():
    # greedy on the first prediction would take ref 0 (IoU 0.5) and leave the second prediction with 0;
    # the optimal assignment pairs p0-r1 and p1-r0
    out = "<think> a with [0, 0, 10, 10]; b with [0, 0, 20, 10] </think> \\boxed{x}"
    refs = [[0, 0, 20, 10], [0, 0, 10, 10]]
    g = grounded_components(out, refs)
    assert g["iou"] == pytest.approx(1.0)


def test_grounded_gemex_mode():
    assert grounded_components(GOOD, [[10, 10, 50, 50]], mode="gemex")["overall"] == 1.0
    assert grounded_components(GOOD, [[10, 10, 50, 60]], mode="gemex")["overall"] == 1.0   # IoU 0.8 > 0.75
    assert grounded_components(GOOD, [[10, 10, 50, 70]], mode="gemex")["overall"] == 0.0   # IoU 0.67
    assert grounded_components(GOOD, [[10, 10, 50, 50], [1, 1, 2, 2]], mode="gemex")["overall"] == 0.0  # count


def test_grounded_only_reads_the_reasoning_boxes():
    out = "<think> nothing here </think> [10, 10, 50, 50] \\boxed{x}"
    assert grounded_components(out, [[10, 10, 50, 50]])["iou"] == 0.0


@pytest.mark.parametrize("boxes,msg", [([[1, 2, 3]], r"boxes\[0\].*4"), ([["a", 1, 2, 3]], r"boxes\[0\]"),
                                       ([[0, 0, float("nan"), 1]], "finite"), (5, "a list of"),
                                       ([[1, 2, 3, True]], r"boxes\[0\]"), (["abcd"], r"boxes\[0\]")])
def test_grounded_bad_reference_boxes(boxes, msg):
    with pytest.raises(ValueError, match=msg):
        grounded_components(GOOD, boxes)


# ---------------------------------------------------------------- clinical

def test_clinical_applies_to_reports_only():
    ref = "There is a small left pleural effusion. Heart size is normal."
    good = "<think> fluid at the left base with [300, 300, 450, 450] </think> The answer is: \\boxed{Small left " \
           "pleural effusion. Normal heart size.}"
    wrong = "<think> x </think> \\boxed{Cardiomegaly. No pleural effusion.}"
    assert clinical_components(good, ref, "report_findings")["overall"] == 1.0
    assert clinical_components(wrong, ref, "report_findings")["overall"] == 0.0
    assert clinical_components(good, "yes", "vqa") is None
    assert clinical_components(good, ref, None)["overall"] == 1.0  # a long answer without a task: a report
    assert report_answer("<think> a </think> no box here") == "no box here"


def test_clinical_gives_no_finding_only_to_an_answer_that_says_something():
    normal = "No acute cardiopulmonary process. Lungs are clear. No pleural effusion."
    assert clinical_components("<think> x </think> \\boxed{asdf qwerty}", normal, "report_findings")["overall"] == 0.0
    said = "<think> x </think> \\boxed{The lungs are clear. No effusion.}"
    assert clinical_components(said, normal, "report_findings")["overall"] == 1.0


# ---------------------------------------------------------------- composites

def test_spec_parse_names_inline_and_files(tmp_path):
    assert RewardSpec.parse("paper").weights == {"paper": 1.0}
    assert RewardSpec.parse("paper=1, grounded=0.5").weights == {"paper": 1.0, "grounded": 0.5}
    shipped = RewardSpec.parse("grounded_paper")
    assert shipped.weights == {"paper": 1.0, "grounded": 1.0} and shipped.grounded_iou_weight == 0.75
    f = tmp_path / "mine.yaml"
    f.write_text("weights: {clinical: 2.0}\nclinical_uncertain: negative\n")
    spec = RewardSpec.parse(str(f), clinical_uncertain="positive")  # the file's own setting wins
    assert spec.weights == {"clinical": 2.0} and spec.clinical_uncertain == "negative" and spec.name == "mine"


@pytest.mark.parametrize("spec,msg", [
    ("nope", r"unknown reward 'nope'.*paper-words"),
    ("paper=1,bogus=2", r"unknown component 'bogus'"),
    ("paper=x", r"'paper=x' is not NAME=WEIGHT"),
    ("paper=1,paper=2", r"'paper' is given twice"),
])
def test_spec_parse_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        RewardSpec.parse(spec)


def test_spec_file_errors_name_the_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("weights: {paper: 1}\ngrounded_mod: soft\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*grounded_mod"):
        RewardSpec.parse(str(f))
    f.write_text("weights: {paper: 1}\ngrounded_mode: fuzzy\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*grounded_mode.*fuzzy"):
        RewardSpec.parse(str(f))
    f.write_text("weights: [paper]\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*'weights' must map"):
        RewardSpec.parse(str(f))


def test_spec_from_config():
    from deepmedix.config import load_config

    cfg = load_config("grpo", "tiny", ["reward=paper", "reward_weights={grounded: 2.0}", "grounded_mode=gemex"])
    spec = RewardSpec.from_config(cfg)
    assert spec.weights == {"grounded": 2.0} and spec.grounded_mode == "gemex"
    assert RewardSpec.from_config(load_config("grpo", "7b")).weights == {"paper": 1.0}
    # a composite file's settings beat the config's defaults; what the run sets beats the file
    file_only = RewardSpec.from_config(load_config("grpo", "tiny", ["reward=grounded_paper"]))
    assert file_only.grounded_iou_weight == 0.75 and file_only.grounded_mode == "soft"
    mine = RewardSpec.from_config(load_config("grpo", "tiny", ["reward=grounded_paper", "grounded_mode=gemex",
                                                                 "grounded_iou_weight=1.0"]))
    assert mine.grounded_mode == "gemex" and mine.grounded_iou_weight == 1.0 and mine.weights["grounded"] == 1.0
    both = RewardSpec.from_config(load_config("grpo", "tiny", ["reward=grounded_paper",
                                                                 "reward_weights={paper: 1, grounded: 2}"]))
    assert both.weights == {"paper": 1.0, "grounded": 2.0} and both.grounded_iou_weight == 0.75


@pytest.mark.parametrize("key,value,msg", [("grounded_iou_weight", "0.75", "must be a number"),
                                           ("grounded_gemex_iou", 1.5, "within 0..1"),
                                           ("clinical_uncertain", "maybe", "positive, negative or ignore")])
def test_spec_settings_are_checked(key, value, msg):
    with pytest.raises(ValueError, match=msg):
        RewardSpec(weights={"paper": 1.0}, **{key: value})


def test_spec_score_sums_the_weighted_components_that_apply():
    spec = RewardSpec.parse("paper=1,grounded=2,clinical=1")
    s = spec.score(GOOD, "nodule", [[10, 10, 50, 50]], "grounding")
    assert s["paper"] == paper_components(GOOD, "nodule")["overall"]
    assert s["grounded"] == 1.0 and s["grounded/iou"] == 1.0 and s["clinical"] is None
    assert s["overall"] == s["paper"] + 2.0
    vqa = spec.score(GOOD, "nodule", None, "vqa")
    assert vqa["grounded"] is None and vqa["overall"] == vqa["paper"]
    nothing = RewardSpec.parse("grounded").score(GOOD, "nodule", None, "vqa")
    assert nothing == {"grounded": None, "overall": None}  # nothing applies: no score (as in TRL), not 0


def test_trl_reward_functions_names_weights_parts_and_rollouts():
    spec = RewardSpec.parse("paper=1,grounded=0.5")
    seen, metrics = [], {}
    funcs, weights = trl_reward_functions(spec, on_scores=seen.append)
    assert [f.__name__ for f in funcs] == ["paper", "grounded"] and weights == [1.0, 0.5]
    conv = [{"role": "assistant", "content": GOOD}]
    completions = [GOOD, conv]
    kw = dict(answer=["nodule", "mass"], ref_boxes_frame=[[[10, 10, 50, 50]], []], task=["grounding", "vqa"],
              log_metric=lambda k, v: metrics.__setitem__(k, v), prompts=["p1", "p2"])
    paper = funcs[0](completions, **kw)
    assert paper == [paper_components(GOOD, "nodule")["overall"], paper_components(GOOD, "mass")["overall"]]
    assert seen == []  # the batch is complete only once every component is in
    assert funcs[1](completions, **kw) == [1.0, None]  # neutral for the record without boxes
    assert metrics["rewards/paper/accuracy"] == pytest.approx((1.5 + 0.0) / 2)
    assert metrics["rewards/grounded/iou"] == 1.0  # over the records it applies to
    (batch,) = seen
    assert batch["completions"] == [GOOD, GOOD] and batch["scores"]["grounded"][1] is None
    # the next batch may reuse the same list object (CPython reuses ids): it still waits for every component
    funcs[0](completions, **kw)
    assert len(seen) == 1
    funcs[1](completions, **kw)
    assert len(seen) == 2
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        funcs[0](completions, answer=["x"])


# ---------------------------------------------------------------- the CLI

def _cli(*args):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("deepmedix")
    return subprocess.run([str(exe), "reward", "score", *map(str, args)], capture_output=True, text=True)


def test_cli_scores_every_line(tmp_path):
    import json

    f = tmp_path / "preds.jsonl"
    rows = [{"prediction": GOOD, "ground_truth": "nodule", "boxes": [[10, 10, 50, 50]]},
            {"prediction": "no format", "ground_truth": "a | b"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    r = _cli(f)
    assert r.returncode == 0, r.stderr
    first, second = [json.loads(x) for x in r.stdout.splitlines()]
    assert first == {"paper": first["overall"], "paper/accuracy": 1.5, "paper/format": 1.0,
                     "paper/coordinate": 0.05, "overall": (1 - 0.1) * 1.5 + 0.1 + 0.05}
    assert second["overall"] == 0.0
    r = _cli(f, "--reward", "grounded_paper")
    first, second = [json.loads(x) for x in r.stdout.splitlines()]
    assert first["grounded"] == 1.0 and first["overall"] == first["paper"] + 1.0
    assert second["grounded"] is None and second["overall"] == second["paper"]


@pytest.mark.parametrize("line,msg", [
    ('{"prediction": "x"}', r"preds.jsonl:2: field 'ground_truth' must be a string"),
    ("not json", r"preds.jsonl:2: not JSON"),
    ('["x"]', r"preds.jsonl:2: expected a JSON object"),
    ('{"prediction": "x", "ground_truth": "y", "boxes": [[1, 2]]}', r"preds.jsonl:2: field 'boxes'\[0\]"),
])
def test_cli_bad_lines_name_file_line_and_field(tmp_path, line, msg):
    import re

    f = tmp_path / "preds.jsonl"
    f.write_text('{"prediction": "x", "ground_truth": "y"}\n' + line + "\n")
    r = _cli(f)
    assert r.returncode == 2 and r.stdout == ""  # nothing printed: every line is checked first
    assert re.search(msg, " ".join(r.stderr.split())), r.stderr


def test_cli_unknown_reward(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prediction": "x", "ground_truth": "y"}\n')
    r = _cli(f, "--reward", "nope")
    assert r.returncode == 2 and "unknown reward 'nope'" in r.stderr


# ---------------------------------------------------------------- a record; the TRL functions across processes

def test_score_against_a_record_maps_its_boxes_into_the_model_frame():
    from deepmedix.data.schema import Box, Record
    from deepmedix.rewards import score

    # a 1024 x 2048 image: the reference box [20, 40, 100, 200] is [10, 10, 50, 50] in the 512 frame
    rec = Record(record_id="r1", patient_id="p", study_id="s", source="x", images=["a.png"],
                 image_sizes=[[1024, 2048]], task="grounding", prompt="Where?", answer="nodule", split="test",
                 boxes=[Box("nodule", [20, 40, 100, 200])])
    from deepmedix.grounding import Frame

    got = score("paper=1,grounded=2", GOOD, rec, frame=Frame.parse("square512"))
    assert got["grounded"] == 1.0 and got["grounded/iou"] == 1.0
    assert got == RewardSpec.parse("paper=1,grounded=2").score(GOOD, "nodule", [[10, 10, 50, 50]], "grounding")
    assert score("grounded", GOOD, rec, frame=Frame.parse("square1024"))["grounded/iou"] < 1.0  # other boxes
    # the native frame (the default: the paper's pixel budget) of this 1:2 image is 336 x 700 cells' pixels
    native = Frame()
    assert native.size(1024, 2048) == (336, 700)
    ref = native.to_frame([20, 40, 100, 200], 1024, 2048)
    out = GOOD.replace("[10, 10, 50, 50]", "[" + ", ".join(str(round(v)) for v in ref) + "]")
    assert out != GOOD and score("grounded", out, rec)["grounded/iou"] > 0.9


def test_trl_reward_functions_survive_pickling_with_their_batch():
    import pickle

    seen = []
    funcs, _ = trl_reward_functions(RewardSpec.parse("paper=1,grounded=0.5"), on_scores=_Collect(seen))
    funcs = pickle.loads(pickle.dumps(funcs))  # as a worker process would receive them
    assert [f.__name__ for f in funcs] == ["paper", "grounded"]
    kw = dict(answer=["nodule"], ref_boxes_frame=[[[10, 10, 50, 50]]], task=["grounding"])
    assert funcs[1]([GOOD], **kw) == [1.0]
    funcs[0]([GOOD], **kw)
    funcs[1]([GOOD], **kw)
    (batch,) = funcs[0].batch.on_scores.seen  # the unpickled copies still share one batch
    assert set(batch["scores"]) == {"paper", "grounded"}


class _Collect:
    def __init__(self, seen):
        self.seen = seen

    def __call__(self, batch):
        self.seen.append(batch)
