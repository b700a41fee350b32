"""The artifact store: local folders (``/path`` or ``file://``) and ``s3://bucket/prefix`` (minio client).

Every artifact is written atomically: it is built in a temporary folder and then renamed into place (local), or
uploaded file by file with ``lineage.json`` written last as the commit marker (S3). Readers of an S3 artifact
refuse a prefix without that marker. Beside each artifact sits ``lineage.json``: the stage, its config, the code
version and the hashes of its inputs.

S3 settings come from the environment, with KServe's names: ``S3_ENDPOINT`` (host:port or URL), ``S3_USE_HTTPS``
(``0``/``1``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from deepmedix.errors import DeepMedixError, InputError

LINEAGE = "lineage.json"
_BIG = 256 * 1024 * 1024


class StoreError(DeepMedixError, RuntimeError):
    """A URI that cannot be read or written (S3 unreachable, a missing object, a bad URI)."""


def jsonl_objects(path: str | os.PathLike, label: str | os.PathLike | None = None,
                  expected: str = "a JSON object") -> Iterator[tuple[int, str, dict]]:
    """``(line, where, row)`` for each non-blank line of a JSONL file, ``where`` being ``label:line`` (``label``: how
    messages name the file, default its path). A file that cannot be read, a line that is not JSON or not an
    object is a ValueError that says where (``expected``: what an object line should be, for that message)."""
    label = path if label is None else label
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{label}: cannot read ({exc})") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{label}:{no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected {expected}, got {type(row).__name__}")
        yield no, where, row


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """``obj`` as indented JSON with sorted keys (anything JSON cannot hold written as its ``str``)."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def local_path(uri: str | os.PathLike) -> Path:
    s = str(uri)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def parse_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StoreError(f"{uri}: no bucket in S3 URI")
    return bucket, key.strip("/")


def s3_client():
    from minio import Minio

    endpoint = os.environ.get("S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if not endpoint:
        raise StoreError("S3_ENDPOINT (or AWS_ENDPOINT_URL) is not set: cannot reach an s3:// store")
    secure = os.environ.get("S3_USE_HTTPS", "1") not in ("0", "false", "False")
    if "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
        secure = scheme == "https"
    return Minio(endpoint.rstrip("/"), access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                 secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"), secure=secure,
                 region=os.environ.get("AWS_REGION") or None)


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def upload_dir(src: Path, uri: str, client=None) -> None:
    """Upload a folder under an S3 prefix. An artifact already there is withdrawn first (its ``lineage.json``
    commit marker, then the rest), and the new ``lineage.json`` goes last, so readers never see a mix."""
    client = client or s3_client()
    bucket, prefix = parse_s3(uri)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    old = [o.object_name for o in client.list_objects(bucket, prefix=prefix + "/" if prefix else "", recursive=True)]
    old.sort(key=lambda k: not k.endswith("/" + LINEAGE) and k != LINEAGE)
    for name in old:
        client.remove_object(bucket, name)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == LINEAGE)
    for p in files:
        client.fput_object(bucket, _key(prefix, p.relative_to(src).as_posix()), str(p))


