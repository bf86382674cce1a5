// An object's colour, the same as the report's (jobs/report_frames.py object_color): hues step by
// the golden ratio from 0.07, saturation 0.9, value 1, so object 3 is the same orange everywhere.
export function objectColor(id) {
  const h = (0.07 + Number(id) * 0.6180339887498949) % 1.0;
  const s = 0.9, v = 1.0;
  const i = Math.floor(h * 6.0), f = h * 6.0 - i;
  const p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
  const [r, g, b] = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
  return [r, g, b].map((c) => Math.round(c * 255));
}

export function cssColor(id, alpha = 1) {
  const [r, g, b] = objectColor(id);
  return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}
