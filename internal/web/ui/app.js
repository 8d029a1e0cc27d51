// The sendonce dashboard: plain JavaScript over the HTTP API (docs/api.md).
// Every piece of data comes from /v1/ with the caller's bearer token, kept in
// sessionStorage for this tab only; nothing is fetched from elsewhere.
"use strict";

const TOKEN_KEY = "sendonce.token";
const POLL_MS = 1000;
const STATES = ["queued", "sending", "sent", "failed", "in_doubt"];
const SERIES = [
  ["accepted", "accepted"], ["duplicates", "duplicates suppressed"], ["sent", "sent"],
  ["failed", "failed"], ["in_doubt", "in doubt"],
];

let timer = null;       // the overview's poll
let pendingLogin = null; // resolves when the operator signs in

// h builds an element: h("a", {href: "#"}, "text", child...). Text is
// always set as text, never parsed as HTML.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

// api calls the HTTP API; a 401 asks the operator for a token and retries.
async function api(path, opts = {}) {
  for (;;) {
    const headers = Object.assign({}, opts.headers || {});
    if (token()) headers["Authorization"] = "Bearer " + token();
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method: opts.method || "GET", headers, cache: "no-store",
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
    });
    if (resp.status === 401) {
      await askToken(token() ? "That token was refused; check it and try again." : "");
      continue;
    }
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) {
      const e = (data && data.error) || {};
      throw new Error(e.message || resp.status + " " + resp.statusText);
    }
    return data;
  }
}

function askToken(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("logout").hidden = true;
  const box = document.getElementById("login");
  const err = document.getElementById("login-error");
  err.hidden = !message;
  err.textContent = message || "";
  box.hidden = false;
  document.getElementById("login-token").focus();
  if (!pendingLogin) {
    pendingLogin = new Promise((resolve) => {
      document.getElementById("login-form").onsubmit = (ev) => {
        ev.preventDefault();
        const v = document.getElementById("login-token").value.trim();
        if (!v) return;
        sessionStorage.setItem(TOKEN_KEY, v);
        document.getElementById("login-token").value = "";
        box.hidden = true;
        document.getElementById("logout").hidden = false;
        pendingLogin = null;
        resolve();
      };
    });
  }
  return pendingLogin;
}

function confirmDialog(title, text, okLabel) {
  const box = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  const ok = document.getElementById("confirm-ok");
  const cancel = document.getElementById("confirm-cancel");
  ok.textContent = okLabel;
  box.hidden = false;
  ok.focus();
  return new Promise((resolve) => {
    const done = (v) => { box.hidden = true; ok.onclick = cancel.onclick = null; resolve(v); };
    ok.onclick = () => done(true);
    cancel.onclick = () => done(false);
  });
}

let toastTimer = null;
function toast(msg) {
  const t = document.getElementById("toast");
  t.textContent = msg;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
}

