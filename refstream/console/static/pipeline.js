import { Refused, api, every, setupAuth, status } from "./common.js";
import { chartOf, draw, short } from "./charts.js";

const KEEP = 450; // 15 minutes of 2 s samples, as the console keeps them

// "0 workers" (partition, group): as people read it
const byGroup = (name) => {
  const [partition, ...group] = name.split(" ");
  return `group ${group.join(" ")} · partition ${partition}`;
};
const bytes = (n) => `${short(n)}B`;

// chart -> how it is drawn: `zeros` for rates (a sample without a series: none happened)
const CHARTS = {
  accepted: { zeros: true, unit: "/s", axis: "events/s" },
  stored: { zeros: true, unit: "/s", axis: "events/s" },
  lag: { integer: true, unit: " unread", axis: "entries", label: byGroup, none: "no consumer group yet" },
  pending_age: { unit: " s", axis: "seconds", label: byGroup, none: "no consumer group yet" },
  live: { integer: true, axis: "processes" },
  spool: { zeros: true, idle: "no spool", integer: true, unit: " waiting", axis: "events" },
  memory: { format: bytes, axis: "bytes" },
  reachable: { ticks: [0, 1], format: (v) => (v ? "up" : "down"), axis: "1 up, 0 down" },
  dead: { integer: true, axis: "letters" },
};
let samples = [];
let failed = null; // why the last read failed: the charts say "no data" and why

function render() {
  // one window for every chart: the first sample this page holds to the last
  const span = samples.length ? [samples[0].at_ms, samples[samples.length - 1].at_ms] : null;
  for (const [name, opts] of Object.entries(CHARTS)) {
    const chart = chartOf(samples, name, opts);
    if (!samples.length) chart.empty = failed ? `no data: the console did not answer (${failed})` : "no data yet";
    draw(document.getElementById(`chart-${name}`), chart, { ...opts, window: span });
  }
  const last = samples[samples.length - 1];
  const capped = last?.accepted_capped ? " (accepted: more than the console counts per sample)" : "";
  if (failed) status(`could not read the samples: ${failed}`);
  else status(last ? `last sample ${new Date(last.at_ms).toLocaleString()}${capped}` : "");
}

async function refresh() {
  const since = samples.length ? samples[samples.length - 1].at_ms : 0;
  try {
    const { status: code, data } = await api(`/api/pipeline?since=${since}`);
    if (code !== 200) throw new Error(data.detail || data.error || `HTTP ${code}`);
    samples = samples.concat(data.samples).slice(-KEEP);
    failed = null;
  } catch (err) {
    if (err instanceof Refused) throw err;
    failed = err.message;
  }
  render();
}

let timer = null;
setupAuth("operator", () => {
  samples = [];
  failed = null;
  render();
  if (timer !== null) clearInterval(timer);
  timer = every(2000, refresh);
});
