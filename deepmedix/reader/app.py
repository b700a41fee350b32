"""The reader study web app: sign in with a personal token, rate blinded candidates case by case.

Every route resolves what it shows through the signed-in reader: cases are addressed by the reader's own position
(``/case/3`` is the third case in *this* reader's order) and candidates by the reader's own blinded slot, so no id
in a URL reaches another reader's cases, slots or ratings. Sessions are random ids (stored hashed) in an HttpOnly,
SameSite=Strict cookie; every POST carries a CSRF token (the session's, or a double-submit cookie on the sign-in
form). A rating is saved whole, in one transaction, or not at all.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException

from deepmedix.errors import DeepMedixError
from deepmedix.reader.db import AXES, connect, token_hash

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "dmx_session"
SIGNIN_COOKIE = "dmx_signin"
MAX_BODY = 64 * 1024
PosInt = Annotated[int, PathParam(ge=1, le=2**31 - 1)]  # case positions and slots (SQLite-safe)
SCORES = ("1", "2", "3", "4", "5")
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
TEMPLATES = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
CSS = (HERE / "static" / "reader.css").read_text()


class PageError(DeepMedixError):
    """Answered with the error page and ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class SignInRequired(DeepMedixError):
    """A page asked for without a valid session: answered with a redirect to the sign-in form."""


@dataclass
class Reader:
    id: int
    name: str
    csrf: str


def render(template: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(template).render(**ctx), status_code=status_code)


