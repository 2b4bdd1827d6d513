// What every console page shares: the key in the page (sessionStorage, sent as a Bearer
// header: never in a URL, never a cookie), JSON from /api/, and elements built with
// textContent only, so a value holding markup shows as text.

const STORE = { operator: "refstream.console.token", tenant: "refstream.console.readkey" };

export class Refused extends Error {}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// a date in the viewer's own time zone and language
export function when(ms) {
  return ms === null || ms === undefined ? "-" : new Date(ms).toLocaleString();
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

let kind = "operator";

export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(STORE[kind]);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
  });
  if (response.status === 401) {
    showRefused();
    throw new Refused("refused");
  }
  const data = await response.json();
  return { status: response.status, data };
}

// what a refused visitor reads: why (no more than that: every refusal is the same answer)
// and what to do next
const NEXT = {
  operator: [
    "The console did not accept this operator token, or was given none.",
    "Operator pages need the token the console was started with (REFSTREAM_CONSOLE_TOKEN; ./scripts/dev prints it): ask whoever runs the console, then enter it above. A workspace key does not open these pages: with one, open Tenant links.",
  ],
  tenant: [
    "The console did not accept this workspace key, or was given none.",
    "Tenant links needs an API key of your workspace with scope read (refstream keys create --workspace <id> --scopes read makes one); a revoked or expired key is refused too. Enter it above.",
  ],
};

function showRefused() {
  const note = document.getElementById("refused");
  if (!note) return;
  document.getElementById("refused-why").textContent = NEXT[kind][0];
  document.getElementById("refused-next").textContent = NEXT[kind][1];
  note.hidden = false;
  status("Refused: see above.");
  document.getElementById("key")?.focus();
}

// the navigation shows a tenant no operator page: those only where an operator's token is held
function navigation() {
  const operator = kind === "operator" || Boolean(sessionStorage.getItem(STORE.operator));
  for (const a of document.querySelectorAll('nav a[data-for="operator"]')) a.hidden = !operator;
}

export function status(text) {
  const line = document.getElementById("status");
  if (line) line.textContent = text;
}

// the key form at the top of each page: the operator's token, or a tenant's read key.
// Nothing is asked of /api/ before there is a key to send, where one is needed: no
// request is made only to be refused.
export async function setupAuth(pageKind, onKey) {
  kind = pageKind;
  navigation();
  const form = document.getElementById("auth");
  const input = document.getElementById("key");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = input.value.trim();
    if (value) sessionStorage.setItem(STORE[kind], value);
    else sessionStorage.removeItem(STORE[kind]);
    input.value = "";
    document.getElementById("refused").hidden = true;
    onKey();
  });
  if (sessionStorage.getItem(STORE[kind]) || (kind === "operator" && !(await tokenNeeded()))) onKey();
  else status(kind === "operator" ? "Enter the operator token above." : "Enter a workspace key of scope read above.");
}

async function tokenNeeded() {
  const response = await fetch("/api/access", { credentials: "omit", cache: "no-store" });
  return (await response.json()).operator_token !== false;
}

// call fn now and every ms, one call at a time, until a refusal (a new key starts it again)
export function every(ms, fn) {
  let busy = false;
  let timer = null;
  const tick = async () => {
    if (busy) return;
    busy = true;
    try {
      await fn();
    } catch (err) {
      if (err instanceof Refused) clearInterval(timer);
      else status(`could not read: ${err.message}`);
    } finally {
      busy = false;
    }
  };
  timer = setInterval(tick, ms);
  tick();
  return timer;
}
