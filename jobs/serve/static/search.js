// The search page: the form's GET parameters are the page's address (/?q=...&label=...&video=...),
// so a search can be shared; results come from /api/search, grouped by video in rank order.
import { el, fmtTime, frameUrl, getJSON, videoUrl } from "./util.js";
import { cssColor } from "./colors.js";

const params = new URLSearchParams(location.search);
const status = document.getElementById("status");

function fillSelect(select, items, value, text, chosen) {
  for (const item of items) {
    const option = el("option", { value: value(item), text: text(item) });
    if (value(item) === chosen) option.selected = true;
    select.append(option);
  }
}

function resultCard(r) {
  const thumbTime = r.ts_start ?? 0;
  return el("a", { class: "result", href: videoUrl(r.video_id, r.ts_start, r.object_id), "data-object": r.object_id },
    el("img", { src: frameUrl(r.video_id, thumbTime, r.object_id), alt: "no frame (source unreadable)", loading: "lazy",
      onerror: (e) => e.target.classList.add("missing") }),
    el("div", { class: "meta" },
      el("div", { class: "title" },
        el("span", { class: "swatch", "data-color": r.object_id }),
        el("strong", { text: r.label || "object" }),
        el("span", { class: "muted", text: ` #${r.object_id}` })),
      el("div", { class: "span", text: `${fmtTime(r.ts_start)} – ${fmtTime(r.ts_end)}` +
        (r.clip_index !== null && r.clip_index !== undefined ? ` · clip ${r.clip_index}` : " · whole track") }),
      el("p", { class: "text", text: r.text || "" }),
      el("div", { class: "muted small", text: `${r.kind || ""} · score ${r.score.toFixed(4)}` })));
}

function render(body) {
  const results = document.getElementById("results");
  results.replaceChildren();
  const groups = new Map();
  for (const r of body.results) {
    if (!groups.has(r.video_id)) groups.set(r.video_id, { name: r.name, items: [] });
    groups.get(r.video_id).items.push(r);
  }
  for (const [videoId, group] of groups) {
    results.append(el("section", { class: "group", "data-video": videoId },
      el("h2", {}, el("a", { href: videoUrl(videoId, 0), text: group.name }),
        el("span", { class: "muted", text: ` ${videoId}` })),
      el("div", { class: "cards" }, ...group.items.map(resultCard))));
  }
  for (const swatch of results.querySelectorAll(".swatch")) swatch.style.background = cssColor(swatch.dataset.color);
  const how = body.mode === "like" ? "by meaning and words" : "by words (this index has no embeddings)";
  status.textContent = `${body.results.length} object${body.results.length === 1 ? "" : "s"} for “${body.q}”, ` +
    `searched ${how}` + (body.notes.length ? `. ${body.notes.join(" ")}` : "");
}

async function main() {
  const q = params.get("q") || "";
  document.getElementById("q").value = q;
  try {
    const facets = await getJSON("/api/videos");
    fillSelect(document.getElementById("label"), facets.labels, (l) => l.label, (l) => `${l.label} (${l.objects})`,
      params.get("label") || "");
    fillSelect(document.getElementById("video"), facets.videos, (v) => v.video_id, (v) => v.name, params.get("video") || "");
    if (!q) {
      status.textContent = `${facets.videos.length} videos indexed. Search their objects by what they look like or do.`;
      return;
    }
    status.textContent = "searching…";
    const search = new URLSearchParams({ q });
    for (const name of ["label", "video", "mode", "top"]) if (params.get(name)) search.set(name, params.get(name));
    render(await getJSON(`/api/search?${search}`));
  } catch (err) {
    status.textContent = `error: ${err.message}`;
    status.classList.add("error");
  }
}

main();
