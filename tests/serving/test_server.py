"""The KServe server as a real subprocess on a tiny random-init model, plus unit tests of the predictor pieces."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from deepmedix.demo import stop_process
from deepmedix.model.tiny import build_tiny
from serving.predictor import DeepMedixModel, build_prediction, draw_overlay

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_b64(width: int = 300, height: int = 200) -> str:
    arr = (np.add.outer(np.arange(height), np.arange(width)) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Server:
    def __init__(self, model_dir: Path, log_dir: Path, name: str = "deepmedix"):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = log_dir / f"{name}-{self.port}.stderr"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.t0 = time.time()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serving.server", "--model", str(model_dir), "--port", str(self.port),
                 "--host", "127.0.0.1", "--name", name, "--max-new-tokens", "24"],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        self.startup_s = None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-6000:]

    def wait_ready(self) -> None:
        deadline = time.time() + READY_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}\n--- stderr ---\n{self.stderr()}")
            try:
                r = requests.get(f"{self.url}/v1/models/{self.name}", timeout=2)
                if r.status_code == 200 and r.json().get("ready"):
                    self.startup_s = time.time() - self.t0
                    print(f"server {self.name} ready in {self.startup_s:.1f} s")
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"server not ready after {READY_TIMEOUT_S} s\n--- stderr ---\n{self.stderr()}")

    def stop(self) -> None:
        stop_process(self.proc, 20)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory, request):
    srv = Server(tiny_model, tmp_path_factory.mktemp("logs"))
    request.addfinalizer(srv.stop)
    srv.wait_ready()
    return srv


def predict(srv: Server, body) -> requests.Response:
    return requests.post(f"{srv.url}/v1/models/{srv.name}:predict", json=body, timeout=120)


# ---------------------------------------------------------------- over HTTP

def test_valid_predict(server):
    img = png_b64(300, 200)
    r = predict(server, {"instances": [{"image": img, "question": "Is the heart enlarged?"},
                                       {"image": img, "question": "Which side?", "max_new_tokens": 4}]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2
    for p in preds:
        assert isinstance(p["text"], str)
        assert "answer" in p and (p["answer"] is None or isinstance(p["answer"], str))
        assert isinstance(p["format_ok"], bool)
        assert isinstance(p["steps"], list) and isinstance(p["boxes"], list)
        assert p["image_size"] == [300, 200]
        for step in p["steps"]:
            assert isinstance(step["text"], str) and isinstance(step["boxes"], list)
        for x1, y1, x2, y2 in p["boxes"]:
            assert 0 <= x1 <= 300 and 0 <= x2 <= 300 and 0 <= y1 <= 200 and 0 <= y2 <= 200


@pytest.mark.parametrize("instances, field", [
    ([{"image": "IMAGE"}], "instances[0].question"),
    ([{"image": "IMAGE", "question": "q"}, {"image": "not base64 !!", "question": "q"}], "instances[1].image"),
    ([{"image": base64.b64encode(b"these bytes are not an image").decode(), "question": "q"}], "instances[0].image"),
    ([{"question": "q"}], "instances[0].image"),
    ([{"image": "IMAGE", "question": "q", "max_new_tokens": "many"}], "instances[0].max_new_tokens"),
    ([], "instances"),
])
def test_bad_input_is_400_naming_the_field(server, instances, field):
    img = png_b64(32, 32)
    instances = [{k: (img if v == "IMAGE" else v) for k, v in inst.items()} for inst in instances]
    r = predict(server, {"instances": instances})
    assert 400 <= r.status_code < 500, r.text
    assert field in r.json()["error"]


def test_missing_instances_and_non_object_body(server):
    for body in ({}, [1, 2], {"instances": "x"}):
        r = predict(server, body)
        assert r.status_code == 400, r.text
        assert "instances" in r.json()["error"] or "request body" in r.json()["error"]


def test_binds_requested_host(server):
    tcp = Path("/proc/net/tcp")
    if not tcp.exists():
        pytest.skip("no /proc/net/tcp")
    listening = [line.split()[1] for line in tcp.read_text().splitlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{server.port:04X}" in listening  # 127.0.0.1, not 0.0.0.0


def test_second_server_alongside(server, tiny_model, tmp_path):
    """gRPC is off, so a second server on the same machine does not collide on 8081."""
    other = Server(tiny_model, tmp_path, name="second")
    try:
        other.wait_ready()
        r = predict(other, {"instances": [{"image": png_b64(64, 48), "question": "q", "max_new_tokens": 2}]})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["image_size"] == [64, 48]
    finally:
        other.stop()
    assert requests.get(f"{server.url}/v1/models/{server.name}", timeout=5).status_code == 200


# ---------------------------------------------------------------- in process

def test_box_conversion_from_frame():
    raw = r"<think> heart with [0, 0, 256, 512] </think> The answer is: \boxed{yes}"
    p = build_prediction(raw, 300, 200, frame=512)
    assert p["boxes"] == [[0, 0, 150, 200]]
    assert p["steps"] == [{"text": "heart with [0, 0, 256, 512]", "boxes": [[0, 0, 150, 200]]}]
    assert p["answer"] == "yes" and p["format_ok"] is True
    assert p["image_size"] == [300, 200] and p["text"] == raw


def test_size_limits_checked_before_generation():
    m = DeepMedixModel("m", "/nonexistent", max_pixels=300 * 200 - 1, max_image_bytes=10_000_000)
    with pytest.raises(Exception, match=r"instances\[0\]\.image: 300x200 pixels"):
        m.decode_instances({"instances": [{"image": png_b64(300, 200), "question": "q"}]})
    m = DeepMedixModel("m", "/nonexistent", max_image_bytes=100)
    with pytest.raises(Exception, match=r"instances\[0\]\.image: .*limit of 100"):
        m.decode_instances({"instances": [{"image": png_b64(300, 200), "question": "q"}]})


def test_sixteen_bit_and_data_url_images_decode():
    arr = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    images, questions, budgets = DeepMedixModel("m", "/x").decode_instances(
        {"instances": [{"image": data_url, "question": " q "}]})
    assert images[0].mode == "RGB" and images[0].size == (40, 30)
    assert np.asarray(images[0]).max() == 255 and questions == ["q"] and budgets == [256]


def test_draw_overlay(tmp_path):
    img = Image.new("L", (300, 200), 0)
    out = draw_overlay(img, [[10, 20, 150, 120]], ["heart"], tmp_path / "o.png")
    drawn = Image.open(out)
    assert drawn.format == "PNG" and drawn.mode == "RGB" and drawn.size == (300, 200)
    assert drawn.getpixel((80, 20)) == (255, 0, 0)  # top edge of the first (red) box
    assert drawn.getpixel((80, 70)) == (0, 0, 0)  # inside stays untouched
