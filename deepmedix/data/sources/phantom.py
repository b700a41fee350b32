"""The embedded default source: the procedurally generated phantom CXR set, streamed one study at a time."""

from __future__ import annotations

from typing import Iterator

from deepmedix.data.sources.base import ImageRef, Item, Quarantine, Source


class PhantomSource(Source):
    name = "phantom"
    option_names = ("n_patients", "n_studies", "studies_per_patient", "image_size", "vqa_per_study",
                    "split_ratios", "seed")
    needs_root = False

    def items(self) -> Iterator[Item | Quarantine]:
        from deepmedix.data import phantom  # drawing code: imported only when the phantom set is drawn

        o = self.options
        size = int(o.get("image_size", 512))
        for data, recs in phantom.iter_studies(
                n_patients=int(o.get("n_patients", 40)),
                studies_per_patient=tuple(o.get("studies_per_patient", (1, 3))),
                size=size, seed=int(o.get("seed", 0)), split_ratios=tuple(o.get("split_ratios", (0.7, 0.15, 0.15))),
                vqa_per_study=int(o.get("vqa_per_study", 3)), n_studies=int(o.get("n_studies", 0))):
            ref = ImageRef(data=data, name=f"phantom study {recs[0]['study_id']}")
            for r in recs:
                r = dict(r)
                r.pop("source")
                yield Item(images=[ref], **r)
