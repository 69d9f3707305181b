// The Pulse console: charts, live tables, and actions. No framework, no
// build step. The token is kept in sessionStorage (this tab only) and sent
// as an Authorization header: never in a cookie or the URL.
"use strict";
(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const TOKEN_KEY = "pulse-console-token";
  const REFRESH_MS = 5000;
  let windowName = "5m";
  let tokenName = null;

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
  function headers(extra) {
    const h = Object.assign({ "Accept": "application/json" }, extra || {});
    if (token()) h["Authorization"] = "Bearer " + token();
    return h;
  }
  async function api(method, path, body) {
    const init = { method: method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
    if (body) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const err = new Error((data.error && data.error.message) || response.statusText);
      err.status = response.status;
      throw err;
    }
    return data;
  }
  function say(text, bad) {
    const m = $("#message");
    m.textContent = text;
    m.style.color = bad ? "#fca5a5" : "#bbf7d0";
  }
  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const c of children || []) e.append(c);
    return e;
  }

  // -- the token ------------------------------------------------------------
  async function checkToken() {
    tokenName = null;
    if (token()) {
      try { tokenName = (await api("GET", "/console/whoami")).name; }
      catch (e) { say("token refused: " + e.message, true); }
    }
    $("#who").textContent = tokenName ? "acting as " + tokenName : "read-only: no token";
    document.querySelectorAll("button.act").forEach(b => { b.disabled = !tokenName; });
  }
  $("#token-form").addEventListener("submit", ev => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
    $("#token").value = "";
    checkToken().then(refreshAll);
  });
  $("#forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    checkToken();
  });

  // -- the job browser ---------------------------------------------------------
  function filterParams() {
    const params = new URLSearchParams();
    new FormData($("#filters")).forEach((v, k) => { if (v) params.set(k, v); });
    return params;
  }
  function bulkFilter() {
    const f = {};
    filterParams().forEach((v, k) => { if (["state", "type", "queue", "error"].includes(k)) f[k] = v; });
    return f;
  }
  function jobRow(j) {
    const link = el("a", { href: "#job-" + j.id, text: String(j.id) });
    link.addEventListener("click", ev => { ev.preventDefault(); showJob(j.id); });
    const cells = [el("td", { class: "num" }, [link]),
      el("td", { class: "state " + j.state, text: j.state }),
      el("td", { text: j.type }), el("td", { text: j.queue }),
      el("td", { class: "num", text: String(j.attempt) }),
      el("td", { text: (j.created_at || "").replace("T", " ").slice(0, 19) }),
      el("td", { class: "error", text: (j.last_error || "").slice(0, 200) })];
    return el("tr", { "data-id": String(j.id) }, cells);
  }
  async function loadJobs(after) {
    const params = filterParams();
    if (after) params.set("after", after);
    let data;
    try { data = await api("GET", "/console/jobs.json?" + params); }
    catch (e) { $("#job-list").textContent = "cannot read jobs: " + e.message; return; }
    const head = el("tr", {}, ["id", "state", "type", "queue", "attempt", "created", "last error"]
      .map(h => el("th", { text: h })));
    const table = el("table", { id: "jobs" }, [el("thead", {}, [head]),
      el("tbody", {}, data.jobs.map(jobRow))]);
    const count = el("p", { id: "job-count" }, [el("b", { text: data.count + (data.count_exact ? "" : "+") }),
      " matching jobs"]);
    const parts = [count, table];
    if (data.next_after) {
      const next = el("a", { id: "next-page", href: "#", text: "older jobs \u2192" });
      next.addEventListener("click", ev => { ev.preventDefault(); loadJobs(data.next_after); });
      parts.push(next);
    }
    $("#job-list").replaceChildren(...parts);
  }
  $("#filters").addEventListener("submit", ev => { ev.preventDefault(); loadJobs(); });

  async function bulk(action, filter, what) {
    if (!tokenName) { say("actions need a token", true); return; }
    try {
      const dry = await api("POST", "/jobs/bulk/" + action, Object.assign({ dry_run: true }, filter));
      if (!window.confirm(action + " " + dry.matched + " " + what + "?")) return;
      const done = await api("POST", "/jobs/bulk/" + action, filter);
      say(action + ": " + done.changed + " of " + done.matched + " jobs (by " + done.by + ")");
    } catch (e) { say(action + " refused (" + (e.status || "?") + "): " + e.message, true); }
    refreshAll();
  }
  document.querySelectorAll("#bulk button").forEach(b => b.addEventListener("click", () => {
    const f = bulkFilter();
    if (!Object.keys(f).length) { say("set a filter first (bulk actions need one)", true); return; }
    bulk(b.dataset.bulk, f, "matching jobs");
  }));

  async function showJob(id) {
    const box = $("#job-detail");
    let j;
    try { j = await api("GET", "/console/jobs/" + id + ".json"); }
    catch (e) { say("job " + id + ": " + e.message, true); return; }
    const buttons = ["retry", "cancel", "delete"].map(a => {
      const b = el("button", { type: "button", class: "act", "data-job-action": a, text: a });
      b.disabled = !tokenName;
      b.addEventListener("click", () => bulk(a, { id: j.id }, "job (" + j.id + ")").then(() => showJob(j.id)));
      return b;
    });
    const attempts = (j.attempts || []).map(a => el("div", {}, [
      el("b", { text: "attempt " + a.attempt + ": " + a.outcome }),
      el("span", { class: "dim", text: "  " + (a.worker || "") + " " + (a.finished_at || "") }),
      a.error_message ? el("div", { class: "error", text: (a.error_class || "") + ": " + a.error_message }) : "",
      a.traceback ? el("pre", { text: a.traceback }) : ""]));
    const lease = j.lease ? "lease: " + j.lease.lease_owner + " until " + j.lease.lease_expires_at : "no lease";
    box.replaceChildren(el("h2", { text: "job " + j.id + " \u00b7 " + j.type + " \u00b7 " }, [
      el("span", { id: "detail-state", class: "state " + j.state, text: j.state })]),
      el("div", { class: "actions" }, buttons), el("p", { text: lease }),
      el("h3", { text: "payload" }), el("pre", { text: JSON.stringify(j.payload, null, 2) }),
      el("h3", { text: "result" }), el("pre", { text: JSON.stringify(j.result, null, 2) }),
      el("h3", { text: "progress" }), el("pre", { text: JSON.stringify(j.progress, null, 2) }),
      el("h3", { text: "attempts" }), ...attempts);
    box.hidden = false;
  }

  // -- the cluster -------------------------------------------------------------
  async function loadCluster() {
    let data;
    try { data = await api("GET", "/console/cluster.json"); } catch (e) { return; }
    const head = el("tr", {}, ["node", "heartbeat", "process", "pid", "state", "running", "RSS MB", "restarts"]
      .map(h => el("th", { text: h })));
    const rows = [];
    for (const n of data.nodes) {
      for (const p of n.processes) {
        rows.push(el("tr", { class: n.alive ? "" : "stale" }, [
          el("td", { text: n.node_id + (n.leader ? " (leader)" : "") }),
          el("td", { text: n.alive ? "alive" + (n.state && n.state !== "running" ? ", " + n.state : "")
            : "silent " + Math.round(n.heartbeat_age_s) + "s" }),
          el("td", { text: p.role + " " + p.idx }), el("td", { class: "num", text: String(p.pid) }),
          el("td", { text: p.state == null ? "" : String(p.state) }),
          el("td", { class: "num", text: p.running == null ? "" : String(p.running) }),
          el("td", { class: "num", text: p.rss_mb == null ? "" : String(p.rss_mb) }),
          el("td", { class: "num", text: p.restarts == null ? "" : String(p.restarts) })]));
      }
    }
    // Drain / resume any live node: this one through its master, another
    // through the database (its scheduler carries it out and acknowledges).
    const nodeLines = data.nodes.filter(n => n.alive && n.state != null).map(n => {
      const buttons = ["drain", "resume"].map(verb => {
        const b = el("button", { type: "button", class: "act", "data-node-action": verb,
          "data-node": n.node_id, text: verb });
        b.disabled = !tokenName;
        b.addEventListener("click", () => nodeAction(n.node_id, verb));
        return b;
      });
      const label = n.node_id + (n.node_id === data.this_node ? " (this node)" : "") + ": " + n.state + " ";
      return el("p", { class: "node-actions" }, [label, ...buttons]);
    });
    $("#cluster-view").replaceChildren(el("table", { id: "cluster" }, [el("thead", {}, [head]), el("tbody", {}, rows)]),
      ...nodeLines);
    const paused = data.paused_queues.map(q => {
      const b = el("button", { type: "button", class: "act", text: "resume " + q });
      b.disabled = !tokenName;
      b.addEventListener("click", () => queueAction(q, "resume"));
      return b;
    });
    const input = el("input", { id: "pause-queue", size: "12", placeholder: "queue" });
    const pause = el("button", { type: "button", class: "act", text: "pause" });
    pause.disabled = !tokenName;
    pause.addEventListener("click", () => input.value && queueAction(input.value, "pause"));
    $("#queues").replaceChildren(el("p", {}, ["Paused queues: ",
      paused.length ? "" : "none", ...paused, " \u00b7 pause a queue: ", input, pause]));
  }
  async function nodeAction(node, verb) {
    try {
      const r = await api("POST", "/nodes/" + encodeURIComponent(node) + "/" + verb);
      say(node + ": " + verb + " by " + r.by + (r.pending ? " (asked; the node has not answered yet)"
        : " (now " + r.state + ")"));
    } catch (e) { say(verb + " refused (" + (e.status || "?") + "): " + e.message, true); }
    loadCluster();
  }
  async function queueAction(queue, verb) {
    try { await api("POST", "/queues/" + encodeURIComponent(queue) + "/" + verb); say(queue + " " + verb + "d"); }
    catch (e) { say(verb + " refused: " + e.message, true); }
    loadCluster();
  }

  // -- charts: SVG lines with axes, units and the current value ----------------
  const COLORS = ["#15803d", "#b91c1c", "#b45309", "#0e7490", "#7c3aed", "#db2777"];
  function chart(title, unit, lines, windowS) {
    const W = 480, H = 160, L = 44, B = 20, T = 18, R = 8;
    const now = Date.now(), start = now - windowS * 1000;
    let max = 0;
    lines.forEach(l => l.points.forEach(p => { if (p.v != null) max = Math.max(max, p.v); }));
    max = max > 0 ? max * 1.1 : 1;
    const x = t => L + (W - L - R) * (t - start) / (now - start);
    const y = v => T + (H - T - B) * (1 - v / max);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("preserveAspectRatio", "none");
    const add = (tag, attrs, text) => {
      const e = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text != null) e.textContent = text;
      svg.append(e); return e;
    };
    for (let i = 0; i <= 4; i++) {  // the y axis: 0 .. max in the unit
      const v = max * i / 4;
      add("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e5e7eb" });
      add("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#6b7280" },
        v >= 10 ? v.toFixed(0) : v.toFixed(2));
    }
    for (let i = 0; i <= 5; i++) {  // the x axis: minutes ago
      const t = start + (now - start) * i / 5;
      const ago = Math.round((now - t) / 60000);
      add("text", { x: x(t), y: H - 4, "text-anchor": "middle", "font-size": 10, fill: "#6b7280" },
        ago ? "-" + ago + "m" : "now");
    }
    add("text", { x: L, y: 10, "font-size": 10, fill: "#6b7280" }, unit);
    const current = [];
    lines.forEach((l, i) => {
      const pts = l.points.filter(p => p.v != null);
      if (!pts.length) return;
      add("polyline", { fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 2,
        "data-series": l.name, points: pts.map(p => x(p.t).toFixed(1) + "," + y(p.v).toFixed(1)).join(" ") });
      current.push(l.name + " " + fmt(pts[pts.length - 1].v));
    });
    const legend = el("div", { class: "legend" }, lines.map((l, i) =>
      el("span", {}, [el("i"), l.name])));
    legend.querySelectorAll("i").forEach((e, i) => { e.style.background = COLORS[i % COLORS.length]; });
    return el("div", { class: "chart" }, [el("h3", { text: title }, [
      el("span", { class: "now", text: current.join(" \u00b7 ") || "no data yet" })]), svg, legend]);
  }
  function fmt(v) { return v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(3); }
  async function loadCharts() {
    let data;
    try { data = await api("GET", "/console/stats.json?window=" + windowName); } catch (e) { return; }
    const pts = key => data.totals.map(r => ({ t: Date.parse(r.t), v: r[key] }));
    const depth = Object.entries(data.depth).map(([name, rows]) =>
      ({ name: name, points: rows.map(r => ({ t: Date.parse(r.t), v: r.waiting })) }));
    $("#charts").replaceChildren(
      chart("Throughput", "jobs/s", [{ name: "completed", points: pts("completed") },
        { name: "failed", points: pts("failed") }, { name: "retried", points: pts("retried") }], data.window_s),
      chart("Pickup latency", "seconds", [{ name: "p50", points: pts("p50") },
        { name: "p95", points: pts("p95") }], data.window_s),
      chart("Queue depth (waiting)", "jobs", depth.length ? depth :
        [{ name: "all", points: pts("waiting") }], data.window_s));
  }
  document.querySelectorAll(".tabs button").forEach(b => b.addEventListener("click", () => {
    windowName = b.dataset.window;
    document.querySelectorAll(".tabs button").forEach(o => o.classList.toggle("on", o === b));
    loadCharts();
  }));

  function refreshAll() { loadCharts(); loadCluster(); loadJobs(); }
  checkToken().then(refreshAll);
  setInterval(() => { loadCharts(); loadCluster(); }, REFRESH_MS);
})();
