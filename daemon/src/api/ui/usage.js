// tpacct's usage page: reads /api/v1/stats, /api/v1/devices and /traffic with the controller's
// secret (kept in localStorage) and draws SVG by hand. No framework, no chart library, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const KEY = "tpacct.secret";
const THEME = "tpacct.theme";
const REFRESH_MS = 10000;
// The group keys that are also filters (clicking one narrows the page to it).
const FILTERABLE = ["device", "host", "rule", "outbound", "process", "destination"];

const state = { filters: {}, devices: new Map(), timer: null, live: null, loading: 0 };

function secret() { return localStorage.getItem(KEY) || ""; }

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
}
const exact = (n) => Number(n).toLocaleString("en-US");
const value = (n, metric) => (metric === "connections" ? exact(n) : bytes(n));

class AuthError extends Error {}

async function api(path, params) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) url.searchParams.set(k, v);
  const r = await fetch(url, { headers: secret() ? { Authorization: "Bearer " + secret() } : {} });
  if (r.status === 401) throw new AuthError("the secret was refused");
  const body = await r.json().catch(() => ({}));
  if (!r.ok || (body.status && body.status !== "success")) {
    throw new Error(`${path}: ${body.message || r.status}`);
  }
  return body.status ? body.data : body;
}

// The chosen range as [from, to, open]: `open` when it ends now, and is then asked without
// `to`, so the live flows (whose end is the server's now) count.
function range() {
  const now = new Date();
  const kind = $("range").value;
  const hours = { "1h": 1, "24h": 24, "7d": 168, "30d": 720 }[kind];
  if (hours) return [new Date(now - hours * 3600e3), now, true];
  if (kind === "today") {
    const d = new Date(now); d.setHours(0, 0, 0, 0); return [d, now, true];
  }
  if (kind === "month") return [new Date(now.getFullYear(), now.getMonth(), 1), now, true];
  const from = $("from").value ? new Date($("from").value) : new Date(now - 86400e3);
  const to = $("to").value ? new Date($("to").value) : now;
  return [from, to, !$("to").value];
}

function query(from, to, extra) {
  const q = { from: from.toISOString() };
  if (to) q.to = to.toISOString();
  return Object.assign(q, state.filters, extra);
}

function name(group, key) {
  if (key === null || key === undefined || key === "") return "(none)";
  if (group === "device") {
    const d = state.devices.get(key);
    if (d && d.hostname) return d.hostname;
  }
  return String(key);
}

