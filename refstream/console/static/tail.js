import { api, clear, el, every, setupAuth, status, when } from "./common.js";

const form = document.getElementById("filter");
let query = "";

const SHOWN = 25;
const SHORT = { event_id: 12, workspace: 8, payload: 300 }; // the rest in the cell's title

function cell(row, name) {
  const value = String(row[name] ?? "-");
  const cut = SHORT[name];
  const attrs = name === "payload" ? { class: "payload" } : {};
  if (cut && value.length > cut) return el("td", { ...attrs, title: value }, `${value.slice(0, cut)}…`);
  return el("td", attrs, value);
}

function cells(row, names) {
  return names.map((n) => cell(row, n));
}

function show(tableId, rows, names) {
  const body = clear(document.querySelector(`#${tableId} tbody`));
  for (const row of rows.slice(0, SHOWN)) {
    const tr = el("tr", { class: row.stage }, el("td", {}, when(row.at_ms)), ...cells(row, names));
    body.append(tr);
  }
}

async function refresh() {
  const { status: code, data } = await api(`/api/tail${query}`);
  if (code !== 200) {
    status(data.detail || data.error);
    return;
  }
  show("accepted", data.accepted, ["type", "dialect", "link", "workspace", "event_id", "payload"]);
  show("outcomes", data.outcomes, ["stage", "reason", "type", "dialect", "link", "event_id", "payload"]);
  status(`updated ${new Date().toLocaleTimeString()}`);
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const params = new URLSearchParams();
  for (const [k, v] of new FormData(form)) if (String(v).trim()) params.set(k, String(v).trim());
  query = params.toString() ? `?${params}` : "";
  refresh();
});

let timer = null;
setupAuth("operator", () => {
  if (timer !== null) clearInterval(timer);
  timer = every(750, refresh);
});
