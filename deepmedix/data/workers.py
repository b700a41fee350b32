"""Curation's image workers: decode, check, resize, encode and store each image, in this process (one worker) or
in forked worker processes fed one chunk ahead, so the main process finishes one chunk while the next is decoded.
"""

from __future__ import annotations

import os
from typing import Any

from deepmedix import store
from deepmedix.data import images as imgs
from deepmedix.data.sink import Sink
from deepmedix.data.sources import BadInput
from deepmedix.errors import CurationError

_W: dict[str, Any] = {}


def _init_worker(sink: Sink, settings: dict[str, int], forked: bool = False, parent: int = 0) -> None:
    if forked:  # a forked child must not share the parent's S3 connections, nor hold its output open
        import signal
        import sys
        import warnings

        sink._client, sink._has, sink._dirs = None, set(), set()
        warnings.simplefilter("ignore")
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        sys.stdout = sys.stderr = open(os.devnull, "w")
        try:  # die with the main process, however it dies (Linux)
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if parent and os.getppid() != parent:
            os._exit(1)
    _W["sink"], _W["settings"], _W["roots"] = sink, settings, {}


def _keep_heap() -> None:
    """Keep each image's freed buffers (a few MB) in the heap for the next image (glibc only). glibc's own
    limits follow the largest block freed so far: after a 0.5 MB image, a heap top over 1 MB is given back to
    the kernel, so each image's buffers were fresh zeroed pages again, about 400 page faults and a millisecond
    of kernel time an image in a forked worker. (A process that once freed a larger block, such as a big CSV
    read, escapes it by chance.) The limits set here are glibc's own ceilings for its dynamic ones; forked
    workers inherit them."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: larger blocks are mmapped
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: a larger free heap top is given back
    except (OSError, AttributeError):
        pass


def _ping() -> int:
    return os.getpid()


def _work(job: tuple) -> tuple[str, tuple]:
    """Decode, check, resize, encode and store one image. Returns (key, ("ok", ...)) or (key, ("bad", file,
    reason)). Store failures are not the input's fault: they propagate and stop the run."""
    key, root, path, data, name = job
    if root is not None:  # one Root (and S3 client) per worker, not one per batch
        root = _W.setdefault("roots", {}).setdefault(root.uri, root)
    s = _W["settings"]
    label = path or name
    where = (lambda f: f) if root is None else (lambda f: f"{root.uri}/{f}")
    try:
        if data is None:
            data = root.local_file(path) or root.read_bytes(path)
        p = imgs.process(data, label, s["max_pixels"], s["max_image_pixels"], s["compress_level"])
    except BadInput as exc:
        return key, ("bad", where(exc.file), exc.reason)
    except MemoryError:
        return key, ("bad", where(label), "image too large to decode in memory")
    except store.StoreError:
        raise
    except Exception as exc:  # a decoder failing in a way nobody listed is still the input's fault
        return key, ("bad", where(label), f"undecodable image ({type(exc).__name__}: {exc})")
    _W["sink"].put_once(p.rel, p.png)
    return key, ("ok", p.sha, p.size, p.orig_size, p.phash)


def _work_batch(jobs: list[tuple]) -> list[tuple[str, tuple]]:
    return [_work(j) for j in jobs]


class ImagePool:
    """Image work: in this process (one worker) or in forked worker processes, with work submitted per chunk
    and collected later, so the main process finishes one chunk while the next is decoded."""

    BATCH = 4

    def __init__(self, workers: int, sink: Sink, settings: dict[str, int]):
        self.ex = None
        _init_worker(sink, settings)
        _keep_heap()  # here, before any fork: the workers inherit it
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # fork: workers start at once with what this process imported (the main process holds no S3
            # connection or lock the workers use: the initializer drops them); the decoders are imported once,
            # before the fork
            from PIL import JpegImagePlugin, PngImagePlugin  # noqa: F401

            from deepmedix.data import dicom  # noqa: F401

            ctx = mp.get_context("fork")
            self.ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                          initargs=(sink, settings, True, os.getpid()))
            for _ in range(workers):  # start them now, while the main process reads the first metadata
                self.ex.submit(_ping)

    def submit(self, jobs: list[tuple]) -> Any:
        if self.ex is None:
            return jobs
        return [self.ex.submit(_work_batch, jobs[i:i + self.BATCH]) for i in range(0, len(jobs), self.BATCH)]

    def collect(self, handle: Any) -> dict[str, tuple]:
        if self.ex is None:
            return dict(map(_work, handle))
        from concurrent.futures.process import BrokenProcessPool

        out: dict[str, tuple] = {}
        try:
            for f in handle:
                out.update(f.result())
        except BrokenProcessPool:
            raise CurationError("an image worker process died (killed for memory, or a crash inside an image "
                                "decoder); finished chunks are kept: rerun to resume, with fewer --workers if "
                                "memory is short") from None
        return out

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True)

    def kill(self) -> None:
        if self.ex is not None:
            procs = list((getattr(self.ex, "_processes", None) or {}).values())
            self.ex.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=5)
