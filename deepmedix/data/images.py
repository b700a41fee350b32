"""Image handling for curation: decode (JPEG, PNG, DICOM), guard, resize to the pixel budget, encode, hash.

Every stored image is an 8-bit grayscale PNG with no metadata (no DICOM tags, no text chunks), named by the
sha256 of its bytes, so an image shared by several records or datasets is stored once.

Speed: a JPEG is decoded straight at a reduced scale (libjpeg's DCT scaling through ``Image.draft``) when the
target is at most half its size, which skips most of the decoding work of a full-size open→convert→resize.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import warnings
import zlib

from deepmedix.errors import InputError

try:  # zlib-ng: the same deflate streams, about twice as fast
    from zlib_ng import zlib_ng as _deflate
except ImportError:  # pragma: no cover - the plain zlib works too
    _deflate = zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageFile

from deepmedix.data.sources.base import BadInput, local_read_errors

ImageFile.LOAD_TRUNCATED_IMAGES = False
DEFAULT_MAX_PIXELS = 512 * 512          # the model's pixel budget (Qwen2.5-VL max_pixels in the paper)
DEFAULT_MAX_IMAGE_PIXELS = 150_000_000  # larger inputs are refused as decompression bombs
_FORMATS = ("JPEG", "PNG", "MPO")


@dataclass
class Processed:
    png: bytes
    sha: str
    size: tuple[int, int]        # stored (width, height)
    orig_size: tuple[int, int]   # decoded original (width, height)
    phash: int

    @property
    def rel(self) -> str:
        return image_rel(self.sha)


def image_rel(sha: str) -> str:
    return f"images/{sha[:16]}.png"


def target_size(w: int, h: int, max_pixels: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio and at most ``max_pixels`` pixels (never upscaled)."""
    if w * h <= max_pixels:
        return w, h
    s = math.sqrt(max_pixels / (w * h))
    return max(1, int(w * s)), max(1, int(h * s))


def is_dicom(data: bytes, name: str = "") -> bool:
    return data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def _to_l(img: Image.Image, name: str) -> Image.Image:
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(np.clip((a - lo) * scale, 0, 255).astype(np.uint8), "L")
    if img.mode in ("1", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "F"):
        return img.convert("L")
    raise BadInput(name, f"unsupported image mode {img.mode}")


def _open_local(path: Path, name: str) -> tuple[bytes, Any]:
    """The first bytes of a local file (enough to tell DICOM) and the open binary file, or BadInput."""
    with local_read_errors(name):
        f = open(path, "rb")
    with local_read_errors(name):
        try:
            return f.read(132), f
        except OSError:
            f.close()
            raise


