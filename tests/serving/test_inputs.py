"""In-process tests of the serving pieces: request parsing, grounding in original pixels, overlays, batching."""

from __future__ import annotations

import asyncio
import base64
import io

import fx_serving as fx
import numpy as np
import pytest
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest
from PIL import Image

from deepmedix.grounding import INSTRUCTION, Frame, grounding_object
from deepmedix.viz import draw_overlay
from serving import prometheus as metrics
from serving.inputs import Limits, UnknownModel, make_query, parse_chat, parse_v1, parse_v2
from serving.predictor import DeepMedixModel


def test_grounding_object_maps_boxes_to_original_pixels():
    raw = r"<think> heart with [0, 0, 256, 512] and [256, 256, 512, 512] </think> The answer is: \boxed{yes}"
    g = grounding_object(raw, (300, 200), frame=Frame.parse("square512"))
    assert g["boxes"] == [[0, 0, 150, 200], [150, 100, 300, 200]]
    assert g["steps"] == [{"text": "heart with [0, 0, 256, 512] and [256, 256, 512, 512]",
                           "boxes": [[0, 0, 150, 200], [150, 100, 300, 200]], "views": [0, 0]}]
    assert g["answer"] == "yes" and g["format_ok"] is True and g["image_size"] == [300, 200]
    assert grounding_object("no grammar at all", (10, 10)) == {
        "answer": None, "format_ok": False, "steps": [], "boxes": [], "box_views": [], "image_size": [10, 10],
        "image_sizes": [[10, 10]], "views": [{"image_size": [10, 10], "boxes": []}]}


def test_v1_sixteen_bit_png_data_url_and_instruction_not_doubled():
    arr = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    (q,) = parse_v1({"instances": [{"image": url, "question": f" Findings?\n{INSTRUCTION}\n", "top_p": 0.5,
                                    "temperature": 0.7}]}, Limits(max_new_tokens=33))
    # sized by the native frame (aspect kept, scaled up to the pixel budget), not squashed to a square
    (image,) = q.images
    assert image.mode == "RGB" and image.size == Limits().frame.input_size(40, 30) == (591, 443)
    assert q.sizes == [(40, 30)]
    assert np.asarray(image).max() == 255 and q.originals is None
    assert q.question == "Findings?" and q.max_new_tokens == 33
    assert q.sampling == (True, 0.7, 0.5)


def test_limits_checked_before_decoding():
    with pytest.raises(InvalidInput, match=r"instances\[0\]\.image: 300x200 pixels, over the limit of 59999"):
        parse_v1({"instances": [{"image": fx.png_b64(300, 200), "question": "q"}]}, Limits(max_pixels=59_999))
    with pytest.raises(InvalidInput, match=r"instances\[0\]\.image: .*limit of 100 bytes"):
        parse_v1({"instances": [{"image": fx.png_b64(300, 200), "question": "q"}]}, Limits(max_image_bytes=100))
    with pytest.raises(InvalidInput, match=r"instances\[0\]\.question: 21 characters, over the limit of 20"):
        parse_v1({"instances": [{"image": fx.png_b64(8, 8), "question": "x" * 21}]}, Limits(max_text_chars=20))


def test_v2_raw_bytes_and_broadcast_text():
    img = InferInput("image", [2], "BYTES", [fx.png_bytes(20, 10), fx.png_b64(30, 10)])
    text = InferInput("text", [1], "BYTES", [b"Findings?"])
    budget = InferInput("max_new_tokens", [2, 1], "INT32", [[5], [7]])
    qs = parse_v2(InferRequest("m", [img, text, budget], parameters={"overlay": True}), Limits())
    assert [q.sizes for q in qs] == [[(20, 10)], [(30, 10)]]
    assert [q.originals[0].size for q in qs] == [(20, 10), (30, 10)]  # kept for the overlay
    assert [q.question for q in qs] == ["Findings?", "Findings?"] and [q.max_new_tokens for q in qs] == [5, 7]
    assert all(q.overlay for q in qs)
    with pytest.raises(InvalidInput, match=r"unknown input\(s\) \['prompt'\]"):
        parse_v2(InferRequest("m", [img, text, InferInput("prompt", [1], "BYTES", ["x"])]), Limits())


