// Small helpers shared by the pages. Everything from the index is put in the page as text
// (textContent, never innerHTML): captions and labels are model output.

export async function getJSON(url) {
  const response = await fetch(url, { headers: { accept: "application/json" } });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

export function fmtTime(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "?";
  const s = Math.max(0, seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), rest = s % 60;
  const sec = rest.toFixed(1).padStart(4, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

export function videoUrl(videoId, t, objectId) {
  const params = new URLSearchParams();
  if (t !== null && t !== undefined) params.set("t", Number(t).toFixed(3).replace(/\.?0+$/, ""));
  if (objectId !== null && objectId !== undefined) params.set("object", String(objectId));
  return `/video/${encodeURIComponent(videoId)}?${params}`;
}

export function frameUrl(videoId, t, objectId, width) {
  const params = new URLSearchParams({ t: String(t) });
  if (objectId !== null && objectId !== undefined) params.set("object", String(objectId));
  if (width) params.set("width", String(width));
  return `/api/videos/${encodeURIComponent(videoId)}/frame?${params}`;
}