function fmtTime(s) {
  if (!s) return "";
  const d = new Date(s);
  return d.toLocaleString(undefined, { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function stateBadge(st) { return h("span", { class: "state " + st, "data-state": st }, st.replace("_", " ")); }

function keyLink(key) { return h("a", { href: "#/email/" + encodeURIComponent(key) }, key); }

function render(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false));
}

function showError(err) {
  render(h("h1", {}, "Something went wrong"), h("p", { class: "error", id: "page-error" }, err.message || String(err)));
}

// ---------- overview ----------

async function overview() {
  const cards = h("div", { class: "cards" },
    card("total", "accepted", "c-total"),
    card("dup", "duplicates suppressed (1 h)", "c-duplicates"),
    ...STATES.map((st) => card(st, st.replace("_", " "), "c-" + st)));
  const chart = h("div", { class: "chart", id: "chart" });
  render(h("h1", {}, "Overview"), cards,
    h("h2", {}, "Last hour, per minute (this node)"), chart,
    h("p", { class: "muted", id: "updated" }));
  const tick = async () => {
    try {
      const s = await api("/v1/stats");
      updateOverview(s);
    } catch (e) {
      document.getElementById("updated").textContent = "Update failed: " + e.message;
    }
  };
  await tick();
  timer = setInterval(tick, POLL_MS);
}

function card(cls, label, id) {
  return h("div", { class: "card " + cls }, h("div", { class: "n", id }, "–"), h("div", { class: "l" }, label));
}

function updateOverview(s) {
  const set = (id, v) => { const el = document.getElementById(id); if (el) el.textContent = String(v); };
  let total = 0;
  for (const st of STATES) { set("c-" + st, s.counts[st] || 0); total += s.counts[st] || 0; }
  set("c-total", total);
  set("c-duplicates", s.activity.reduce((n, m) => n + m.duplicates, 0));
  setInDoubtBadge(s.counts.in_doubt || 0);
  drawChart(document.getElementById("chart"), s.activity);
  const u = document.getElementById("updated");
  if (u) u.textContent = "Updated " + fmtTime(s.now);
}

function setInDoubtBadge(n) { document.getElementById("nav-in-doubt").textContent = n ? String(n) : ""; }

function drawChart(box, minutes) {
  if (!box) return;
  const W = 900, H = 240, L = 36, B = 22, T = 8, R = 8;
  const max = Math.max(1, ...minutes.flatMap((m) => SERIES.map(([k]) => m[k])));
  const x = (i) => L + (i * (W - L - R)) / Math.max(1, minutes.length - 1);
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "emails per minute over the last hour" });
  for (const v of [0, max / 2, max]) {
    g.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    g.append(svg("text", { x: 2, y: y(v) + 4 }, String(Math.round(v))));
  }
  minutes.forEach((m, i) => {
    if (i % 10 === 0 || i === minutes.length - 1) {
      const d = new Date(m.start);
      g.append(svg("text", { x: x(i) - 14, y: H - 4 }, d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" })));
    }
  });
  for (const [k] of SERIES) {
    const pts = minutes.map((m, i) => `${x(i).toFixed(1)},${y(m[k]).toFixed(1)}`).join(" ");
    g.append(svg("polyline", { class: "s-" + k, points: pts, "data-series": k }));
  }
  const legend = h("div", { class: "legend" }, SERIES.map(([k, label]) => h("span", {}, h("i", { class: "s-" + k }), label)));
  box.replaceChildren(g, legend);
}

// ---------- emails ----------

function hashQuery() {
  const i = location.hash.indexOf("?");
  return new URLSearchParams(i < 0 ? "" : location.hash.slice(i + 1));
}

async function emails() {
  const q = hashQuery();
  const field = (name, label, type) => h("label", {}, label,
    h("input", { name, id: "f-" + name, type: type || "text", value: q.get(name) || "" }));
  const state = h("select", { name: "state", id: "f-state" }, h("option", { value: "" }, "any"),
    STATES.map((st) => h("option", { value: st, selected: q.get("state") === st }, st)));
  const form = h("form", { class: "search", id: "search" },
    field("key_prefix", "Key starts with"), field("recipient", "Recipient"),
    h("label", {}, "State", state),
    field("from", "Accepted from", "datetime-local"), field("to", "Accepted before", "datetime-local"),
    h("button", { type: "submit", class: "primary" }, "Search"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const p = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) p.set(k, v);
    location.hash = "#/emails?" + p.toString();
  });
  const tbody = h("tbody", { id: "email-rows" });
  const more = h("button", { id: "more", hidden: true }, "More");
  const info = h("p", { class: "muted", id: "list-info" });
  render(h("h1", {}, "Emails"), form,
    h("table", {}, h("thead", {}, h("tr", {}, ["Key", "State", "To", "Subject", "Attempts", "Duplicates", "Accepted"].map((c) => h("th", {}, c)))), tbody),
    more, info);

  const params = new URLSearchParams({ limit: "50" });
  for (const k of ["key_prefix", "recipient", "state"]) if (q.get(k)) params.set(k, q.get(k));
  if (q.get("from")) params.set("created_after", new Date(q.get("from")).toISOString());
  if (q.get("to")) params.set("created_before", new Date(q.get("to")).toISOString());
  let shown = 0;
  const load = async (cursor) => {
    if (cursor) params.set("cursor", cursor);
    const t0 = performance.now();
    const page = await api("/v1/emails?" + params.toString());
    for (const r of page.emails) {
      tbody.append(h("tr", { "data-key": r.key },
        h("td", { class: "key" }, keyLink(r.key)), h("td", {}, stateBadge(r.state)),
        h("td", {}, r.to.join(", ")), h("td", {}, r.subject), h("td", {}, r.attempts),
        h("td", {}, r.duplicates), h("td", {}, fmtTime(r.created_at))));
    }
    shown += page.emails.length;
    more.hidden = !page.next_cursor;
    more.onclick = () => load(page.next_cursor).catch(showError);
    info.textContent = `${shown} shown${page.next_cursor ? ", more available" : ""} · last page in ${Math.round(performance.now() - t0)} ms`;
  };
  await load("");
}

// ---------- one email ----------

