import { api, every, setupAuth, status } from "./common.js";
import { draw, seriesOf } from "./charts.js";

const KEEP = 450; // 15 minutes of 2 s samples, as the console keeps them
const CHARTS = {
  accepted: "/s",
  stored: "/s",
  lag: "",
  pending_age: "s",
  live: "",
  spool: "",
  memory: "B",
  reachable: "",
  dead: "",
};
let samples = [];

function render() {
  for (const [name, unit] of Object.entries(CHARTS)) {
    draw(document.getElementById(`chart-${name}`), seriesOf(samples, name), { unit });
  }
  const last = samples[samples.length - 1];
  status(last ? `last sample ${new Date(last.at_ms).toLocaleString()}${last.accepted_capped ? " (accepted: more than the console counts per sample)" : ""}` : "");
}

async function refresh() {
  const since = samples.length ? samples[samples.length - 1].at_ms : 0;
  const { data } = await api(`/api/pipeline?since=${since}`);
  samples = samples.concat(data.samples).slice(-KEEP);
  render();
}

let timer = null;
setupAuth("operator", () => {
  samples = [];
  render();
  if (timer !== null) clearInterval(timer);
  timer = every(2000, refresh);
});
