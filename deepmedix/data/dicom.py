"""Decoding DICOM chest X-rays into 8-bit grayscale display images.

API:

* ``decode_dicom(data, name, max_pixels=100_000_000) -> np.ndarray`` — a 2-D ``uint8`` array in display
  orientation (air dark, bone bright) or :class:`BadInput` naming ``name`` and saying why.
* ``dicom_size(data, name="<dicom>") -> (width, height)`` — Columns/Rows from the header only.

Outputs carry no DICOM metadata: only the pixel values are returned, and only the attributes needed to decode
them (image pixel module, rescale, VOI, BurnedInAnnotation) are read. Patient/study attributes are never read,
returned, copied or put in error messages.

Pipeline (PS3.3 C.11 / PS3.4 N.2 grayscale pipeline):

1. Read with ``pydicom.dcmread(force=False)``: a Part 10 file (preamble + ``DICM``) is required.
2. Refusals before any decoding: no Pixel Data (7FE0,0010); BurnedInAnnotation (0028,0301) = YES (burned-in text
   is PHI we cannot scrub); missing or zero Rows/Columns; Rows x Columns over ``max_pixels`` ("decompression
   bomb"); a transfer syntax pydicom cannot decode, or whose decoder plugin is not installed (the reason names
   the syntax and the missing packages); native pixel data shorter than Rows x Columns x frames x samples x
   bytes per sample (truncated / inconsistent; trailing excess up to one row is tolerated as padding, more is
   refused); PALETTE COLOR and unknown photometric interpretations.
3. Multi-frame: frame 0 only is decoded (a projection radiograph stored as several frames keeps the primary
   image first, e.g. dual-energy standard/soft-tissue/bone).
4. Colour (RGB, YBR_*; YBR converted to RGB by pydicom): converted to grayscale with ITU-R BT.601 luma weights
   and scaled by BitsStored; modality/VOI transforms are not applied (they are defined for monochrome only).
5. Monochrome: modality LUT (Modality LUT Sequence or RescaleSlope/Intercept, via
   :func:`pydicom.pixels.apply_modality_lut`), then VOI:

   * VOI LUT Sequence (first item) when present. Applied here rather than with ``pydicom.pixels.apply_voi``,
     whose index array uses the LUT's output dtype and so wraps for an 8-bit LUT with more than 256 entries.
     The output is scaled by the descriptor's bit depth, except that a LUT declared 16-bit whose entries all
     fit in 12 bits (a common mislabel) is scaled as 12-bit.
   * else WindowCenter/WindowWidth, the first pair when several, with VOILUTFunction LINEAR (default),
     LINEAR_EXACT or SIGMOID, computed directly into [0, 1] with the PS3.3 C.11.2.1.2 formulas (pydicom's
     ``apply_windowing`` maps onto a bit-depth dependent range we would have to undo).
   * else the 0.5 % and 99.5 % percentiles of the modality values (robust to a few hot/dead pixels and burnt-in
     collimator edges), linearly mapped to [0, 1] and clipped. A flat image becomes all zeros.

   BitsStored 8/12/16 all work the same way: the transforms act on the stored values, so a 12-bit image in 16
   allocated bits and the same image stored as 16 or 8 bits give the same picture.
6. MONOCHROME1 is inverted after the VOI so that air is dark. PresentationLUTShape is not consulted (for DX it
   restates the photometric interpretation).
7. Output ``round(255 * y)`` as ``uint8``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from deepmedix.data.sources.base import BadInput
from deepmedix.errors import InputError

MAX_PIXELS = 100_000_000
_PIXEL_DATA_TAG = 0x7FE00010
_PIXEL_TAG_BYTES = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_PERCENTILES = (0.5, 99.5)
_GRAY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")


def _read(data: bytes, name: str, header_only: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadInput(name, "not a DICOM file (no bytes)")
    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        raise BadInput(name, "not a DICOM Part 10 file (no 'DICM' marker after the 128-byte preamble)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(bytes(data)), force=False, stop_before_pixels=header_only)
        except InvalidDicomError as exc:
            raise BadInput(name, f"not a readable DICOM file ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - any parser failure means a corrupt file
            raise BadInput(name, f"corrupt or truncated DICOM file ({type(exc).__name__}: {exc})") from None
    if any("End of file reached" in str(w.message) for w in caught):
        raise BadInput(name, "truncated DICOM file (end of file inside an element)")
    ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if not ts:
        raise BadInput(name, "truncated or invalid DICOM file: file meta has no Transfer Syntax UID (0002,0010)")
    # pydicom stops silently at end of file: a value shorter than its declared length means truncation
    try:
        tags = list(ds.keys())
        if tags:
            last = ds.get_item(tags[-1])
            length = getattr(last, "length", None)
            value = getattr(last, "value", None)
            if (length is not None and length != 0xFFFFFFFF and isinstance(value, (bytes, bytearray))
                    and len(value) < length):
                raise BadInput(name, f"truncated DICOM file: element {last.tag} declares {length} bytes, "
                                     f"{len(value)} present")
    except BadInput:
        raise
    except Exception:  # noqa: BLE001
        pass
    return ds


def _int(ds, keyword: str, default: int | None = None) -> int | None:
    try:
        v = ds.get(keyword, default)
        if v is None or v == "":
            return default
        return int(v)
    except (TypeError, ValueError):
        return default


def dicom_size(data: bytes, name: str = "<dicom>") -> tuple[int, int]:
    """(width, height) = (Columns, Rows) read from the header only (pixel data is not parsed)."""
    ds = _read(data, name, header_only=True)
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols or rows < 0 or cols < 0:
        raise BadInput(name, "DICOM has no valid Rows (0028,0010) / Columns (0028,0011)")
    return cols, rows


def _first(value) -> float:
    """First value of a possibly multi-valued DS element."""
    try:
        from pydicom.multival import MultiValue

        if isinstance(value, (MultiValue, list, tuple)):
            value = value[0]
    except ImportError:  # pragma: no cover
        pass
    return float(value)


def _window(x: np.ndarray, center: float, width: float, func: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing into [0, 1]."""
    if func == "SIGMOID":
        if width <= 0:
            raise InputError("WindowWidth must be > 0 for SIGMOID")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if func == "LINEAR_EXACT":
        if width <= 0:
            raise InputError("WindowWidth must be > 0 for LINEAR_EXACT")
        c, w = center, width
    else:  # LINEAR
        if width < 1:
            raise InputError("WindowWidth must be >= 1 for LINEAR")
        c, w = center - 0.5, width - 1.0
    if w == 0:  # LINEAR with width 1: a threshold at c
        return (x > c).astype(np.float64)
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)


