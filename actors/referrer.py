"""The PixelRefer stage: for every clip of a Ray batch, a detailed caption of each tracked object and
the answers to the user's questions, on one actor that loads the model once.

The clips of a batch share their model calls. Each clip's masks, crops and prompts are made on their
own, then all clips go through the vision tower together (`Referrer.prepare_many`), and every
clip's requests decode together in batches bounded by a row count and a padded-token budget
(`Referrer.decode`). Many short clips with
one or two objects each thus fill a batch that one clip alone never would, and a clip's answers are
the same as when it runs alone (greedy, per-row state; tested).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.busy import BusyClock
from actors.columns import times_column
from actors.labels import CATEGORY_PROMPT, CATEGORY_TOKENS, normalise_category
from actors.requests import expand_questions, owned_tracks, shown_frames
from actors.rle import decode_rle

log = logging.getLogger(__name__)

#: Where a referrer batch's time goes (`phase_s_referrer_<phase>` columns): RLE masks decoded,
#: crops and prompts built, the vision tower, object tokens (region encoder), LLM prefill and decode.
REFERRER_PHASES = ("masks", "crops", "vision_tower", "region_tokens", "appearance", "llm_prefill", "llm_decode")


def encode_vector(vector: np.ndarray) -> str:
    """A float32 vector as base64 of its little-endian bytes: a third of JSON's size, and exact."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


def is_error(value: Any) -> bool:
    """Ray Data turns an all-None string column into NaN floats: only a non-empty string is an error."""
    return isinstance(value, str) and value != ""


def frame_positions(column: Any, count: int) -> list[int]:
    """The clip's frame index of each frame a row carries (`frame_indices`; empty: all of them)."""
    text = column if isinstance(column, str) else ""
    return [int(i) for i in json.loads(text)] if text else list(range(count))


@dataclass
class _Clip:
    """One row's requests, between `prepare` and the shared decode."""

    row: int
    tracks: list[dict[str, Any]]
    pairs: list[tuple[str, list[int]]]
    notes: list[str]
    #: Positions in `tracks` of the objects asked for their category (those without a label).
    asked: list[int] = field(default_factory=list)
    inputs: Any = None
    prepared: Any = None
    results: list = field(default_factory=list)

    def tables(self) -> tuple[list[dict], list[dict]]:
        """The row's `captions_json` and `qa_json` entries from its answers."""
        n, m = len(self.tracks), len(self.pairs)
        categories = {k: r for k, r in zip(self.asked, self.results[n + m:])}
        captions = []
        for k, (track, result) in enumerate(zip(self.tracks, self.results[:n])):
            ts = [f["ts"] for f in track["frames"]]
            answer = categories.get(k)
            captions.append({
                "object_id": int(track["object_id"]),
                "ts_start": min(ts) if ts else None,
                "ts_end": max(ts) if ts else None,
                "caption": None if result.error else result.text,
                "num_tokens": int(result.num_tokens),
                "category": normalise_category(answer.text) if answer is not None and not answer.error else None,
            })
        spans = {c["object_id"]: (c["ts_start"], c["ts_end"]) for c in captions}
        qa = []
        for (q, objs), r in zip(self.pairs, self.results[n:n + m]):
            starts = [spans[o][0] for o in objs if spans.get(o, (None,))[0] is not None]
            ends = [spans[o][1] for o in objs if spans.get(o, (None, None))[1] is not None]
            qa.append({
                "object_ids": [int(o) for o in objs], "question": q, "answer": None if r.error else r.text,
                "ts_start": min(starts) if starts else None, "ts_end": max(ends) if ends else None,
            })
        self.notes += [f"object {r.error}" for r in self.results[:n + m] if r.error]
        return captions, qa

    def appearance(self) -> list[dict[str, Any]]:
        """The row's `appearance_json` entries: one vector per object whose masks reached the tower."""
        looks = getattr(self.prepared, "appearance", None) or {}
        return [{"object_id": int(self.tracks[k]["object_id"]), "dim": int(v.shape[0]),
                 "vector": encode_vector(v)} for k, v in sorted(looks.items())]