function el(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function card(id, now, before, metric) {
  const c = $("card-" + id);
  const v = now[id];
  c.querySelector("b").textContent = value(v, metric);
  c.querySelector("b").dataset.value = v;
  c.querySelector("small").textContent = metric === "connections" ? "flows" : exact(v) + " B";
  const i = c.querySelector("i");
  const was = before[id];
  i.className = "";
  if (!was) {
    i.textContent = v ? "new against the range before" : "";
  } else {
    const pct = ((v - was) / was) * 100;
    i.textContent = `${pct >= 0 ? "+" : ""}${pct.toFixed(1)}% against the range before`;
    i.className = pct >= 0 ? "more" : "less";
  }
}

function bars(group, rows) {
  const svg = $("bars");
  svg.replaceChildren();
  // Drawn at the element's own width, so text keeps its size on a phone.
  const width = Math.max(300, svg.clientWidth || 1000);
  const rowH = 26, labelW = Math.min(190, width * 0.34), right = Math.min(110, width * 0.22);
  svg.setAttribute("viewBox", `0 0 ${width} ${Math.max(1, rows.length) * rowH + 24}`);
  svg.dataset.group = group;
  if (!rows.length) {
    svg.append(el("text", { x: 0, y: 16, class: "muted" }, "No flows in this range."));
    return;
  }
  const max = Math.max(...rows.map((r) => r.total), 1);
  const scale = (width - labelW - right) / max;
  rows.forEach((r, i) => {
    const key = r[group];
    const y = i * rowH;
    const g = el("g", { class: FILTERABLE.includes(group) && key ? "pick" : "", "data-key": key ?? "" });
    g.append(el("title", {}, `${name(group, key)}: ${exact(r.total)} B (down ${exact(r.download)}, up ${exact(r.upload)}), ${r.count} flows`));
    g.append(el("text", { x: 0, y: y + 17 }, name(group, key).slice(0, Math.floor(labelW / 7))));
    g.append(el("rect", { x: labelW, y: y + 4, width: Math.max(1, r.download * scale), height: rowH - 8, class: "down" }));
    g.append(el("rect", { x: labelW + r.download * scale, y: y + 4, width: r.upload * scale, height: rowH - 8, class: "up" }));
    g.append(el("text", { x: width - right + 8, y: y + 17, class: "muted" }, bytes(r.total)));
    if (FILTERABLE.includes(group) && key) g.addEventListener("click", () => narrow(group, key));
    svg.append(g);
  });
  const legend = el("text", { x: labelW, y: rows.length * rowH + 18, class: "muted" });
  legend.append(el("tspan", { class: "down" }, "■"), el("tspan", {}, " download  "));
  legend.append(el("tspan", { class: "up" }, "■"), el("tspan", {}, " upload"));
  svg.append(legend);
}

// Buckets of a fixed length, every one in the range (the API lists only those with flows).
const STEP = { minute: 60e3, hour: 3600e3, day: 86400e3 };

function filled(points, interval, from, to) {
  const step = STEP[interval];
  if (!step) return points;
  const first = Math.floor(from / step) * step;
  if ((to - first) / step > 1500) return points;
  const have = new Map(points.map((p) => [Date.parse(p.time), p.value]));
  const all = [];
  for (let t = first; t <= to; t += step) all.push({ time: new Date(t).toISOString(), value: have.get(t) || 0 });
  return all;
}

function series(points, metric, interval) {
  const svg = $("series");
  svg.replaceChildren();
  const width = Math.max(300, svg.clientWidth || 1000), height = 260, left = 70, bottom = 24;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.dataset.interval = interval;
  svg.dataset.points = points.length;
  if (!points.some((p) => p.value)) {
    svg.append(el("text", { x: left, y: 20, class: "muted" }, "No flows in this range."));
    return;
  }
  const max = Math.max(...points.map((p) => p.value), 1);
  const plotH = height - bottom - 10;
  for (const f of [0, 0.5, 1]) {
    const y = 10 + plotH * (1 - f);
    svg.append(el("line", { x1: left, x2: width, y1: y, y2: y, class: "grid" }));
    svg.append(el("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "muted" }, value(max * f, metric)));
  }
  const step = (width - left) / points.length;
  const every = Math.ceil(points.length / Math.max(2, Math.floor(width / 130)));
  points.forEach((p, i) => {
    const h = (p.value / max) * plotH;
    const x = left + i * step;
    const t = new Date(p.time);
    const label = ["minute", "hour"].includes(interval) ? t.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" }) : t.toLocaleDateString();
    const w = Math.min(48, Math.max(1, step * 0.8));
    const r = el("rect", { x: x + (step - w) / 2, y: 10 + plotH - h, width: w, height: Math.max(h, 0.5), class: "bar" });
    r.append(el("title", {}, `${label}: ${metric === "connections" ? exact(p.value) + " flows" : exact(p.value) + " B"}`));
    svg.append(r);
    if (i % every === 0) svg.append(el("text", { x: x + step / 2, y: height - 6, "text-anchor": "middle", class: "muted" }, label));
  });
}

function devices(list) {
  state.devices = new Map(list.map((d) => [d.device, d]));
  const body = $("devices").querySelector("tbody");
  body.replaceChildren();
  for (const d of list) {
    const tr = document.createElement("tr");
    tr.dataset.device = d.device;
    const cells = [d.device, d.mac || "", d.hostname || "", (d.ips || []).join(", "), bytes(d.today), bytes(d.month), bytes(d.total)];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i >= 4) td.className = "num";
      tr.append(td);
    });
    tr.title = `all time: ${exact(d.total)} B in ${exact(d.connections)} flows`;
    tr.addEventListener("click", () => narrow("device", d.device));
    body.append(tr);
  }
}