def decode(data: bytes | Path, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
           max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to a grayscale image already reduced toward ``max_pixels``; returns it and the original size.
    ``data`` is the file's bytes, or a local path (read by the decoder in blocks, never whole)."""
    if isinstance(data, Path):
        head, f = _open_local(data, name)
        try:
            if not head:
                raise BadInput(name, "zero-byte file")
            if is_dicom(head, name):
                data = head + f.read()
            else:
                f.seek(0)
                return _decode_pil(f, name, max_pixels, max_image_pixels)
        finally:
            f.close()
    if not data:
        raise BadInput(name, "zero-byte file")
    if is_dicom(data, name):
        from deepmedix.data.dicom import decode_dicom

        arr = decode_dicom(data, name, max_pixels=max_image_pixels)
        return Image.fromarray(arr, "L"), (arr.shape[1], arr.shape[0])
    return _decode_pil(io.BytesIO(data), name, max_pixels, max_image_pixels)


def _decode_pil(fp, name: str, max_pixels: int, max_image_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels  # Pillow's own guard fires inside open(): make it ours, for now
    try:
        return _decode_pil_guarded(fp, name, max_pixels, max_image_pixels)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _decode_pil_guarded(fp, name: str, max_pixels: int, max_image_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            if img.format not in _FORMATS:
                raise BadInput(name, f"unsupported image format {img.format} (JPEG, PNG or DICOM expected)")
            w, h = img.size
            if w * h > max_image_pixels:
                raise BadInput(name, f"decompression bomb: {w}x{h} pixels is over the {max_image_pixels} limit")
            if img.format in ("JPEG", "MPO"):
                tw, th = target_size(w, h, max_pixels)
                img.draft("L", (tw, th))
            img.load()
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInput(name, f"decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.UnidentifiedImageError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower() or isinstance(exc, EOFError):
            raise BadInput(name, f"truncated image ({msg})") from None
        raise BadInput(name, f"undecodable image ({msg})") from None
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    return _to_l(img, name), (w, h)


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bicubic; the last step after a DCT-domain reduction (less than 2x left) is a box filter (area average),
    which is as good for a shrink that small and a third cheaper than bilinear (Pillow's filters widen with the
    scale factor, so every filter here is antialiased)."""
    if img.size == size:
        return img
    small_step = img.width < 2 * size[0] and img.height < 2 * size[1]
    return img.resize(size, Image.BOX if small_step else Image.BICUBIC, reducing_gap=3.0)


def _chunk(tag: bytes, body: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    crc = _deflate.crc32(body, _deflate.crc32(tag)) & 0xFFFFFFFF
    return struct.pack(">I", len(body)), tag, body, struct.pack(">I", crc)


def encode_png(img: Image.Image, compress_level: int = 1) -> bytes:
    """A minimal 8-bit grayscale PNG: IHDR, one IDAT, IEND — no metadata chunks at all. Rows use the "Up"
    filter and zlib's Huffman-only strategy: on radiographs (smooth anatomy plus noise) the filtered rows have
    few long matches, so this compresses as well as the default at a fraction of the cost."""
    a = np.asarray(img, dtype=np.uint8)
    h, w = a.shape
    rows = np.empty((h, w + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up (the row above the first one is zeros)
    rows[0, 1:] = a[0]
    np.subtract(a[1:], a[:-1], out=rows[1:, 1:])
    z = _deflate.compressobj(compress_level, _deflate.DEFLATED, 15, 9, _deflate.Z_HUFFMAN_ONLY)
    idat = z.compress(rows) + z.flush()  # the array's buffer, no copy
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", *_chunk(b"IHDR", ihdr), *_chunk(b"IDAT", idat), *_chunk(b"IEND", b"")))


PHASH_BITS = 256


def phash(img: Image.Image) -> int:
    """256-bit perceptual hash: the 255 lowest non-DC frequencies of a 64x64 thumbnail's DCT against their
    median. Chest radiographs share their global layout, so the common 64-bit hash (8x8 frequencies) puts
    different patients within a few bits of each other; 256 bits keep them apart while re-encoded, rescaled or
    re-windowed copies of one image stay within a few bits."""
    a = np.asarray(img.resize((64, 64), Image.BILINEAR), dtype=np.float64)
    low = (_DCT16 @ a @ _DCT16.T).ravel()[1:]  # the 16x16 lowest frequencies of the orthonormal 2-D DCT-II
    median = np.partition(low, 127)[127]       # 255 values: the 128th smallest is the median
    return int.from_bytes(np.packbits((low > median)[_PHASH_ORDER]).tobytes(), "big")


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of the orthonormal DCT-II matrix of size ``n`` (two products give a 2-D DCT's low
    corner, without computing the full transform)."""
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * np.arange(k)[:, None] / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


_DCT16 = _dct_rows(64, 16)
# A fixed shuffle of the 255 bits, so that each contiguous block PhashIndex cuts mixes low and high frequencies
# (the low ones are nearly constant across chest radiographs and would crowd a block's buckets).
_PHASH_ORDER = (np.arange(255) * 97) % 255  # 97 is coprime with 255: a fixed permutation, no RNG involved


MIN_SIDE = 32  # smaller images are icons or thumbnails, not radiographs


def process(data: bytes | Path, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
            max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, compress_level: int = 1,
            min_side: int = MIN_SIDE) -> Processed:
    img, orig = decode(data, name, max_pixels, max_image_pixels)
    if min(orig) < min_side:
        raise BadInput(name, f"image too small ({orig[0]}x{orig[1]}; the shorter side must be at least {min_side})")
    out = resize(img, target_size(*orig, max_pixels))
    png = encode_png(out, compress_level)
    return Processed(png=png, sha=hashlib.sha256(png).hexdigest(), size=out.size, orig_size=orig, phash=phash(out))


class PhashIndex:
    """Near-duplicate lookup for 256-bit hashes within Hamming distance ``d``, by pigeonhole: cut into ``d + 1``
    blocks, two hashes within distance ``d`` agree exactly on at least one block. Each hash has an owner, an
    int the caller chooses. Compact: about 200 bytes a hash, whatever the run's size."""

    def __init__(self, d: int):
        if not 0 <= d <= 64:
            raise InputError(f"phash_distance must be 0..64 (or -1 to turn near-duplicate search off), got {d}")
        from array import array

        from deepmedix.data.compact import U64MultiMap

        self.d = d
        n = d + 1
        edges = [round(i * PHASH_BITS / n) for i in range(n + 1)]
        masks = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self.cuts = [(lo, mask, mask >> 64 != 0) for lo, mask in masks]  # d <= 2: blocks over 64 bits, hashed
        self.blocks = [U64MultiMap() for _ in self.cuts]
        self.hashes: list[int] = []
        self.owners = array("q")

    def __len__(self) -> int:
        return len(self.hashes)

    @staticmethod
    def _key(h: int, lo: int, mask: int, wide: bool) -> int:
        b = (h >> lo) & mask
        return hash(b) & 0xFFFFFFFFFFFFFFFF if wide else b

    def _candidates(self, h: int) -> Iterator[int]:
        seen: set[int] = set()
        for (lo, mask, wide), block in zip(self.cuts, self.blocks):
            for row in block.get(self._key(h, lo, mask, wide)):
                if row not in seen:
                    seen.add(row)
                    yield row

    def find(self, h: int, skip: Callable[[int], bool] = lambda owner: False) -> tuple[int, int] | None:
        """A stored hash within distance ``d`` whose owner ``skip`` does not rule out, and that owner; or None.
        An exact match is preferred."""
        best = None
        for row in self._candidates(h):
            cand, owner = self.hashes[row], self.owners[row]
            dist = (cand ^ h).bit_count()
            if dist <= self.d and not skip(owner):
                if dist == 0:
                    return cand, owner
                if best is None:
                    best = (cand, owner)
        return best

    def __contains__(self, h: int) -> bool:
        lo, mask, wide = self.cuts[0]
        return any(self.hashes[row] == h for row in self.blocks[0].get(self._key(h, lo, mask, wide)))

    def add(self, h: int, owner: int) -> None:
        """Store ``h`` for ``owner`` (a hash already stored keeps its first owner)."""
        if h in self:
            return
        row = len(self.hashes)
        self.hashes.append(h)
        self.owners.append(owner)
        for (lo, mask, wide), block in zip(self.cuts, self.blocks):
            block.add(self._key(h, lo, mask, wide), row)
