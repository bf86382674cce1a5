// The video page: /video/<video_id>?t=SECONDS&object=ID. The source plays from /media/<video_id>
// (range requests); a browser that cannot play its codec gets the indexed frames as stills
// (?stills=1 asks for them). Masks follow the playhead (overlay.js), with
// requestVideoFrameCallback where the browser has it (the exact frame shown), else timeupdate and
// animation frames while playing.
import { el, fmtTime, frameUrl, getJSON, videoUrl } from "./util.js";
import { cssColor } from "./colors.js";
import { MaskLayer } from "./overlay.js";

const videoId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

class Player {
  constructor(doc, onTime) {
    this.doc = doc;
    this.video = $("video");
    this.still = $("still");
    this.times = doc.sampled_ts;
    this.onTime = onTime;
    this.stills = false;
    this.stillTime = 0;
  }

  get time() {
    return this.stills ? this.stillTime : this.video.currentTime;
  }

  start(t, forceStills) {
    if (forceStills) {
      this.useStills("showing the indexed frames as stills (asked for with ?stills=1)", t);
      return;
    }
    const v = this.video;
    let ready = false;
    v.addEventListener("error", () => this.useStills(
      "This browser cannot play this video (its codec or container); showing the indexed frames as stills instead.",
      ready ? this.time : t), { once: true });
    v.addEventListener("loadedmetadata", () => { ready = true; }, { once: true });
    v.addEventListener("loadedmetadata", () => { if (t) v.currentTime = t; else this.onTime(0); }, { once: true });
    v.addEventListener("seeked", () => this.onTime(v.currentTime));
    v.addEventListener("timeupdate", () => this.onTime(v.currentTime));
    if ("requestVideoFrameCallback" in v) {
      const step = (_now, meta) => { this.onTime(meta.mediaTime); v.requestVideoFrameCallback(step); };
      v.requestVideoFrameCallback(step);
    } else {
      const loop = () => { if (!v.paused) this.onTime(v.currentTime); requestAnimationFrame(loop); };
      requestAnimationFrame(loop);
    }
    v.src = `/media/${encodeURIComponent(videoId)}`;
  }

  useStills(message, t) {
    if (this.stills) return;
    this.stills = true;
    const notice = $("notice");
    notice.textContent = message;
    notice.hidden = false;
    this.video.removeAttribute("src");
    this.video.hidden = true;
    this.still.hidden = false;
    this.seek(t || 0);
  }

  seek(t) {
    const d = this.doc.video.duration_s || 0;
    t = Math.max(0, d ? Math.min(t, d) : t);
    if (this.stills) {
      this.stillTime = nearestTime(this.times, t) ?? t;
      this.still.src = frameUrl(videoId, this.stillTime, null, this.doc.video.width);
      this.onTime(this.stillTime);
    } else {
      this.video.currentTime = t;
    }
  }

  step(direction) {
    const t = this.time;
    const next = direction > 0 ? this.times.find((x) => x > t + 1e-6) : [...this.times].reverse().find((x) => x < t - 1e-6);
    if (next !== undefined) this.seek(next);
  }
}

function nearestTime(times, t) {
  let best = null;
  for (const x of times) if (best === null || Math.abs(x - t) < Math.abs(best - t)) best = x;
  return best;
}

function buildTimeline(doc, player, select) {
  const duration = doc.video.duration_s || Math.max(1, ...doc.objects.map((o) => o.last_ts || 0));
  const pct = (t) => `${(100 * t) / duration}%`;
  // Rows scroll inside the timeline (a long video may have hundreds of objects); the playhead
  // lives in the scrolled content so it spans every row.
  const root = el("div", { class: "rows" });
  $("timeline").replaceChildren(root);
  const clipsRow = el("div", { class: "row clips" }, el("div", { class: "name muted", text: "clips" }));
  const clipTrack = el("div", { class: "track" });
  for (const clip of doc.clips) {
    if (clip.ts_start === null) continue;
    const captions = clip.captions.map((c) => `#${c.object_id}: ${c.caption}`).join("\n");
    const box = el("div", { class: `clip ${clip.status === "ok" ? "" : "failed"}`, title:
      `clip ${clip.clip_index} ${fmtTime(clip.ts_start)}–${fmtTime(clip.ts_end)}\n${captions}`,
      onclick: () => player.seek(clip.ts_start) });
    box.style.left = pct(clip.ts_start);
    box.style.width = pct(Math.max(0, clip.ts_end - clip.ts_start));
    clipTrack.append(box);
  }
  clipsRow.append(clipTrack);
  root.append(clipsRow);
  for (const obj of doc.objects) {
    const track = el("div", { class: "track" });
    for (const [lo, hi] of obj.spans) {
      const bar = el("div", { class: "seg", "data-object": obj.object_id, "data-lo": lo, "data-hi": hi,
        title: `#${obj.object_id} ${obj.label || ""} ${fmtTime(lo)}–${fmtTime(hi)}` });
      bar.style.left = pct(lo);
      bar.style.width = pct(Math.max(0, hi - lo));
      bar.style.background = cssColor(obj.object_id);
      bar.addEventListener("click", (event) => {
        const rect = bar.getBoundingClientRect();
        const f = rect.width > 0 ? (event.clientX - rect.left) / rect.width : 0;
        select(obj.object_id);
        player.seek(lo + Math.min(1, Math.max(0, f)) * (hi - lo));
      });
      track.append(bar);
    }
    const name = el("button", { class: "name", type: "button", "data-object": obj.object_id,
      onclick: () => { select(obj.object_id); player.seek(obj.first_ts ?? 0); } },
      el("span", { class: "swatch" }), `#${obj.object_id} ${obj.label || ""}`);
    name.firstChild.style.background = cssColor(obj.object_id);
    root.append(el("div", { class: "row", "data-object": obj.object_id }, name, track));
  }
  const head = el("div", { class: "playhead" });
  root.append(head);
  return (t) => { head.style.left = `calc(var(--name-width) + (100% - var(--name-width)) * ${t / duration})`; };
}