// timeline renders the email's events (GET /v1/emails/{key}/events).
function timeline(events) {
  const text = (e) => {
    switch (e.kind) {
      case "accepted": return `Accepted via ${e.detail}`;
      case "duplicate": return `Duplicate submission suppressed (${e.detail} so far)`;
      case "attempt": return `Attempt ${e.attempt} started` + (e.detail ? ` by ${e.detail}` : "");
      case "committing": return "Handing the message over (commit marker written)";
      case "sent": return "Sent" + (e.detail ? `: upstream replied ${e.detail}` : "");
      case "failed": return "Failed" + (e.detail ? `: ${e.detail}` : "");
      case "retry": return "Back to the queue" + (e.detail ? `: ${e.detail}` : "");
      case "in_doubt": return "In doubt" + (e.detail ? `: ${e.detail}` : "") + "; the upstream may or may not have it";
      case "resolved": return `Resolved (${e.state}): ${e.detail}`;
    }
    return e.kind;
  };
  const cls = { duplicate: "dup", sent: "sent", failed: "failed", in_doubt: "in_doubt" };
  return h("ol", { class: "timeline", id: "timeline" },
    events.map((e) => h("li", { class: cls[e.kind] || "", "data-kind": e.kind }, h("time", {}, fmtTime(e.at)), text(e))));
}

function resolveButtons(r, after) {
  if (r.state !== "in_doubt") return null;
  const act = async (action, label, explain) => {
    const ok = await confirmDialog(label + "?", `${explain} This is recorded as yours on email “${r.key}”.`, label);
    if (!ok) return;
    try {
      const rec = await api("/v1/emails/" + encodeURIComponent(r.key) + "/resolve", { method: "POST", body: { action } });
      toast(`${r.key}: ${rec.state} (${rec.resolved_by})`);
      after();
    } catch (e) {
      toast("Failed: " + e.message);
    }
  };
  return h("div", { class: "actions" },
    h("button", { "data-action": "resend", onclick: () => act("resend", "Resend", "It will be delivered again with the same Message-ID, so a receiver that deduplicates discards a copy.") }, "Resend"),
    h("button", { "data-action": "mark_sent", onclick: () => act("mark_sent", "Mark sent", "It will be recorded as delivered; nothing is sent.") }, "Mark sent"),
    h("button", { class: "danger", "data-action": "fail", onclick: () => act("fail", "Fail", "It will be recorded as failed; nothing is sent.") }, "Fail"));
}

async function email(key) {
  const path = "/v1/emails/" + encodeURIComponent(key);
  const [r, m, ev] = await Promise.all([api(path), api(path + "/message"), api(path + "/events")]);
  const fields = [["Key", r.key], ["State", stateBadge(r.state)], ["Message-ID", r.message_id], ["From", r.from],
    ["To", r.to.join(", ")], ["Subject", r.subject], ["Source", r.source], ["Attempts", r.attempts],
    ["Duplicates suppressed", r.duplicates], ["Accepted", fmtTime(r.created_at)], ["Updated", fmtTime(r.updated_at)]];
  if (r.resolved_by) fields.push(["Resolved", r.resolved_by]);
  let body;
  if (m.purged) body = h("p", { class: "muted" }, "The body was removed after sending (purge_body_on_send).");
  else if (m.html) body = h("iframe", { class: "body", sandbox: "", srcdoc: m.html, title: "HTML body", id: "body-html" });
  else body = h("pre", { class: "body", id: "body-text" }, m.text);
  const headers = h("details", {}, h("summary", {}, "Headers"),
    h("pre", { class: "body" }, m.headers.map(([k, v]) => k + ": " + v).join("\n")));
  render(h("h1", {}, "Email ", h("code", {}, r.key)),
    resolveButtons(r, () => route()),
    h("div", { class: "two" },
      h("div", {}, h("h2", {}, "Record"), h("dl", { class: "fields" }, fields.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))),
      h("div", {}, h("h2", {}, "Timeline"), timeline(ev.events))),
    h("h2", {}, "Body"), body, m.text && m.html ? h("details", {}, h("summary", {}, "Text part"), h("pre", { class: "body" }, m.text)) : null,
    headers);
}

// ---------- in doubt ----------

