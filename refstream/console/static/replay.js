import { api, clear, el, setupAuth, status, when } from "./common.js";

const form = document.getElementById("range");
const runButton = document.getElementById("run");
const outcome = document.getElementById("outcome");
let checked = null; // the range the last dry run counted: what "Replay it" runs

function rangeOf() {
  const data = new FormData(form);
  const iso = (v) => (String(v || "").trim() ? new Date(String(v)).toISOString() : null);
  return { since: iso(data.get("since")), until: iso(data.get("until")) };
}

function counts(result) {
  const body = clear(document.querySelector("#counts tbody"));
  const line = (name, c) => el("tr", {}, el("td", {}, name), el("td", {}, Object.entries(c).map(([k, v]) => `${k} ${v}`).join(", ")));
  for (const [p, c] of Object.entries(result.partitions)) body.append(line(p, c));
  body.append(line("all", result.totals));
}

function show(run) {
  if (!run) return;
  const progress = document.getElementById("progress");
  progress.max = run.total || 1;
  progress.value = run.state === "done" ? progress.max : run.done;
  document.getElementById("progress-text").textContent =
    `${run.kind === "dry_run" ? "dry run" : "replay"} ${run.state}: ${run.done}${run.total ? ` of ${run.total}` : ""} (started ${when(run.started_ms)})`;
  if (run.state === "failed") outcome.textContent = run.error;
  if (run.result) {
    counts(run.result);
    const t = run.result.totals;
    outcome.textContent =
      run.kind === "dry_run"
        ? `dry run: ${t.entries} entries in range, ${t.new} would be stored, ${t.stored} stored already`
        : `replayed: ${t.entries} entries, ${t.inserted} stored, ${t.duplicates} there already`;
  }
}

async function follow() {
  for (;;) {
    const { data } = await api("/api/replay");
    show(data.run);
    if (!data.run || data.run.state !== "running") return data.run;
    await new Promise((r) => setTimeout(r, 500));
  }
}

async function start(kind, range) {
  const { status: code, data } = await api(`/api/replay/${kind}`, { method: "POST", body: range });
  if (code === 409) {
    outcome.textContent = `a ${data.running.kind === "dry_run" ? "dry run" : "replay"} is running (${data.running.id}, from ${data.running.since}, started ${when(data.running.started_ms)}): wait for it`;
    return null;
  }
  if (code !== 202) {
    outcome.textContent = data.detail || data.error;
    return null;
  }
  return follow();
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  runButton.disabled = true;
  const range = rangeOf();
  const run = await start("dry-run", range);
  if (run && run.state === "done") {
    checked = range;
    runButton.disabled = false;
  }
});

runButton.addEventListener("click", async () => {
  runButton.disabled = true;
  if (checked) await start("run", checked);
});

setupAuth("operator", () => follow().then(() => status("")).catch(() => {}));