function showPanel(doc, objectId, player) {
  const panel = $("panel");
  const obj = doc.objects.find((o) => o.object_id === objectId);
  if (!obj) { panel.replaceChildren(el("p", { class: "muted", text: "No object selected." })); return; }
  const caps = doc.clips.flatMap((clip) => clip.captions.filter((c) => c.object_id === objectId));
  const answers = doc.qa.filter((q) => (q.object_ids || []).includes(objectId));
  const swatch = el("span", { class: "swatch" });
  swatch.style.background = cssColor(objectId);
  panel.replaceChildren(
    el("h2", {}, swatch, el("span", { text: `#${obj.object_id} ${obj.label || "object"}` })),
    el("p", { class: "muted small", text:
      `${obj.source || ""} · ${obj.num_frames} frames · ${fmtTime(obj.first_ts)}–${fmtTime(obj.last_ts)}` }),
    el("p", { class: "track-caption", text: obj.track_caption || "(no whole-track caption: seen in one clip)" }),
    el("h3", { text: `Per-clip captions (${caps.length})` }),
    el("ol", { class: "captions" }, ...caps.map((c) => el("li", {},
      el("button", { type: "button", class: "time", text: fmtTime(c.ts_start), onclick: () => player.seek(c.ts_start) }),
      el("span", { text: ` ${c.caption}` })))),
    el("h3", { text: `Answers (${answers.length})` }),
    el("ul", { class: "answers" }, ...answers.map((a) => el("li", {},
      el("strong", { text: a.question }), el("span", { text: ` ${a.answer}` })))),
    el("p", {}, el("a", { href: videoUrl(videoId, player.time, objectId), text: "link to this moment" })));
}

// Two phases, so a long video is usable before its document arrives: the masks window around t
// (which also carries the frame size and duration) starts the player and the overlay; the
// document (objects, spans, clips, captions: the slower request) then fills the timeline and panel.
async function main() {
  const asked = Number(params.get("t") || 0);
  const t = Number.isFinite(asked) && asked > 0 ? asked : 0;
  const base = `/api/videos/${encodeURIComponent(videoId)}`;
  const firstWindow = getJSON(`${base}/masks?start=${Math.max(0, t - 10).toFixed(3)}&end=${(t + 20).toFixed(3)}`);
  const docRequest = getJSON(base);
  let info;
  try {
    info = await firstWindow;
  } catch (err) {
    $("title").textContent = `error: ${err.message}`;
    return;
  }
  $("video-filter").value = videoId;
  $("player").style.setProperty("--aspect", String(info.width / info.height));
  const layer = new MaskLayer($("masks"), videoId, info.width, info.height);
  layer.addWindow(info);
  const doc = { video: { duration_s: info.duration_s, width: info.width }, sampled_ts: info.times };
  let moveHead = () => {};
  let shown = null;
  const onTime = (time) => {
    $("clock").textContent = `${fmtTime(time)} / ${fmtTime(doc.video.duration_s)}`;
    $("player").dataset.time = String(player.time); // where the player is (time may be the shown frame's)
    moveHead(time);
    if (shown !== time) {
      shown = time;
      layer.draw(time).catch((err) => { $("status").textContent = `masks: ${err.message}`; });
    }
  };
  const player = new Player(doc, onTime);
  const object = params.get("object");
  const wanted = object !== null && object !== "" && !Number.isNaN(Number(object)) ? Number(object) : null;
  layer.selected = wanted;
  $("prev").addEventListener("click", () => player.step(-1));
  $("next").addEventListener("click", () => player.step(1));
  $("all").addEventListener("change", (e) => { layer.showAll = e.target.checked; layer.redraw(player.time); });
  player.start(t, params.get("stills") === "1");

  try {
    Object.assign(doc, await docRequest);
  } catch (err) {
    $("title").textContent = `error: ${err.message}`;
    return;
  }
  player.times = doc.sampled_ts;
  document.title = `pixelrefer: ${doc.video.name}`;
  $("title").textContent = doc.video.name;
  const select = (objectId) => {
    layer.selected = objectId;
    for (const row of document.querySelectorAll(".row[data-object]")) {
      row.classList.toggle("selected", Number(row.dataset.object) === objectId);
    }
    showPanel(doc, objectId, player);
    layer.redraw(player.time);
  };
  moveHead = buildTimeline(doc, player, select);
  moveHead(player.time);
  $("status").textContent = `${doc.objects.length} objects · ${doc.clips.length} clips · ${doc.sampled_ts.length} indexed frames`;
  if (wanted !== null) select(wanted);
}

main();
