"""The reader study app end to end: a uvicorn subprocess driven by headless Chromium (Debian's ``chromium`` and
``chromium-driver``, through Selenium), then HTTP-level checks of sign-in, CSRF, validation and authorisation, and
the export's numbers against a table computed by hand."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image

from deepmedix.data.records import frame_boxes
from deepmedix.data.schema import load_records
from deepmedix.grounding import Frame, format_output, parse
from deepmedix.reader import ReaderError, create_study, export, make_app
from serving.local import free_port, stop_process, wait_ready

MODELS = {"coldstart": format_output([("there is cardiomegaly in this region", [[184, 217, 396, 296]])],
                                     "right pleural effusion"),
          "grpo": format_output([("the lung fields are clear", [[64, 64, 448, 448]]),
                                 ("there is a nodule in this region", [[300, 200, 400, 300], [90, 100, 200, 180]]),
                                 ("so the answer follows", [])], "left mid lung")}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FRAME = Frame()  # native: the per-image grid the predictions' boxes are in


def write_predictions(data_dir: Path, out: Path, raw: str, n: int) -> Path:
    """A ``predictions.jsonl`` in the evaluation's format (deepmedix.eval.run.predict) for the first n test records."""
    with out.open("w") as f:
        for rec in load_records(data_dir, "test")[:n]:
            p = parse(raw)
            f.write(json.dumps({"record_id": rec.record_id, "task": rec.task, "question_type": rec.question_type,
                                "source": rec.source, "prompt": rec.prompt, "raw_output": raw, "answer": p.answer,
                                "boxes": p.boxes, "format_ok": p.format_ok, "reference": rec.answer,
                                "ref_boxes_frame": frame_boxes(rec, FRAME), "frame": FRAME.spec,
                                "frame_size": list(FRAME.size(*rec.image_sizes[0])),
                                "image_size": rec.image_sizes[0]}) + "\n")
    return out


