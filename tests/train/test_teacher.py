"""The cold-start teachers and the trace filter: the real openai client against a stub OpenAI-compatible server
(tests/train/openai_stub_server.py, a uvicorn subprocess), and the filter's reasons on hand-written traces."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import pytest
from conftest import server_process
from PIL import Image
from typer.testing import CliRunner

from deepmedix import stages, store
from deepmedix.config import load_config
from deepmedix.data.schema import Box, Record, load_records
from deepmedix.errors import InputError
from deepmedix.grounding import BOX_RE
from deepmedix.llm.client import ResponseCache, cache_key, redact_url
from deepmedix.synth.filter import keep_trace
from deepmedix.synth.teacher import OpenAITeacher, build_messages, cache_dir, clean_response

KEY_ENV = "DEEPMEDIX_TEST_TEACHER_KEY"
SECRET = "sk-stub-secret-0123456789abcdef"
SERVER = Path(__file__).with_name("openai_stub_server.py")
N_RECORDS = 8  # max_records=6 train + eval_records=2 validate


# ---------------------------------------------------------------- the stub server

@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    with server_process(SERVER, [], tmp_path_factory.mktemp("stub")) as url:
        yield url


def requests_for(stub: str, model: str) -> int:
    return httpx.get(f"{stub}/stats", timeout=5).json()["by_model"].get(model, 0)


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def overrides(stub: str, model: str, cache: Path, *extra: str) -> list[str]:
    return ["teacher=openai", f"teacher_model={model}", f"teacher_base_url={stub}/v1", f"teacher_api_key_env={KEY_ENV}",
            f"teacher_cache={cache}", "max_records=6", "eval_records=2", "teacher_timeout_s=5",
            "teacher_backoff_s=0.01", *extra]


def synth(small_data, out: Path, stub: str, model: str, cache: Path, *extra: str) -> dict:
    r = stages.coldstart_synth(str(small_data), str(out), "tiny", overrides(stub, model, cache, *extra))
    report = json.loads((out / "filter_report.json").read_text())
    assert json.loads((out / "manifest.json").read_text())["filter"] == report
    assert r["after"] == report["kept"] and r["dropped"] == report["dropped"]
    return report


def no_secret_in(folder: Path) -> bool:
    return all(SECRET not in p.read_text(errors="replace") for p in folder.rglob("*.json"))


# ---------------------------------------------------------------- the openai teacher

def test_good_teacher_traces_are_kept_and_pass_the_filter(small_data, stub, api_key, tmp_path):
    before = requests_for(stub, "good")
    out = tmp_path / "traces"
    rep = synth(small_data, out, stub, "good", tmp_path / "cache")
    u = rep["teacher_stats"]["unique_prompts"]  # records with identical messages share one request
    assert 0 < u <= N_RECORDS and requests_for(stub, "good") - before == u
    assert rep["selected"] == N_RECORDS and rep["kept"] == N_RECORDS and rep["dropped"] == {}
    assert rep["teacher_stats"]["requests"] == u and rep["teacher_stats"]["cache_hits"] == 0
    recs = load_records(out)
    assert len(recs) == N_RECORDS and {r.split for r in recs} == {"train", "validate"}
    for r in recs:
        assert keep_trace(r.trace, r) is None
        assert "opacity consistent with" in r.trace or not r.boxes
    # every request showed the teacher the study's images, as stored
    sizes = {tuple(sz) for r in recs for sz in r.image_sizes}
    shown = httpx.get(f"{stub}/stats", timeout=5).json()["images"][-u:]
    assert len(shown) == u and all(req and all(tuple(sz) in sizes for sz in req) for req in shown)
    # the key never lands in the artifact; the lineage names only its env var
    lineage = store.read_lineage(out)
    assert lineage["config"]["teacher_api_key_env"] == KEY_ENV and lineage["filter"]["kept"] == N_RECORDS
    assert no_secret_in(out) and no_secret_in(tmp_path / "cache")


def test_rerun_makes_no_http_calls(small_data, stub, api_key, tmp_path):
    cache = tmp_path / "cache"
    first = synth(small_data, tmp_path / "a", stub, "good", cache)
    n = requests_for(stub, "good")
    second = synth(small_data, tmp_path / "b", stub, "good", cache)
    assert requests_for(stub, "good") == n  # every response came from the cache
    u = first["teacher_stats"]["unique_prompts"]
    assert second["teacher_stats"]["cache_hits"] == u and second["teacher_stats"]["requests"] == 0
    assert second["kept"] == first["kept"] == N_RECORDS
    assert [r.trace for r in load_records(tmp_path / "a")] == [r.trace for r in load_records(tmp_path / "b")]
    # another sampling temperature is another cache key
    synth(small_data, tmp_path / "c", stub, "good", cache, "teacher_temperature=0.7")
    assert requests_for(stub, "good") == n + u


def test_garbage_is_dropped_for_grammar(small_data, stub, api_key, tmp_path):
    rep = synth(small_data, tmp_path / "t", stub, "garbage", tmp_path / "cache")
    assert rep["kept"] == 0 and rep["dropped"] == {"grammar": N_RECORDS}
    assert len(rep["dropped_examples"]["grammar"]) == 5
    assert load_records(tmp_path / "t") == []


def test_slow_teacher_times_out_retries_then_gives_up(small_data, stub, api_key, tmp_path):
    before = requests_for(stub, "slow")
    cache = tmp_path / "cache"
    rep = synth(small_data, tmp_path / "t", stub, "slow", cache, "max_records=2", "eval_records=1",
                "teacher_timeout_s=0.5", "teacher_max_retries=1", "teacher_concurrency=3")
    u = rep["teacher_stats"]["unique_prompts"]
    assert rep["kept"] == 0 and rep["dropped"] == {"teacher_error": 3}
    assert requests_for(stub, "slow") - before == 2 * u  # each prompt: one try and one retry
    assert rep["teacher_stats"]["retries"] == u and rep["teacher_stats"]["errors"] == u
    # three at a time: the first tries of all prompts reached the server together, each before any of them had
    # timed out (a client sending one at a time would wait out a 0.5 s timeout between them)
    first_tries = httpx.get(f"{stub}/stats", timeout=5).json()["arrivals"]["slow"][before:before + u]
    assert len(first_tries) == u == 3 and max(first_tries) - min(first_tries) < 0.5, first_tries
    assert not list(cache.rglob("*.json"))  # failures are not cached


def test_flaky_server_is_retried_and_kept(small_data, stub, api_key, tmp_path):
    before = requests_for(stub, "flaky")
    rep = synth(small_data, tmp_path / "t", stub, "flaky", tmp_path / "cache")
    assert rep["kept"] == N_RECORDS and rep["dropped"] == {}
    u = rep["teacher_stats"]["unique_prompts"]
    assert requests_for(stub, "flaky") - before == 3 * u  # two 500s, then the answer
    assert rep["teacher_stats"]["retries"] == 2 * u


def test_400_is_not_retried(small_data, stub, api_key, tmp_path):
    before = requests_for(stub, "err400")
    rep = synth(small_data, tmp_path / "t", stub, "err400", tmp_path / "cache")
    assert rep["kept"] == 0 and rep["dropped"] == {"teacher_error": N_RECORDS}
    assert requests_for(stub, "err400") - before == rep["teacher_stats"]["unique_prompts"]
    assert rep["teacher_stats"]["retries"] == 0


def test_unknown_model_stops_the_run_with_a_clear_error(small_data, stub, api_key, tmp_path):
    with pytest.raises(ValueError, match="refused the request.*teacher_model"):
        synth(small_data, tmp_path / "t", stub, "no-such-model", tmp_path / "cache")
    assert not (tmp_path / "t").exists()


def test_a_truncated_response_is_dropped_and_never_cached(small_data, stub, api_key, tmp_path):
    for _ in range(2):
        before = requests_for(stub, "truncated")
        rep = synth(small_data, tmp_path / "t", stub, "truncated", tmp_path / "cache")
        assert rep["kept"] == 0 and rep["dropped"] == {"teacher_error": N_RECORDS}
        assert requests_for(stub, "truncated") - before == rep["teacher_stats"]["unique_prompts"]  # asked again


def test_429_is_retried_after_the_servers_delay(small_data, stub, api_key, tmp_path):
    before = requests_for(stub, "ratelimit")
    rep = synth(small_data, tmp_path / "t", stub, "ratelimit", tmp_path / "cache")
    assert rep["kept"] == N_RECORDS and rep["dropped"] == {}
    assert requests_for(stub, "ratelimit") - before == 2 * rep["teacher_stats"]["unique_prompts"]


def test_missing_settings_fail_clearly(small_data, stub, api_key, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="teacher_model"):
        OpenAITeacher(load_config("coldstart", "tiny", overrides(stub, "''", cache)))
    with pytest.raises(ValueError, match="teacher_base_url.*OPENAI_BASE_URL"):
        OpenAITeacher(load_config("coldstart", "tiny", overrides(stub, "good", cache, "teacher_base_url=''")))
    monkeypatch.setenv("OPENAI_BASE_URL", f"{stub}/v1")
    t = OpenAITeacher(load_config("coldstart", "tiny", overrides(stub, "good", cache, "teacher_base_url=''")))
    assert t.base_url == f"{stub}/v1"
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=KEY_ENV):
        stages.coldstart_synth(str(small_data), str(tmp_path / "t"), "tiny", overrides(stub, "good", cache))
    assert not (tmp_path / "t").exists()
    # the CLI: one line naming the env var, exit code 2
    from deepmedix.cli import app

    args = ["coldstart", "synth", "--data", str(small_data), "--out", str(tmp_path / "t")]
    for o in overrides(stub, "good", cache):
        args += ["--set", o]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and KEY_ENV in r.output and "Traceback" not in r.output
    assert not (tmp_path / "t").exists()


def test_cache_key_location_and_atomic_writes(monkeypatch, tmp_path):
    msgs = [{"role": "user", "content": "q"}]
    k = cache_key("http://h/v1", "m", msgs, 0.2, 100)
    assert k == cache_key("http://h/v1", "m", [{"role": "user", "content": "q"}], 0.2, 100)
    assert len({k, cache_key("http://h/v1", "m2", msgs, 0.2, 100), cache_key("http://h/v1", "m", msgs, 0.3, 100),
                cache_key("http://h/v1", "m", msgs, 0.2, 101), cache_key("http://g/v1", "m", msgs, 0.2, 100),
                cache_key("http://h/v1", "m", [{"role": "user", "content": "q2"}], 0.2, 100)}) == 6
    c = ResponseCache(tmp_path / "c")
    assert c.get(k) is None
    c.put(k, "<think> a </think> \\boxed{b}")
    assert c.get(k) == "<think> a </think> \\boxed{b}"
    assert [p.name for p in (tmp_path / "c").rglob("*") if p.is_file()] == [f"{k}.json"]  # no temp file left
    cfg = load_config("coldstart", "tiny")
    monkeypatch.setenv("DEEPMEDIX_CACHE", str(tmp_path / "dmx"))
    assert cache_dir(cfg) == tmp_path / "dmx" / "teacher"
    cfg.teacher_cache = str(tmp_path / "mine")
    assert cache_dir(cfg) == tmp_path / "mine"


# ---------------------------------------------------------------- the prompt

def rec(task: str = "vqa", answer: str = "yes", boxes=((200, 200, 400, 400),), images=("images/a.png",),
        prompt: str = "Is there a pleural effusion?", rid: str = "r1", size: int = 512) -> Record:
    """A ``size`` x ``size`` study; traces cite boxes in its pixels."""
    return Record(record_id=rid, patient_id="p1", study_id="s1", source="unit", images=list(images),
                  image_sizes=[[size, size]] * len(images), task=task, prompt=prompt, answer=answer, split="train",
                  question_type="presence" if task == "vqa" else "",
                  boxes=[Box("pleural effusion", list(b)) for b in boxes], findings=["pleural effusion"]).validate()


def image_root(tmp_path: Path, *records: Record) -> Path:
    """A dataset root holding the records' images (PNG, each at its record's size, a grey of its own per name)."""
    for r in records:
        for uri, (w, h) in zip(r.images, r.image_sizes):
            (tmp_path / uri).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (w, h), 40 + sum(map(ord, uri)) % 150).save(tmp_path / uri)
    return tmp_path


def test_prompt_carries_the_image_and_what_the_teacher_needs(tmp_path):
    from openai_stub_server import good_trace

    r = rec(task="report_impression", answer="Small right pleural effusion. No pneumothorax.")
    system, user = build_messages(r, image_root(tmp_path, r))
    assert system["role"] == "system" and "\\boxed{" in system["content"] and "[x1, y1, x2, y2]" in system["content"]
    (text_part, image_part) = user["content"]
    text = text_part["text"]
    assert "512x512 pixels" in text and "- pleural effusion: [200, 200, 400, 400]" in text  # the image's own pixels
    assert r.prompt in text and "Small right pleural effusion. No pneumothorax." in text
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:  # the stored image, as it is
        assert im.size == (512, 512) and im.tobytes() == Image.open(tmp_path / r.images[0]).tobytes()
    assert keep_trace(good_trace(text), r) is None
    # without reference boxes no region is offered: boxes come from the teacher's own reading of the image
    bare = build_messages(rec(boxes=()), tmp_path)[1]["content"][0]["text"]
    assert "- none" in bare and not BOX_RE.search(bare.split("### Reference regions")[1].split("###")[0])
    with pytest.raises(InputError, match="r1: image images/a.tif"):
        build_messages(rec(images=("images/a.tif",)), tmp_path)


def test_identical_prompts_share_one_request(stub, api_key, tmp_path):
    cfg = load_config("coldstart", "tiny", overrides(stub, "good", tmp_path / "cache"))
    before = requests_for(stub, "good")
    a, b, c = rec(rid="a"), rec(rid="b"), rec(rid="c", images=("images/c.png",))  # c: the same text, another image
    n_images = len(httpx.get(f"{stub}/stats", timeout=5).json()["images"])
    out = OpenAITeacher(cfg, log=lambda line: None)([a, b, c], image_root(tmp_path, a, c))
    assert requests_for(stub, "good") - before == 2
    assert out[0] == out[1] and out[0][1] is None and keep_trace(out[0][0], a) is None
    assert httpx.get(f"{stub}/stats", timeout=5).json()["images"][n_images:] == [[[512, 512]], [[512, 512]]]


def test_response_cleanup_and_url_redaction():
    assert clean_response("```text\n<think> a </think> \\boxed{b}\n```") == "<think> a </think> \\boxed{b}"
    assert clean_response("  <think> a </think> \\boxed{b}\n") == "<think> a </think> \\boxed{b}"
    assert redact_url("https://user:pw@host:8443/v1") == "https://host:8443/v1"
    assert redact_url("http://127.0.0.1:9/v1") == "http://127.0.0.1:9/v1"


# ---------------------------------------------------------------- the filter, reason by reason

def T(steps: str, answer: str) -> str:  # noqa: N802 - a trace
    return f"<think> {steps} </think> The answer is: \\boxed{{{answer}}}"


GOOD_STEP = "a meniscus-shaped opacity at the right base with [200, 200, 400, 400]"


def test_filter_keeps_a_good_trace():
    assert keep_trace(T(GOOD_STEP, "yes"), rec()) is None
    assert keep_trace(T(GOOD_STEP, "Yes"), rec()) is None  # the reward's matcher ignores case


def test_filter_grammar():
    assert keep_trace("The answer is yes, there is an effusion.", rec()) == "grammar"
    assert keep_trace(f"<think> {GOOD_STEP} The answer is: \\boxed{{yes}}", rec()) == "grammar"
    assert keep_trace(f"<think> {GOOD_STEP} </think> The answer is: yes", rec()) == "grammar"


def test_filter_answer_short_list_and_long():
    assert keep_trace(T(GOOD_STEP, "no"), rec()) == "answer"
    lst = rec(answer="pleural effusion | cardiomegaly")
    assert keep_trace(T(GOOD_STEP, "cardiomegaly | pleural effusion"), lst) is None  # items as a set
    assert keep_trace(T(GOOD_STEP, "pleural effusion"), lst) == "answer"
    report = rec(task="report_impression", answer="Small right pleural effusion. No pneumothorax or consolidation.")
    assert keep_trace(T(GOOD_STEP, report.answer), report) is None
    assert keep_trace(T(GOOD_STEP, "Small right pleural effusion. No pneumothorax or consolidation"),
                      report) is None  # near-verbatim
    assert keep_trace(T(GOOD_STEP, "Normal heart size, clear lungs, no acute disease."), report) == "answer"


def test_filter_box_outside_image():
    assert keep_trace(T("an opacity with [200, 200, 600, 400]", "yes"), rec()) == "box_outside_image"
    assert keep_trace(T("an opacity with [300, 200, 300, 400]", "yes"), rec()) == "box_outside_image"
    small = rec(size=256, boxes=((100, 100, 200, 200),))  # boxes are the image's own pixels: [200 .. 400] is out
    assert keep_trace(T(GOOD_STEP, "yes"), small) == "box_outside_image"


def test_filter_box_no_overlap():
    assert keep_trace(T("an opacity at the apex with [0, 0, 50, 50]", "yes"), rec()) == "box_no_overlap"
    assert keep_trace(T(f"{GOOD_STEP}; and at the apex with [0, 0, 50, 50]", "yes"), rec()) == "box_no_overlap"
    assert keep_trace(T("a meniscus-shaped opacity at the right base", "yes"), rec()) == "box_no_overlap"
    small = T("a small opacity with [200, 200, 260, 260]", "yes")  # IoU 0.09 with the reference
    assert keep_trace(small, rec()) == "box_no_overlap"
    assert keep_trace(small, rec(), iou_min=0.05) is None
    # no reference boxes: a box the teacher read off the image, inside it, will do
    assert keep_trace(T("the lungs with [64, 64, 448, 448]", "yes"), rec(boxes=())) is None


def test_filter_too_short_and_too_long():
    short = T("clear", "yes")
    assert keep_trace(short, rec(boxes=())) is None
    assert keep_trace(short, rec(boxes=()), min_chars=len(short) + 1) == "too_short"
    long_ = T("; ".join([GOOD_STEP] * 40), "yes")
    assert len(long_) > 2000
    assert keep_trace(long_, rec()) is None
    assert keep_trace(long_, rec(), max_chars=2000) == "too_long"


def test_filter_duplicate():
    seen: set = set()
    assert keep_trace(T(GOOD_STEP, "yes"), rec(), seen=seen) is None
    assert keep_trace(T(GOOD_STEP, "yes"), rec(rid="r2"), seen=seen) == "duplicate"
    assert keep_trace("  " + T(GOOD_STEP.upper(), "YES"), rec(rid="r3"), seen=seen) == "duplicate"
    # the same text for another image or another question is another training example
    assert keep_trace(T(GOOD_STEP, "yes"), rec(rid="r4", images=("images/b.png",)), seen=seen) is None
    assert keep_trace(T(GOOD_STEP, "yes"), rec(rid="r5", prompt="Any effusion?"), seen=seen) is None
    # a dropped trace does not enter the seen set
    assert keep_trace(T(GOOD_STEP, "no"), rec(rid="r6"), seen=seen) == "answer"
    assert len(seen) == 3
