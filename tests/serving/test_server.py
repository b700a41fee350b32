"""The KServe model server as a real process: v1, v2 and the OpenAI route (with the real ``openai`` client), on a
tiny Qwen2.5-VL taught one grounded answer; limits, the bearer token, overload and recovery on a second server."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fx_serving as fx
import openai
import psutil
import pytest
import requests
from PIL import Image

from deepmedix import grounding
from serving.local import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120
W, H = 300, 200
TAUGHT_BOX = fx.FRAME.from_frame(fx.TAUGHT_BOX_FRAME, W, H)  # the 300x200 image's frame is 224x140


class Server:
    """``python -m serving.server`` on 127.0.0.1 with its stderr in a log file."""

    def __init__(self, model: str | Path | None, log_dir: Path, *args: str, name: str = "deepmedix",
                 env: dict | None = None, cli: bool = False, module: str | None = None):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}-{self.port}.log"
        full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                        **(env or {}))
        with open(self.log, "wb") as err:
            if module is not None:  # another server (the transformer): its own arguments
                cmd = [sys.executable, "-m", module, *args, "--port", str(self.port), "--host", "127.0.0.1"]
            else:
                cmd = [sys.executable, "-m", *(("deepmedix.cli", "serve") if cli else ("serving.server",)),
                       "--model", str(model), "--port", str(self.port), "--host", "127.0.0.1", "--name", name, *args]
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=err)
        self.wait_ready()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def wait_ready(self) -> None:
        deadline = time.time() + READY_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}\n--- log ---\n{self.tail()}")
            try:
                r = requests.get(f"{self.url}/v1/models/{self.name}", timeout=2)
                if r.status_code == 200 and r.json().get("ready"):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"server not ready after {READY_TIMEOUT_S} s\n--- log ---\n{self.tail()}")

    def post(self, path: str, body, **kw) -> requests.Response:
        return requests.post(f"{self.url}{path}", json=body, timeout=kw.pop("timeout", 120), **kw)

    def predict(self, body, **kw) -> requests.Response:
        return self.post(f"/v1/models/{self.name}:predict", body, **kw)

    def metric(self, name: str, **labels) -> float:
        """The summed value of one Prometheus sample from /metrics (0 if absent)."""
        total = 0.0
        for line in requests.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, lab = head.partition("{")
            if metric == name and all(f'{k}="{v}"' in lab for k, v in labels.items()):
                total += float(value)
        return total

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        stop_process(self.proc, 20)


@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> Path:
    return fx.taught_model(tmp_path_factory.mktemp("model") / "taught")


@pytest.fixture(scope="module")
def server(taught, tmp_path_factory):
    srv = Server(taught, tmp_path_factory.mktemp("logs"), "--max-new-tokens", "64", "--max-batch-size", "8",
                 "--max-wait-ms", "20", "--max-image-bytes", "2000000", "--max-pixels", "4000000")
    yield srv
    srv.stop()


def chat_image(b64: str, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64}"}}


def assert_taught_grounding(g: dict, width: int = W, height: int = H) -> None:
    box = fx.FRAME.from_frame(fx.TAUGHT_BOX_FRAME, width, height)
    assert g["answer"] == "cardiomegaly" and g["format_ok"] is True
    assert g["image_size"] == [width, height]
    assert g["steps"] == [{"text": "the heart with [28, 56, 84, 112] is enlarged", "boxes": [box], "views": [0]}]
    assert g["boxes"] == [box] and g["box_views"] == [0]
    assert g["views"] == [{"image_size": [width, height], "boxes": [box]}]


TWO_VIEWS = ((300, 200, 1), (200, 300, 4))  # fx.PROBES_TWO[0]: a landscape and a portrait view


def assert_two_view_grounding(g: dict, views=TWO_VIEWS) -> None:
    """Each box of ``fx.TAUGHT_TWO`` in the pixels of the view its step names: the heart on the first view, the
    effusion on the second, each mapped back through that view's own frame."""
    sizes = [[w, h] for w, h, _ in views]
    boxes = [fx.FRAME.from_frame(b, *size) for b, size in zip(fx.TAUGHT_TWO_BOXES_FRAME, sizes)]
    assert g["answer"] == "cardiomegaly | effusion" and g["format_ok"] is True
    assert g["image_sizes"] == sizes and g["image_size"] == sizes[0]
    assert g["boxes"] == boxes and g["box_views"] == [0, 1]
    assert [s["views"] for s in g["steps"]] == [[0], [1]]
    assert g["views"] == [{"image_size": sizes[0], "boxes": [boxes[0]]}, {"image_size": sizes[1], "boxes": [boxes[1]]}]
    # the same frame numbers land on different pixels in the two views (their frames differ)
    assert fx.FRAME.size(*sizes[0]) != fx.FRAME.size(*sizes[1])
    assert boxes[1] != fx.FRAME.from_frame(fx.TAUGHT_TWO_BOXES_FRAME[1], *sizes[0])