class ReferrerStage:
    """Callable class for `map_batches`: loads PixelRefer once per actor, then serves batches of clips.

    Input columns: `frames`, `timestamps`, `tracks_json`, `questions_json`, `error`, and optionally
    `num_owned` and `frame_indices` (which clip frames `frames` holds, when the tracker shipped only
    the ones shown to PixelRefer). Output: the same row without `frames` (they must not travel
    further), plus `captions_json`, `qa_json`, `appearance_json` (each object's appearance vector,
    pooled from the tower features the captions are made of: `pipeline.reid`) and the stage's busy
    and phase columns. A failure on one
    clip becomes that clip's `error`; the other clips of the batch go on.

    `batch_size` and `token_budget` bound one LLM batch (prompts, padded prompt tokens), whichever
    clips the prompts come from.
    """

    def __init__(
        self,
        model: Any = "tiny",
        mode: str = "lite",
        *,
        max_new_tokens: int = 64,
        batch_size: int = 64,
        token_budget: int | None = 16384,
        upstream_local_crop: bool = False,
        caption_prompt: str | None = None,
        object_frames: int | None = None,
        categories: bool = True,
    ) -> None:
        from models.referrer import DEFAULT_CAPTION_PROMPT, Referrer

        if object_frames is not None and object_frames <= 0:
            raise ValueError(f"object_frames must be positive, got {object_frames}")
        # A loaded `Referrer` is taken as it is (benches that build a model in memory).
        self.referrer = (Referrer.from_pretrained(model, mode=mode, upstream_local_crop=upstream_local_crop)
                         if isinstance(model, str) else model)
        self.object_frames = object_frames
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.caption_prompt = caption_prompt or DEFAULT_CAPTION_PROMPT
        #: Ask each unlabelled object's category beside its caption (`actors.labels`).
        self.categories = categories
        self.clock = BusyClock("referrer", REFERRER_PHASES)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {k: list(v) for k, v in batch.items() if k != "frames"}
        n = len(batch["video_id"])
        captions, answers, looks = ["[]"] * n, ["[]"] * n, ["[]"] * n
        with self.clock.batch():
            clips = []
            for i in range(n):
                if is_error(batch["error"][i]):
                    continue
                try:
                    clip = self._prepare(batch, i)
                except Exception as exc:  # noqa: BLE001 - one clip's failure must not take the batch down
                    self._fail(out, batch, i, exc)
                    continue
                if clip is not None:
                    clips.append(clip)
            clips = self._encode(clips, out, batch)
            for clip in self._decode(clips, out, batch):
                cap, qa = clip.tables()
                if clip.notes:
                    log.warning("video %s: %s", batch["video_id"][clip.row], "; ".join(clip.notes))
                captions[clip.row], answers[clip.row] = json.dumps(cap), json.dumps(qa)
                looks[clip.row] = json.dumps(clip.appearance())
            self.clock.add(self.referrer.times.take())
        out["captions_json"] = captions
        out["qa_json"] = answers
        out["appearance_json"] = looks
        result = {k: np.asarray(v, dtype=object) for k, v in out.items()}
        result.update(self.clock.columns(n))
        return result

    def _prepare(self, batch: dict[str, np.ndarray], i: int) -> _Clip | None:
        """Row `i`'s requests, encoded up to the LLM (None when it has no object to ask about)."""
        from models.referrer import Request

        owned = int(batch["num_owned"][i]) if "num_owned" in batch else None
        tracks = owned_tracks(batch["tracks_json"][i], owned)
        if not tracks:
            return None
        frames = batch["frames"][i]
        times = times_column(batch["timestamps"][i])
        held = frame_positions(batch["frame_indices"][i] if "frame_indices" in batch else "", len(frames))
        if len(held) != len(frames) or (held and max(held) >= len(times)):
            raise ValueError(f"{len(times)} timestamps do not fit {len(frames)} frames (clip frames {held[:8]}...)")
        position = {clip_index: k for k, clip_index in enumerate(held)}
        with self.referrer.times("masks"):
            objects = []
            for t, keep in zip(tracks, shown_frames(tracks, self.object_frames).values()):
                by_index = {f["frame_index"]: f for f in t["frames"]}
                objects.append({position[f]: decode_rle(by_index[f]["rle"]) for f in keep})
        ids = [int(t["object_id"]) for t in tracks]
        index_of = {oid: k for k, oid in enumerate(ids)}
        pairs, notes = expand_questions(json.loads(batch["questions_json"][i] or "[]"), ids)
        requests = [Request(prompt=self.caption_prompt, object_indices=[k]) for k in range(len(tracks))]
        requests += [Request(prompt=q, object_indices=[index_of[o] for o in objs]) for q, objs in pairs]
        asked = [k for k, t in enumerate(tracks) if self.categories and not t.get("label")]
        requests += [Request(prompt=CATEGORY_PROMPT, object_indices=[k], max_new_tokens=CATEGORY_TOKENS) for k in asked]
        return _Clip(row=i, tracks=tracks, pairs=pairs, notes=notes, asked=asked,
                     inputs=(list(frames), [float(times[k]) for k in held], objects, requests))

    def _encode(self, clips: list[_Clip], out: dict[str, list[Any]], batch: dict[str, np.ndarray]) -> list[_Clip]:
        """Every clip up to the LLM, sharing the vision tower (`Referrer.prepare_many`); a clip whose
        input is wrong fails alone, and if the shared call fails, clip by clip finds the culprit."""
        try:
            results = self.referrer.prepare_many([c.inputs for c in clips])
        except Exception:  # noqa: BLE001
            log.exception("shared encoding of %d clips failed; encoding them one by one", len(clips))
            results = []
            for clip in clips:
                try:
                    results.append(self.referrer.prepare(*clip.inputs))
                except Exception as exc:  # noqa: BLE001
                    results.append(exc)
        done = []
        for clip, result in zip(clips, results):
            clip.inputs = None  # the frames go as soon as the clip is encoded
            if isinstance(result, Exception):
                self._fail(out, batch, clip.row, result)
            else:
                clip.prepared = result
                done.append(clip)
        return done

    def _decode(self, clips: list[_Clip], out: dict[str, list[Any]], batch: dict[str, np.ndarray]) -> list[_Clip]:
        """Every clip's requests in shared LLM batches; if that fails, clip by clip, so that only the
        clip at fault fails. Returns the clips that got their answers."""
        if not clips:
            return []
        kwargs = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                  "token_budget": self.token_budget}
        try:
            for clip, results in zip(clips, self.referrer.decode([c.prepared for c in clips], **kwargs)):
                clip.results = results
            return clips
        except Exception as exc:  # noqa: BLE001 - find the clip at fault below
            if len(clips) == 1:
                self._fail(out, batch, clips[0].row, exc)
                return []
            log.exception("shared decode of %d clips failed; decoding them one by one", len(clips))
        done = []
        for clip in clips:
            try:
                clip.results = self.referrer.decode([clip.prepared], **kwargs)[0]
            except Exception as exc:  # noqa: BLE001
                self._fail(out, batch, clip.row, exc)
                continue
            done.append(clip)
        return done

    @staticmethod
    def _fail(out: dict[str, list[Any]], batch: dict[str, np.ndarray], i: int, exc: BaseException) -> None:
        log.error("referrer failed on %s clip %s", batch["video_id"][i],
                  batch["clip_index"][i] if "clip_index" in batch else "-", exc_info=exc)
        out["error"][i] = f"referrer: {type(exc).__name__}: {exc}"