def _lut_values(item, ds) -> np.ndarray:
    elem = item["LUTData"]
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        little = True
        try:
            little = bool(ds.file_meta._tsyntax_encoding[1] is not False)
        except Exception:  # noqa: BLE001
            pass
        return np.frombuffer(bytes(value)[: len(value) // 2 * 2], dtype="<u2" if little else ">u2").astype(np.int64)
    if isinstance(value, (int, float)):
        return np.asarray([value], dtype=np.int64)
    return np.asarray(list(value), dtype=np.int64)


def _voi_lut(x: np.ndarray, ds) -> np.ndarray:
    item = ds.VOILUTSequence[0]
    desc = [int(v) for v in item.LUTDescriptor]
    n_entries, first, bits = (desc[0] or 65536), desc[1], desc[2]
    if bits == 8 and "LUTData" in item and isinstance(item["LUTData"].value, (bytes, bytearray)) \
            and len(item["LUTData"].value) == n_entries:
        lut = np.frombuffer(bytes(item["LUTData"].value), dtype=np.uint8).astype(np.int64)  # 8-bit packed OB/OW
    else:
        lut = _lut_values(item, ds)
    if lut.size == 0:
        raise InputError("VOI LUT Data is empty")
    n = min(n_entries, lut.size)
    if bits < 1 or bits > 16:
        raise InputError(f"VOI LUT descriptor bit depth {bits} unsupported")
    top = float(2 ** bits - 1)
    if bits == 16 and int(lut.max()) < 4096:
        top = 4095.0
    idx = np.clip(np.rint(x).astype(np.int64) - first, 0, n - 1)
    return np.clip(lut[idx].astype(np.float64) / top, 0.0, 1.0)


def _percentile_range(x: np.ndarray) -> tuple[float, float]:
    flat = x.ravel()
    if flat.size > 4_000_000:  # deterministic subsample keeps this cheap on huge images
        flat = flat[:: flat.size // 2_000_000]
    lo, hi = np.percentile(flat, _PERCENTILES)
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    return float(lo), float(hi)


def _to_unit(x: np.ndarray, ds) -> np.ndarray:
    """Modality values -> [0, 1] through the VOI stage."""
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        if item.get("LUTDescriptor") is not None and "LUTData" in item:
            return _voi_lut(x, ds)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        func = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
        if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            func = "LINEAR"
        return _window(x.astype(np.float64), center, width, func)
    lo, hi = _percentile_range(x)
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float64)
    return np.clip((x.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def decode_dicom(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one DICOM image into a 2-D ``uint8`` display image (see the module docstring), or raise BadInput."""
    from pydicom.pixels import apply_modality_lut, get_decoder

    ds = _read(data, name, header_only=False)
    if _PIXEL_DATA_TAG not in ds:
        if _PIXEL_TAG_BYTES in bytes(data[132:]):
            raise BadInput(name, "truncated or corrupt DICOM file: Pixel Data (7FE0,0010) could not be read")
        raise BadInput(name, "DICOM has no Pixel Data element (7FE0,0010)")
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned == "YES":
        raise BadInput(name, "DICOM says burned-in annotation (0028,0301)=YES")

    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols or rows < 0 or cols < 0:
        raise BadInput(name, "DICOM has no valid Rows (0028,0010) / Columns (0028,0011)")
    if rows * cols > max_pixels:
        raise BadInput(name, f"decompression bomb: {cols}x{rows} = {rows * cols} pixels > {max_pixels}")
    frames = _int(ds, "NumberOfFrames", 1) or 1
    spp = _int(ds, "SamplesPerPixel", 1) or 1
    bits_alloc = _int(ds, "BitsAllocated")
    bits_stored = _int(ds, "BitsStored", bits_alloc)
    if bits_alloc not in (1, 8, 16, 32):
        raise BadInput(name, f"unsupported BitsAllocated (0028,0100) {bits_alloc}")
    if not bits_stored or bits_stored > bits_alloc:
        bits_stored = bits_alloc
    if spp not in (1, 3):
        raise BadInput(name, f"unsupported SamplesPerPixel (0028,0002) {spp}")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric == "PALETTE COLOR":
        raise BadInput(name, "PALETTE COLOR DICOM images are not supported")
    if photometric not in _GRAY + _COLOUR:
        raise BadInput(name, f"unsupported photometric interpretation {photometric or '(missing)'!r}")
    if (spp == 1) != (photometric in _GRAY):
        raise BadInput(name, f"SamplesPerPixel {spp} inconsistent with photometric interpretation {photometric}")

    ts = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise BadInput(name, f"transfer syntax {ts} ({ts.name}) is not supported by pydicom") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise BadInput(name, f"no decoder installed for transfer syntax {ts.name} ({ts}): {missing}")

    if not ts.is_compressed:
        raw = ds.get_item(_PIXEL_DATA_TAG).value or b""
        n_values = rows * cols * frames * spp
        need = (n_values + 7) // 8 if bits_alloc == 1 else n_values * (bits_alloc // 8)
        if len(raw) < need:
            raise BadInput(name, f"pixel data is {len(raw)} bytes but Rows x Columns x frames x samples needs "
                                 f"{need} (truncated or inconsistent with Rows/Columns)")
        row_bytes = max(1, cols * spp * max(1, bits_alloc // 8))
        if len(raw) - need >= row_bytes:
            raise BadInput(name, f"pixel data is {len(raw)} bytes but Rows x Columns x frames x samples needs "
                                 f"{need} (inconsistent with Rows/Columns)")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            arr, _ = decoder.as_array(ds, index=0)
        except Exception as exc:  # noqa: BLE001 - every decoder failure is a bad input
            raise BadInput(name, f"cannot decode pixel data ({ts.name}): {type(exc).__name__}: {exc}") from None
    arr = np.asarray(arr)
    want = (rows, cols) if spp == 1 else (rows, cols, 3)
    if arr.shape != want:
        raise BadInput(name, f"decoded pixel array has shape {arr.shape}, Rows/Columns say {want}")

    if photometric in _COLOUR:
        # YBR_* arrive as RGB (pydicom converts when raw=False)
        gray = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        unit = np.clip(gray / float(2 ** bits_stored - 1), 0.0, 1.0)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                x = apply_modality_lut(arr, ds)
                unit = _to_unit(np.asarray(x), ds)
            except Exception as exc:  # noqa: BLE001 - malformed LUT/window values
                raise BadInput(name, f"invalid modality/VOI transform: {type(exc).__name__}: {exc}") from None
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
    unit = np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(unit * 255.0).astype(np.uint8)