def test_a_served_box_lands_on_the_pixels_its_training_target_came_from(server, taught):
    """The server's frame is the one training writes targets in: a record whose box is what the server returned
    (original pixels of a non-square image) has, as its stage-1 target, exactly the box tokens the model emitted."""
    from deepmedix.data.records import plain_target
    from deepmedix.data.schema import Box, Record
    from deepmedix.model.processor import folder_frame

    train_frame = folder_frame(taught, "native")  # what sft/grpo bind (Loaded.frame) for this folder
    assert train_frame == fx.FRAME
    for width, height in ((W, H), (100, 400), (640, 480)):
        r = requests.post(f"{server.url}/v1/models/deepmedix:predict", timeout=120, json={"instances": [
            {"image": fx.png_b64(width, height), "question": fx.QUESTIONS[0]}]})
        (served,) = r.json()["predictions"][0]["grounding"]["boxes"]
        rec = Record(record_id="r", patient_id="p", study_id="s", source="x", images=["a.png"],
                     image_sizes=[[width, height]], task="grounding", prompt="Where?", answer="cardiomegaly",
                     split="train", boxes=[Box("cardiomegaly", served)]).validate()
        assert plain_target(rec, train_frame) == "cardiomegaly " + grounding.box_str(fx.TAUGHT_BOX_FRAME)
        assert served != pytest.approx(grounding.Frame.parse("square512").from_frame(fx.TAUGHT_BOX_FRAME, width,
                                                                                      height))


# ---------------------------------------------------------------- the OpenAI route, with the openai client

def test_openai_client_gets_a_grounded_answer(server):
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["deepmedix"]
    resp = client.chat.completions.create(
        model="deepmedix", max_tokens=64, temperature=0,
        messages=[{"role": "system", "content": "You are a radiologist."},
                  {"role": "user", "content": [chat_image(fx.png_b64(W, H)),
                                               {"type": "text", "text": fx.QUESTIONS[0]}]}],
        extra_body={"overlay": True})
    choice = resp.choices[0]
    assert choice.message.content == fx.TAUGHT and choice.finish_reason == "stop"
    assert resp.usage.completion_tokens > 10 and resp.usage.prompt_tokens > 10
    g = choice.model_extra["grounding"]
    assert TAUGHT_BOX == pytest.approx([37.5, 80, 112.5, 160])
    overlay = Image.open(io.BytesIO(base64.b64decode(g.pop("overlay_png"))))
    assert_taught_grounding(g)
    assert overlay.format == "PNG" and overlay.size == (W, H)
    assert overlay.convert("RGB").getpixel((75, 80)) == (255, 0, 0)  # top edge of the (red) first box


def test_openai_streaming(server):
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="deepmedix", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": fx.QUESTIONS[1]},
                                               chat_image(fx.png_b64(W, H, seed=3))]}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == fx.TAUGHT
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 5  # token by token, not one block
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == "stop"
    assert_taught_grounding(last.choices[0].model_extra["grounding"])
    assert chunks[-1].usage.completion_tokens > 10


@pytest.mark.parametrize("content, param", [
    ([{"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}, {"type": "text", "text": "q"}],
     "messages[0].content[0].image_url.url"),
    ([{"type": "text", "text": "no image"}], "messages[0].content"),
    ([chat_image(base64.b64encode(b"not an image").decode()), {"type": "text", "text": "q"}],
     "messages[0].content[0].image_url.url"),
    ([chat_image("%%%"), {"type": "text", "text": "q"}], "messages[0].content[0].image_url.url"),
    ([{"type": "audio", "x": 1}], "messages[0].content[0].type"),
])
def test_openai_bad_requests_are_400_naming_the_field(server, content, param):
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="deepmedix", messages=[{"role": "user", "content": content}])
    assert err.value.status_code == 400
    assert param in err.value.message and err.value.body["param"] == param


def test_openai_unknown_model_and_multi_turn(server):
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)
    user = {"role": "user", "content": [chat_image(fx.png_b64(32, 32)), {"type": "text", "text": "q"}]}
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[user])
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]\.role: multi-turn"):
        client.chat.completions.create(model="deepmedix", messages=[user, {"role": "assistant", "content": "x"}, user])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="deepmedix", messages=[user], max_tokens=10**6)


# ---------------------------------------------------------------- v1 and v2

