// Number and date formatting, and the two element builders every part of the page uses.

const SVG_NS = "http://www.w3.org/2000/svg";

const compactFormat = new Intl.NumberFormat("en", {
  notation: "compact",
  maximumSignificantDigits: 3,
});
export const integer = new Intl.NumberFormat("en");
export const fmtCompact = (n) => compactFormat.format(n);
export const fmtPct = (x, digits = 1) => `${(x * 100).toFixed(digits)}%`;
export const fmtShare = (x) => (x > 0 && x < 0.001 ? "<0.1%" : fmtPct(x));
export const fmtList = (xs) => xs.map((x) => Number(x.toFixed(4))).join(", ");

export function fmtMicros(us) {
  return us >= 1000 ? `${(us / 1000).toFixed(2)} ms` : `${us.toFixed(us < 10 ? 1 : 0)} µs`;
}

export function fmtDate(iso) {
  const match = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})/.exec(iso || "");
  if (!match) return iso || "unknown";
  return `${match[1]} ${match[2]}${iso.endsWith("Z") ? " UTC" : ""}`;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

export function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

export function tooltip(node, text) {
  node.append(svg("title", {}, text));
  return node;
}

export function clip(text, max) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}