def test_chat_parsing():
    user = {"role": "user", "content": [{"type": "text", "text": "Is there"},
                                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                            + fx.png_b64(16, 8)}},
                                        {"type": "text", "text": "an effusion?"}]}
    q, opts = parse_chat({"model": "m", "messages": [{"role": "system", "content": "Be brief."}, user],
                          "max_completion_tokens": 9, "stream": True}, Limits(), "m")
    assert q.question == "Is there\nan effusion?" and q.sizes == [(16, 8)] and q.max_new_tokens == 9
    assert q.system == "Be brief."
    assert opts == {"model": "m", "stream": True, "include_usage": False}
    for body, msg in [({"model": "m", "messages": [user], "n": 2}, "n: only n=1"),
                      ({"model": "m", "messages": [user], "tools": [{"type": "function"}]}, "tools:"),
                      ({"model": "m", "messages": [user, user]}, "2 user messages"),
                      ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, r"messages\[0\]\.role"),
                      ({"messages": [user]}, "model:"),
                      ({"model": "m", "messages": [user], "top_p": 0}, r"top_p: expected a number in \(0"),
                      ({"model": "m", "messages": [user], "stream": "yes"}, "stream: expected true or false"),
                      ({"model": "m", "messages": [user], "temperature": 10**400}, "temperature: expected a number"),
                      ({"model": "m", "messages": [user], "n": True}, "n: only n=1"),
                      ({"model": "m", "messages": [user], "stop": ["\n"]}, "stop: stop sequences"),
                      ({"model": "m", "messages": [user], "seed": 1, "temperature": 0.5}, "seed: seeded sampling"),
                      ({"model": "m", "messages": [user], "response_format": {"type": "json_object"}},
                       "response_format"),
                      ({"model": "other", "messages": [user]}, "model: the model 'other' does not exist")]:
        with pytest.raises(InvalidInput, match=msg):
            parse_chat(body, Limits(), "m")
    with pytest.raises(UnknownModel):  # checked before the image is decoded
        parse_chat({"model": "x", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, Limits(), "m")


def test_draw_overlay(tmp_path):
    img = Image.new("L", (300, 200), 0)
    out = draw_overlay(img, [[10, 20, 150, 120]], ["heart"], tmp_path / "o.png")
    drawn = Image.open(out)
    assert drawn.format == "PNG" and drawn.mode == "RGB" and drawn.size == (300, 200)
    assert drawn.getpixel((80, 20)) == (255, 0, 0)  # top edge of the first (red) box
    assert drawn.getpixel((80, 70)) == (0, 0, 0)  # inside stays untouched


def test_batcher_groups_by_decoding_and_keeps_order(tmp_path):
    """Six concurrent queries on a real (tiny) model: greedy ones share a generate, sampled ones run in their
    own; each request gets its own answers back in order, with its own token budget."""
    from deepmedix.model.tiny import build_tiny

    model = DeepMedixModel("m", str(build_tiny(tmp_path / "tiny")), max_batch_size=8, max_wait_ms=200)
    model.load()
    img = fx.image(64, 48)

    lim = Limits()

    async def go():
        greedy = [make_query([img], "q", lim, n) for n in (3, 6, 9, 12)]
        sampled = [make_query([img], "q", lim, 4, temperature=0.9, top_p=0.9) for _ in range(2)]
        return await asyncio.gather(model.answer(greedy[:2]), model.answer(sampled), model.answer(greedy[2:]))

    count0, sum0 = _hist(metrics.BATCH_SIZE)
    first, sampled, second = asyncio.run(go())
    count1, sum1 = _hist(metrics.BATCH_SIZE)
    assert (count1 - count0, sum1 - sum0) == (2, 6)  # one greedy batch of 4, one sampled batch of 2
    assert [a["usage"]["completion_tokens"] for a in first + second] == [3, 6, 9, 12]
    longest = second[1]["text"]
    assert all(longest.startswith(a["text"]) for a in first + second[:1])  # greedy: prefixes of one answer
    assert [a["usage"]["completion_tokens"] for a in sampled] == [4, 4]
    model.stop()


def _hist(h):
    samples = {s.name: s.value for m in h.collect() for s in m.samples}
    return samples["deepmedix_batch_size_count"], samples["deepmedix_batch_size_sum"]


def test_generate_batch_rows_end_on_their_own(tmp_path):
    """Each row stops at its own budget and is reported (on_done) as it ends, before the batch does; a row whose
    caller is gone stops at once; the streamed tokens are the row's tokens."""
    from deepmedix.model.generate import generate_batch
    from deepmedix.model.load import load
    from deepmedix.model.tiny import build_tiny

    loaded = load(build_tiny(tmp_path / "tiny"), device="cpu")
    img = fx.image(64, 48)
    done, streamed = [], {0: [], 1: [], 2: []}
    gens = generate_batch(loaded, [[img]] * 3, ["q", "q", "r"], [2, 12, 40],
                          on_token=lambda k, t: streamed[k].append(t), on_done=lambda k, g: done.append((k, g)),
                          stop_row=lambda k: k == 2 and len(streamed[2]) >= 5)
    assert [k for k, _ in done] == [0, 2, 1]  # in the order they ended
    assert [g.completion_tokens for g in gens] == [2, 12, 5] and gens[2].finish_reason == "length"
    assert [dict(done)[k] for k in range(3)] == gens
    assert [len(v) for v in streamed.values()] == [2, 12, 5]
    assert loaded.processor.decode(streamed[1], skip_special_tokens=True).strip() == gens[1].text
