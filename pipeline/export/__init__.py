"""Tracks out of the index into the formats other tools read: YouTube-VIS JSON (`ytvis`), MOTS
(`mots`: MOTS Challenge text plus MOTS PNG), MOT Challenge boxes (`mot`) and CVAT for video 1.1
XML (`cvat`). Each format's module states its frame numbering and ids in its docstring (and, where
the format allows, in the files it writes).

Every writer reads the default view of the committed index (`selection`) and streams masks
(`masks`): memory is bounded by one object's or one range of frames' mask rows, whatever the
video's length. Output goes to a local path or an fsspec URL (`target`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from pipeline.export.selection import ExportError, VideoInfo, select_videos
from pipeline.export.target import Target
from pipeline.store import TableStore

FORMATS = ("ytvis", "mots", "mot", "cvat")


def export(output: str, fmt: str, out: str, storage_options: Mapping[str, Any] | None = None,
           videos: Sequence[str] | None = None, label: str | None = None,
           note: Callable[[str], None] = lambda line: None) -> dict[str, int]:
    """Write the selection of OUTPUT to `out` in `fmt`; returns counts (videos, tracks, ...)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    store = TableStore(output, storage_options)
    selected = select_videos(store, videos, label)
    target = Target(out, storage_options)
    with target.guard("writing the export"):
        if fmt == "ytvis":
            from pipeline.export import ytvis

            with target.open() as stream:
                return ytvis.write(store, selected, stream)
        from pipeline.export import cvat, mot, mots

        writer = {"mots": mots.write, "mot": mot.write, "cvat": cvat.write}[fmt]
        return writer(store, selected, target, note)


__all__ = ["FORMATS", "ExportError", "VideoInfo", "export", "select_videos"]
