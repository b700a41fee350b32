"""The native box frame is what the processor really makes of each image: the grid ``image_grid_thw`` covers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as stock_smart_resize

from deepmedix.data.records import open_image
from deepmedix.grounding import Frame, smart_resize
from deepmedix.model.load import load
from deepmedix.model.processor import folder_frame, processor_frame
from deepmedix.model.tiny import build_tiny

SIZES = [(2544, 3056), (3056, 2544), (512, 512), (300, 200), (1024, 700), (700, 1024), (2000, 640), (64, 900),
         (999, 1001), (168, 168), (4000, 30)]
BUDGETS = [(262144, 262144), (168 * 168, 168 * 168), (3136, 12845056), (3136, 262144)]


def test_smart_resize_is_the_processors():
    for w, h in SIZES + [(1, 100), (100, 9), (56, 56)]:
        for lo, hi in BUDGETS:
            assert smart_resize(h, w, 28, lo, hi) == tuple(stock_smart_resize(h, w, 28, lo, hi)), (w, h, lo, hi)


@pytest.mark.parametrize("lo,hi", BUDGETS[:3])
def test_native_frame_is_the_grid_the_processor_produces(lo, hi):
    """For non-square images: open_image(img, frame) is what the processor is handed; the grid it returns
    (``image_grid_thw`` x patch size) is exactly ``frame.size`` — boxes written in that frame are pixels of the
    grid the vision encoder sees."""
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": lo, "longest_edge": hi})
    frame = processor_frame(ip, "native")
    assert (frame.factor, frame.min_pixels, frame.max_pixels) == (28, lo, hi)
    for w, h in SIZES:
        if max(w, h) / min(w, h) > 50 and hi > 262144:
            continue  # a 4000x30 strip at the stock budget is 4 GB of patches: not a chest film
        img = open_image(Image.new("L", (w, h), 90), frame)
        assert img.size == frame.input_size(w, h)
        _, gh, gw = (int(v) for v in ip(images=[img], return_tensors="np")["image_grid_thw"][0])
        assert (gw * ip.patch_size, gh * ip.patch_size) == frame.size(w, h), (w, h)


def test_square_frame_squashes_and_boxes_stay_in_the_square():
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 262144, "longest_edge": 262144})
    frame = processor_frame(ip, "square512")
    img = open_image(Image.new("L", (300, 700)), frame)
    assert img.size == (512, 512) and frame.size(300, 700) == (512, 512)
    _, gh, gw = (int(v) for v in ip(images=[img], return_tensors="np")["image_grid_thw"][0])
    assert (gw * 14, gh * 14) == (532, 532)  # the processor's grid differs from the box square: that convention


def test_a_model_folder_gives_the_same_frame_loaded_or_read(tmp_path):
    folder = build_tiny(tmp_path / "m", texts=["the heart is enlarged"])
    loaded = load(folder)
    assert loaded.frame("native") == folder_frame(folder) == Frame("native", 512, 28, 168 * 168, 168 * 168)
    assert folder_frame(folder, "native", 262144, 262144) == Frame()  # a budget override, as load_processor takes
    assert load(folder, min_pixels=262144, max_pixels=262144).frame() == Frame()
    assert loaded.frame(Frame.parse("square512")) == Frame("square", 512, 28, 168 * 168, 168 * 168)
    # what the tiny model is handed for a portrait image, and the grid it sees
    img = open_image(Image.fromarray(np.zeros((700, 300), np.uint8)), loaded.frame())
    grid = loaded.processor.image_processor(images=[img], return_tensors="np")["image_grid_thw"][0]
    assert (int(grid[2]) * 14, int(grid[1]) * 14) == loaded.frame().size(300, 700) == (112, 252)


def test_auto_is_the_frame_the_folder_was_trained_in(tmp_path):
    """A trained folder's lineage.json records its training config's frame; ``auto`` (the default of every stage,
    of evaluation and of the server) reads it, and a folder that records none (a released checkpoint) is native."""
    import json
    import shutil

    from deepmedix.model.processor import recorded_frame, resolve_frame

    folder = build_tiny(tmp_path / "m", texts=["the heart is enlarged"])
    assert recorded_frame(folder) == "native" and load(folder).frame("auto") == load(folder).frame("native")
    for written, spec in (("square512", "square512"), (512, "square512"), ("native", "native"), ("auto", "native"),
                          ("bogus", "native")):
        trained = tmp_path / f"t-{written}"
        shutil.copytree(folder, trained)
        (trained / "lineage.json").write_text(json.dumps({"stage": "sft", "config": {"frame": written}}))
        assert recorded_frame(trained) == spec, written
        assert load(trained).frame() == folder_frame(trained, "auto") == load(trained).frame(spec)
        assert resolve_frame("auto", trained) == spec and resolve_frame("native", trained) == "native"
    (tmp_path / "t-square512" / "lineage.json").write_text("{not json")
    assert recorded_frame(tmp_path / "t-square512") == "native"
    with pytest.raises(ValueError):
        resolve_frame("square", folder)
