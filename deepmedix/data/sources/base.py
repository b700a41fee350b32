"""What every source adapter works with.

* :class:`Root` — a dataset as published, in a local folder or under an ``s3://`` prefix. Paths are POSIX paths
  relative to the root; one that escapes the root (``..``, an absolute path, a symlink pointing outside) raises
  :class:`BadInput`, as does a missing or unreadable file.
* :class:`Item` — a would-be Record: texts, ids, official split and boxes in the *original* pixels of the first
  image, with the images still as :class:`ImageRef` (a file under the root, or bytes made in memory). The curation
  engine decodes, resizes and stores the images, rescales the boxes, scrubs the texts and assigns splits.
* :class:`Quarantine` — an input the adapter refused (bad metadata row, missing report, duplicate id, ...), with
  the file and the reason. Adapters yield these in the same stream as Items and never raise for bad data.
* :class:`Source` — the adapter base class; subclasses register themselves by ``name``.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from deepmedix import store
from deepmedix.data.schema import Box
from deepmedix.errors import DeepMedixError, InputError, MissingInputError

SOURCES: dict[str, type["Source"]] = {}


@contextlib.contextmanager
def local_read_errors(name: str) -> Iterator[None]:
    """A local file that cannot be read becomes BadInput naming it (missing, a folder, unreadable)."""
    try:
        yield
    except FileNotFoundError:
        raise BadInput(name, "file not found") from None
    except IsADirectoryError:
        raise BadInput(name, "is a folder, not a file") from None
    except OSError as exc:
        raise BadInput(name, f"unreadable ({exc.strerror or exc})") from None


class BadInput(DeepMedixError):
    """An input to quarantine. ``file`` names it (relative to the source root where possible)."""

    def __init__(self, file: str, reason: str, record: str = ""):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason, self.record = file, reason, record

    def __reduce__(self):  # travels between processes intact
        return (BadInput, (self.file, self.reason, self.record))


@dataclass
class Quarantine:
    source: str
    file: str
    reason: str
    record: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "file": self.file, "reason": self.reason, "record": self.record}


@dataclass
class ImageRef:
    """One image of an Item: ``path`` under ``root`` (the source's own root when None — set it when the images
    live in another dataset, e.g. VQA questions joined to MIMIC-CXR-JPG), or ``data`` (encoded bytes made in
    memory)."""
    path: str = ""
    data: bytes | None = None
    name: str = ""  # how quarantine reports name an in-memory image
    root: "Root | None" = None

    def label(self) -> str:
        return self.path or self.name or "<in-memory image>"


@dataclass
class Item:
    record_id: str            # unique within the source; the Record id becomes "<source>/<record_id>"
    patient_id: str           # namespaced where sources share patients, e.g. "mimic:10000032"
    study_id: str
    task: str                 # one of schema.TASKS
    prompt: str
    answer: str
    images: list[ImageRef]    # frontal first
    split: str = ""           # official split ("train"/"validate"/"test") or "" for the seeded patient split
    view: str = ""
    question_type: str = ""
    boxes: list[Box] = field(default_factory=list)  # [x1, y1, x2, y2] on images[0], see box_frame
    box_frame: tuple[int, int] | None = None  # (width, height) the boxes are given in when the dataset says so
    # (MS-CXR's image_width/height, ChestX-ray14's 1024x1024); None: the decoded image's own pixels
    findings: list[str] = field(default_factory=list)
    trace: str = ""
    # anatomical landmarks on images[0] in the boxes' frame (the phantom's lungs and heart): where a cold-start
    # teacher may point when a record has no reference box
    landmarks: list[Box] = field(default_factory=list)
    file: str = ""            # the metadata file (and row) this Item came from, for quarantine reports


def _norm_rel(rel: str) -> str | None:
    """Normalised POSIX path inside the root, or None when it escapes (absolute, '..' above the root, NUL)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return None
    rel = rel.replace("\\", "/")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        return None
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return norm


