"""Source adapters: each reads one public dataset in its own published layout and yields Items.

``get_source(name)`` returns the adapter class; ``SOURCES`` lists the registered names.
"""

from __future__ import annotations

import importlib

from deepmedix.data.sources.base import SOURCES, BadInput, ImageRef, Item, Quarantine, Root, Source, open_root

_MODULES = ("phantom", "mimic", "ms_cxr", "mimic_vqa", "vindr", "nih", "iu_xray", "manifest")


def _load_all() -> None:
    for m in _MODULES:
        importlib.import_module(f"deepmedix.data.sources.{m}")


def get_source(name: str) -> type[Source]:
    _load_all()
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known: {sorted(SOURCES)}")
    return SOURCES[name]


def source_names() -> list[str]:
    _load_all()
    return sorted(SOURCES)


__all__ = ["SOURCES", "BadInput", "ImageRef", "Item", "Quarantine", "Root", "Source", "open_root", "get_source",
           "source_names"]
