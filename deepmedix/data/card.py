"""``deepmedix data card DATASET --out DIR``: a dataset card people can look at.

``card.md`` plus PNGs: records by source × task × split; VQA question types and answer lengths; for each box
label, where its boxes lie (a heat map of box coverage on the unit image) and how large they are; quarantine reasons
by source; near-duplicate pairs side by side (the dropped image, read from where curation found it, next to the
kept one), so the threshold can be judged on one's own data; a contact sheet per task of random records with their
boxes drawn and the prompt and answer underneath. Deterministic for a seed.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import tempfile
import textwrap
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image, ImageDraw, ImageFont

from deepmedix import store
from deepmedix.data.schema import SPLITS, TASKS, Record, load_records
from deepmedix.data.sources.base import slug
from deepmedix.viz import draw_boxes

__all__ = ["write_card", "publish_card"]

GRID = 64  # heat-map cells per side of the unit image


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def counts_png(records: list[Record], path: Path) -> list[list[str]]:
    """Grouped bars: records per source/task, one bar per split. Returns the table rows for the card."""
    keys = sorted({(r.source, r.task) for r in records})
    n = Counter((r.source, r.task, r.split) for r in records)
    fig = _figure(max(6.0, 0.9 * len(keys) + 2), 4.2)
    ax = fig.subplots()
    width = 0.8 / len(SPLITS)
    for k, split in enumerate(SPLITS):
        xs = [i + (k - 1) * width for i in range(len(keys))]
        ax.bar(xs, [n[(s, t, split)] for s, t in keys], width, label=split)
    ax.set_xticks(range(len(keys)), [f"{s}\n{t}" for s, t in keys], fontsize=8)
    ax.set_ylabel("records")
    ax.set_title("Records by source, task and split")
    ax.legend()
    fig.savefig(path)
    return [[s, t, *(str(n[(s, t, sp)]) for sp in SPLITS), str(sum(n[(s, t, sp)] for sp in SPLITS))]
            for s, t in keys]


def vqa_png(records: list[Record], path: Path) -> dict[str, int] | None:
    vqa = [r for r in records if r.task == "vqa"]
    if not vqa:
        return None
    types = Counter(r.question_type for r in vqa)
    fig = _figure(10, 3.8)
    left, right = fig.subplots(1, 2)
    names = sorted(types, key=lambda t: -types[t])
    left.barh(names[::-1], [types[t] for t in names[::-1]])
    left.set_title("VQA question types")
    left.set_xlabel("questions")
    lengths = [len(r.answer.split()) for r in vqa]
    right.hist(lengths, bins=range(0, max(lengths) + 2), color="tab:orange")
    right.set_title("VQA answer length")
    right.set_xlabel("words")
    right.set_ylabel("answers")
    fig.savefig(path)
    return dict(sorted(types.items()))


def boxes_png(label: str, boxes: list[tuple[list[float], tuple[int, int]]], path: Path) -> None:
    """Left: the share of this label's boxes covering each cell of the unit image; right: box sizes (sqrt of the
    area as a fraction of the image) as a histogram."""
    import numpy as np

    heat = np.zeros((GRID, GRID))
    sizes = []
    for box, (w, h) in boxes:
        x1, y1, x2, y2 = (box[0] / w, box[1] / h, box[2] / w, box[3] / h)
        c1, c2 = int(max(0, min(GRID - 1, x1 * GRID))), int(max(0, min(GRID - 1, x2 * GRID)))
        r1, r2 = int(max(0, min(GRID - 1, y1 * GRID))), int(max(0, min(GRID - 1, y2 * GRID)))
        heat[r1:r2 + 1, c1:c2 + 1] += 1
        sizes.append(float(np.sqrt(max(0.0, (x2 - x1) * (y2 - y1)))))
    fig = _figure(9, 4)
    left, right = fig.subplots(1, 2)
    im = left.imshow(heat / max(1, len(boxes)), cmap="magma", extent=(0, 1, 1, 0), vmin=0)
    left.set_title(f"{label}: where its {len(boxes)} boxes lie")
    left.set_xlabel("x / image width")
    left.set_ylabel("y / image height")
    fig.colorbar(im, ax=left, label="share of boxes covering")
    right.hist(sizes, bins=20, range=(0, 1), color="tab:green")
    right.set_title(f"{label}: box size")
    right.set_xlabel("sqrt(box area / image area)")
    right.set_ylabel("boxes")
    fig.savefig(path)


def quarantine_png(rows: list[dict[str, Any]], path: Path) -> dict[str, dict[str, int]]:
    """Horizontal bars: quarantined inputs per (source, reason kind). The kind is the reason without its
    specifics (line numbers, quoted values, numbers)."""
    by: dict[str, Counter] = defaultdict(Counter)
    for q in rows:
        by[q.get("source", "?")][reason_kind(q.get("reason", ""))] += 1
    items = sorted(((s, k, n) for s, c in by.items() for k, n in c.items()), key=lambda x: (x[0], -x[2]))[:40]
    fig = _figure(11, max(2.5, 0.32 * len(items) + 1.2))
    ax = fig.subplots()
    ax.barh([f"{s}: {k[:70]}" for s, k, _ in items][::-1], [n for _, _, n in items][::-1], color="tab:red")
    ax.set_title("Quarantined inputs by source and reason")
    ax.set_xlabel("inputs")
    ax.tick_params(axis="y", labelsize=7)
    fig.savefig(path)
    return {s: dict(c.most_common()) for s, c in sorted(by.items())}


def reason_kind(reason: str) -> str:
    text = re.sub(r"^(line|row) \d+: ", "", reason)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "…", text)
    text = re.sub(r"\[[^\]]*\]", "[…]", text)
    text = re.sub(r"\b\d+x\d+\b", "WxH", text)
    text = re.sub(r"\bstudy \S+", "study …", text)
    return re.sub(r"(?<![\w-])\d+(\.\d+)?", "N", text).strip()


def _thumb(img: Image.Image, size: int, boxes: list | None = None, labels: list[str] | None = None
           ) -> Image.Image:
    """``img`` scaled (up or down, aspect kept) to fit ``size``, with ``boxes`` (its pixels) drawn at that scale."""
    from PIL import ImageOps

    scaled = ImageOps.contain(img.convert("RGB"), (size, size))
    if not boxes:
        return scaled
    sx, sy = scaled.width / img.width, scaled.height / img.height
    return draw_boxes(scaled, [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes], labels)


def _caption(lines: list[str], width: int) -> list[str]:
    out = []
    for line in lines:
        out += textwrap.wrap(line, width=max(10, width // 6)) or [""]
    return out[:6]


def contact_png(image: Callable[[str], Path], records: list[Record], task: str, path: Path, n: int, seed: int
                ) -> int:
    """A grid of ``n`` random records of ``task``: the first image with its boxes, prompt and answer below."""
    pool = sorted((r for r in records if r.task == task), key=lambda r: r.record_id)
    pick = random.Random(f"{seed}:{task}").sample(pool, min(n, len(pool)))
    if not pick:
        return 0
    cell, text_h, cols = 256, 84, 3
    rows = (len(pick) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for k, r in enumerate(pick):
        x, y = (k % cols) * cell, (k // cols) * (cell + text_h)
        with Image.open(image(r.images[0])) as im:
            thumb = _thumb(im, cell - 8, [b.box for b in r.boxes], [b.label for b in r.boxes])
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + 4))
        lines = _caption([f"{r.record_id} ({len(r.images)} view{'s' if len(r.images) > 1 else ''})",
                          f"Q: {r.prompt}", f"A: {r.answer}"], cell)
        for j, line in enumerate(lines):
            draw.text((x + 4, y + cell + 2 + 13 * j), line, fill=(0, 0, 0), font=font)
    sheet.save(path, format="PNG")
    return len(pick)


def _open_input(file: str, roots: list[str]) -> Image.Image:
    """The image a quarantine row names (PNG, JPEG or DICOM): an absolute path or URI, or a path under one of the
    source's roots."""
    import io

    from deepmedix.data.dicom import decode_dicom

    for uri in ([file] if file.startswith("/") or store.is_s3(file) else []) + [f"{r.rstrip('/')}/{file}"
                                                                             for r in roots]:
        try:
            raw = store.fetch_file(uri).read_bytes() if store.is_s3(uri) else Path(uri).read_bytes()
            if raw[128:132] == b"DICM":
                return Image.fromarray(decode_dicom(raw, uri), "L")
            img = Image.open(io.BytesIO(raw))
            img.load()
            return img
        except Exception:  # noqa: BLE001 (missing, unreadable, undecodable: try the next root, then say so)
            continue
    raise OSError(file)


