"""Requests with several views of one study per query, parsed in process: v1 (``image`` as a list, or ``images``),
v2 (``image`` of shape [queries, views]) and OpenAI (several ``image_url`` parts); limits and errors name the
field; the overlay shows the views side by side. The served answers are in test_server.py."""

from __future__ import annotations

import base64
import io

import fx_serving as fx
import pytest
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest
from PIL import Image

from deepmedix.grounding import grounding_object
from deepmedix.viz import COLORS, overlay_png
from serving.inputs import Limits, parse_chat, parse_v1, parse_v2

LIM = Limits(frame=fx.FRAME)


def test_v1_views_as_a_list_in_order_each_sized_by_the_frame():
    a, b = fx.png_b64(300, 200, 1), fx.png_b64(200, 300, 4)
    q1, q2, q3 = parse_v1({"instances": [{"image": [a, b], "question": "Compare.", "overlay": True},
                                         {"images": [b], "question": "One."},
                                         {"image": a, "question": "Plain."}]}, LIM)
    assert q1.sizes == [(300, 200), (200, 300)] and [im.size for im in q1.images] == [
        fx.FRAME.input_size(300, 200), fx.FRAME.input_size(200, 300)]
    assert [o.size for o in q1.originals] == [(300, 200), (200, 300)]
    assert q2.sizes == [(200, 300)] and q3.sizes == [(300, 200)] and q2.originals is None


@pytest.mark.parametrize("instance, message", [
    ({"image": "A", "images": ["A"]}, r"instances\[0\]: give \"image\" or \"images\", not both"),
    ({"image": []}, r"instances\[0\]\.image: an empty list"),
    ({"images": "A"}, r"instances\[0\]\.images: expected a list"),
    ({"image": ["A"] * 5}, r"instances\[0\]\.image: 5 images, over the limit of 4 views per query"),
    ({"image": ["GOOD", "not base64 !!"]}, r"instances\[0\]\.image\[1\]: not valid base64"),
])
def test_v1_view_errors_name_the_field(instance, message):
    inst = {k: ([fx.png_b64(20, 20) if x == "GOOD" else x for x in v] if isinstance(v, list) else v)
            for k, v in instance.items()}
    with pytest.raises(InvalidInput, match=message):
        parse_v1({"instances": [{**inst, "question": "q"}]}, LIM)


def test_v2_image_of_shape_queries_by_views_is_row_major():
    imgs = [fx.png_b64(40 + 10 * i, 30, i) for i in range(4)]
    req = InferRequest("m", [InferInput("image", [2, 2], "BYTES", [imgs[:2], imgs[2:]]),
                             InferInput("text", [2, 1], "BYTES", [[b"first"], [b"second"]])])
    q1, q2 = parse_v2(req, LIM)
    assert q1.sizes == [(40, 30), (50, 30)] and q2.sizes == [(60, 30), (70, 30)]
    assert (q1.question, q2.question) == ("first", "second")
    # [n, 1]: one view each, as before
    req = InferRequest("m", [InferInput("image", [2, 1], "BYTES", [imgs[0], imgs[1]]),
                             InferInput("text", [1], "BYTES", [b"q"])])
    assert [q.sizes for q in parse_v2(req, LIM)] == [[(40, 30)], [(50, 30)]]
    for shape, data, message in (([1, 2, 1], imgs[:2], r"shape \[1, 2, 1\]; expected \[queries\] or"),
                                 ([1, 5], imgs + imgs[:1], "5 images, over the limit of 4 views"),
                                 ([1, 2], [imgs[0], "QUJD"], r"inputs\[0\] \(image\)\.data\[1\]")):
        req = InferRequest("m", [InferInput("image", shape, "BYTES", data), InferInput("text", [1], "BYTES", [b"q"])])
        with pytest.raises(InvalidInput, match=message):
            parse_v2(req, LIM)


def test_openai_several_image_url_parts_and_view_names_are_not_the_question():
    url = lambda w, h: {"type": "image_url", "image_url": {"url": "data:image/png;base64," + fx.png_b64(w, h)}}  # noqa
    q, _ = parse_chat({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Picture 1: "}, url(300, 200), {"type": "text", "text": "Picture 2:"}, url(200, 300),
        {"type": "text", "text": "Compare the views."}]}]}, LIM, "m")
    assert q.sizes == [(300, 200), (200, 300)] and q.question == "Compare the views."
    with pytest.raises(InvalidInput, match=r"messages\[0\]\.content: no image_url part"):
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "text only"}]}, LIM, "m")


def test_overlay_draws_each_box_on_its_view_side_by_side():
    raw = ("<think> Picture 1 shows the heart with [28, 56, 84, 112]; Picture 2 shows the effusion with "
           "[56, 28, 112, 84] </think> The answer is: \\boxed{cardiomegaly | effusion}")
    sizes = [(300, 200), (200, 300)]
    g = grounding_object(raw, sizes, fx.FRAME)
    black = [Image.new("RGB", s) for s in sizes]
    out = Image.open(io.BytesIO(base64.b64decode(overlay_png(black, g, sizes))))
    assert out.size == (300 + 133, 200)
    (x1, y1, x2, _), (u1, v1, u2, _) = g["boxes"]
    # top edges, right of the step label drawn above each box
    assert out.getpixel((round(x2) - 4, round(y1) + 1)) == COLORS[0]
    k = 200 / 300  # the second view is scaled to the first one's height
    assert out.getpixel((300 + round(u2 * k) - 4, round(v1 * k) + 1)) == COLORS[1]
    assert out.getpixel((300 + round(u2 * k) - 4, round(v1 * k) + 20)) == (0, 0, 0)  # inside, untouched
    # reduced copies of the views (as a request keeps them): boxes scaled to each copy
    small = [Image.new("RGB", (150, 100)), Image.new("RGB", (100, 150))]
    half = Image.open(io.BytesIO(base64.b64decode(overlay_png(small, g, sizes))))
    assert half.size == (150 + 67, 100)
    assert half.getpixel((round(x2 / 2) - 3, round(y1 / 2) + 1)) == COLORS[0]


def test_overlay_of_views_with_extreme_aspect_ratios_stays_small():
    """A request chooses its images: a 12 x 2000 view beside a 2000 x 12 one would make a 333000-pixel-wide strip
    at the first view's height. The strip is capped at 2048 px per view; a view too thin for the processor at all
    is refused when the request is parsed, naming it."""
    sizes = [(12, 2000), (2000, 12)]
    g = grounding_object("<think> Picture 2 [1, 1, 5, 5] </think> \\boxed{x}", sizes, fx.FRAME)
    out = Image.open(io.BytesIO(base64.b64decode(overlay_png([Image.new("RGB", s) for s in sizes], g, sizes))))
    assert out.width <= 2 * 2048 and out.height >= 1
    with pytest.raises(InvalidInput, match=r"instances\[0\]\.image\[1\]: 10x2000 pixels: absolute aspect ratio"):
        parse_v1({"instances": [{"image": [fx.png_b64(30, 20), fx.png_b64(10, 2000)], "question": "q"}]}, LIM)
