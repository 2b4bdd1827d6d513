import { api, clear, el, every, setupAuth, status, when } from "./common.js";

async function refresh() {
  const { data } = await api("/api/erasures");
  const body = clear(document.querySelector("#erasures tbody"));
  if (!data.erasures.length) body.append(el("tr", {}, el("td", { colspan: "6" }, "no erasure pending")));
  for (const e of data.erasures) {
    body.append(
      el(
        "tr",
        {},
        el("td", {}, e.erasure_id),
        el("td", {}, e.workspace_id),
        el("td", {}, when(Date.parse(e.requested_at))),
        el("td", {}, e.pending.join(", ")),
        el("td", {}, when(Date.parse(e.archive_due))),
        el("td", e.overdue ? { class: "overdue" } : {}, e.overdue ? "OVERDUE" : ""),
      ),
    );
  }
  status(`updated ${new Date().toLocaleTimeString()}`);
}

let timer = null;
setupAuth("operator", () => {
  if (timer !== null) clearInterval(timer);
  timer = every(10000, refresh);
});
