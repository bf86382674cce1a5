"""Ground truth for `pixelrefer eval`: YouTube-VIS JSON or MOTS Challenge text, read into per-video
frames of {ground-truth id: COCO RLE}, each frame tagged with how it is placed in time.

How a ground-truth video is found in the index (`GtVideo.key`): YTVIS by `pixelrefer.video_id`
(what `pixelrefer export --format ytvis` writes), else by the folder of its first `file_names`
entry (`<video>/00000.jpg`, the YTVIS convention); MOTS by the file's name without `.txt`. The key
must equal an index `video_id` or its source file's name without extension (`scores.match`).

How a ground-truth frame is placed in time (`GtFrame.ref`):
- YTVIS with `pixelrefer.timestamps`: ("time", seconds);
- YTVIS without them: ("sampled", k): frame k is the index's k-th sampled frame (a YTVIS file's
  frames are a sampled list with no times, so the index's own grid is the only reading);
- MOTS: ("source", n - 1): line frame n is the 1-based source frame n (MOTS Challenge numbering),
  at (n - 1) / fps seconds. MOTS class 10 (ignore regions) is left out.
- CVAT for video 1.1 (a file or a folder of `.xml`, e.g. a corrected `export --format cvat`):
  ("source", n), CVAT's 0-based source frames; each track's boxes where not `outside` (CVAT's own
  export lists every frame of a track, interpolated ones too). Boxes, not masks: `scores` then
  compares the index's boxes. The video is named by the task's `<name>` (the export writes the
  `video_id` there), else by the file name.

Any problem raises `ExportError` naming the file and the first problem found.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Any

from pipeline.export.selection import ExportError
from pipeline.export.target import Target

GT_FORMATS = ("ytvis", "mots", "cvat")
MOTS_IGNORE_CLASS = 10


@dataclasses.dataclass
class GtFrame:
    ref: tuple[str, float]  # ("time", seconds) | ("sampled", k) | ("source", 0-based frame)
    objects: dict[int, dict[str, Any]]  # ground-truth id -> COCO RLE {"size": [h, w], "counts": str}


@dataclasses.dataclass
class GtVideo:
    key: str
    where: str  # how messages name it: "gt.json videos[2]" or "gt/seq.txt"
    frames: list[GtFrame]
    boxes: bool = False  # objects are COCO boxes [x, y, w, h] (CVAT tracks), not RLE masks


#: What a ground truth's name says its format is, when `--format` is not given.
SUFFIX_FORMATS = {".json": "ytvis", ".txt": "mots", ".xml": "cvat"}


def guess_format(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """The format a ground truth's name (or, for a folder, its files' names) says; ExportError when it
    says none or several, asking for `--format`."""
    source = Target(path, storage_options)
    with source.guard("reading the ground truth"):
        if not source.fs.exists(source.root):
            raise ExportError(f"ground truth {path!r}: no such file or folder")
        names = source.fs.ls(source.root, detail=False) if source.fs.isdir(source.root) else [source.root]
    found = {SUFFIX_FORMATS[s] for s in (posixpath.splitext(str(n))[1].lower() for n in names) if s in SUFFIX_FORMATS}
    if len(found) != 1:
        said = f"holds {', '.join(sorted(found))} files" if found else "has no .json, .txt or .xml name"
        raise ExportError(f"ground truth {path!r} {said}: give its format with --format {'|'.join(GT_FORMATS)}")
    return found.pop()


def read_ground_truth(path: str, fmt: str | None, storage_options: dict[str, Any] | None = None) -> list[GtVideo]:
    """Every video of a ground-truth file or folder; `fmt` None: `guess_format`."""
    fmt = fmt or guess_format(path, storage_options)
    if fmt not in GT_FORMATS:
        raise ExportError(f"unknown ground-truth format {fmt!r}: use one of {', '.join(GT_FORMATS)}")
    source = Target(path, storage_options)
    with source.guard("reading the ground truth"):
        if not source.fs.exists(source.root):
            raise ExportError(f"ground truth {path!r}: no such file or folder")
        if fmt == "ytvis":
            videos = _read_ytvis(source, path)
        else:
            videos = [_read_mots_file(source, p, posixpath.basename(p)) if fmt == "mots" else _read_cvat_file(source, p)
                      for p in _files(source, path, ".txt" if fmt == "mots" else ".xml")]
    if not videos:
        raise ExportError(f"ground truth {path!r}: holds no video")
    return videos


# -- YouTube-VIS --------------------------------------------------------------------------------


def _read_ytvis(source: Target, shown: str) -> list[GtVideo]:
    if source.fs.isdir(source.root):
        raise ExportError(f"ground truth {shown!r} is a folder; a YTVIS ground truth is one JSON file")
    try:
        with source.fs.open(source.root, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"ground truth {shown!r} is not a JSON file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("videos"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ExportError(f"ground truth {shown!r} is not YouTube-VIS JSON: it needs top-level 'videos' and "
                          "'annotations' lists")
    videos: dict[Any, GtVideo] = {}
    lengths: dict[Any, int] = {}
    for i, entry in enumerate(data["videos"]):
        where = f"{shown} videos[{i}]"
        if not isinstance(entry, dict) or "id" not in entry:
            raise ExportError(f"ground truth {where}: a video needs an 'id'")
        extra = entry.get("pixelrefer") if isinstance(entry.get("pixelrefer"), dict) else {}
        names = entry.get("file_names") or []
        key = extra.get("video_id") or (posixpath.dirname(str(names[0])) if names else None)
        if not key:
            raise ExportError(f"ground truth {where}: no 'pixelrefer.video_id' and no 'file_names' folder to "
                              "name the video by")
        length = int(entry.get("length") or len(names))
        times = extra.get("timestamps")
        if times is not None and len(times) != length:
            raise ExportError(f"ground truth {where}: {len(times)} timestamps for {length} frames")
        refs = [("time", float(t)) for t in times] if times is not None else [("sampled", k) for k in range(length)]
        videos[entry["id"]] = GtVideo(str(key), where, [GtFrame(ref, {}) for ref in refs])
        lengths[entry["id"]] = length
    for i, ann in enumerate(data["annotations"]):
        where = f"{shown} annotations[{i}]"
        if not isinstance(ann, dict) or ann.get("video_id") not in videos:
            raise ExportError(f"ground truth {where}: its video_id is not among 'videos'")
        segmentations = ann.get("segmentations")
        if not isinstance(segmentations, list) or len(segmentations) != lengths[ann["video_id"]]:
            raise ExportError(f"ground truth {where}: 'segmentations' must list one entry (or null) per frame "
                              f"of its video ({lengths[ann['video_id']]})")
        gt_id = int(ann.get("id", i + 1))
        for k, segmentation in enumerate(segmentations):
            if segmentation is not None:
                videos[ann["video_id"]].frames[k].objects[gt_id] = _rle(segmentation, f"{where} frame {k}")
    return list(videos.values())


def _rle(segmentation: Any, where: str) -> dict[str, Any]:
    """A YTVIS segmentation as compressed COCO RLE (uncompressed count lists are converted)."""
    from pycocotools import mask as mask_utils

    if not isinstance(segmentation, dict) or "size" not in segmentation or "counts" not in segmentation:
        raise ExportError(f"ground truth {where}: a segmentation must be COCO RLE ({{'size': [h, w], 'counts': ...}})")
    size = [int(v) for v in segmentation["size"]]
    counts = segmentation["counts"]
    if isinstance(counts, list):
        encoded = mask_utils.frPyObjects({"size": size, "counts": counts}, *size)
        counts = encoded["counts"].decode("ascii")
    return {"size": size, "counts": counts}


# -- MOTS ---------------------------------------------------------------------------------------

def _files(source: Target, shown: str, suffix: str) -> list[str]:
    """The file itself, or a folder's `<video>{suffix}` files."""
    if not source.fs.isdir(source.root):
        return [source.root]
    files = sorted(p for p in source.fs.ls(source.root, detail=False) if p.endswith(suffix))
    if not files:
        raise ExportError(f"ground truth {shown!r} is a folder without ground-truth files (<video>{suffix})")
    return files