class Root:
    """A dataset root: a local folder or an ``s3://bucket/prefix``. Picklable (worker processes reopen it)."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/") if str(uri) != "/" else "/"
        self.s3 = store.is_s3(self.uri)
        if self.s3:
            self.bucket, self.prefix = store.parse_s3(self.uri)
        else:
            self.path = store.local_path(self.uri)
            if not self.path.is_dir():
                raise MissingInputError(f"{uri}: dataset root is not a folder")
            self.real = Path(os.path.realpath(self.path))
        self._client = None
        self._real_dirs: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_client"] = None
        d["_real_dirs"] = {}
        return d

    @property
    def client(self):
        if self._client is None:
            self._client = store.s3_client()
        return self._client

    def __repr__(self) -> str:
        return f"Root({self.uri!r})"

    # -- paths
    def safe(self, rel: str) -> str:
        norm = _norm_rel(rel)
        if norm is None:
            raise BadInput(str(rel), "path escapes the dataset root")
        if not self.s3:
            parent, name = posixpath.split(norm)
            full = os.path.join(self._real_dir(parent), name)
            real = os.path.realpath(full) if os.path.islink(full) else full
            if real != str(self.real) and not real.startswith(str(self.real) + os.sep):
                raise BadInput(norm, "path escapes the dataset root (symlink)")
        return norm

    def _real_dir(self, rel_dir: str) -> str:
        """The real path of a folder under the root, resolved one level at a time from the deepest cached
        parent (a symlinked level is resolved whole), so each new folder costs one lstat, not one per level."""
        if not rel_dir:
            return str(self.real)
        todo: list[str] = []
        d, real = rel_dir, self._real_dirs.get(rel_dir)
        while real is None and d:  # walk up to a cached folder (or the root), iteratively: paths can be deep
            todo.append(d)
            d = posixpath.dirname(d)
            real = self._real_dirs.get(d) if d else str(self.real)
        if len(self._real_dirs) + len(todo) > 4096:
            self._real_dirs.clear()
        for d in reversed(todo):
            full = os.path.join(real, posixpath.basename(d))
            real = os.path.realpath(full) if os.path.islink(full) else full
            self._real_dirs[d] = real
        return real

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def exists(self, rel: str) -> bool:
        try:
            norm = self.safe(rel)
        except BadInput:
            return False
        if not self.s3:
            return (self.path / norm).is_file()
        from minio.error import S3Error

        with store.s3_errors(f"{self.uri}/{norm}"):
            try:
                self.client.stat_object(self.bucket, self._key(norm))
                return True
            except S3Error as exc:
                # AccessDenied: what S3 answers for a missing key to a caller without ListBucket
                if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket", "AccessDenied"):
                    return False
                raise

    def first(self, *candidates: str) -> str | None:
        """The first candidate path that exists (e.g. ``x.csv`` or ``x.csv.gz``)."""
        for c in candidates:
            if self.exists(c):
                return c
        return None

    # -- reading
    def local_file(self, rel: str) -> Path | None:
        """The checked local path of a file under a local root (None on S3): decoders read it in blocks."""
        return None if self.s3 else self.path / self.safe(rel)

    def read_bytes(self, rel: str) -> bytes:
        norm = self.safe(rel)
        if not self.s3:
            with local_read_errors(norm):
                return (self.path / norm).read_bytes()
        from minio.error import S3Error

        with store.s3_errors(f"{self.uri}/{norm}"):
            try:
                resp = self.client.get_object(self.bucket, self._key(norm))
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    raise BadInput(norm, "file not found") from None
                if exc.code in ("AccessDenied", "InvalidObjectState", "InvalidRange"):  # this object only
                    raise BadInput(norm, f"unreadable ({exc.code})") from None
                raise
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

    def read_text(self, rel: str) -> str:
        """UTF-8 text (a BOM is dropped); non-UTF-8 bytes raise BadInput. ``.gz`` files are decompressed."""
        data = self.read_bytes(rel)
        if rel.endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as exc:
                raise BadInput(rel, f"not a readable gzip file ({exc})") from None
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise BadInput(rel, f"not UTF-8 text (byte {exc.start})") from None

    def read_csv(self, rel: str) -> Iterator[dict[str, str]]:
        """Rows of a CSV (``.csv`` or ``.csv.gz``) as dicts keyed by the header, values stripped."""
        reader = csv.DictReader(io.StringIO(self.read_text(rel), newline=""))
        for row in reader:
            yield {(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}

    def walk(self, rel_dir: str = "", suffixes: tuple[str, ...] = ()) -> Iterator[str]:
        """Relative paths of the files under ``rel_dir`` (recursive, sorted), filtered by suffix (case-insensitive)."""
        sfx = tuple(s.lower() for s in suffixes)
        if not self.s3:
            base = self.path / rel_dir if rel_dir else self.path
            if not base.is_dir():
                return
            out = []
            for dirpath, dirs, files in os.walk(base):
                dirs.sort()
                for f in files:
                    if not sfx or f.lower().endswith(sfx):
                        out.append((Path(dirpath) / f).relative_to(self.path).as_posix())
            yield from sorted(out)
            return
        pfx = self._key(rel_dir.strip("/")) if rel_dir else self.prefix
        pfx = pfx + "/" if pfx else ""
        names = []
        with store.s3_errors(self.uri):
            for o in self.client.list_objects(self.bucket, prefix=pfx, recursive=True):
                rel = o.object_name[len(self.prefix) + 1:] if self.prefix else o.object_name
                if not sfx or rel.lower().endswith(sfx):
                    names.append(rel)
        yield from sorted(names)


class HeaderError(InputError):
    """A metadata file whose header lacks a required column: the source stops (no row-by-row quarantine)."""


def column_key(name: str) -> str:
    """How column names are compared: case and whitespace ignored (``rad_ID`` is ``rad_id``, ``Image  Index`` is
    ``Image Index``). Releases of the same dataset spell their headers differently between files and versions."""
    return "".join(str(name).split()).casefold()


def match_columns(file: str, header: list[str], required: tuple[str, ...] | list[str],
                  known: tuple[str, ...] | list[str] = ()) -> list[str]:
    """``header`` with each cell that matches a published name (``required`` + ``known``, by :func:`column_key`)
    replaced by that name, others only stripped. Raises :class:`HeaderError` naming the file, the missing
    columns and the columns found when a required one is absent."""
    published = {column_key(name): name for name in (*known, *required)}
    out = [published.get(column_key(cell), cell.strip()) for cell in header]
    twice = sorted({name for name in out if name and out.count(name) > 1})
    if twice:
        raise HeaderError(f"{file}: column(s) {twice} appear more than once; found {[c.strip() for c in header]} "
                          f"(column names are matched ignoring case and spaces)")
    missing = [name for name in required if name not in out]
    if missing:
        raise HeaderError(f"{file}: missing required column(s) {missing}; found {[c.strip() for c in header]} "
                          f"(column names are matched ignoring case and spaces)")
    return out


def slug(text: str) -> str:
    """A name as an id part: lower-case letters and digits joined by dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def read_csv_rows(root: Root, rel: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header cells (stripped) and an iterator of (data row number, cells), blank lines skipped. Raises
    BadInput, also mid-way for a CSV syntax error (the row is named)."""
    reader = csv.reader(io.StringIO(root.read_text(rel), newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as exc:
        raise BadInput(rel, f"header is not readable CSV ({exc})") from None

    def rows() -> Iterator[tuple[int, list[str]]]:
        n = 0
        try:
            for cells in reader:
                n += 1
                if not cells or all(not c.strip() for c in cells):
                    continue
                yield n, [c.strip() for c in cells]
        except csv.Error as exc:
            raise BadInput(rel, f"row {n + 1}: not readable CSV ({exc})") from None

    return header, rows()


def open_root(uri: str) -> Root:
    return Root(uri)


class Source:
    """Base class of the adapters. Subclasses set ``name`` and implement :meth:`items`.

    ``options`` are the adapter's own settings from the curate config (unknown keys are refused by the engine
    through :attr:`option_names`). Adapters must be deterministic: the same files give the same stream.
    """

    name: ClassVar[str] = ""
    option_names: ClassVar[tuple[str, ...]] = ()
    needs_root: ClassVar[bool] = True  # False for sources that make their data (the phantom)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            SOURCES[cls.name] = cls

    def __init__(self, root: Root, **options: Any):
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            raise InputError(f"source {self.name}: unknown option(s) {unknown}; known: {list(self.option_names)}")
        self.root = root
        self.options = options

    def items(self) -> Iterator[Item | Quarantine]:
        raise NotImplementedError

    def bad(self, file: str, reason: str, record: str = "") -> Quarantine:
        return Quarantine(self.name, file, reason, record)
