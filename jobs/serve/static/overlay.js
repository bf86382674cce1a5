// The masks drawn over the video: fetched a window at a time around the playhead (never a whole
// video's), decoded from COCO RLE in the browser (rle.js), drawn on a canvas of the video's own
// pixel size that CSS stretches over the player exactly like the video (so a mask pixel lands on
// its video pixel at any display size).
import { forEachRun } from "./rle.js";
import { objectColor, cssColor } from "./colors.js";
import { getJSON } from "./util.js";

const BEFORE_S = 10, AFTER_S = 20, KEEP_WINDOWS = 4, ALPHA = 0.5;

export class MaskLayer {
  constructor(canvas, videoId, width, height) {
    this.canvas = canvas;
    this.videoId = videoId;
    canvas.width = width;
    canvas.height = height;
    this.ctx = canvas.getContext("2d");
    this.windows = []; // {start, end, times, byTs: Map(ts -> masks)}
    this.pending = new Map();
    this.selected = null;
    this.showAll = true;
    this.lastKey = null;
  }

  windowFor(t) {
    return this.windows.find((w) => t >= w.start && t <= w.end);
  }

  async load(t) {
    const start = Math.max(0, t - BEFORE_S), end = t + AFTER_S;
    const key = `${Math.floor(start)}`;
    if (this.pending.has(key)) return this.pending.get(key);
    const url = `/api/videos/${encodeURIComponent(this.videoId)}/masks?start=${start.toFixed(3)}&end=${end.toFixed(3)}`;
    const job = getJSON(url).then((body) => this.addWindow(body)).finally(() => this.pending.delete(key));
    this.pending.set(key, job);
    return job;
  }

  // A /masks answer: its masks by sampled time.
  addWindow(body) {
    const byTs = new Map(body.times.map((ts) => [ts, []]));
    for (const m of body.masks) {
      if (!byTs.has(m.ts)) byTs.set(m.ts, []);
      byTs.get(m.ts).push(m);
    }
    const times = [...byTs.keys()].sort((a, b) => a - b);
    this.windows.push({ start: body.start, end: body.end, times, byTs });
    if (this.windows.length > KEEP_WINDOWS) this.windows.shift();
  }

  // Draw the masks of the indexed frame nearest t; fetch the window first (and the next one
  // early) when t is not covered yet.
  async draw(t) {
    let w = this.windowFor(t);
    if (!w) {
      await this.load(t);
      w = this.windowFor(t);
      if (!w) return;
    }
    if (t > w.end - AFTER_S / 2 && !this.windowFor(w.end + 1)) this.load(w.end + 1).catch(() => {});
    const ts = nearest(w.times, t);
    const key = `${ts}|${this.selected}|${this.showAll}`;
    if (key === this.lastKey) return;
    this.lastKey = key;
    this.paint(ts, ts === null ? [] : w.byTs.get(ts) || []);
  }

  redraw(t) {
    this.lastKey = null;
    return this.draw(t);
  }

  paint(ts, masks) {
    const { ctx, canvas } = this;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const shown = masks.filter((m) => this.showAll || m.object_id === this.selected);
    const image = ctx.createImageData(canvas.width, canvas.height);
    for (const m of shown) {
      if (!m.counts || !m.size) continue;
      const [h, w] = m.size;
      const [r, g, b] = objectColor(m.object_id);
      const a = Math.round(255 * (this.selected === null || m.object_id === this.selected ? ALPHA : ALPHA / 2));
      const sx = canvas.width / w, sy = canvas.height / h, W = canvas.width, data = image.data;
      forEachRun({ size: m.size, counts: m.counts }, (x, y0, y1) => {
        const cx0 = Math.floor(x * sx), cx1 = Math.max(cx0 + 1, Math.floor((x + 1) * sx));
        const cy0 = Math.floor(y0 * sy), cy1 = Math.max(cy0 + 1, Math.floor((y1 + 1) * sy));
        for (let y = cy0; y < cy1; y += 1) {
          for (let cx = cx0; cx < cx1; cx += 1) {
            const o = (y * W + cx) * 4;
            data[o] = r; data[o + 1] = g; data[o + 2] = b; data[o + 3] = a;
          }
        }
      });
    }
    ctx.putImageData(image, 0, 0);
    for (const m of shown) {
      if (!m.bbox || !m.size) continue;
      const sx = canvas.width / m.size[1], sy = canvas.height / m.size[0];
      const [x0, y0, x1, y1] = m.bbox;
      // The box goes just outside the bbox (which is exclusive at x1, y1), never over the mask's pixels.
      const width = m.object_id === this.selected ? 2 : 1, off = width / 2;
      ctx.strokeStyle = cssColor(m.object_id);
      ctx.lineWidth = width;
      ctx.strokeRect(Math.round(x0 * sx) - off, Math.round(y0 * sy) - off,
        Math.round((x1 - x0) * sx) + 2 * off, Math.round((y1 - y0) * sy) + 2 * off);
    }
    canvas.dataset.ts = ts === null ? "" : String(ts);
    canvas.dataset.objects = shown.map((m) => m.object_id).join(" ");
  }
}

function nearest(times, t) {
  if (!times.length) return null;
  let lo = 0, hi = times.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (times[mid] < t) lo = mid + 1; else hi = mid;
  }
  if (lo > 0 && Math.abs(times[lo - 1] - t) <= Math.abs(times[lo] - t)) return times[lo - 1];
  return times[lo];
}
