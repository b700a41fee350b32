"""A curated dataset's storage: a local folder or an ``s3://`` prefix, every file written atomically."""

from __future__ import annotations

import io
import os
import stat
from typing import Iterator

from deepmedix import store


class Sink:
    """The output dataset: a local folder or an ``s3://`` prefix. Every file is written atomically (a temporary
    name then ``os.replace`` locally; one PUT on S3, which is never visible half-written)."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.s3 = store.is_s3(self.uri)
        self._client = None
        self._has: set[str] = set()
        self._dirs: set[str] = set()  # local folders known to exist
        if self.s3:
            self.bucket, self.prefix = store.parse_s3(self.uri)
        else:
            self.path = store.local_path(self.uri)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_client"], d["_has"], d["_dirs"] = None, set(), set()
        return d

    @property
    def client(self):
        if self._client is None:
            self._client = store.s3_client()
            with store.s3_errors(self.uri):
                if not self._client.bucket_exists(self.bucket):
                    self._client.make_bucket(self.bucket)
        return self._client

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def put(self, rel: str, data: bytes, durable: bool = True) -> None:
        if self.s3:
            with store.s3_errors(f"{self.uri}/{rel}"):
                self.client.put_object(self.bucket, self._key(rel), io.BytesIO(data), len(data))
            return
        p = os.path.join(self.path, rel)
        folder, name = os.path.split(p)
        if folder not in self._dirs:
            os.makedirs(folder, exist_ok=True)
            self._dirs.add(folder)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:  # the folder was removed since it was made
            os.makedirs(folder, exist_ok=True)
            f = open(tmp, "wb")
        try:
            with f:
                f.write(data)
                if durable:  # shards, markers, manifest, lineage; images are cheap to redo
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def put_once(self, rel: str, data: bytes) -> None:
        """Content-addressed files: written once, then known to exist."""
        if rel in self._has:
            return
        if self.s3:
            self.put(rel, data, durable=False)
        else:
            try:
                fresh = os.stat(os.path.join(self.path, rel)).st_size != len(data)  # an emptied file is rewritten
            except FileNotFoundError:
                fresh = True
            if fresh:
                self.put(rel, data, durable=False)
        if len(self._has) >= 100_000:  # a cache of what exists, bounded: forgetting costs one stat later
            self._has.clear()
        self._has.add(rel)

    def get(self, rel: str) -> bytes | None:
        if self.s3:
            from minio.error import S3Error

            with store.s3_errors(f"{self.uri}/{rel}"):
                try:
                    r = self.client.get_object(self.bucket, self._key(rel))
                except S3Error as exc:
                    if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                        return None
                    raise
                try:
                    return r.read()
                finally:
                    r.close()
                    r.release_conn()
        p = self.path / rel
        return p.read_bytes() if p.is_file() else None

    def _sizes(self, rel_dir: str) -> Iterator[tuple[str, int]]:
        """(relative name, size) of every file under ``rel_dir``."""
        if self.s3:
            pfx = self._key(rel_dir.strip("/")) + "/"
            with store.s3_errors(self.uri):
                for o in self.client.list_objects(self.bucket, prefix=pfx, recursive=True):
                    yield o.object_name[len(self.prefix) + 1 if self.prefix else 0:], o.size or 0
            return
        root = os.path.join(str(self.path), "")  # with one trailing separator
        for folder, _, files in os.walk(os.path.join(root, rel_dir)):  # strings, not a Path per file
            for name in files:
                full = os.path.join(folder, name)
                try:
                    st = os.stat(full)
                except FileNotFoundError:  # removed meanwhile
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield full[len(root):], st.st_size

    def list(self, rel_dir: str) -> list[str]:
        return sorted(self.names(rel_dir))

    def names(self, rel_dir: str) -> Iterator[str]:
        """Every file under ``rel_dir``, in no particular order, one at a time."""
        return (rel for rel, _ in self._sizes(rel_dir))

    def nonempty(self, rel_dir: str) -> set[str]:
        """Files under ``rel_dir`` with at least one byte (a crash can leave an unflushed image empty)."""
        return {rel for rel, size in self._sizes(rel_dir) if size}

    def delete(self, rel: str) -> None:
        if self.s3:
            with store.s3_errors(f"{self.uri}/{rel}"):
                self.client.remove_object(self.bucket, self._key(rel))
            return
        try:
            (self.path / rel).unlink()
        except FileNotFoundError:
            pass