def test_v1_grounded_in_each_images_pixels(server):
    dcm = fx.make_dicom(fx.dicom_pixels())
    r = server.predict({"instances": [
        {"image": fx.png_b64(W, H), "question": fx.QUESTIONS[0]},
        {"image": "data:image/png;base64," + fx.png_b64(640, 480, seed=5), "question": fx.QUESTIONS[2],
         "overlay": True},
        {"image": base64.b64encode(dcm).decode(), "question": fx.QUESTIONS[3]},
        {"image": fx.png_b64(W, H), "question": fx.QUESTIONS[0], "max_new_tokens": 5}]})
    assert r.status_code == 200, r.text
    p = r.json()["predictions"]
    assert [x["text"] for x in p[:3]] == [fx.TAUGHT] * 3
    assert_taught_grounding(p[0]["grounding"])
    assert_taught_grounding(p[1]["grounding"], 640, 480)
    assert_taught_grounding(p[2]["grounding"], 320, 240)  # DICOM: Columns x Rows
    assert "overlay_png" in p[1] and "overlay_png" not in p[0]
    assert Image.open(io.BytesIO(base64.b64decode(p[1]["overlay_png"]))).size == (640, 480)
    # a smaller budget in the same batch: the first 5 tokens of the same answer
    assert p[3]["usage"]["completion_tokens"] == 5 and p[3]["finish_reason"] == "length"
    assert fx.TAUGHT.startswith(p[3]["text"]) and p[3]["grounding"]["format_ok"] is False


def test_v2_bytes_tensors(server):
    body = {"id": "req-1", "parameters": {"max_new_tokens": 64},
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                        "data": [fx.png_b64(W, H), fx.png_b64(100, 400, seed=2)]},
                       {"name": "text", "datatype": "BYTES", "shape": [2], "data": list(fx.QUESTIONS[:2])}]}
    r = server.post(f"/v2/models/{server.name}/infer", body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "req-1" and out["text"]["data"] == [fx.TAUGHT, fx.TAUGHT]
    assert out["text"]["datatype"] == "BYTES" and out["text"]["shape"] == [2]
    assert_taught_grounding(json.loads(out["grounding"]["data"][0]))
    assert_taught_grounding(json.loads(out["grounding"]["data"][1]), 100, 400)


# ---------------------------------------------------------------- several views of one study in one query

def test_two_views_v1_each_box_in_its_views_pixels_with_one_view_queries_in_the_same_batch(server):
    """A two-view query (``image`` as a list) and a one-view query in one request, and another request at the same
    time: the batcher runs them in one generate, the two-view answer grounds a box in each view's pixels, and the
    overlay shows the views side by side with each box on its own view."""
    two = [fx.png_b64(w, h, seed) for w, h, seed in TWO_VIEWS]
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(server.predict, {"instances": [{"images": [fx.png_b64(640, 480, 6),
                                                                        fx.png_b64(480, 640, 9)],
                                                             "question": fx.QUESTIONS[0], "max_new_tokens": 96}]})
        r = server.predict({"instances": [
            {"image": two, "question": fx.QUESTIONS[1], "max_new_tokens": 96, "overlay": True},
            {"image": fx.png_b64(W, H), "question": fx.QUESTIONS[0]}]})
        o = other.result()
    assert r.status_code == 200 and o.status_code == 200, (r.text, o.text)
    p = r.json()["predictions"]
    assert p[0]["text"] == fx.TAUGHT_TWO and p[1]["text"] == fx.TAUGHT
    assert_two_view_grounding(p[0]["grounding"])
    assert_taught_grounding(p[1]["grounding"])
    assert_two_view_grounding(o.json()["predictions"][0]["grounding"], ((640, 480, 6), (480, 640, 9)))
    overlay = Image.open(io.BytesIO(base64.b64decode(p[0]["overlay_png"]))).convert("RGB")
    assert overlay.size == (300 + 133, 200)  # the portrait view scaled to the first one's height
    heart, effusion = p[0]["grounding"]["boxes"]  # top edges, right of each step's label
    assert overlay.getpixel((round(heart[2]) - 4, round(heart[1]) + 1)) == (255, 0, 0)
    ex = 300 + round(effusion[2] * 200 / 300) - 4
    assert overlay.getpixel((ex, round(effusion[1] * 200 / 300) + 1)) == (0, 200, 0)  # second box, second colour


def test_two_views_v2_and_openai(server):
    """The same study through v2 (``image`` of shape [queries, views]) and the OpenAI route (two ``image_url``
    parts, with the real client)."""
    two = [fx.png_b64(w, h, seed) for w, h, seed in TWO_VIEWS]
    body = {"parameters": {"max_new_tokens": 96},
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 2], "data": two},
                       {"name": "text", "datatype": "BYTES", "shape": [1], "data": [fx.QUESTIONS[1]]}]}
    r = server.post(f"/v2/models/{server.name}/infer", body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["text"]["data"] == [fx.TAUGHT_TWO] and out["text"]["shape"] == [1]
    assert_two_view_grounding(json.loads(out["grounding"]["data"][0]))
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(model="deepmedix", max_tokens=96, messages=[
        {"role": "user", "content": [chat_image(two[0]), chat_image(two[1]),
                                     {"type": "text", "text": fx.QUESTIONS[1]}]}])
    assert resp.choices[0].message.content == fx.TAUGHT_TWO
    assert_two_view_grounding(resp.choices[0].model_extra["grounding"])
    with pytest.raises(openai.BadRequestError, match=r"5 images, over the limit of 4 views"):
        client.chat.completions.create(model="deepmedix", messages=[
            {"role": "user", "content": [chat_image(two[0])] * 5 + [{"type": "text", "text": "q"}]}])


@pytest.mark.parametrize("inputs, field", [
    ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["IMAGE"]}], "no input named 'text'"),
    ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["IMAGE"]},
      {"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}], "inputs[1] (text): datatype FP32"),
    ([{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["IMAGE", "QUJD"]},
      {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["q"]}], "inputs[0] (image).data[1]"),
    ([{"name": "image", "datatype": "BYTES", "shape": [3], "data": ["IMAGE"]},
      {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["q"]}], "shape [3] holds 3 values but 1"),
])
def test_v2_bad_input_names_the_tensor(server, inputs, field):
    img = fx.png_b64(32, 32)
    for t in inputs:
        t["data"] = [img if v == "IMAGE" else v for v in t["data"]]
    r = server.post(f"/v2/models/{server.name}/infer", {"inputs": inputs})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]


