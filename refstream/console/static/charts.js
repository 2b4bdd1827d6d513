// Small line charts drawn as SVG, here in the browser: no library, no build step.
// A chart is one name of the samples ({at_ms, <chart>: {<series>: number}}); each series
// is a line with a dot per sample. Every label is text (textContent), never markup.

const SVG = "http://www.w3.org/2000/svg";
const W = 560;
const H = 170;
const PAD = { left: 52, right: 10, top: 16, bottom: 20 };
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const SECOND = 1000;
const DAY = 86_400_000;
// the x axis' steps: the first that puts at most 5 ticks in the window
const STEPS = [10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200].map((s) => s * SECOND);
const DAY_STEPS = [1, 2, 7, 14].map((d) => d * DAY);

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function text(x, y, value, anchor = "start", cls = "axis") {
  const t = svg("text", { x, y, "text-anchor": anchor, class: cls });
  t.textContent = value;
  return t;
}

export function short(n) {
  const cut = (v) => String(Number(v.toFixed(1)));
  if (n >= 1e9) return `${cut(n / 1e9)}G`;
  if (n >= 1e6) return `${cut(n / 1e6)}M`;
  if (n >= 1e3) return `${cut(n / 1e3)}k`;
  return Number.isInteger(n) ? String(n) : String(Number(n.toFixed(2)));
}

// series name -> [[t, value], ...] from the samples that read chart `name`. `zeros`: a rate,
// where a sample without a series means none happened: 0 there, so a burst shows as one
function seriesOf(samples, name, zeros) {
  const read = samples.filter((s) => s[name] && typeof s[name] === "object");
  const out = new Map();
  for (const s of read) for (const k of Object.keys(s[name])) if (!out.has(k)) out.set(k, []);
  for (const s of read) {
    for (const [series, points] of out) {
      const v = s[name][series];
      if (typeof v === "number") points.push([s.at_ms, v]);
      else if (zeros) points.push([s.at_ms, 0]);
    }
  }
  return { read, series: out };
}

// what chart `name` draws from `samples`: its series, the time of its last reading, and
// why it draws none ("no data ..."). A rate read but never seen is a line of zeros.
// `none`: what a chart read with no series at all says (a rate: a line of zeros, `idle`)
export function chartOf(samples, name, { zeros = false, idle = "no traffic", none = "none" } = {}) {
  const { read, series } = seriesOf(samples, name, zeros);
  if (read.length === 0) return { series, last: null, empty: samples.length ? "no data: not read in this window" : null };
  if (series.size === 0 && zeros) series.set(idle, read.map((s) => [s.at_ms, 0]));
  return { series, last: read[read.length - 1].at_ms, empty: series.size ? null : none };
}

function niceStep(span, count, integer) {
  const raw = Math.max(span, Number.EPSILON) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw * 0.999);
  return integer ? Math.max(1, step) : step;
}

// 0, step, 2 step ... up to the first tick at or past `max` (three ticks at least)
function valueTicks(max, integer) {
  const step = niceStep(max || 1, 4, integer);
  const n = Math.max(2, Math.ceil(max / step - 1e-9));
  return Array.from({ length: n + 1 }, (_, i) => Number((i * step).toPrecision(12)));
}

function timeTicks(t0, t1, days) {
  const span = t1 - t0;
  const steps = days ? DAY_STEPS : STEPS;
  const step = steps.find((s) => span / s <= 5) ?? steps[steps.length - 1];
  const ticks = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) ticks.push(t);
  return { ticks, step };
}

function timeLabel(t, { days = false, seconds = true } = {}) {
  if (days) return new Date(t).toLocaleDateString(undefined, { timeZone: "UTC" });
  return seconds ? new Date(t).toLocaleTimeString() : new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// draw `chart` ({series: Map name -> [[t, v]], last, empty}) into `box`, over `window` ([t0,
// t1], the same for every chart of a page; else the series' own span). `axis`: the values'
// unit, written on the axis; `unit`: after each value; `label`: a series' name as shown;
// `ticks`: fixed values (else 0 up past the largest); `days`: the times are UTC days.
export function draw(box, chart, opts = {}) {
  const { unit = "", axis = "", label = (n) => n, ticks = null, integer = false, days = false, format = short } = opts;
  box.replaceChildren();
  const all = [...chart.series.values()].flat();
  if (chart.empty || all.length === 0) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = chart.empty || "no data yet";
    box.append(empty);
    return;
  }
  const [t0, t1] = opts.window ?? [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  const ys = ticks ?? valueTicks(Math.max(...all.map((p) => p[1])), integer);
  const top = ys[ys.length - 1];
  const x = (t) => PAD.left + ((t - t0) / Math.max(1, t1 - t0)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  const node = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "data-t0": t0, "data-t1": t1 });
  for (const v of ys) {
    node.append(svg("line", { x1: PAD.left, y1: y(v), x2: W - PAD.right, y2: y(v), class: v === 0 ? "grid zero" : "grid" }));
    node.append(text(PAD.left - 4, y(v) + 3.5, format(v), "end", "axis tick-y"));
  }
  if (axis) node.append(text(4, PAD.top - 6, axis, "start", "unit"));
  node.append(text(PAD.left, H - 4, timeLabel(t0, { days })));
  node.append(text(W - PAD.right, H - 4, timeLabel(t1, { days }), "end"));
  const { ticks: ts, step } = timeTicks(t0, t1, days);
  for (const t of ts) {
    node.append(svg("line", { x1: x(t), y1: H - PAD.bottom, x2: x(t), y2: H - PAD.bottom + 3, class: "grid tick-x" }));
    if (x(t) - x(t0) > 95 && x(t1) - x(t) > 95) { // clear of the first and last times' labels
      node.append(text(x(t), H - 4, timeLabel(t, { days, seconds: step < 60 * SECOND }), "middle", "axis tick-x"));
    }
  }
  const legend = document.createElement("ul");
  legend.className = "legend";
  let i = 0;
  for (const [name, points] of chart.series) {
    const colour = COLOURS[i++ % COLOURS.length];
    const line = svg("polyline", {
      points: points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
      stroke: colour,
      class: "series",
    });
    line.dataset.series = name;
    node.append(line);
    for (const [t, v] of points) node.append(svg("circle", { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 1.6, fill: colour, class: "point" }));
    // the value now: at the chart's last reading (a series it did not have then: none)
    const at = points[points.length - 1];
    const now = chart.last === null || at[0] === chart.last ? `${format(at[1])}${unit}` : "-";
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour;
    item.dataset.series = name;
    item.append(swatch, document.createTextNode(`${label(name)}: ${now}`));
    legend.append(item);
  }
  box.append(node, legend);
}

// a Map of series drawn by `draw` on their own (the tenant's days): `series` as it is
export function plain(series) {
  return { series, last: null, empty: null };
}