def source_roots(dataset: Path) -> dict[str, list[str]]:
    """Each source's input root as the dataset's lineage records it (``inputs``: ``NN-<source>`` -> uri)."""
    try:
        inputs = store.read_lineage(dataset).get("inputs", {})
    except (OSError, ValueError, store.StoreError):
        return {}
    out: dict[str, list[str]] = defaultdict(list)
    for key, value in inputs.items():
        out[key.split("-", 1)[-1]].append(str(value.get("uri", "")))
    return out


def near_duplicates_png(dataset: Path, image: Callable[[str], Path], records: list[Record], rows: list[dict[str, Any]],
                        path: Path, limit: int = 6) -> list[str]:
    """Each near-duplicate the curation dropped (read from where it was found, when still there) beside the first
    image of the study it duplicated. Returns one line per pair for the card."""
    roots = source_roots(dataset)
    first = {}
    for r in records:
        first.setdefault(r.study_id, r)
    pairs, notes = [], []
    for q in rows:
        m = re.search(r"near-duplicate image \(perceptual hash distance (\d+)\) of an image of study (.+) of "
                      r"another patient", q.get("reason", ""))
        if not m:
            continue
        kept = first.get(m[2])
        try:
            dropped = _open_input(q["file"], roots.get(q.get("source", ""), []))
        except OSError:
            notes.append(f"{q['file']} (distance {m[1]}): no longer readable where curation found it")
            continue
        if kept is None:
            notes.append(f"{q['file']} (distance {m[1]}): study {m[2]} is not in this dataset")
            continue
        pairs.append((dropped, kept, int(m[1]), q["file"]))
        if len(pairs) >= limit:
            break
    if pairs:
        cell = 200
        sheet = Image.new("RGB", (2 * cell + 12, len(pairs) * (cell + 30)), "white")
        draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
        for k, (dropped, kept, dist, file) in enumerate(pairs):
            y = k * (cell + 30)
            with Image.open(image(kept.images[0])) as im:
                sheet.paste(_thumb(im, cell), (cell + 12, y))
            sheet.paste(_thumb(dropped, cell), (0, y))
            draw.text((2, y + cell + 4), f"dropped: {Path(file).name}  |  kept: study {kept.study_id}  |  "
                                         f"distance {dist}", fill=(0, 0, 0), font=font)
        sheet.save(path, format="PNG")
    return [f"{Path(f).name} dropped for study {kept.study_id} (distance {d})" for _, kept, d, f in pairs] + notes