@pytest.mark.parametrize("instances, field", [
    ([{"image": "IMAGE"}], "instances[0].question"),
    ([{"image": "IMAGE", "question": "q"}, {"image": "not base64 !!", "question": "q"}], "instances[1].image"),
    ([{"image": base64.b64encode(b"these bytes are not an image").decode(), "question": "q"}], "instances[0].image"),
    ([{"question": "q"}], "instances[0].image"),
    ([{"image": "IMAGE", "question": "q", "max_new_tokens": "many"}], "instances[0].max_new_tokens"),
    ([{"image": "IMAGE", "question": "q", "temperature": -1}], "instances[0].temperature"),
    ([{"image": "IMAGE", "question": "q"}] * 17, "over the limit of 16"),
    ([], "instances"),
])
def test_v1_bad_input_is_400_naming_the_field(server, instances, field):
    img = fx.png_b64(32, 32)
    instances = [{k: (img if v == "IMAGE" else v) for k, v in inst.items()} for inst in instances]
    r = server.predict({"instances": instances})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb's signature) with a tiny body."""
    import struct
    import zlib

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("payload, message", [
    (_png_with_size(50_000, 50_000), "over the limit of 4000000 pixels"),
    (_png_with_size(2_500, 2_000), "2500x2000 pixels, over the limit of 4000000 pixels"),
    (fx.png_bytes(64, 64)[:80], "not a decodable PNG, JPEG or DICOM"),
    (b"\x00" * 128 + b"DICM" + b"\x00" * 64, "instances[0].image"),
    (b"GIF89a" + b"\x00" * 64, "not a decodable PNG, JPEG or DICOM"),
    (b"\xff" * 2_100_000, "limit of 2000000 bytes"),
])
def test_hostile_images_are_refused_before_generation(server, payload, message):
    before = server.metric("deepmedix_batch_size_count")
    r = server.predict({"instances": [{"image": base64.b64encode(payload).decode(), "question": "q"}]})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"] and "instances[0].image" in r.json()["error"]
    assert server.metric("deepmedix_batch_size_count") == before


def test_concurrent_requests_share_a_generate_and_metrics_count_them(server):
    before = {k: server.metric(k) for k in ("deepmedix_batch_size_count", "deepmedix_batch_size_sum",
                                            "deepmedix_generated_tokens_total")}
    ok_before = server.metric("deepmedix_requests_total", route="v1_predict", code="200")
    body = {"instances": [{"image": fx.png_b64(W, H, seed=7), "question": fx.QUESTIONS[0]}]}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: server.predict(body), range(8)))
    assert all(r.status_code == 200 for r in results)
    assert all(r.json()["predictions"][0]["text"] == fx.TAUGHT for r in results)
    batches = server.metric("deepmedix_batch_size_count") - before["deepmedix_batch_size_count"]
    queries = server.metric("deepmedix_batch_size_sum") - before["deepmedix_batch_size_sum"]
    assert queries == 8 and batches < 8, f"8 queries in {batches} generate calls"
    tokens = server.metric("deepmedix_generated_tokens_total") - before["deepmedix_generated_tokens_total"]
    assert tokens == 8 * results[0].json()["predictions"][0]["usage"]["completion_tokens"]
    assert server.metric("deepmedix_requests_total", route="v1_predict", code="200") == ok_before + 8
    assert server.metric("deepmedix_request_duration_seconds_count", route="v1_predict") >= 8


