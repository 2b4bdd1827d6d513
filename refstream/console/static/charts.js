// Small line charts drawn as SVG, here in the browser: no library, no build step.
// A chart is one name of the samples ({at_ms, <chart>: {<series>: number}}); each series
// is a line with a dot per sample. Every label is text (textContent), never markup.

const SVG = "http://www.w3.org/2000/svg";
const W = 560;
const H = 160;
const PAD = { left: 48, right: 8, top: 8, bottom: 20 };
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function text(x, y, value, anchor = "start") {
  const t = svg("text", { x, y, "text-anchor": anchor, class: "axis" });
  t.textContent = value;
  return t;
}

function short(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}G`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return Number.isInteger(n) ? String(n) : n.toFixed(2);
}

// series name -> [[t, value], ...] from the samples' chart `name`
export function seriesOf(samples, name) {
  const out = new Map();
  for (const s of samples) {
    const values = s[name];
    if (!values) continue;
    for (const [series, v] of Object.entries(values)) {
      if (typeof v !== "number") continue;
      if (!out.has(series)) out.set(series, []);
      out.get(series).push([s.at_ms, v]);
    }
  }
  return out;
}

// draw `series` (a Map of name -> [[t, v]]) into `box`: "no data yet" where there is none
// `days`: the times are UTC days (a tenant's stats), labelled as dates
export function draw(box, series, { unit = "", days = false } = {}) {
  box.replaceChildren();
  const all = [...series.values()].flat();
  if (all.length === 0) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "no data yet";
    box.append(empty);
    return;
  }
  const t0 = Math.min(...all.map((p) => p[0]));
  const t1 = Math.max(...all.map((p) => p[0]));
  const top = Math.max(1, ...all.map((p) => p[1])); // a flat line of zeros sits at the bottom
  const x = (t) => PAD.left + ((t - t0) / Math.max(1, t1 - t0)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  chart.append(svg("line", { x1: PAD.left, y1: y(0), x2: W - PAD.right, y2: y(0), class: "grid" }));
  chart.append(svg("line", { x1: PAD.left, y1: y(top), x2: W - PAD.right, y2: y(top), class: "grid" }));
  chart.append(text(PAD.left - 4, y(top) + 4, short(top) + unit, "end"));
  chart.append(text(PAD.left - 4, y(0) + 4, "0", "end"));
  const label = (t) =>
    days ? new Date(t).toLocaleDateString(undefined, { timeZone: "UTC" }) : new Date(t).toLocaleTimeString();
  chart.append(text(PAD.left, H - 4, label(t0)));
  chart.append(text(W - PAD.right, H - 4, label(t1), "end"));
  const legend = document.createElement("ul");
  legend.className = "legend";
  let i = 0;
  for (const [name, points] of series) {
    const colour = COLOURS[i++ % COLOURS.length];
    const line = svg("polyline", {
      points: points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
      stroke: colour,
      class: "series",
    });
    line.dataset.series = name;
    chart.append(line);
    for (const [t, v] of points) chart.append(svg("circle", { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 1.6, fill: colour, class: "point" }));
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour;
    item.append(swatch, document.createTextNode(`${name}: ${short(points[points.length - 1][1])}${unit}`));
    legend.append(item);
  }
  box.append(chart, legend);
}
