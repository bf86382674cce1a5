// COCO run-length encoding, as the masks table stores it ({size: [h, w], counts: string}).
//
// `counts` is pycocotools' compressed string: each run length is written in 5-bit groups, low
// group first, as characters 48 + group (bit 0x20: another group follows; bit 0x10 of the last
// group: the value is negative), and from the third run on it is stored as the difference from
// the run two before. Runs alternate background / object, starting with background (a mask that
// starts with object pixels starts with a run of 0), and walk the image in column-major order:
// down the first column, then the next, so flat position p is pixel (x = p / h, y = p % h).

export function countsFromString(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// Calls fn(x, y0, y1) for every vertical run of object pixels (column x, rows y0..y1 inclusive):
// what the overlay paints, touching only the object's pixels.
export function forEachRun(rle, fn) {
  const h = rle.size[0];
  const counts = typeof rle.counts === "string" ? countsFromString(rle.counts) : rle.counts;
  let pos = 0;
  for (let i = 0; i < counts.length; i += 1) {
    const n = counts[i];
    if (i % 2 === 1) {
      let p = pos;
      const end = pos + n;
      while (p < end) {
        const x = Math.floor(p / h), y = p - x * h;
        const stop = Math.min(end, (x + 1) * h);
        fn(x, y, y + (stop - p) - 1);
        p = stop;
      }
    }
    pos += n;
  }
}