def test_binds_requested_host(server):
    tcp = Path("/proc/net/tcp")
    if not tcp.exists():
        pytest.skip("no /proc/net/tcp")
    listening = [line.split()[1] for line in tcp.read_text().splitlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{server.port:04X}" in listening  # 127.0.0.1, not 0.0.0.0


# ---------------------------------------------------------------- fuzzing from the OpenAPI document

def test_schemathesis_malformed_requests_never_5xx_and_memory_stays_bounded(server):
    """At least 1,000 requests generated from the server's own OpenAPI document (negative mode: each violates
    the schema; positive mode: schema-valid, with random strings where the images go) get no 5xx. The server's
    resident memory stays bounded across them and a burst of real generations. (Malformed bodies that are not
    JSON, and valid requests with random fields, have their own tests below.)"""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.generation.modes import GenerationMode

    warm = {"instances": [{"image": fx.png_b64(W, H), "question": fx.QUESTIONS[0]}]}
    for _ in range(3):
        assert server.predict(warm).status_code == 200
    rss0 = server.rss_mb()
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    counts, server_errors = {}, []
    for result in schema.get_all_operations():
        op = result.ok()
        is_post = op.method.upper() == "POST"
        for mode, n in ((GenerationMode.NEGATIVE, 260 if is_post else 40),
                        (GenerationMode.POSITIVE, 90 if is_post else 5)):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=n, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case):
                r = case.call(base_url=server.url, timeout=120)
                counts[r.status_code] = counts.get(r.status_code, 0) + 1
                if r.status_code >= 500:
                    # run() is called within this iteration, so op and mode are this iteration's
                    server_errors.append(f"{op.label} {mode.value} -> {r.status_code}: {r.text[:200]} "  # noqa: B023
                                         f"body={str(case.body)[:200]}")
            try:
                run()
            except Exception as exc:  # an operation with nothing to negate (no body, no parameters)
                if "Unsatisfiable" not in type(exc).__name__:
                    raise
    total = sum(counts.values())
    print(f"schemathesis: {total} requests, status codes {dict(sorted(counts.items()))}")
    assert total >= 1000, counts
    assert not server_errors, "\n".join(server_errors[:10])
    with ThreadPoolExecutor(8) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda _: server.predict(warm), range(24)))
    growth = server.rss_mb() - rss0
    print(f"server RSS {rss0:.0f} MB -> {rss0 + growth:.0f} MB")
    assert growth < 150, f"RSS grew by {growth:.0f} MB over {total} requests"


DEEP = b"[" * 100_000
LONG_INT = b"9" * 5000


@pytest.mark.parametrize("path", ["/v1/models/deepmedix:predict", "/v2/models/deepmedix/infer",
                                  "/openai/v1/chat/completions"])
@pytest.mark.parametrize("body", [
    DEEP, b'{"a": ' + LONG_INT + b"}", b"\xff\xfe\x00garbage", b"", b"null", b'"text"', b"[1, 2]",
    b'{"instances": [{"image": "x", "question": "q", "max_new_tokens": ' + LONG_INT + b"}]}",
    b'{"model": "deepmedix", "messages": [], "temperature": 1' + b"0" * 400 + b"}",
    b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1, -1], "data": ["x"]}], '
    b'"parameters": {"temperature": 1' + b"0" * 400 + b"}}",
], ids=["deep", "long-int", "not-utf8", "empty", "null", "string", "list", "v1-long-int", "chat-huge-temp",
        "v2-negative-shape"])
def test_malformed_bodies_are_4xx(server, path, body):
    r = requests.post(server.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])