async function inDoubt() {
  const tbody = h("tbody", { id: "doubt-rows" });
  render(h("h1", {}, "In doubt"),
    h("p", { class: "muted" }, "The upstream took these emails but its answer was lost: it may or may not have them. Decide for each; the decision is recorded with your token's name."),
    h("table", {}, h("thead", {}, h("tr", {}, ["Key", "To", "Subject", "Attempts", "Last error", "Since", ""].map((c) => h("th", {}, c)))), tbody),
    h("p", { class: "muted", id: "doubt-info" }));
  const page = await api("/v1/emails?state=in_doubt&limit=200");
  for (const r of page.emails) {
    tbody.append(h("tr", { "data-key": r.key },
      h("td", { class: "key" }, keyLink(r.key)), h("td", {}, r.to.join(", ")), h("td", {}, r.subject),
      h("td", {}, r.attempts), h("td", {}, r.last_error), h("td", {}, fmtTime(r.updated_at)),
      h("td", {}, resolveButtons(r, () => route()))));
  }
  setInDoubtBadge(page.emails.length);
  document.getElementById("doubt-info").textContent = page.emails.length ? `${page.emails.length} email(s) in doubt` : "Nothing is in doubt.";
}

// ---------- schedules ----------

// schedules shows each schedule of the tenant with its next instants and
// its latest fires' progress (GET /v1/schedules), refreshed while a fire
// runs so its counts move.
async function schedules() {
  const box = h("div", { id: "schedules" });
  render(h("h1", {}, "Schedules"),
    h("p", { class: "muted" }, "Each fire admits its recipients in batches and records its cursor after each one; a fire stopped by an error is retried from there, and whatever a re-run admits again is counted as a duplicate, never sent twice."),
    box, h("p", { class: "muted", id: "sched-updated" }));
  const tick = async () => {
    const s = await api("/v1/schedules");
    box.replaceChildren(...(s.schedules.length ? s.schedules.map(scheduleSection)
      : [h("p", { class: "muted", id: "sched-empty" }, "No schedule is configured for this tenant (see docs/scheduler.md).")]));
    document.getElementById("sched-updated").textContent = "Updated " + fmtTime(s.now);
  };
  await tick();
  timer = setInterval(() => tick().catch((e) => {
    const u = document.getElementById("sched-updated");
    if (u) u.textContent = "Update failed: " + e.message;
  }), POLL_MS);
}

function scheduleSection(sc) {
  const rows = sc.fires.map((f) => h("tr", { "data-fire": f.key, "data-state": f.state },
    h("td", {}, fmtTime(f.scheduled_at), f.manual ? h("span", { class: "muted" }, " (manual)") : null),
    h("td", {}, stateBadge(f.state)),
    h("td", { class: "num", "data-count": "admitted" }, f.admitted),
    h("td", { class: "num", "data-count": "duplicates" }, f.duplicates),
    h("td", { class: "num", "data-count": "rejected" }, f.rejected),
    h("td", { class: "num" }, f.attempts),
    h("td", { class: "cursor" }, f.cursor || "start"),
    h("td", {}, f.state === "waiting" ? `${f.last_error || ""} (retry ${fmtTime(f.next_attempt)})`
      : f.state === "running" ? `running on ${f.owner || "?"}` : (f.last_error ? "earlier error: " + f.last_error : "")),
    h("td", {}, fmtTime(f.finished_at || f.updated_at))));
  return h("section", { class: "schedule", "data-schedule": sc.name },
    h("h2", {}, sc.name),
    h("p", { class: "muted meta" }, `${sc.cron} (${sc.time_zone}) · catch-up ${sc.catch_up} · next: `,
      sc.next.length ? sc.next.map(fmtTime).join(", ") : "never"),
    rows.length
      ? h("table", {}, h("thead", {}, h("tr", {}, ["Scheduled", "State", "Admitted", "Duplicates", "Rejected", "Runs", "Cursor", "Note", "Updated"].map((c) => h("th", {}, c)))),
        h("tbody", { class: "fire-rows" }, rows))
      : h("p", { class: "muted no-fires" }, "No fire recorded yet."));
}

// ---------- routing ----------

async function route() {
  clearInterval(timer);
  timer = null;
  const hash = location.hash || "#/";
  const path = hash.slice(1).split("?")[0];
  let page = "overview";
  let run = overview;
  if (path === "/emails") { page = "emails"; run = emails; }
  else if (path === "/in-doubt") { page = "in-doubt"; run = inDoubt; }
  else if (path === "/schedules") { page = "schedules"; run = schedules; }
  else if (path.startsWith("/email/")) { page = "emails"; const k = decodeURIComponent(path.slice(7)); run = () => email(k); }
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.nav === page);
  document.body.dataset.page = page;
  try {
    await run();
    document.body.dataset.ready = page;
  } catch (e) {
    showError(e);
  }
}

document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.hash = "#/";
  location.reload();
});
document.getElementById("logout").hidden = !token();
window.addEventListener("hashchange", route);
if (document.body.dataset.auth === "required" && !token()) {
  askToken("").then(route); // ask first rather than provoke a 401
} else {
  route();
}