def _read_mots_file(source: Target, path: str, name: str) -> GtVideo:
    frames: dict[int, dict[int, dict[str, Any]]] = {}
    with source.fs.open(path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"ground truth {name} line {number}"
            if len(fields) != 6:
                raise ExportError(f"{where}: a MOTS line has 6 fields (frame id class_id height width rle), "
                                  f"this one {len(fields)}")
            try:
                frame, gt_id, class_id, h, w = (int(v) for v in fields[:5])
            except ValueError:
                raise ExportError(f"{where}: frame, id, class_id, height and width must be whole numbers") from None
            if frame < 1:
                raise ExportError(f"{where}: frames are numbered from 1 (MOTS Challenge), not {frame}")
            if class_id == MOTS_IGNORE_CLASS:
                continue
            frames.setdefault(frame - 1, {})[gt_id] = {"size": [h, w], "counts": fields[5]}
    key = name[:-4] if name.endswith(".txt") else name
    return GtVideo(key, name, [GtFrame(("source", n), objects) for n, objects in sorted(frames.items())])


# -- CVAT for video 1.1 ---------------------------------------------------------------------------


def _read_cvat_file(source: Target, path: str) -> GtVideo:
    from xml.etree import ElementTree

    name = posixpath.basename(path)
    frames: dict[int, dict[int, list[float]]] = {}
    task_name = None
    try:
        with source.fs.open(path, "rb") as f:
            for _, element in ElementTree.iterparse(f, events=("end",)):
                if element.tag == "name" and task_name is None and element.text:
                    task_name = element.text.strip()
                elif element.tag == "track":
                    _cvat_track(element, frames, name)
                    element.clear()
    except ElementTree.ParseError as exc:
        raise ExportError(f"ground truth {name}: not CVAT XML ({exc})") from None
    key = task_name or (name[:-4] if name.endswith(".xml") else name)
    return GtVideo(key, name, [GtFrame(("source", n), objects) for n, objects in sorted(frames.items())], boxes=True)


def _cvat_track(track: Any, frames: dict[int, dict[int, list[float]]], name: str) -> None:
    try:
        track_id = int(track.attrib["id"])
        for box in track.iter("box"):
            if box.attrib.get("outside") == "1":
                continue
            x0, y0, x1, y1 = (float(box.attrib[k]) for k in ("xtl", "ytl", "xbr", "ybr"))
            frames.setdefault(int(box.attrib["frame"]), {})[track_id] = [x0, y0, x1 - x0, y1 - y0]
    except (KeyError, ValueError) as exc:
        raise ExportError(f"ground truth {name}: track {track.attrib.get('id')!r} has a box without a whole-number "
                          f"frame or numeric xtl/ytl/xbr/ybr ({exc})") from None
