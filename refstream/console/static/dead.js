import { api, clear, el, setupAuth, status, when } from "./common.js";

const form = document.getElementById("filter");
const confirmBox = document.getElementById("confirm");
const outcome = document.getElementById("outcome");
let pending = null; // the filter the confirmation is about

function filterOf() {
  const f = {};
  for (const [k, v] of new FormData(form)) if (String(v).trim()) f[k] = String(v).trim();
  return f;
}

function said(result) {
  const skipped = Object.entries(result.skipped || {}).map(([why, n]) => `${why} ${n}`).join(", ");
  outcome.textContent = `matched ${result.matched}, requeued ${result.requeued}` + (skipped ? `, skipped: ${skipped}` : "");
}

async function detail(deadId) {
  const { data } = await api(`/api/dead/${encodeURIComponent(deadId)}`);
  document.getElementById("detail-id").textContent = deadId;
  document.getElementById("detail-body").textContent = JSON.stringify(data, null, 2);
  document.getElementById("detail").hidden = false;
}

async function retryOne(deadId) {
  const { data } = await api("/api/dead/retry", { method: "POST", body: { dead_id: deadId } });
  said(data);
  await refresh();
}

async function refresh() {
  const { data } = await api("/api/dead");
  const reasons = clear(document.getElementById("reasons"));
  const entries = Object.entries(data.by_reason);
  if (!entries.length) reasons.append(el("li", {}, "no dead letters"));
  for (const [why, n] of entries) reasons.append(el("li", {}, `${why}: ${n}`));
  const body = clear(document.querySelector("#letters tbody"));
  for (const l of data.letters) {
    body.append(
      el(
        "tr",
        {},
        el("td", {}, when(l.at_ms)),
        el("td", {}, l.reason),
        el("td", { class: "payload" }, l.error),
        el("td", {}, l.type ?? "-"),
        el("td", {}, l.code ?? "-"),
        el("td", {}, l.deliveries ?? "-"),
        el(
          "td",
          {},
          el("button", { type: "button", onclick: () => detail(l.dead_id) }, "show"),
          " ",
          el("button", { type: "button", class: "retry", onclick: () => retryOne(l.dead_id) }, "retry"),
        ),
      ),
    );
  }
  status(`${data.letters.length} shown, updated ${new Date().toLocaleTimeString()}`);
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  pending = filterOf();
  const { data } = await api("/api/dead/count", { method: "POST", body: pending });
  document.getElementById("confirm-text").textContent =
    `Retry ${data.matched} dead letter${data.matched === 1 ? "" : "s"} matching ${JSON.stringify(pending)}?`;
  confirmBox.dataset.count = String(data.matched);
  confirmBox.hidden = false;
});

document.getElementById("confirm-yes").addEventListener("click", async () => {
  confirmBox.hidden = true;
  const { data } = await api("/api/dead/retry", { method: "POST", body: { filter: pending } });
  said(data);
  await refresh();
});

document.getElementById("confirm-no").addEventListener("click", () => {
  confirmBox.hidden = true;
  pending = null;
});

setupAuth("operator", () => refresh().catch(() => {}));