def test_binary_tensor_extension_and_repository_routes_are_refused(server):
    r = requests.post(f"{server.url}/v2/models/deepmedix/infer", data=b'{"inputs": []}' + fx.png_bytes(8, 8),
                      headers={"Inference-Header-Content-Length": "14", "Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and "base64" in r.json()["error"]
    r = requests.post(f"{server.url}/v2/repository/models/deepmedix/unload", timeout=10)
    assert r.status_code == 403
    assert server.predict({"instances": [{"image": fx.png_b64(), "question": fx.QUESTIONS[0]}]}).status_code == 200


def test_valid_requests_with_random_fields_are_answered(server):
    """Schema-valid requests with real images and random questions, budgets and decoding settings all go
    through generation and come back 200 with a well-formed grounding."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)
    seen = []

    @given(question=st.text(min_size=1, max_size=120).filter(str.strip), budget=st.integers(1, 12),
           temperature=st.sampled_from([0, 0.7, 2]), top_p=st.floats(0.05, 1), overlay=st.booleans(),
           size=st.tuples(st.integers(1, 700), st.integers(1, 700)), use_chat=st.booleans())
    @settings(max_examples=30, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(question, budget, temperature, top_p, overlay, size, use_chat):
        img = fx.png_b64(*size)
        if use_chat:
            resp = client.chat.completions.create(
                model="deepmedix", max_tokens=budget, temperature=temperature, top_p=top_p,
                messages=[{"role": "user", "content": [chat_image(img), {"type": "text", "text": question}]}],
                extra_body={"overlay": overlay})
            g, n = resp.choices[0].model_extra["grounding"], resp.usage.completion_tokens
            assert ("overlay_png" in g) == overlay
        else:
            r = server.predict({"instances": [{"image": img, "question": question, "max_new_tokens": budget,
                                               "temperature": temperature, "top_p": top_p, "overlay": overlay}]})
            assert r.status_code == 200, r.text
            pred = r.json()["predictions"][0]
            g, n = pred["grounding"], pred["usage"]["completion_tokens"]
            assert ("overlay_png" in pred) == overlay
        assert g["image_size"] == list(size) and 1 <= n <= budget
        for x1, y1, x2, y2 in g["boxes"]:
            assert 0 <= min(x1, x2) and max(x1, x2) <= size[0] and 0 <= min(y1, y2) and max(y1, y2) <= size[1]
        seen.append(n)

    run()
    assert len(seen) == 30


def test_stream_client_leaving_early_does_not_hurt_the_server(server):
    body = {"model": "deepmedix", "stream": True, "max_tokens": 64, "messages": [
        {"role": "user", "content": [chat_image(fx.png_b64()), {"type": "text", "text": fx.QUESTIONS[0]}]}]}
    with requests.post(f"{server.url}/openai/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first[len(b"data: "):])["object"] == "chat.completion.chunk"
    # gone after one event; the server goes on answering
    r = server.predict({"instances": [{"image": fx.png_b64(), "question": fx.QUESTIONS[0]}]})
    assert r.status_code == 200 and r.json()["predictions"][0]["text"] == fx.TAUGHT


# ---------------------------------------------------------------- a strict server: token, small queue, timeout

@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """Random-init tiny model (it never stops early), one query per batch, 2 waiting at most, 2 s timeout,
    a bearer token and a 300 kB body limit."""
    from deepmedix.model.tiny import build_tiny

    d = tmp_path_factory.mktemp("strict")
    model = build_tiny(d / "tiny")
    (d / "token").write_text("s3cret-token\n")
    srv = Server(model, d, "--max-batch-size", "1", "--max-queue", "2", "--request-timeout-s", "2",
                 "--max-new-tokens", "8", "--max-new-tokens-limit", "3500", "--max-request-bytes", "300000",
                 "--api-token-file", str(d / "token"), name="strict")
    srv.auth = {"Authorization": "Bearer s3cret-token"}
    yield srv
    srv.stop()


def test_bearer_token(strict):
    body = {"instances": [{"image": fx.png_b64(32, 32), "question": "q"}]}
    r = strict.predict(body)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer" and "bearer token" in r.json()["error"]
    assert strict.predict(body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert strict.predict(body, headers=strict.auth).status_code == 200
    client = openai.OpenAI(base_url=f"{strict.url}/openai/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    client = openai.OpenAI(base_url=f"{strict.url}/openai/v1", api_key="s3cret-token", max_retries=0)
    assert client.models.list().data[0].id == "strict"
    # probes and the scraper need no token
    for path in ("/", "/v1/models/strict", "/v2/health/ready", "/metrics"):
        assert requests.get(strict.url + path, timeout=10).status_code == 200, path
    assert strict.metric("deepmedix_rejected_total", reason="unauthorized") >= 3


def test_body_limit_is_413(strict):
    big = {"instances": [{"image": base64.b64encode(os.urandom(400_000)).decode(), "question": "q"}]}
    r = strict.predict(big, headers=strict.auth)
    assert r.status_code == 413 and "over the limit of 300000" in r.json()["error"]
    # chunked upload (no Content-Length) is counted as it streams in
    data = json.dumps(big).encode()
    r = requests.post(f"{strict.url}/v1/models/strict:predict", data=iter([data[i:i + 65536] for i in
                                                                          range(0, len(data), 65536)]),
                      headers={**strict.auth, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413


def test_overload_gets_429_and_503_with_retry_after_then_recovers(strict):
    long = {"instances": [{"image": fx.png_b64(64, 64), "question": "q", "max_new_tokens": 3400}]}
    rss0 = strict.rss_mb()
    results, lock = {}, threading.Lock()

    def send(key):
        r = strict.predict(long, headers=strict.auth, timeout=60)
        with lock:
            results[key] = r

    threads = [threading.Thread(target=send, args=(k,)) for k in ("running", "queued1", "queued2")]
    threads[0].start()
    time.sleep(0.5)  # the first is generating (one per batch); the next two wait in the queue (its limit)
    threads[1].start()
    threads[2].start()
    time.sleep(0.5)
    refused = strict.predict(long, headers=strict.auth)
    # refused at once: before any of the three (answered at the earliest by their 2 s timeout) has its answer
    assert not results and all(t.is_alive() for t in threads), "a full queue must refuse at once"
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1 and "retry later" in refused.json()["error"]
    for t in threads:
        t.join(60)
    # 2 s timeout, each generation takes longer: all three get 503 + Retry-After
    assert [results[k].status_code for k in ("running", "queued1", "queued2")] == [503, 503, 503]
    assert all(int(results[k].headers["Retry-After"]) >= 1 for k in results)
    assert "request timeout of 2 s" in results["running"].json()["error"]
    # recovery: once the abandoned generations are done, short requests are answered again
    deadline = time.time() + 60
    while True:
        r = strict.predict({"instances": [{"image": fx.png_b64(64, 64), "question": "q"}]}, headers=strict.auth)
        if r.status_code == 200 or time.time() > deadline:
            break
        assert r.status_code in (429, 503), r.text
        time.sleep(0.5)
    assert r.status_code == 200 and r.json()["predictions"][0]["usage"]["completion_tokens"] == 8
    assert strict.metric("deepmedix_rejected_total", reason="queue_full") >= 1
    assert strict.metric("deepmedix_rejected_total", reason="timeout") >= 3
    assert strict.metric("deepmedix_queue_waiting") == 0  # the timed-out queries left the queue
    assert strict.proc.poll() is None
    # a flood of refused and timed-out requests leaves no memory behind
    buf = io.BytesIO()
    Image.new("L", (1500, 1500), 90).save(buf, format="PNG")  # small file, 2.25 MP once decoded
    flood = {"instances": [{"image": base64.b64encode(buf.getvalue()).decode(), "question": "q",
                            "max_new_tokens": 3400, "overlay": True}]}
    with ThreadPoolExecutor(12) as pool:
        codes = [r.status_code for r in pool.map(lambda _: strict.predict(flood, headers=strict.auth, timeout=60),
                                                range(36))]
    assert set(codes) <= {429, 503} and 429 in codes, codes
    growth = strict.rss_mb() - rss0
    print(f"strict server RSS {rss0:.0f} MB -> {rss0 + growth:.0f} MB after {len(codes)} refused requests")
    assert growth < 200, f"RSS grew by {growth:.0f} MB"


# ---------------------------------------------------------------- loading from s3://

def test_deepmedix_serve_a_model_from_s3(taught, tmp_path):
    from conftest import weed_s3

    from deepmedix import store

    with weed_s3(tmp_path / "weed") as s3:
        with store.atomic_dir("s3://models/deepmedix-r1") as d:
            shutil.copytree(taught, d, dirs_exist_ok=True)
        srv = Server("s3://models/deepmedix-r1", tmp_path, "--max-batch-size", "2", name="froms3", cli=True,
                     env={**s3.env, "DEEPMEDIX_CACHE": str(tmp_path / "cache")})  # `deepmedix serve`
        try:
            r = srv.predict({"instances": [{"image": fx.png_b64(W, H), "question": fx.QUESTIONS[0]}]})
            assert r.status_code == 200, r.text
            assert_taught_grounding(r.json()["predictions"][0]["grounding"])
            assert "batch <= 2" in srv.tail()  # the extra option reached the server
        finally:
            srv.stop()


# ---------------------------------------------------------------- the grounding transformer (vLLM runtime's helper)

def test_grounding_transformer_in_front_of_an_openai_predictor(server, tmp_path):
    """The transformer KServe runs in front of the HF/vLLM runtime, here in front of the DeepMedix predictor's
    OpenAI route (the same protocol): it sizes the image for the predictor's processor (native frame, its pixel
    budget), adds the instruction, and grounds the answer in the caller's pixels. KServe's own transformer flags are
    accepted."""
    tr = Server(None, tmp_path, "--model_name", "deepmedix", "--predictor_host", f"127.0.0.1:{server.port}",
                "--predictor_protocol", "v1", "--http_port", "1",  # KServe's flags
                "--frame-min-pixels", str(168 * 168), "--frame-max-pixels", str(168 * 168),  # the predictor's budget
                module="serving.transformer")
    url = tr.url
    try:
        client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key="unused", max_retries=0)
        resp = client.chat.completions.create(model="deepmedix", max_tokens=64, messages=[
            {"role": "user", "content": [chat_image(fx.png_b64(640, 480, seed=11)),
                                         {"type": "text", "text": fx.QUESTIONS[2]}]}])
        assert resp.choices[0].message.content == fx.TAUGHT
        assert_taught_grounding(resp.choices[0].model_extra["grounding"], 640, 480)
        r = requests.post(f"{url}/v1/models/deepmedix:predict", timeout=120, json={"instances": [
            {"image": fx.png_b64(W, H), "question": fx.QUESTIONS[0], "overlay": True},
            {"image": fx.png_b64(100, 400), "question": fx.QUESTIONS[1]}]})
        assert r.status_code == 200, r.text
        p = r.json()["predictions"]
        assert_taught_grounding(p[0]["grounding"])
        assert_taught_grounding(p[1]["grounding"], 100, 400)
        assert Image.open(io.BytesIO(base64.b64decode(p[0]["overlay_png"]))).size == (W, H)
        # two views: the transformer names them (Picture 1, Picture 2) as the HF backend does, and maps each box
        # back through its own view's frame
        two = [fx.png_b64(w, h, seed) for w, h, seed in TWO_VIEWS]
        resp = client.chat.completions.create(model="deepmedix", max_tokens=96, messages=[
            {"role": "user", "content": [chat_image(two[0]), chat_image(two[1]),
                                         {"type": "text", "text": fx.QUESTIONS[1]}]}])
        assert resp.choices[0].message.content == fx.TAUGHT_TWO
        assert_two_view_grounding(resp.choices[0].model_extra["grounding"])
        bad = requests.post(f"{url}/v1/models/deepmedix:predict", json={"instances": [{"question": "q"}]})
        assert bad.status_code == 400 and "instances[0].image" in bad.json()["error"]
        with pytest.raises(openai.BadRequestError, match="stream"):
            client.chat.completions.create(model="deepmedix", stream=True, messages=[
                {"role": "user", "content": [chat_image(fx.png_b64(32, 32)), {"type": "text", "text": "q"}]}])
    finally:
        tr.stop()


def test_frame_calibrate_names_the_frame_a_checkpoint_writes_in(taught, tmp_path):
    """The taught model writes its box in the native frame: on records whose reference box is that box read in
    each image's native frame (non-square images), frame-calibrate finds native with IoU 1 and square512 far off."""
    from typer.testing import CliRunner

    from deepmedix.cli import app
    from deepmedix.data.schema import Box, Record, write_shard

    data = tmp_path / "d"
    (data / "records").mkdir(parents=True)
    (data / "images").mkdir()
    recs = []
    for k, (w, h) in enumerate([(W, H), (100, 400), (640, 480)]):
        fx.image(w, h, seed=k).save(data / "images" / f"{k}.png")
        recs.append(Record(record_id=f"r{k}", patient_id=f"p{k}", study_id=f"s{k}", source="unit",
                           images=[f"images/{k}.png"], image_sizes=[[w, h]], task="grounding",
                           prompt=fx.QUESTIONS[k], answer="cardiomegaly", split="test",
                           boxes=[Box("cardiomegaly", fx.FRAME.from_frame(fx.TAUGHT_BOX_FRAME, w, h))]))
    write_shard(recs, data / "records" / "test-00000.parquet")
    res = CliRunner().invoke(app, ["eval", "frame-calibrate", "--model", str(taught), "--data", str(data),
                                   "--max-new-tokens", "64", "--out", str(tmp_path / "cal.json")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "cal.json").read_text())
    assert rep["best"] == "native" and rep["records"] == 3 and "best fit: frame native" in res.output
    assert rep["results"]["native"]["miou"] > 0.95 and rep["results"]["native"]["acc50"] == 1.0
    assert rep["results"]["square512"]["miou"] < 0.5 and rep["lead_miou"] > 0.45
    bad = CliRunner().invoke(app, ["eval", "frame-calibrate", "--model", str(taught), "--data", str(data),
                                   "--frames", "native,square"])
    assert bad.exit_code == 2 and "--frames" in bad.output
