/*! refstream tracker.js: records a referral click, keeps its click id in a first-party
 * cookie for the program's cookie window, and hands it to your sign-up flow.
 *   <script async src="https://EDGE/tracker.js"></script>
 * data- attributes (all optional): data-api (the edge, default: this script's origin),
 * data-params (referral query parameters, default "ref,aff,via"), data-cookie (default
 * "refstream_click"), data-cookie-domain, data-attribution ("last_click" | "first_click"),
 * data-dnt ("respect" (default) | "ignore": honour Do Not Track / Global Privacy Control).
 * API: window.refstream.clickId() and the DOM event "refstream:click" {detail: {clickId}};
 * window.refstreamOptOut = true (set before the script) disables it.
 * Each page view's click carries a random "dedupe" key, the same on each of its retries
 * (a network error or a 5xx/429, up to 3 more tries, 1 s, 2 s, 4 s apart): the edge counts
 * it once however many copies arrive. */
(function () {
  "use strict";
  var script = document.currentScript;
  var d = (script && script.dataset) || {};
  var api = (d.api || (script && script.src ? new URL(script.src, location.href).origin : "")).replace(/\/+$/, "");
  var params = (d.params || "ref,aff,via").split(",");
  var name = d.cookie || "refstream_click";
  var attribution = d.attribution === "first_click" ? "first_click" : "last_click";
  var dnt = d.dnt !== "ignore" &&
    (navigator.doNotTrack === "1" || window.doNotTrack === "1" || navigator.globalPrivacyControl === true);

  function read() {
    var parts = document.cookie ? document.cookie.split("; ") : [];
    for (var i = 0; i < parts.length; i++) {
      var eq = parts[i].indexOf("=");
      if (parts[i].slice(0, eq) === name) return decodeURIComponent(parts[i].slice(eq + 1));
    }
    return null;
  }
  function write(value, days) {
    var c = name + "=" + encodeURIComponent(value) + "; Max-Age=" + Math.round(days * 86400) + "; Path=/; SameSite=Lax";
    if (d.cookieDomain) c += "; Domain=" + d.cookieDomain;
    if (location.protocol === "https:") c += "; Secure";
    document.cookie = c;
  }
  function announce(id) {
    if (!id) return;
    try { document.dispatchEvent(new CustomEvent("refstream:click", { detail: { clickId: id } })); } catch (e) { /* old browser */ }
  }
  window.refstream = { clickId: read };
  if (window.refstreamOptOut || dnt) return;

  var query = new URLSearchParams(location.search), code = null;
  for (var i = 0; i < params.length && !code; i++) code = query.get(params[i].trim());
  if (!code) { announce(read()); return; }

  var sid = null;
  try {
    sid = sessionStorage.getItem("refstream_session");
    if (!sid) { sid = Date.now().toString(36) + Math.random().toString(36).slice(2); sessionStorage.setItem("refstream_session", sid); }
  } catch (e) { /* storage blocked */ }
  var body = {
    affiliate_url: location.origin + location.pathname + "?aff=" + encodeURIComponent(code),
    page_url: location.href,
    page_title: document.title,
    referrer_url: document.referrer || null,
    session_id: sid,
    user_agent: navigator.userAgent,
    screen_resolution: screen.width + "x" + screen.height,
    viewport_size: window.innerWidth + "x" + window.innerHeight,
    language: navigator.language,
    timezone: (window.Intl && Intl.DateTimeFormat().resolvedOptions().timeZone) || null,
    dedupe: key()
  };
  var payload = JSON.stringify(body);  // the same bytes on every retry

  function key() {  // 128 random bits for this page view's click
    try {
      if (window.crypto && crypto.randomUUID) return "rs_" + crypto.randomUUID();
      var b = new Uint8Array(16); crypto.getRandomValues(b);
      return "rs_" + Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
    } catch (e) { return "rs_" + Date.now().toString(36) + Math.random().toString(36).slice(2) + Math.random().toString(36).slice(2); }
  }
  function retry(tries) {
    if (tries >= 3) return;
    setTimeout(function () { send(tries + 1); }, 1000 * Math.pow(2, tries));
  }
  function send(tries) {
    // text/plain: a "simple" request, no CORS preflight; keepalive: survives a navigation
    fetch(api + "/api/v1/track/click", {
      method: "POST", body: payload, headers: { "Content-Type": "text/plain" },
      keepalive: true, credentials: "omit", mode: "cors"
    }).then(function (r) {
      if (r.status >= 500 || r.status === 429) { retry(tries); return null; }
      return r.json();
    }, function () { retry(tries); return null; }).then(function (j) {
      if (!j || !j.success || !j.click_id) return;
      var current = read();
      if (attribution === "first_click" && current) { announce(current); return; }
      write(j.click_id, j.cookie_window_days || 30);
      announce(j.click_id);
    })["catch"](function () { /* tracking never breaks the page */ });
  }
  send(0);
})();
