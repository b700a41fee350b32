"""Synthetic DICOM files for tests (a helper module, not a test).

``make_dicom(pixels, ...)`` returns the bytes of a valid DICOM Part 10 file (128-byte preamble, ``DICM``, file
meta group) holding one Digital X-Ray image (or CR when ``sop="cr"``) written with pydicom. Import it from a test
in ``tests/data`` as ``from fx_dicom import make_dicom`` (pytest puts the test's folder on ``sys.path``).

Transfer syntaxes: ``explicit_le`` (uncompressed), ``implicit_le``, ``rle`` (RLE Lossless, pydicom's native
encoder), ``jpeg2000`` (JPEG 2000 Lossless, encoded by pylibjpeg-openjpeg). ``jpegls`` needs the pyjpegls
encoder, which is not installed here: :func:`can_encode` says so and ``make_dicom`` raises ``RuntimeError``.
Use :func:`relabel_transfer_syntax` to make a file that *claims* a syntax (e.g. for "decoder missing" tests).

Pixels: ``uint16`` for 12/16 stored bits (12-bit values must fit in 0..4095), ``uint8`` for 8 bits, ``int16``
for signed 16-bit data (``PixelRepresentation`` 1). A 3-D ``(frames, rows, cols)`` array makes a multi-frame file;
``(rows, cols, 3)`` uint8 with ``photometric="RGB"`` makes a colour one.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

DX_SOP = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
CR_SOP = UID("1.2.840.10008.5.1.4.1.1.1")    # Computed Radiography Image Storage

SYNTAXES = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}
_COMPRESSED = {"rle", "jpeg2000", "jpegls"}


def can_encode(transfer_syntax: str) -> bool:
    """Whether ``make_dicom`` can write this transfer syntax with the installed packages."""
    uid = SYNTAXES[transfer_syntax]
    if transfer_syntax not in _COMPRESSED:
        return True
    from pydicom.pixels import get_encoder

    try:
        return bool(get_encoder(uid).is_available)
    except Exception:
        return False


def _window_values(window) -> tuple[list[float], list[float]] | None:
    if window is None:
        return None
    if isinstance(window, tuple) and len(window) == 2 and not isinstance(window[0], (tuple, list)):
        window = [window]
    centers = [float(c) for c, _ in window]
    widths = [float(w) for _, w in window]
    return centers, widths


def make_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    window: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
    voi_lut: np.ndarray | None = None,
    voi_lut_first: int = 0,
    rescale: tuple[float, float] | None = None,
    burned_in: str | None = None,
    pixel_data: bool = True,
    transfer_syntax: str = "explicit_le",
    patient_name: str = "Synthetic^Phantom",
    sop: str = "dx",
    extra_tags: dict[str, Any] | None = None,
) -> bytes:
    """Bytes of a DICOM Part 10 file holding ``pixels``.

    ``window``: one ``(center, width)`` or a list of them (multi-valued WindowCenter/WindowWidth).
    ``voi_lut``: a LUT table (1-D integer array) written as a VOI LUT Sequence item; its descriptor is
    ``[len, voi_lut_first, bits]`` (bits 8 when every entry < 256, else 16).
    ``rescale``: ``(slope, intercept)`` as RescaleSlope/RescaleIntercept (with RescaleType "US").
    ``burned_in``: BurnedInAnnotation value ("YES"/"NO"), absent when None.
    ``pixel_data=False`` writes the image attributes but no Pixel Data element.
    ``extra_tags``: keyword -> value set on the dataset last (may override anything, e.g. ``Rows``).
    """
    arr = np.asarray(pixels)
    if transfer_syntax not in SYNTAXES:
        raise ValueError(f"unknown transfer_syntax {transfer_syntax!r}; known: {sorted(SYNTAXES)}")
    if not can_encode(transfer_syntax):
        raise RuntimeError(f"cannot encode {transfer_syntax}: no encoder installed")
    colour = photometric in ("RGB", "YBR_FULL")
    if colour:
        if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
            raise ValueError("colour pixels must be (rows, cols, 3) or (frames, rows, cols, 3)")
        frames = arr.shape[0] if arr.ndim == 4 else 1
        rows, cols = arr.shape[-3], arr.shape[-2]
    else:
        if arr.ndim not in (2, 3):
            raise ValueError("grayscale pixels must be (rows, cols) or (frames, rows, cols)")
        frames = arr.shape[0] if arr.ndim == 3 else 1
        rows, cols = arr.shape[-2], arr.shape[-1]

    signed = arr.dtype.kind == "i"
    if bits_stored <= 8:
        arr = arr.astype(np.int8 if signed else np.uint8)
        bits_allocated = 8
    else:
        arr = arr.astype(np.int16 if signed else np.uint16)
        bits_allocated = 16
        if not signed and int(arr.max(initial=0)) >= (1 << bits_stored):
            raise ValueError(f"pixel values exceed {bits_stored} stored bits")

    meta = FileMetaDataset()
    sop_uid = DX_SOP if sop == "dx" else CR_SOP
    inst_uid = generate_uid()
    meta.MediaStorageSOPClassUID = sop_uid
    meta.MediaStorageSOPInstanceUID = inst_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # set to the real one below
    meta.ImplementationClassUID = generate_uid()

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_uid
    ds.SOPInstanceUID = inst_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX" if sop == "dx" else "CR"
    ds.PatientName = patient_name
    ds.PatientID = "SYNTH0001"
    ds.StudyDate = "20000101"
    ds.ViewPosition = "PA"
    if sop == "dx":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope = rescale[0]
        ds.RescaleIntercept = rescale[1]
        ds.RescaleType = "US"
    win = _window_values(window)
    if win is not None:
        ds.WindowCenter = win[0] if len(win[0]) > 1 else win[0][0]
        ds.WindowWidth = win[1] if len(win[1]) > 1 else win[1][0]
    if voi_lut is not None:
        lut = np.asarray(voi_lut).astype(np.uint16)
        item = Dataset()
        lut_bits = 8 if int(lut.max(initial=0)) < 256 else 16
        item.LUTDescriptor = [len(lut) if len(lut) < 65536 else 0, int(voi_lut_first), lut_bits]
        item.LUTExplanation = "SYNTHETIC"
        item["LUTData"] = pydicom.DataElement(0x00283006, "US", [int(v) for v in lut])
        ds.VOILUTSequence = DicomSequence([item])
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in

    if pixel_data:
        ds.PixelData = arr.tobytes()
        if bits_allocated == 8:
            ds["PixelData"].VR = "OB"
    uid = SYNTAXES[transfer_syntax]
    if pixel_data and transfer_syntax in _COMPRESSED:
        ds.compress(uid, arr, encoding_plugin="pydicom" if transfer_syntax == "rle" else "")
    else:
        meta.TransferSyntaxUID = uid
    # after encoding, so that extra_tags can make a file inconsistent with its pixel data
    if extra_tags:
        for k, v in extra_tags.items():
            setattr(ds, k, v)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True,
                     implicit_vr=uid == ImplicitVRLittleEndian, little_endian=True)
    return buf.getvalue()


def relabel_transfer_syntax(data: bytes, uid: str) -> bytes:
    """The same file with its file-meta TransferSyntaxUID replaced. For a compressed ``uid`` the (uncompressed)
    pixel bytes are encapsulated as one fragment, so the file parses but cannot really be decoded."""
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(data))
    uid = UID(uid)
    if "PixelData" in ds and uid.is_compressed and not ds.file_meta.TransferSyntaxUID.is_compressed:
        raw = ds.PixelData
        ds.PixelData = encapsulate([raw + b"\0" * (len(raw) % 2)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = uid
    buf = io.BytesIO()
    # keep the dataset encoding (explicit little endian) the original was written in
    pydicom.dcmwrite(buf, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buf.getvalue()
