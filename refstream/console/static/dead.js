import { api, clear, el, setupAuth, status, when } from "./common.js";

const form = document.getElementById("filter");
const confirmBox = document.getElementById("confirm");
const confirmYes = document.getElementById("confirm-yes");
const outcome = document.getElementById("outcome");
let pending = null; // what the confirmation is about: {label, run}

function filterOf() {
  const f = {};
  for (const [k, v] of new FormData(form)) if (String(v).trim()) f[k] = String(v).trim();
  return f;
}

// a letter as the outcome line names it: its id, and what it was when it can be decoded
function named(l) {
  const what = l.type ? ` (${l.type}${l.code ? ` ${l.code}` : ""})` : " (undecodable)";
  return `letter ${l.dead_id}${what}`;
}

function skippedText(skipped) {
  return Object.entries(skipped || {}).map(([why, n]) => `${why} ${n}`).join(", ");
}

function retried(letter, r) {
  if (r.requeued) return `${named(letter)}: requeued to its partition`;
  if (r.missing) return `${named(letter)}: not requeued, no longer a dead letter (retried or dropped already)`;
  return `${named(letter)}: not requeued (${skippedText(r.skipped) || "nothing matched"})`;
}

function retriedAll(filter, r) {
  const skipped = skippedText(r.skipped);
  return `retry of the letters matching ${JSON.stringify(filter)}: matched ${r.matched}, requeued ${r.requeued}` + (skipped ? `, skipped: ${skipped}` : "");
}

function dropped(letter, r) {
  if (r.dropped) return `${named(letter)}: dropped (moved to the dropped letters)`;
  return `${named(letter)}: not dropped, no longer a dead letter (retried or dropped already)`;
}

async function detail(deadId) {
  const { data } = await api(`/api/dead/${encodeURIComponent(deadId)}`);
  document.getElementById("detail-id").textContent = deadId;
  document.getElementById("detail-body").textContent = JSON.stringify(data, null, 2);
  document.getElementById("detail").hidden = false;
}

// the row's buttons stay disabled from the click until the answer: a double click sends one
async function act(row, fn) {
  const buttons = [...row.querySelectorAll("button.act")];
  for (const b of buttons) b.disabled = true;
  try {
    outcome.textContent = await fn();
  } finally {
    for (const b of buttons) b.disabled = b.dataset.never === "true";
  }
  await refresh();
}

async function retryOne(row, letter) {
  await act(row, async () => {
    const { data } = await api("/api/dead/retry", { method: "POST", body: { dead_id: letter.dead_id } });
    return data.error ? `${named(letter)}: ${data.detail || data.error}` : retried(letter, data);
  });
}

function askDrop(row, letter) {
  ask(`Drop ${named(letter)}? It moves to the dropped letters and is never retried.`, "Drop", () =>
    act(row, async () => {
      const { data } = await api("/api/dead/drop", { method: "POST", body: { dead_id: letter.dead_id } });
      return data.error ? `${named(letter)}: ${data.detail || data.error}` : dropped(letter, data);
    }),
  );
}

function ask(text, verb, run) {
  document.getElementById("confirm-text").textContent = text;
  confirmYes.textContent = verb;
  confirmYes.disabled = false;
  pending = run;
  confirmBox.hidden = false;
}

function letterRow(l) {
  const row = el("tr", { "data-dead-id": l.dead_id });
  const retry = el("button", { type: "button", class: "retry act", onclick: () => retryOne(row, l) }, "retry");
  if (!l.decodable) {
    retry.disabled = true;
    retry.dataset.never = "true";
    retry.title = "it cannot be decoded: a retry would die again; drop it";
  }
  const drop = el("button", { type: "button", class: "drop act", onclick: () => askDrop(row, l) }, "drop");
  row.append(
    el("td", {}, when(l.at_ms)),
    el("td", {}, l.reason),
    el("td", { class: "payload" }, l.error),
    el("td", {}, l.type ?? "-"),
    el("td", {}, l.code ?? "-"),
    el("td", {}, l.deliveries ?? "-"),
    el("td", {}, el("button", { type: "button", onclick: () => detail(l.dead_id) }, "show"), " ", retry, " ", drop),
  );
  return row;
}

async function refresh() {
  const { data } = await api("/api/dead");
  const reasons = clear(document.getElementById("reasons"));
  const entries = Object.entries(data.by_reason);
  if (!entries.length) reasons.append(el("li", {}, "no dead letters"));
  for (const [why, n] of entries) reasons.append(el("li", {}, `${why}: ${n}`));
  const body = clear(document.querySelector("#letters tbody"));
  for (const l of data.letters) body.append(letterRow(l));
  status(`${data.letters.length} shown, updated ${new Date().toLocaleTimeString()}`);
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const filter = filterOf();
  const { data } = await api("/api/dead/count", { method: "POST", body: filter });
  const text = `Retry ${data.matched} dead letter${data.matched === 1 ? "" : "s"} matching ${JSON.stringify(filter)}?`;
  ask(text, "Retry", async () => {
    const { data: r } = await api("/api/dead/retry", { method: "POST", body: { filter } });
    outcome.textContent = retriedAll(filter, r);
    await refresh();
  });
  confirmBox.dataset.count = String(data.matched);
});

confirmYes.addEventListener("click", async () => {
  if (!pending) return;
  const run = pending;
  pending = null;
  confirmYes.disabled = true;
  confirmBox.hidden = true;
  await run();
});

document.getElementById("confirm-no").addEventListener("click", () => {
  confirmBox.hidden = true;
  pending = null;
});

setupAuth("operator", () => refresh().catch(() => {}));
