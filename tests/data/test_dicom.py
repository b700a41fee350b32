"""deepmedix.data.dicom: DICOM -> 8-bit display image, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
from fx_dicom import can_encode, make_dicom, relabel_transfer_syntax

from deepmedix.data.dicom import decode_dicom, dicom_size
from deepmedix.data.sources.base import BadInput


def ramp12(rows: int = 48, cols: int = 64) -> np.ndarray:
    """A horizontal 12-bit ramp 0..4095 (every row the same)."""
    row = np.linspace(0, 4095, cols).round().astype(np.uint16)
    return np.tile(row, (rows, 1))


def linear_window(x, center, width):
    """PS3.3 C.11.2.1.2.1 LINEAR, written out independently, into 0..255."""
    x = np.asarray(x, dtype=np.float64)
    c, w = center - 0.5, width - 1
    y = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5))
    return np.rint(y * 255).astype(np.uint8)


def bad(data, name="img.dcm", **kw) -> BadInput:
    with pytest.raises(BadInput) as ei:
        decode_dicom(data, name, **kw)
    assert ei.value.file == name
    return ei.value


# ---------------------------------------------------------------------------------------------------- basics

def test_output_is_2d_uint8_of_rows_columns():
    out = decode_dicom(make_dicom(ramp12(48, 64)), "a.dcm")
    assert out.dtype == np.uint8 and out.shape == (48, 64)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)  # monotonic ramp stays monotonic


def test_dicom_size_reads_header_only():
    data = make_dicom(ramp12(30, 70))
    assert dicom_size(data) == (70, 30)
    # header only: a file whose pixel data is cut short still reports its size
    assert dicom_size(make_dicom(ramp12(30, 70), pixel_data=False)) == (70, 30)
    with pytest.raises(BadInput):
        dicom_size(b"not a dicom file at all" * 10)


# ---------------------------------------------------------------------------------------------------- VOI

def test_window_center_width_matches_linear_formula():
    px = np.array([[0, 1000, 1499, 1500, 1750, 2000, 2250, 2500, 2501, 4095]], dtype=np.uint16)
    out = decode_dicom(make_dicom(px, window=(2000, 1001)), "w.dcm")
    assert out.tolist() == linear_window(px, 2000, 1001).tolist()
    assert out[0, 0] == 0 and out[0, -1] == 255 and out[0, 5] in (127, 128)


def test_first_of_several_windows_is_used():
    px = ramp12(4, 200)
    out = decode_dicom(make_dicom(px, window=[(1000, 500), (3000, 2000)]), "w.dcm")
    assert np.array_equal(out, linear_window(px, 1000, 500))


def test_sigmoid_voi_function():
    px = np.array([[0, 1000, 2000, 3000, 4095]], dtype=np.uint16)
    out = decode_dicom(make_dicom(px, window=(2000, 1000), extra_tags={"VOILUTFunction": "SIGMOID"}), "s.dcm")
    want = np.rint(255 / (1 + np.exp(-4 * (px.astype(float) - 2000) / 1000))).astype(np.uint8)
    assert out.tolist() == want.tolist()


def test_voi_lut_sequence_8bit_output_with_4096_entries():
    # 4096-entry LUT with 8-bit output: pydicom's apply_voi would wrap the index at 256
    px = np.array([[0, 15, 16, 300, 1000, 2048, 4095]], dtype=np.uint16)
    lut = np.arange(4096) // 16
    out = decode_dicom(make_dicom(px, voi_lut=lut), "lut.dcm")
    assert out.tolist() == (px // 16).tolist()


def test_voi_lut_first_mapped_value_and_clamping():
    px = np.array([[0, 99, 100, 150, 355, 356, 4000]], dtype=np.uint16)
    lut = np.arange(256)  # maps 100..355 -> 0..255
    out = decode_dicom(make_dicom(px, voi_lut=lut, voi_lut_first=100), "lut.dcm")
    assert out.tolist() == [[0, 0, 0, 50, 255, 255, 255]]


def test_voi_lut_preferred_over_window():
    px = np.array([[0, 2048, 4095]], dtype=np.uint16)
    out = decode_dicom(make_dicom(px, voi_lut=np.arange(4096) // 16, window=(100, 10)), "lut.dcm")
    assert out.tolist() == [[0, 128, 255]]


def test_voi_lut_16bit_descriptor_scales_to_full_range():
    px = np.array([[0, 2048, 4095]], dtype=np.uint16)
    lut = np.arange(4096) * 16  # 0..65520, declared 16-bit
    out = decode_dicom(make_dicom(px, voi_lut=lut), "lut.dcm")
    assert out.tolist() == np.rint(px * 16 / 65535 * 255).astype(int).tolist()


def test_no_voi_uses_robust_percentiles():
    rng = np.random.default_rng(0)
    px = rng.integers(1000, 2001, size=(100, 100)).astype(np.uint16)
    px[0, :10] = 4095  # 10 hot pixels (0.1 %) must not squash the range
    px[1, :10] = 0
    out = decode_dicom(make_dicom(px), "p.dcm")
    body = out[2:]
    assert body.min() <= 5 and body.max() >= 250
    assert out[0, 0] == 255 and out[1, 0] == 0


def test_flat_image_without_voi_is_black():
    out = decode_dicom(make_dicom(np.full((8, 8), 700, np.uint16)), "flat.dcm")
    assert out.shape == (8, 8) and not out.any()


# ------------------------------------------------------------------------------ modality, photometric, depth

def test_rescale_slope_intercept_applied_before_window():
    px = np.array([[0, 250, 499, 500, 501, 750, 1000]], dtype=np.uint16)
    # modality values 2x - 1000: -1000, -500, -2, 0, 2, 500, 1000; window on modality values
    out = decode_dicom(make_dicom(px, rescale=(2.0, -1000.0), window=(0, 1001)), "r.dcm")
    assert out.tolist() == linear_window(px.astype(float) * 2 - 1000, 0, 1001).tolist()
    # the same window without the rescale would saturate almost everything
    raw = decode_dicom(make_dicom(px, window=(0, 1001)), "r.dcm")
    assert raw.tolist() != out.tolist()


def test_signed_16bit_with_rescale():
    px = (ramp12(4, 100).astype(np.int32) - 2048).astype(np.int16)
    out = decode_dicom(make_dicom(px, bits_stored=16, rescale=(1.0, 1024.0), window=(1024, 4096)), "s.dcm")
    assert np.array_equal(out, linear_window(px.astype(float) + 1024, 1024, 4096))


def test_monochrome1_is_inverted():
    px = ramp12()
    m2 = decode_dicom(make_dicom(px, photometric="MONOCHROME2"), "m2.dcm")
    m1 = decode_dicom(make_dicom(px, photometric="MONOCHROME1"), "m1.dcm")
    assert np.array_equal(m1.astype(int), 255 - m2.astype(int))
    assert m1[0, 0] == 255 and m1[0, -1] == 0  # low stored value = white in MONOCHROME1
    w2 = decode_dicom(make_dicom(px, photometric="MONOCHROME2", window=(2000, 1500)), "m2.dcm")
    w1 = decode_dicom(make_dicom(px, photometric="MONOCHROME1", window=(2000, 1500)), "m1.dcm")
    assert np.array_equal(w1.astype(int), 255 - w2.astype(int))


def test_12_16_and_8_bit_give_the_same_picture():
    a12 = ramp12()
    o12 = decode_dicom(make_dicom(a12, bits_stored=12), "12.dcm")
    o16 = decode_dicom(make_dicom(a12 * 16, bits_stored=16), "16.dcm")
    o8 = decode_dicom(make_dicom((a12 // 16).astype(np.uint8), bits_stored=8), "8.dcm")
    assert np.abs(o12.astype(int) - o16.astype(int)).max() <= 1
    assert np.abs(o12.astype(int) - o8.astype(int)).max() <= 3
    # and with windows scaled accordingly
    w12 = decode_dicom(make_dicom(a12, bits_stored=12, window=(2048, 2048)), "12.dcm")
    w16 = decode_dicom(make_dicom(a12 * 16, bits_stored=16, window=(2048 * 16, 2048 * 16)), "16.dcm")
    w8 = decode_dicom(make_dicom((a12 // 16).astype(np.uint8), bits_stored=8, window=(128, 128)), "8.dcm")
    assert np.abs(w12.astype(int) - w16.astype(int)).max() <= 1
    assert np.abs(w12.astype(int) - w8.astype(int)).max() <= 5


def test_8bit_full_range_identity():
    px = np.arange(256, dtype=np.uint8).reshape(16, 16)
    data = make_dicom(px, bits_stored=8, window=(127.5, 256), extra_tags={"VOILUTFunction": "LINEAR_EXACT"})
    out = decode_dicom(data, "8.dcm")
    assert np.abs(out.astype(int) - px.astype(int)).max() <= 1


def test_rgb_becomes_grayscale():
    v = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([v, v, v], axis=-1)
    out = decode_dicom(make_dicom(rgb, photometric="RGB", bits_stored=8), "rgb.dcm")
    assert out.shape == (16, 16) and np.array_equal(out, v)
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert decode_dicom(make_dicom(red, photometric="RGB", bits_stored=8), "r.dcm")[0, 0] == round(0.299 * 255)


def test_multiframe_takes_first_frame():
    a = ramp12()
    frames = np.stack([a, 4095 - a, np.zeros_like(a)])
    out = decode_dicom(make_dicom(frames, window=(2048, 4096)), "mf.dcm")
    assert np.array_equal(out, decode_dicom(make_dicom(a, window=(2048, 4096)), "one.dcm"))


# ---------------------------------------------------------------------------------------------------- compressed

def test_rle_lossless_decodes_like_uncompressed():
    a = ramp12()
    a[10:20, 10:30] = 3000
    plain = decode_dicom(make_dicom(a, window=(2000, 3000)), "p.dcm")
    rle_bytes = make_dicom(a, window=(2000, 3000), transfer_syntax="rle")
    assert b"1.2.840.10008.1.2.5" in rle_bytes[:600]
    assert np.array_equal(decode_dicom(rle_bytes, "rle.dcm"), plain)
    m1 = decode_dicom(make_dicom(a, photometric="MONOCHROME1", transfer_syntax="rle"), "rle1.dcm")
    assert np.array_equal(m1.astype(int), 255 - decode_dicom(make_dicom(a), "p.dcm").astype(int))


@pytest.mark.skipif(not can_encode("jpeg2000"), reason="no JPEG 2000 encoder installed")
def test_jpeg2000_lossless_decodes_like_uncompressed():
    a = ramp12()
    assert np.array_equal(decode_dicom(make_dicom(a, transfer_syntax="jpeg2000"), "j2k.dcm"),
                          decode_dicom(make_dicom(a), "p.dcm"))


def test_missing_decoder_is_named(monkeypatch):
    import pydicom.pixels

    class NoDecoder:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-rle>=2.0"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoDecoder())
    e = bad(make_dicom(ramp12(), transfer_syntax="rle"))
    assert "no decoder installed" in e.reason and "RLE Lossless" in e.reason and "pylibjpeg" in e.reason


def test_unsupported_transfer_syntax():
    e = bad(relabel_transfer_syntax(make_dicom(ramp12()), "1.2.840.10008.1.2.4.100"))  # MPEG2
    assert "transfer syntax" in e.reason and "not supported" in e.reason


def test_undecodable_compressed_stream():
    # claims JPEG baseline but holds raw pixels
    e = bad(relabel_transfer_syntax(make_dicom(ramp12()), "1.2.840.10008.1.2.4.50"))
    assert "cannot decode" in e.reason or "inconsistent" in e.reason


# ---------------------------------------------------------------------------------------------------- refusals

def test_burned_in_annotation_refused():
    e = bad(make_dicom(ramp12(), burned_in="YES"))
    assert e.reason == "DICOM says burned-in annotation (0028,0301)=YES"
    assert "Synthetic" not in str(e) and "Phantom" not in str(e)
    assert decode_dicom(make_dicom(ramp12(), burned_in="NO"), "ok.dcm").shape == (48, 64)


def test_no_pixel_data():
    e = bad(make_dicom(ramp12(), pixel_data=False))
    assert "no Pixel Data" in e.reason and "(7FE0,0010)" in e.reason


@pytest.mark.parametrize("ts", ["explicit_le", "rle"])
def test_truncated_bytes_never_decode(ts):
    data = make_dicom(ramp12(), transfer_syntax=ts)
    cuts = set(range(0, len(data), max(1, len(data) // 60)))
    cuts |= {len(data) - k for k in (1, 2, 5, 7, 8, 9, 20, 40, 44)}
    cuts = sorted(cuts)
    for cut in cuts:
        if ts == "rle" and cut >= len(data) - 4:
            # only the 4-byte length of the final sequence delimiter is missing: every pixel is there,
            # pydicom accepts it and so do we
            continue
        with pytest.raises(BadInput):
            decode_dicom(data[:cut], "t.dcm")


def test_truncated_pixel_data_reason():
    data = make_dicom(ramp12())
    e = bad(data[:-100])
    assert "truncated" in e.reason


def test_random_bytes():
    rng = np.random.default_rng(7)
    for n in (0, 1, 100, 131, 132, 1000, 5000):
        e = bad(rng.bytes(n))
        assert "DICOM" in e.reason
    for _ in range(20):
        blob = bytearray(rng.bytes(2000))
        blob[128:132] = b"DICM"
        with pytest.raises(BadInput):
            decode_dicom(bytes(blob), "r.dcm")
    bad(b"\x89PNG\r\n\x1a\n" + b"\0" * 300)


def test_rows_columns_inconsistent_with_pixel_data():
    e = bad(make_dicom(ramp12(48, 64), extra_tags={"Rows": 60}))
    assert "Rows/Columns" in e.reason
    e = bad(make_dicom(ramp12(48, 64), extra_tags={"Rows": 20}))
    assert "Rows/Columns" in e.reason
    e = bad(make_dicom(ramp12(48, 64), extra_tags={"Rows": 0}))
    assert "Rows" in e.reason


def test_decompression_bomb_guard():
    e = bad(make_dicom(ramp12(48, 64)), max_pixels=1000)
    assert "decompression bomb" in e.reason
    # a tiny file claiming 60000 x 60000 is refused before anything is decoded
    e = bad(make_dicom(ramp12(8, 8), transfer_syntax="rle", extra_tags={"Rows": 60000, "Columns": 60000}))
    assert "decompression bomb" in e.reason
    assert decode_dicom(make_dicom(ramp12(48, 64)), "ok.dcm", max_pixels=48 * 64).shape == (48, 64)


def test_palette_colour_refused():
    e = bad(make_dicom(np.zeros((4, 4), np.uint8), bits_stored=8, photometric="PALETTE COLOR"))
    assert "PALETTE COLOR" in e.reason


def test_output_carries_no_metadata():
    out = decode_dicom(make_dicom(ramp12(), patient_name="Doe^Jane"), "m.dcm")
    assert type(out) is np.ndarray and out.base is None or isinstance(out.base, np.ndarray)
    assert not hasattr(out, "PatientName")
