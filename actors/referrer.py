"""The PixelRefer stage: per video, a detailed caption of every tracked object and the answers to
the user's questions, in batched generate calls on one actor that loads the model once.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import numpy as np
from actors.busy import BusyClock
from actors.columns import times_column
from actors.rle import decode_rle

log = logging.getLogger(__name__)

REGION = "<region>"


def expand_questions(specs: Sequence[dict], object_ids: Sequence[int]) -> tuple[list[tuple[str, list[int]]], list[str]]:
    """Turn question specs into (question, object ids) pairs for this video's objects.

    One placeholder and no explicit objects: asked of every object. k placeholders and no explicit
    objects: the first k objects. Returns the pairs and a list of readable reasons for skipped ones.
    """
    pairs: list[tuple[str, list[int]]] = []
    skipped: list[str] = []
    known = list(object_ids)
    for spec in specs:
        question, explicit = spec["question"], spec.get("objects")
        count = question.count(REGION)
        if explicit is not None:
            missing = [o for o in explicit if o not in known]
            if missing:
                skipped.append(f"question {question!r}: objects {missing} were not tracked")
                continue
            pairs.append((question, list(explicit)))
        elif count == 1:
            pairs += [(question, [o]) for o in known]
        elif len(known) >= count:
            pairs.append((question, known[:count]))
        else:
            skipped.append(f"question {question!r}: needs {count} objects, video has {len(known)}")
    return pairs, skipped


def spread_frames(frame_indices: Sequence[int], limit: int | None) -> list[int]:
    """At most ``limit`` of an object's frames, evenly spread: its first and last among them (for a
    ``limit`` of 1, its middle frame).

    Lite spends one 32-token entry in the prompt and three tower images on every frame an object is
    masked in, so a track over all sampled frames costs about that many times a single mask
    (``bench.referrer``: 20 masks vs 1). Keeping the track's ends keeps the caption's time span.
    """
    ordered = sorted(frame_indices)
    if limit is None or len(ordered) <= limit:
        return ordered
    if limit == 1:
        return [ordered[len(ordered) // 2]]
    picks = np.linspace(0, len(ordered) - 1, limit).round().astype(int)
    return [ordered[i] for i in sorted(set(picks.tolist()))]


def is_error(value: Any) -> bool:
    """Ray Data turns an all-None string column into NaN floats: only a non-empty string is an error."""
    return isinstance(value, str) and value != ""


class ReferrerStage:
    """Callable class for `map_batches`: loads PixelRefer once per actor, then serves batches.

    Input columns: `frames`, `timestamps`, `tracks_json`, `questions_json`, `error`. Output: the
    same row without `frames` (they must not travel further), plus `captions_json` and `qa_json`.
    A failure on one video becomes that video's `error`; the other videos of the batch go on.
    """

    def __init__(
        self,
        model: str = "tiny",
        mode: str = "lite",
        *,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        upstream_local_crop: bool = False,
        caption_prompt: str | None = None,
        object_frames: int | None = None,
    ) -> None:
        from models.referrer import DEFAULT_CAPTION_PROMPT, Referrer

        if object_frames is not None and object_frames <= 0:
            raise ValueError(f"object_frames must be positive, got {object_frames}")
        self.referrer = Referrer.from_pretrained(model, mode=mode, upstream_local_crop=upstream_local_crop)
        self.object_frames = object_frames
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.caption_prompt = caption_prompt or DEFAULT_CAPTION_PROMPT
        self.clock = BusyClock("referrer")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {k: list(v) for k, v in batch.items() if k != "frames"}
        captions, answers = [], []
        n = len(batch["video_id"])
        with self.clock.batch():
            for i in range(n):
                if is_error(batch["error"][i]):
                    captions.append("[]")
                    answers.append("[]")
                    continue
                owned = int(batch["num_owned"][i]) if "num_owned" in batch else None
                try:
                    cap, qa, notes = self._one_video(
                        batch["frames"][i], times_column(batch["timestamps"][i]), batch["tracks_json"][i], batch["questions_json"][i],
                        owned=owned if owned is not None and owned >= 0 else None,
                    )
                except Exception as exc:  # noqa: BLE001 - one video's failure must not take the batch down
                    log.exception("referrer failed on %s", batch["video_id"][i])
                    out["error"][i] = f"referrer: {type(exc).__name__}: {exc}"
                    cap, qa = [], []
                else:
                    if notes:
                        log.warning("video %s: %s", batch["video_id"][i], "; ".join(notes))
                captions.append(json.dumps(cap))
                answers.append(json.dumps(qa))
        out["captions_json"] = captions
        out["qa_json"] = answers
        result = {k: np.asarray(v, dtype=object) for k, v in out.items()}
        result.update(self.clock.columns(n))
        return result

    def _one_video(self, frames: np.ndarray, timestamps: np.ndarray, tracks_json: str, questions_json: str,
                   owned: int | None = None) -> tuple[list, list, list[str]]:
        """Captions and answers for one clip (or one short video, or one track row).

        `owned`: the clip's own frames are the first `owned`; the one after them is the next clip's
        first frame, sampled only to link tracks across the boundary, so it is captioned there.
        """
        from models.referrer import Request

        tracks = json.loads(tracks_json or "[]")
        if owned is not None:
            tracks = [{**t, "frames": [f for f in t["frames"] if f["frame_index"] < owned]} for t in tracks]
            tracks = [t for t in tracks if t["frames"]]
        if not tracks:
            return [], [], []
        objects = []
        for t in tracks:
            by_index = {f["frame_index"]: f for f in t["frames"]}
            keep = spread_frames(list(by_index), self.object_frames)
            objects.append({i: decode_rle(by_index[i]["rle"]) for i in keep})
        ids = [int(t["object_id"]) for t in tracks]
        index_of = {oid: k for k, oid in enumerate(ids)}
        pairs, notes = expand_questions(json.loads(questions_json or "[]"), ids)
        requests = [Request(prompt=self.caption_prompt, object_indices=[k]) for k in range(len(tracks))]
        requests += [Request(prompt=q, object_indices=[index_of[o] for o in objs]) for q, objs in pairs]
        results = self.referrer.generate(
            list(frames), [float(t) for t in timestamps], objects, requests,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
        )
        captions = []
        for track, result in zip(tracks, results[: len(tracks)]):
            ts = [f["ts"] for f in track["frames"]]
            captions.append({
                "object_id": int(track["object_id"]),
                "ts_start": min(ts) if ts else None,
                "ts_end": max(ts) if ts else None,
                "caption": None if result.error else result.text,
                "num_tokens": int(result.num_tokens),
            })
        spans = {c["object_id"]: (c["ts_start"], c["ts_end"]) for c in captions}
        qa = []
        for (q, objs), r in zip(pairs, results[len(tracks):]):
            starts = [spans[o][0] for o in objs if spans.get(o, (None,))[0] is not None]
            ends = [spans[o][1] for o in objs if spans.get(o, (None, None))[1] is not None]
            qa.append({
                "object_ids": [int(o) for o in objs], "question": q, "answer": None if r.error else r.text,
                "ts_start": min(starts) if starts else None, "ts_end": max(ends) if ends else None,
            })
        notes += [f"object {r.error}" for r in results if r.error]
        return captions, qa, notes
