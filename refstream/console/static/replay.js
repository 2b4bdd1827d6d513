import { api, clear, el, setupAuth, status, when } from "./common.js";

const form = document.getElementById("range");
const runButton = document.getElementById("run");
const outcome = document.getElementById("outcome");
let checked = null; // the range the last dry run counted: what "Replay it" runs

// the fields are read in the browser's time zone: each says which
const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "your browser's time zone";
for (const span of document.querySelectorAll(".zone")) span.textContent = `(${zone})`;

function rangeOf() {
  const data = new FormData(form);
  const iso = (v) => (String(v || "").trim() ? new Date(String(v)).toISOString() : null);
  return { since: iso(data.get("since")), until: iso(data.get("until")) };
}

const KIND = { dry_run: "dry run", replay: "replay" };

// a dry run's counts and a replay's in the same words: "new" is what the replay stores (or
// would), "stored already" what it leaves as it is (by event id, or a repeated lead)
function words(kind, c) {
  const dry = kind === "dry_run";
  const out = [
    ["entries in range", c.entries],
    ["new", dry ? c.new : c.inserted],
    ["stored already", dry ? c.stored + c.repeats : c.duplicates],
    ["skipped", c.skipped],
  ];
  for (const [key, name] of [["undecodable", "undecodable"], ["failed", "failed"], ["archived", "from the archive"], ["refunds_not_restored", "refunds not restored"]]) {
    if (c[key]) out.push([name, c[key]]);
  }
  return out;
}

const said = (pairs) => pairs.map(([name, n]) => `${n} ${name}`).join(", ");

function counts(run) {
  const body = clear(document.querySelector("#counts tbody"));
  const line = (name, c) => el("tr", {}, el("td", {}, name), el("td", {}, said(words(run.kind, c))));
  for (const [p, c] of Object.entries(run.result.partitions)) body.append(line(p, c));
  body.append(line("all", run.result.totals));
}

function show(run) {
  if (!run) return;
  const progress = document.getElementById("progress");
  const name = KIND[run.kind] ?? run.kind;
  // done: every entry in range was read, whichever the kind (a dry run reports no progress)
  const total = run.result ? run.result.totals.entries : run.total;
  const done = run.result ? total : run.done;
  progress.max = total || 1;
  progress.value = run.state === "done" ? progress.max : done;
  const of = total === null || total === undefined ? (run.state === "running" ? "reading" : `${done} entries`) : `${done} of ${total} entries`;
  document.getElementById("progress-text").textContent = `${name} ${run.state}: ${of} (started ${when(run.started_ms)})`;
  if (run.state === "failed") outcome.textContent = `${name} failed: ${run.error}`;
  if (run.result) {
    counts(run);
    outcome.textContent = `${name}: ${said(words(run.kind, run.result.totals))}`;
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
    outcome.textContent = `a ${KIND[data.running.kind]} is running (${data.running.id}, from ${data.running.since}, started ${when(data.running.started_ms)}): wait for it`;
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
