import { api, clear, el, setupAuth, status } from "./common.js";
import { draw, plain } from "./charts.js";

const DAYS = 30; // as the console reads them (refstream/console/views.py)

function perDay(days) {
  const totals = new Map(); // day -> {clicks, leads, sales}
  for (const d of days) {
    const t = totals.get(d.day) || { clicks: 0, leads: 0, sales: 0 };
    t.clicks += d.clicks;
    t.leads += d.leads;
    t.sales += d.sales;
    totals.set(d.day, t);
  }
  const series = new Map([["clicks", []], ["leads", []], ["sales", []]]);
  for (const day of [...totals.keys()].sort()) {
    const at = Date.parse(`${day}T00:00:00Z`);
    for (const name of series.keys()) series.get(name).push([at, totals.get(day)[name]]);
  }
  return series;
}

async function refresh() {
  const { data } = await api("/api/tenant/links");
  document.getElementById("workspace").textContent = data.workspace_id;
  // the 30 days the table covers, today's (UTC) the last
  const today = Date.parse(`${new Date().toISOString().slice(0, 10)}T00:00:00Z`);
  const span = [today - (DAYS - 1) * 86_400_000, today];
  draw(document.getElementById("chart-days"), plain(perDay(data.days)), { days: true, integer: true, axis: "per day", window: span });
  const body = clear(document.querySelector("#days tbody"));
  for (const d of data.days) {
    const drops = Object.entries(d.drops).map(([why, n]) => `${why} ${n}`).join(", ") || "-";
    body.append(
      el("tr", {}, ...[d.day, d.link, d.clicks, d.leads, d.conversions, d.sales, drops].map((v) => el("td", {}, v))),
    );
  }
  status(`updated ${new Date().toLocaleTimeString()}`);
}

setupAuth("tenant", () => refresh().catch(() => {}));