function chips() {
  const box = $("filters");
  box.replaceChildren();
  for (const [k, v] of Object.entries(state.filters)) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "chip";
    b.dataset.filter = k;
    b.textContent = `${k}: ${name(k, v)} ×`;
    b.title = "remove this filter";
    b.addEventListener("click", () => { delete state.filters[k]; load(); });
    box.append(b);
  }
}

function narrow(key, v) {
  state.filters[key] = v;
  load();
}

async function load() {
  const ticket = ++state.loading;
  const [from, to, open] = range();
  const until = open ? null : to;
  const before = new Date(from - (to - from));
  const group = $("group").value, interval = $("interval").value, metric = $("metric").value;
  try {
    const [now, prev, groups, points, devs] = await Promise.all([
      api("/api/v1/stats", query(from, until, { type: "summary" })),
      api("/api/v1/stats", query(before, from, { type: "summary" })),
      api("/api/v1/stats", query(from, until, { type: "group", group_by: group, limit: 12 })),
      api("/api/v1/stats", query(from, until, { type: "timeseries", interval, metric })),
      api("/api/v1/devices"),
    ]);
    if (ticket !== state.loading) return; // a newer load is on its way
    devices(devs);
    chips();
    for (const id of ["count", "total", "download", "upload"]) card(id, now, prev, id === "count" ? "connections" : "bytes");
    bars(group, groups);
    series(filled(points, interval, from.getTime(), to.getTime()), metric, interval);
    $("error").textContent = "";
    document.body.dataset.loaded = ticket;
  } catch (e) {
    if (e instanceof AuthError) return login(e.message);
    $("error").textContent = e.message;
  }
}

function live() {
  if (state.live) state.live.close();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/traffic?token=${encodeURIComponent(secret())}`);
  ws.onmessage = (m) => {
    const t = JSON.parse(m.data);
    $("live-up").textContent = bytes(t.up) + "/s";
    $("live-down").textContent = bytes(t.down) + "/s";
  };
  ws.onclose = () => { if (state.live === ws) setTimeout(live, 3000); };
  state.live = ws;
}

function login(message) {
  clearInterval(state.timer);
  if (state.live) { const ws = state.live; state.live = null; ws.close(); }
  $("page").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("secret").focus();
}

function open() {
  $("login").hidden = true;
  $("page").hidden = false;
  load();
  live();
  clearInterval(state.timer);
  state.timer = setInterval(() => { if ($("range").value !== "custom") load(); }, REFRESH_MS);
}

function theme(t) {
  if (t) document.documentElement.dataset.theme = t;
  else delete document.documentElement.dataset.theme;
}

function init() {
  theme(localStorage.getItem(THEME));
  $("theme").addEventListener("click", () => {
    const dark = getComputedStyle(document.documentElement).getPropertyValue("--bg").trim() === "#12151c";
    const t = dark ? "light" : "dark";
    localStorage.setItem(THEME, t);
    theme(t);
  });
  $("login").addEventListener("submit", async (e) => {
    e.preventDefault();
    localStorage.setItem(KEY, $("secret").value);
    try {
      await api("/api/v1/stats", { type: "summary", from: new Date(Date.now() - 1000).toISOString() });
      open();
    } catch (err) {
      login(err.message);
    }
  });
  $("forget").addEventListener("click", () => { localStorage.removeItem(KEY); login(""); });
  $("range").addEventListener("change", () => { $("custom").hidden = $("range").value !== "custom"; load(); });
  for (const id of ["from", "to", "group", "interval", "metric"]) $(id).addEventListener("change", load);
  if (document.body.dataset.auth === "required" && !secret()) return login("");
  api("/api/v1/stats", { type: "summary", from: new Date(Date.now() - 1000).toISOString() })
    .then(open)
    .catch((e) => login(e instanceof AuthError ? "" : e.message));
}

init();