@contextlib.contextmanager
def dataset_view(dataset: str) -> Iterator[tuple[Path, Callable[[str], Path]]]:
    """A folder with the dataset's records, ``quarantine.jsonl`` and ``lineage.json``, and a function from a
    record's image path to a local file. A folder is used as it is. From ``s3://`` only those small files are
    downloaded, and each image the card shows is fetched on its own: a card never copies a whole dataset (its
    images) to the local disk."""
    if not store.is_s3(dataset):
        path = store.fetch(dataset)
        yield path, lambda rel: path / rel
        return
    from deepmedix.data.sink import Sink

    sink = Sink(dataset)
    tmp = Path(tempfile.mkdtemp(prefix="deepmedix-card-"))
    try:
        for rel in [*sink.list("records"), store.LINEAGE, "quarantine.jsonl"]:
            raw = sink.get(rel)
            if raw is not None:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(raw)
        if not (tmp / store.LINEAGE).is_file():
            raise store.StoreError(f"{sink.uri}: incomplete dataset (no {store.LINEAGE} commit marker)")
        yield tmp, lambda rel: store.fetch_file(f"{sink.uri}/{rel}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_card(dataset: str, out: str, sample: int = 6, seed: int = 0) -> dict[str, Any]:
    """Write ``card.md`` and its PNGs for a curated dataset (folder or ``s3://``) into ``out`` (atomically)."""
    with dataset_view(dataset) as (path, image):
        return _write_card(dataset, path, image, out, sample, seed)


def _write_card(dataset: str, path: Path, image: Callable[[str], Path], out: str, sample: int, seed: int
                ) -> dict[str, Any]:
    records = load_records(path)
    qfile = path / "quarantine.jsonl"
    rows = [json.loads(ln) for ln in qfile.read_text().splitlines() if ln.strip()] if qfile.exists() else []
    with store.atomic_dir(out) as d:
        md = [f"# Dataset card: {dataset}", "", f"{len(records)} records of {len({r.patient_id for r in records})} "
              f"patients; {len(rows)} inputs quarantined.", "", "## Records", "", "![records](counts.png)", "",
              "| source | task | " + " | ".join(SPLITS) + " | all |", "|---" * (len(SPLITS) + 3) + "|"]
        md += ["| " + " | ".join(row) + " |" for row in counts_png(records, d / "counts.png")]
        pngs = ["counts.png"]
        types = vqa_png(records, d / "vqa.png")
        if types:
            pngs.append("vqa.png")
            md += ["", "## VQA", "", "![vqa](vqa.png)", "", "Question types: " +
                   ", ".join(f"{t} {n}" for t, n in types.items()) + "."]
        labelled: dict[str, list] = defaultdict(list)
        for r in records:
            for b in r.boxes:
                labelled[b.label].append((b.box, tuple(r.image_sizes[0])))
        if labelled:
            md += ["", "## Boxes", ""]
            names: set[str] = set()
            for label in sorted(labelled):
                name = f"boxes-{slug(label)}.png"
                k = 1
                while name in names:  # labels that differ only in case or punctuation get their own file
                    k += 1
                    name = f"boxes-{slug(label)}-{k}.png"
                names.add(name)
                boxes_png(label, labelled[label], d / name)
                pngs.append(name)
                md += [f"### {label} ({len(labelled[label])} boxes)", "", f"![{label}]({name})", ""]
        if rows:
            kinds = quarantine_png(rows, d / "quarantine.png")
            pngs.append("quarantine.png")
            md += ["", "## Quarantine", "", "![quarantine](quarantine.png)", ""]
            md += [f"- **{s}**: " + "; ".join(f"{k} ({n})" for k, n in c.items()) for s, c in kinds.items()]
        pairs = near_duplicates_png(path, image, records, rows, d / "near-duplicates.png")
        md += ["", "## Near-duplicates", ""]
        if (d / "near-duplicates.png").exists():
            pngs.append("near-duplicates.png")
            md += ["Dropped (left) beside the image it was taken for a copy of (right): judge the perceptual-hash "
                   "threshold on your own data.", "", "![near-duplicates](near-duplicates.png)", ""]
        md += [f"- {p}" for p in pairs] or ["None dropped."]
        md += ["", "## Samples", ""]
        for task in TASKS:
            name = f"samples-{task}.png"
            if contact_png(image, records, task, d / name, sample, seed):
                pngs.append(name)
                md += [f"### {task}", "", f"![{task}]({name})", ""]
        (d / "card.md").write_text("\n".join(md) + "\n")
    return {"out": str(out), "records": len(records), "quarantined": len(rows), "pngs": pngs}


def publish_card(dataset: str, sample: int = 6, seed: int = 0) -> str:
    """The card of a committed dataset, written into it (``DATASET/card``, a folder or an ``s3://`` prefix), then
    named in the dataset's ``lineage.json`` (``"card": "card"``). The lineage is the dataset's commit marker and the
    version :func:`deepmedix.store.fetch` keys its cache on, so a reader that fetched the dataset before the card
    existed fetches it again with the card, never a copy without it. Only that one object changes: the records,
    the content hash and the config hash stay as they were committed."""
    from deepmedix.data.sink import Sink

    sink = Sink(dataset)
    raw = sink.get(store.LINEAGE)
    if raw is None:
        raise store.StoreError(f"{dataset}: no {store.LINEAGE} (not a committed dataset)")
    out = f"{sink.uri}/card"
    write_card(dataset, out, sample, seed)
    lineage = json.loads(raw)
    lineage["card"] = "card"
    sink.put(store.LINEAGE, (json.dumps(lineage, indent=2, sort_keys=True) + "\n").encode())
    return out


def card_html(card_dir: str | Path) -> str:
    """``card.md`` as one self-contained HTML page, its PNGs inlined (what KFP's UI shows for an HTML artifact)."""
    import base64
    import html

    card_dir = Path(card_dir)
    body, table = [], False
    for line in (card_dir / "card.md").read_text().splitlines():
        if table and not line.startswith("|"):
            body.append("</table>")
            table = False
        image = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if image:
            data = base64.b64encode((card_dir / image[2]).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(image[1])}" src="data:image/png;base64,{data}" '
                        f'style="max-width:100%"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("|---"):
            continue
        elif line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            tag = "th" if not table else "td"
            body.append(("<table border=1 cellpadding=3>" if not table else "") + "<tr>" +
                        "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            table = True
        elif line.startswith("- "):
            item = re.sub(r"[*][*](.+?)[*][*]", r"<b>\1</b>", html.escape(line[2:]))
            body.append(f"<li>{item}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if table:
        body.append("</table>")
    return "<!doctype html><html><head><meta charset='utf-8'><title>Dataset card</title></head><body>" + \
        "\n".join(body) + "</body></html>\n"