async def form_data(request: Request) -> dict[str, list[str]]:
    """The POSTed urlencoded form (at most 64 KiB, UTF-8); an empty body is an empty form."""
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise PageError(400, "The form could not be read.") from None
    if declared > MAX_BODY:  # refused before reading it
        raise PageError(413, "The form is too large.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise PageError(413, "The form is too large.")
    body = bytes(body)
    if not body:
        return {}
    if len(body) > MAX_BODY:
        raise PageError(413, "The form is too large.")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise PageError(415, "Forms must be sent as application/x-www-form-urlencoded.")
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise PageError(400, "The form could not be read.") from None


def one(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name, [])
    if len(values) > 1:
        raise PageError(400, f"The form field '{name}' was sent more than once.")
    return values[0] if values else None


def check_csrf(sent: str | None, expected: str | None) -> None:
    if not sent or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise PageError(403, "The form's security token is missing or out of date: reload the page and try again.")


def validate(form: dict[str, list[str]], slots: list[int]) -> tuple[dict[str, str], list[str]]:
    """The valid answers by field name, and one message per missing or invalid answer."""
    values: dict[str, str] = {}
    errors: list[str] = []
    for k in slots:
        for axis in AXES:
            name = f"{axis}_{k}"
            v = one(form, name)
            if not v:
                errors.append(f"Candidate {k}: {axis} is missing.")
            elif v not in SCORES:
                errors.append(f"Candidate {k}: {axis} must be a whole number from 1 to 5 (got '{v[:20]}').")
            else:
                values[name] = v
    choices = {str(k) for k in slots} | {"tie"}
    for name, label in (("grounded", "Grounded preference"), ("overall", "Overall preference")):
        v = one(form, name)
        if not v:
            errors.append(f"{label} is missing.")
        elif v not in choices:
            errors.append(f"{label} must be one of the candidates or 'tie' (got '{v[:20]}').")
        else:
            values[name] = v
    return values, errors


def make_app(db_path: str | os.PathLike, *, secure_cookie: bool = False, session_hours: float = 12.0) -> FastAPI:
    """The app serving the study in ``db_path``. ``secure_cookie``: mark cookies Secure (serve over HTTPS)."""
    db = Path(db_path)
    connect(db).close()
    ttl = int(session_hours * 3600)
    app = FastAPI(title="DeepMedix reader study", docs_url=None, redoc_url=None, openapi_url=None)
    cookie = {"httponly": True, "samesite": "strict", "secure": secure_cookie, "path": "/"}

    def get_conn() -> Iterator[sqlite3.Connection]:
        conn = connect(db)
        try:
            yield conn
        finally:
            conn.close()

    def current(request: Request, conn: sqlite3.Connection) -> Reader | None:
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid:
            return None
        row = conn.execute("SELECT r.id, r.name, s.csrf FROM session s JOIN reader r ON r.id = s.reader_id "
                           "WHERE s.id_hash = ? AND s.expires_at > ?", (token_hash(sid), time.time())).fetchone()
        return Reader(row["id"], row["name"], row["csrf"]) if row else None

    def page_reader(request: Request, conn: sqlite3.Connection = Depends(get_conn)) -> Reader:
        reader = current(request, conn)
        if reader is None:
            raise SignInRequired()
        return reader

    def api_reader(request: Request, conn: sqlite3.Connection = Depends(get_conn)) -> Reader:
        reader = current(request, conn)
        if reader is None:
            raise PageError(401, "You are not signed in (or your session has ended).")
        return reader

    def progress(conn: sqlite3.Connection, reader: Reader) -> tuple[int, int]:
        row = conn.execute("SELECT count(*), count(r.case_id) FROM assignment a LEFT JOIN rating r "
                           "ON r.reader_id = a.reader_id AND r.case_id = a.case_id WHERE a.reader_id = ?",
                           (reader.id,)).fetchone()
        return row[1], row[0]

    def case_of(conn: sqlite3.Connection, reader: Reader, pos: int) -> sqlite3.Row:
        row = conn.execute("SELECT a.case_id, c.question FROM assignment a JOIN study_case c ON c.id = a.case_id "
                           "WHERE a.reader_id = ? AND a.position = ?", (reader.id, pos)).fetchone()
        if row is None:
            raise PageError(404, f"There is no case {pos} in your list.")
        return row

    def slots_of(conn: sqlite3.Connection, reader: Reader, case_id: int) -> list[sqlite3.Row]:
        return conn.execute("SELECT s.slot, s.model_id, c.answer, c.steps FROM slot s JOIN candidate c "
                            "ON c.case_id = s.case_id AND c.model_id = s.model_id "
                            "WHERE s.reader_id = ? AND s.case_id = ? ORDER BY s.slot", (reader.id, case_id)).fetchall()

    def saved(conn: sqlite3.Connection, reader: Reader, case_id: int, slots: list[sqlite3.Row]) -> dict[str, str]:
        slot_of = {s["model_id"]: str(s["slot"]) for s in slots}
        rating = conn.execute("SELECT grounded_model_id, overall_model_id FROM rating "
                              "WHERE reader_id = ? AND case_id = ?", (reader.id, case_id)).fetchone()
        if rating is None:
            return {}
        values = {"grounded": slot_of.get(rating["grounded_model_id"], "tie"),
                  "overall": slot_of.get(rating["overall_model_id"], "tie")}
        for row in conn.execute("SELECT * FROM score WHERE reader_id = ? AND case_id = ?", (reader.id, case_id)):
            values.update({f"{axis}_{slot_of[row['model_id']]}": str(row[axis]) for axis in AXES})
        return values

    def case_page(conn: sqlite3.Connection, reader: Reader, pos: int, values: dict[str, str] | None = None,
                  errors: list[str] | None = None) -> HTMLResponse:
        case = case_of(conn, reader, pos)
        slots = slots_of(conn, reader, case["case_id"])
        candidates = [{"slot": s["slot"], "answer": s["answer"], "steps": json.loads(s["steps"])} for s in slots]
        done, total = progress(conn, reader)
        return render("case.html", 400 if errors else 200, reader=reader, pos=pos, total=total, done=done,
                      question=case["question"], candidates=candidates, axes=AXES, scores=SCORES,
                      values=saved(conn, reader, case["case_id"], slots) if values is None else values,
                      errors=errors or [])

    def signin_form(status: int = 200, error: str | None = None) -> HTMLResponse:
        pre = secrets.token_urlsafe(24)
        resp = render("signin.html", status, csrf=pre, error=error)
        resp.set_cookie(SIGNIN_COOKIE, pre, **cookie)
        return resp

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        resp = await call_next(request)
        resp.headers.update(HEADERS)
        return resp

    @app.exception_handler(PageError)
    async def page_error(request: Request, exc: PageError) -> HTMLResponse:
        return render("error.html", exc.status, status=exc.status, message=exc.message)

    @app.exception_handler(SignInRequired)
    async def sign_in_required(request: Request, exc: SignInRequired) -> RedirectResponse:
        return RedirectResponse("/", status_code=303)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> HTMLResponse:
        return render("error.html", exc.status_code, status=exc.status_code, message=str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_path(request: Request, exc: RequestValidationError) -> HTMLResponse:
        return render("error.html", 404, status=404, message="There is no such page.")

    @app.get("/static/reader.css")
    def css() -> Response:
        return Response(CSS, media_type="text/css")

    @app.get("/", response_model=None)
    def home(request: Request, conn: sqlite3.Connection = Depends(get_conn)) -> Response:
        if current(request, conn) is not None:
            return RedirectResponse("/cases", status_code=303)
        return signin_form()

    @app.post("/signin", response_model=None)
    def signin(request: Request, form: dict = Depends(form_data),
               conn: sqlite3.Connection = Depends(get_conn)) -> Response:
        check_csrf(one(form, "csrf"), request.cookies.get(SIGNIN_COOKIE))
        token = (one(form, "token") or "").strip()
        row = conn.execute("SELECT id FROM reader WHERE token_hash = ?", (token_hash(token),)).fetchone() \
            if 0 < len(token) <= 200 else None
        if row is None:
            return signin_form(401, "This token is not valid for this study. Check it and try again.")
        sid, now = secrets.token_urlsafe(32), time.time()
        with conn:
            conn.execute("DELETE FROM session WHERE expires_at <= ?", (now,))
            conn.execute("INSERT INTO session VALUES (?, ?, ?, ?)",
                         (token_hash(sid), row["id"], secrets.token_urlsafe(32), now + ttl))
        resp = RedirectResponse("/cases", status_code=303)
        resp.set_cookie(SESSION_COOKIE, sid, max_age=ttl, **cookie)
        resp.delete_cookie(SIGNIN_COOKIE, **cookie)
        return resp

    @app.post("/signout")
    def signout(request: Request, reader: Reader = Depends(api_reader), form: dict = Depends(form_data),
                conn: sqlite3.Connection = Depends(get_conn)) -> RedirectResponse:
        check_csrf(one(form, "csrf"), reader.csrf)
        with conn:
            conn.execute("DELETE FROM session WHERE id_hash = ?", (token_hash(request.cookies[SESSION_COOKIE]),))
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, **cookie)
        return resp

    @app.get("/cases")
    def cases(reader: Reader = Depends(page_reader), conn: sqlite3.Connection = Depends(get_conn)) -> HTMLResponse:
        rows = conn.execute("SELECT a.position, r.saved_at FROM assignment a LEFT JOIN rating r "
                            "ON r.reader_id = a.reader_id AND r.case_id = a.case_id WHERE a.reader_id = ? "
                            "ORDER BY a.position", (reader.id,)).fetchall()
        done, total = progress(conn, reader)
        return render("cases.html", reader=reader, rows=rows, done=done, total=total)

    @app.get("/case/{pos}")
    def case(pos: PosInt, reader: Reader = Depends(page_reader),
             conn: sqlite3.Connection = Depends(get_conn)) -> HTMLResponse:
        return case_page(conn, reader, pos)

    @app.post("/case/{pos}", response_model=None)
    def rate(pos: PosInt, reader: Reader = Depends(api_reader), form: dict = Depends(form_data),
             conn: sqlite3.Connection = Depends(get_conn)) -> Response:
        check_csrf(one(form, "csrf"), reader.csrf)
        case_id = case_of(conn, reader, pos)["case_id"]
        model_of = {s["slot"]: s["model_id"] for s in slots_of(conn, reader, case_id)}
        values, errors = validate(form, list(model_of))
        if errors:
            return case_page(conn, reader, pos, values, errors)
        pref = {k: None if values[k] == "tie" else model_of[int(values[k])] for k in ("grounded", "overall")}
        with conn:
            conn.execute("INSERT INTO rating VALUES (?, ?, ?, ?, ?) ON CONFLICT (reader_id, case_id) DO UPDATE SET "
                         "grounded_model_id = excluded.grounded_model_id, "
                         "overall_model_id = excluded.overall_model_id, saved_at = excluded.saved_at",
                         (reader.id, case_id, pref["grounded"], pref["overall"], time.strftime("%Y-%m-%dT%H:%M:%S")))
            conn.executemany("INSERT INTO score VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (reader_id, case_id, model_id) "
                             "DO UPDATE SET relevance = excluded.relevance, correctness = excluded.correctness, "
                             "completeness = excluded.completeness",
                             [(reader.id, case_id, mid, *(int(values[f"{a}_{k}"]) for a in AXES))
                              for k, mid in model_of.items()])
        nxt = conn.execute("SELECT a.position FROM assignment a LEFT JOIN rating r ON r.reader_id = a.reader_id "
                           "AND r.case_id = a.case_id WHERE a.reader_id = ? AND r.case_id IS NULL "
                           "ORDER BY a.position <= ?, a.position LIMIT 1", (reader.id, pos)).fetchone()
        return RedirectResponse(f"/case/{nxt[0]}" if nxt else "/cases", status_code=303)

    @app.get("/case/{pos}/image.png")
    def image(pos: PosInt, reader: Reader = Depends(api_reader),
              conn: sqlite3.Connection = Depends(get_conn)) -> Response:
        case_id = case_of(conn, reader, pos)["case_id"]
        blob = conn.execute("SELECT image FROM study_case WHERE id = ?", (case_id,)).fetchone()[0]
        return Response(blob, media_type="image/png")

    @app.get("/case/{pos}/candidate/{slot}.png")
    def overlay(pos: PosInt, slot: PosInt, reader: Reader = Depends(api_reader),
                conn: sqlite3.Connection = Depends(get_conn)) -> Response:
        case_id = case_of(conn, reader, pos)["case_id"]
        row = conn.execute("SELECT c.overlay FROM slot s JOIN candidate c ON c.case_id = s.case_id "
                           "AND c.model_id = s.model_id WHERE s.reader_id = ? AND s.case_id = ? AND s.slot = ?",
                           (reader.id, case_id, slot)).fetchone()
        if row is None:
            raise PageError(404, f"Case {pos} has no candidate {slot}.")
        return Response(row[0], media_type="image/png")

    return app


def serve(db_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *,
          secure_cookie: bool = False) -> None:
    """Serve the study with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(make_app(db_path, secure_cookie=secure_cookie), host=host, port=port)