def download_dir(uri: str, dest: Path, client=None) -> Path:
    client = client or s3_client()
    bucket, prefix = parse_s3(uri)
    objs = list(client.list_objects(bucket, prefix=prefix + "/" if prefix else "", recursive=True))
    names = {o.object_name[len(prefix) + 1 if prefix else 0:] for o in objs}
    if not objs:
        raise StoreError(f"{uri}: no objects under this prefix")
    if LINEAGE not in names and "config.json" not in names:
        raise StoreError(f"{uri}: incomplete artifact (no {LINEAGE} commit marker)")
    if LINEAGE not in names and "model.safetensors.index.json" in names:  # a checkpoint uploaded by other tools
        index = json.loads(client.get_object(bucket, _key(prefix, "model.safetensors.index.json")).read())
        missing = sorted(set(index.get("weight_map", {}).values()) - names)
        if missing:
            raise StoreError(f"{uri}: incomplete checkpoint, missing {missing[:3]}")
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=dest.parent))
    for o in objs:
        rel = o.object_name[len(prefix) + 1 if prefix else 0:]
        client.fget_object(bucket, o.object_name, str(tmp / rel))
    ordinary_modes(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def cache_root(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("DEEPMEDIX_CACHE", Path.home() / ".cache" / "deepmedix"))


def _remote_version(client, bucket: str, prefix: str) -> str:
    """The ETag of the artifact's commit marker ('' when it has none)."""
    from minio.error import S3Error

    try:
        return client.stat_object(bucket, _key(prefix, LINEAGE)).etag or ""
    except S3Error:
        return ""


def fetch(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding the artifact at ``uri``. An ``s3://`` artifact is downloaded into the cache, and
    downloaded again when its ``lineage.json`` has changed since."""
    if not is_s3(uri):
        p = local_path(uri)
        if not p.exists():
            raise StoreError(f"{uri}: no such file or folder")
        return p
    bucket, prefix = parse_s3(str(uri))
    dest = cache_root(cache_dir) / "s3" / bucket / prefix
    stamp = dest.with_name(dest.name + ".version")
    with s3_errors(str(uri)):
        client = s3_client()
        version = _remote_version(client, bucket, prefix)
        if dest.exists() and stamp.exists() and stamp.read_text() == version:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        download_dir(str(uri), dest, client)
    stamp.write_text(version)
    return dest


def fetch_file(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """One object (an image, say) as a local file; local paths are returned as they are."""
    if not is_s3(uri):
        p = local_path(uri)
        if not p.is_file():
            raise StoreError(f"{uri}: no such file")
        return p
    bucket, key = parse_s3(uri)
    dest = cache_root(cache_dir) / "s3-files" / bucket / key
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with s3_errors(uri):
            s3_client().fget_object(bucket, key, str(dest))
    return dest


@contextlib.contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    """minio and connection failures become one StoreError naming the URI."""
    from minio.error import MinioException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except (MinioException, HTTPError, OSError) as exc:
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"{uri}: S3 request failed ({type(exc).__name__}: {exc})") from exc


def ordinary_modes(root: str | os.PathLike) -> None:
    """Give a folder tree the modes a plain ``cp`` under the process umask would: folders 0755 and files 0644 (0755
    where executable) with umask 022. Writers here leave owner-only modes behind (``tempfile.mkdtemp`` folders 0700;
    safetensors 0.8 ``save_file`` writes its file 0600), and a model or dataset served or read by another uid (a
    predictor pod as uid 1000, a mounted volume) must not be."""
    umask = os.umask(0)
    os.umask(umask)
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        executable = path.is_dir() or mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def check_readable(root: str | os.PathLike) -> None:
    """Raise :class:`InputError` naming the first file or folder under ``root`` this process cannot read, with the
    uid it runs as and the file's owner and mode: "permission denied", never a misleading "no such file"."""
    root = Path(root)

    def paths() -> Iterator[Path]:
        yield root
        if root.is_dir():
            yield from sorted(root.rglob("*"))

    for path in paths():
        if path.is_symlink() and not path.exists():
            raise InputError(f"{path}: a broken symbolic link (to {os.readlink(path)})")
        want = os.R_OK | os.X_OK if path.is_dir() else os.R_OK
        if not os.access(path, want):
            try:
                st = path.lstat()
            except OSError as exc:  # gone since the walk listed it
                raise InputError(f"{path}: {exc.strerror}") from None
            raise InputError(f"{path}: permission denied for uid {os.getuid()} (owner uid {st.st_uid}, mode "
                             f"{st.st_mode & 0o7777:04o}); make it readable by that uid, e.g. chmod -R a+rX")


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Build an artifact in a temporary folder; publish it at ``dest`` only if the block succeeds."""
    if is_s3(dest):
        staging = cache_root() / "staging"  # beside the cache (a large volume in pods), not a small /tmp
        staging.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="deepmedix-", dir=staging))
        try:
            yield tmp
            with s3_errors(str(dest)):
                upload_dir(tmp, str(dest))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    final = local_path(dest)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        ordinary_modes(tmp)  # mkdtemp makes it 0700, safetensors its files 0600: published, it is readable by all
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def dir_hash(path: str | os.PathLike) -> str:
    """sha256 over a folder's relative paths and contents (files over 256 MiB: size and head/tail)."""
    root = Path(path)
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.name != LINEAGE)
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() if p != root else p.name.encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        with open(p, "rb") as f:
            if size <= _BIG:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), 2)
                h.update(f.read())
    return h.hexdigest()


def artifact_hash(uri: str | os.PathLike) -> str:
    """An input's hash: the one its own lineage recorded when it was written, else computed now."""
    path = fetch(uri)
    lineage = path / LINEAGE
    if lineage.exists():
        recorded = json.loads(lineage.read_text()).get("sha256")
        if recorded:
            return recorded
    return dir_hash(path)


def code_version() -> str:
    from deepmedix import __version__

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{__version__}+{rev}" if rev else __version__


def write_lineage(folder: str | os.PathLike, stage: str, config: Any = None,
                  inputs: dict[str, str | os.PathLike] | None = None, extra: dict[str, Any] | None = None) -> dict:
    """Write ``lineage.json`` into a (local, not yet published) artifact folder."""
    import dataclasses

    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else (config or {})
    record = {
        "stage": stage,
        "config": cfg,
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": {name: {"uri": str(uri), "sha256": artifact_hash(uri)} for name, uri in (inputs or {}).items()},
        "sha256": dir_hash(folder),
    }
    record.update(extra or {})
    Path(folder, LINEAGE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def read_lineage(uri: str | os.PathLike) -> dict:
    p = fetch(uri) / LINEAGE
    if not p.exists():
        raise StoreError(f"{uri}: no {LINEAGE}")
    return json.loads(p.read_text())