def new_study(data_dir: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """Two models (one with an extra record: cases are the records both answered), 3 cases, 2 readers."""
    root.mkdir(parents=True, exist_ok=True)
    preds = {m: str(write_predictions(data_dir, root / f"{m}.jsonl", raw, 4 if m == "coldstart" else 3))
             for m, raw in MODELS.items()}
    db = root / "study.db"
    return db, create_study(db, str(data_dir), preds, ["alice", "bob"], n_cases=3, seed=0)


@pytest.fixture(scope="module")
def server(small_data, tmp_path_factory):
    """(base URL, tokens, study db) of a study served by uvicorn in a subprocess."""
    root = tmp_path_factory.mktemp("reader")
    db, tokens = new_study(small_data, root)
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", f"from deepmedix.reader import serve; serve({str(db)!r}, "
                                                   f"port={port})"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/", proc, timeout=60)
        yield url, tokens, db
    finally:
        stop_process(proc)
        log.close()


def ratings(pos: int) -> dict[str, str]:
    """The form values reader 1 gives case ``pos`` in the browser."""
    values = {f"{axis}_{k}": str((pos + k + a) % 5 + 1) for k in (1, 2)
              for a, axis in enumerate(("relevance", "correctness", "completeness"))}
    return {**values, "grounded": ("1", "2", "tie")[pos - 1], "overall": ("tie", "1", "2")[pos - 1]}


def test_browser_sign_in_rate_revisit_and_readers_apart(server, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, tokens, db = server

    def submit(d, button: str, expected: str) -> None:
        """Click a form's submit button and wait for the page it leads to."""
        before = d.find_element(By.TAG_NAME, "html")
        d.find_element(By.ID, button).click()

        def left(_) -> bool:
            # Selenium's staleness_of only catches StaleElementReferenceException, but chromedriver sometimes answers
            # a query on a node of the page being replaced with "unhandled inspector error: Node with given id does
            # not belong to the document" (SeleniumHQ/selenium#15401): that node is just as gone.
            try:
                before.is_enabled()
                return False
            except StaleElementReferenceException:
                return True
            except WebDriverException as e:
                if any(m in (e.msg or "") for m in ("does not belong to the document", "No node with given id")):
                    return True
                raise

        WebDriverWait(d, 10).until(left)
        WebDriverWait(d, 10).until(lambda _: d.execute_script("return document.readyState") == "complete")
        assert d.current_url == url + expected

    def sign_in(d, token: str) -> None:
        d.get(url + "/")
        d.find_element(By.ID, "token").send_keys(token)
        submit(d, "signin-button", "/cases")

    def progress(d) -> str:
        return d.find_element(By.CSS_SELECTOR, "#progress strong").text

    d = browser()
    sign_in(d, tokens["alice"])
    assert d.find_element(By.ID, "reader-name").text == "alice" and progress(d) == "0 / 3"
    d.find_element(By.LINK_TEXT, "Rate").click()
    assert d.current_url == url + "/case/1"
    widths = d.execute_script("return [...document.querySelectorAll('img.overlay')].map(i => i.naturalWidth)")
    assert widths == [512, 512]  # 128-px phantom images, enlarged for reading
    assert "coldstart" not in d.page_source and "grpo" not in d.page_source  # blinded
    assert d.find_element(By.CSS_SELECTOR, "#candidate-1 h2").text == "Candidate 1"
    d.save_screenshot(str(tmp_path / "case.png"))
    page = Image.open(tmp_path / "case.png").convert("RGB")
    assert page.size[0] >= 1000 and len(set(page.getdata())) > 200
    for k in (1, 2):  # each candidate's first box is red (deepmedix.viz.COLORS[0])
        shot = Image.open(io.BytesIO(d.find_element(By.ID, f"overlay-{k}").screenshot_as_png)).convert("RGB")
        reds = sum(1 for r, g, b in shot.getdata() if r > 200 and g < 60 and b < 60)
        assert reds > 100, f"candidate {k}: no box drawn"

    for pos in (1, 2, 3):  # Save goes on to the next case, then back to the list
        for name, value in ratings(pos).items():
            d.find_element(By.ID, f"{name}_{value}").click()
        submit(d, "save", f"/case/{pos + 1}" if pos < 3 else "/cases")
    assert progress(d) == "3 / 3"

    d.get(url + "/case/2")
    for name, value in ratings(2).items():
        assert d.find_element(By.ID, f"{name}_{value}").is_selected(), name
    d.find_element(By.ID, "relevance_1_5").click()
    submit(d, "save", "/cases")
    d.get(url + "/case/2")
    assert d.find_element(By.ID, "relevance_1_5").is_selected() and progress(d) == "3 / 3"
    with sqlite3.connect(db) as conn:
        counts = conn.execute("SELECT (SELECT count(*) FROM rating WHERE reader_id = r.id), (SELECT count(*) FROM "
                              "score WHERE reader_id = r.id) FROM reader r WHERE r.name = 'alice'").fetchone()
    assert counts == (3, 6)

    d2 = browser()
    sign_in(d2, tokens["bob"])
    assert d2.find_element(By.ID, "reader-name").text == "bob" and progress(d2) == "0 / 3"
    d2.get(url + "/case/2")
    assert d2.execute_script("return document.querySelectorAll('input[type=radio]:checked').length") == 0


# ------------------------------------------------------------------------------------------------ HTTP level

def hidden_csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def signed_in(url: str, token: str) -> tuple[requests.Session, str]:
    """A session signed in with ``token`` and its CSRF token."""
    s = requests.Session()
    r = s.post(url + "/signin", data={"csrf": hidden_csrf(s.get(url + "/").text), "token": token})
    assert r.status_code == 200 and r.url == url + "/cases"
    return s, hidden_csrf(r.text)


def complete_form(csrf: str | None) -> dict[str, str]:
    return {**ratings(1), **({"csrf": csrf} if csrf else {})}


def saved_count(db: Path, reader: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM rating JOIN reader ON reader.id = reader_id WHERE name = ?",
                            (reader,)).fetchone()[0]


def test_sign_in_needs_the_form_token_and_a_valid_personal_token(server):
    url, tokens, _ = server
    s = requests.Session()
    csrf = hidden_csrf(s.get(url + "/").text)
    assert s.post(url + "/signin", data={"token": tokens["bob"]}).status_code == 403
    assert requests.post(url + "/signin", data={"csrf": csrf, "token": tokens["bob"]}).status_code == 403  # no cookie
    r = s.post(url + "/signin", data={"csrf": csrf, "token": "not-a-token"})
    assert r.status_code == 401 and "This token is not valid for this study" in r.text
    assert "dmx_session" not in s.cookies
    r = s.get(url + "/")
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_rating_posts_need_the_session_csrf_token(server):
    url, tokens, db = server
    s, csrf = signed_in(url, tokens["bob"])
    assert s.post(url + "/case/1", data=complete_form(None)).status_code == 403
    assert s.post(url + "/case/1", data=complete_form("x" + csrf)).status_code == 403
    _, alice_csrf = signed_in(url, tokens["alice"])
    assert s.post(url + "/case/1", data=complete_form(alice_csrf)).status_code == 403  # another session's token
    assert s.post(url + "/signout", data={}).status_code == 403
    assert saved_count(db, "bob") == 0


@pytest.mark.parametrize("change,message", [
    ({"correctness_2": "6"}, "Candidate 2: correctness must be a whole number from 1 to 5 (got &#39;6&#39;)"),
    ({"relevance_1": "0"}, "Candidate 1: relevance must be a whole number from 1 to 5"),
    ({"completeness_1": ""}, "Candidate 1: completeness is missing."),
    ({"overall": "3"}, "Overall preference must be one of the candidates or &#39;tie&#39;"),
    ({"grounded": None}, "Grounded preference is missing."),
])
def test_invalid_ratings_are_refused_whole(server, change, message):
    url, tokens, db = server
    s, csrf = signed_in(url, tokens["bob"])
    form = {k: v for k, v in {**complete_form(csrf), **change}.items() if v is not None}
    r = s.post(url + "/case/1", data=form)
    assert r.status_code == 400 and message in r.text and "Nothing was saved" in r.text
    assert saved_count(db, "bob") == 0


def test_each_route_answers_only_for_the_signed_in_readers_own_cases(server):
    url, tokens, _ = server
    anon = requests.Session()
    r = anon.get(url + "/case/1", allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    for path in ("/case/1/image.png", "/case/1/candidate/1.png"):
        assert anon.get(url + path).status_code == 401
    assert anon.post(url + "/case/1", data=complete_form("x")).status_code == 401

    s, csrf = signed_in(url, tokens["bob"])
    r = s.get(url + "/case/1/candidate/2.png")
    assert r.status_code == 200 and r.content.startswith(PNG_SIGNATURE) and r.headers["cache-control"] == "no-store"
    assert s.get(url + "/case/1/image.png").content.startswith(PNG_SIGNATURE)
    for path in ("/case/0", "/case/4", "/case/4/image.png", "/case/1/candidate/3.png", "/case/abc", "/admin",
                 "/case/99999999999999999999", "/case/1/candidate/99999999999999999999.png", "/case/-1"):
        assert s.get(url + path).status_code == 404, path
    assert s.post(url + "/case/4", data=complete_form(csrf)).status_code == 404
    big = {"csrf": csrf, "pad": "x" * (70 * 1024)}
    assert s.post(url + "/case/1", data=big).status_code == 413
    page = s.get(url + "/case/1").text  # alice rated every case; bob sees none of it
    assert " checked" not in page and "alice" not in page
    assert s.post(url + "/signout", data={"csrf": csrf}).url == url + "/"
    assert s.get(url + "/cases", allow_redirects=False).status_code == 303


# ------------------------------------------------------------------------------------------------ export

def test_export_numbers_match_a_table_computed_by_hand(small_data, tmp_path):
    from fastapi.testclient import TestClient

    db, tokens = new_study(small_data, tmp_path / "study")
    client = TestClient(make_app(db))
    conn = sqlite3.connect(db)

    def rate(reader: str, pos: int, scores: dict[str, tuple[int, int, int]], grounded: str, overall: str) -> None:
        """Rate by model name: the reader's blinded slots are looked up in the study file."""
        client.cookies.clear()
        csrf = hidden_csrf(client.get("/").text)
        csrf = hidden_csrf(client.post("/signin", data={"csrf": csrf, "token": tokens[reader]}).text)
        slot = dict(conn.execute("SELECT m.name, s.slot FROM slot s JOIN model m ON m.id = s.model_id JOIN reader r "
                                 "ON r.id = s.reader_id JOIN assignment a ON a.reader_id = s.reader_id AND "
                                 "a.case_id = s.case_id WHERE r.name = ? AND a.position = ?", (reader, pos)).fetchall())
        form = {f"{axis}_{slot[m]}": str(v) for m, vals in scores.items()
                for axis, v in zip(("relevance", "correctness", "completeness"), vals)}
        form.update({k: v if v == "tie" else str(slot[v]) for k, v in (("grounded", grounded), ("overall", overall))})
        assert client.post(f"/case/{pos}", data={**form, "csrf": csrf}, follow_redirects=False).status_code == 303

    rate("alice", 1, {"grpo": (4, 3, 5), "coldstart": (2, 2, 3)}, "grpo", "grpo")
    rate("alice", 2, {"grpo": (5, 4, 4), "coldstart": (3, 3, 2)}, "coldstart", "grpo")
    rate("alice", 3, {"grpo": (3, 3, 3), "coldstart": (3, 3, 3)}, "tie", "grpo")
    rate("bob", 1, {"grpo": (1, 1, 1), "coldstart": (5, 5, 5)}, "coldstart", "coldstart")  # changed below
    rate("bob", 1, {"grpo": (4, 4, 4), "coldstart": (1, 2, 2)}, "grpo", "grpo")
    rate("bob", 2, {"grpo": (2, 5, 3), "coldstart": (4, 1, 4)}, "grpo", "coldstart")
    conn.close()

    out = export(db, tmp_path / "out")
    # by hand: grpo relevance (4+5+3+4+2)/5, correctness (3+4+3+4+5)/5, completeness (5+4+3+4+3)/5;
    # grounded: grpo 3 wins, coldstart 1, 1 tie -> (3 + 1/2)/5, (1 + 1/2)/5; overall: 4 wins vs 1, no tie
    expected = {"grpo": (3.6, 3.8, 3.8, 0.7, 0.8), "coldstart": (2.6, 2.2, 2.8, 0.3, 0.2)}
    for r in out["models"]:
        got = [r[k] for k in ("relevance", "correctness", "completeness", "grounded_share", "overall_share")]
        assert got == pytest.approx(expected.pop(r["model"])), r["model"]
    assert not expected
    assert [r["n"] for r in out["models"]] == [5, 5] and out["n_ratings"] == 5
    assert out["ties"] == {"grounded": 1, "overall": 0} and out["readers"] == {"alice": 3, "bob": 2}

    rows = list(csv.DictReader(Path(out["files"]["csv"]).open()))
    assert {r["model"]: (r["relevance"], r["grounded_wins"], r["grounded_ties"], r["overall_share"]) for r in rows} \
        == {"coldstart": ("2.6000", "1", "1", "0.2000"), "grpo": ("3.6000", "3", "1", "0.8000")}
    md = Path(out["files"]["md"]).read_text()
    assert "| grpo | 5 | 3.6000 | 3.8000 | 3.8000 | 0.7000 | 0.8000 |" in md and "| bob | 2 / 3 |" in md
    png = Path(out["files"]["png"]).read_bytes()
    assert png.startswith(PNG_SIGNATURE) and Image.open(io.BytesIO(png)).size[0] > 800


def test_study_creation_refuses_bad_inputs(small_data, tmp_path):
    one = {"grpo": str(write_predictions(small_data, tmp_path / "g.jsonl", MODELS["grpo"], 3))}
    two = {**one, "coldstart": str(write_predictions(small_data, tmp_path / "c.jsonl", MODELS["coldstart"], 2))}
    with pytest.raises(ReaderError, match="at least two models"):
        create_study(tmp_path / "a.db", str(small_data), one, ["alice"], 1, 0)
    with pytest.raises(ReaderError, match="only 2 records are in every model's predictions"):
        create_study(tmp_path / "a.db", str(small_data), two, ["alice"], 3, 0)
    with pytest.raises(ReaderError, match="distinct"):
        create_study(tmp_path / "a.db", str(small_data), two, ["alice", " alice"], 1, 0)
    assert not list(tmp_path.glob("a.db*"))
    create_study(tmp_path / "a.db", str(small_data), two, ["alice"], 2, 0)
    with pytest.raises(ReaderError, match="already exists"):
        create_study(tmp_path / "a.db", str(small_data), two, ["alice"], 2, 0)
    with pytest.raises(ReaderError, match="no ratings saved yet"):
        export(tmp_path / "a.db", tmp_path / "out")


def test_swatch_colours_are_the_overlay_colours():
    from deepmedix.viz import COLORS

    css = (Path(__file__).resolve().parents[2] / "deepmedix" / "reader" / "static" / "reader.css").read_text()
    assert [tuple(map(int, m)) for m in re.findall(r"\.c\d \{ border-color: rgb\((\d+), (\d+), (\d+)\)", css)] \
        == COLORS


def test_the_cli_creates_a_study_and_refuses_an_empty_export(small_data, tmp_path):
    import json
    import subprocess
    import sys

    exe = str(Path(sys.executable).with_name("deepmedix"))
    preds = {m: write_predictions(small_data, tmp_path / f"{m}.jsonl", raw, 3) for m, raw in MODELS.items()}
    db = tmp_path / "study.db"
    r = subprocess.run([exe, "reader", "create", "--db", str(db), "--data", str(small_data), "--cases", "2",
                        *[x for m, p in preds.items() for x in ("-p", f"{m}={p}")], "-r", "alice", "-r", "bob"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    tokens = json.loads(r.stdout)["tokens"]
    assert set(tokens) == {"alice", "bob"} and all(len(t) >= 16 for t in tokens.values())
    r = subprocess.run([exe, "reader", "export", "--db", str(db), "--out", str(tmp_path / "x")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr
    r = subprocess.run([exe, "reader", "create", "--db", str(tmp_path / "s2.db"), "--data", str(small_data),
                        "-p", "a=nothing", "-r", "alice"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and not (tmp_path / "s2.db").exists()


def test_candidate_boxes_are_read_in_each_predictions_own_frame(tmp_path):
    """Evaluation writes each record's frame size; the study maps a model's boxes from it to the image per axis
    (a portrait image's native frame is not square), and reads files without one in the old 512 square."""
    from PIL import Image

    from deepmedix.reader.study import candidate_view, display_image, frame_of

    img = Image.new("L", (300, 600))
    raw = format_output([("there is cardiomegaly in this region", [[28, 56, 84, 112]])], "cardiomegaly")
    _, steps, png = candidate_view(raw, img, display_image(img, 1024), (224, 448), tmp_path)
    assert steps[0]["boxes"][0]["box"] == [38, 75, 112, 150] and png.startswith(PNG_SIGNATURE)
    assert frame_of({"frame_size": [224, 448]}, 512) == (224, 448)
    assert frame_of({"frame_size": None}, 512) == frame_of({}, 512) == (512, 512)
