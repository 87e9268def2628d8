// georeg dashboard: signs in, reads one Server-Sent Events stream of snapshots
// from the management server (fetch, so the session travels in the
// Authorization header, never a cookie or a URL), and draws them. Every
// value from the server reaches the page as text (textContent), never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const KEY = "georeg.dashboard.session";
const S = { session: sessionStorage.getItem(KEY), role: null, state: null, drawn: false,
            stream: null, retry: 1000, imageRef: null, imageTimer: null, imagePolls: 0 };

const $ = (id) => document.getElementById(id);
function el(tag, attrs = {}, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
const xy = (lon, lat) => [lon, -lat];
function sizeText(bytes) {               // bytes, as people read them
  if (bytes < 1000) return `${Math.round(bytes)} B`;
  if (bytes < 1e6) return `${(bytes / 1e3).toFixed(1)} kB`;
  return `${(bytes / 1e6).toFixed(1)} MB`;
}
const rateText = (bps) => (bps === null || bps === undefined ? "–" : `${sizeText(bps)}/s`);

async function api(method, path, body) {
  const headers = {};
  if (S.session) headers.Authorization = "Bearer " + S.session;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                cache: "no-store" });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  return { status: r.status, data };
}
const errorText = (r) => (r.data && r.data.error && r.data.error.message)
  || (r.data && Array.isArray(r.data.errors) && r.data.errors[0] && r.data.errors[0].message)   // a node's OCI error
  || `HTTP ${r.status}`;

// -- signing in --------------------------------------------------------------------

async function signIn(body) {
  const r = await api("POST", "api/session", body);
  if (r.status !== 200) { $("sign-in-error").textContent = errorText(r); return false; }
  S.session = r.data.session;
  sessionStorage.setItem(KEY, S.session);
  return true;
}

function showSignIn() {
  S.session = null; sessionStorage.removeItem(KEY);
  if (S.stream) S.stream.abort();
  $("dashboard").hidden = true; $("sign-out").hidden = true; $("sign-in").hidden = false;
  $("live").textContent = "signed out"; $("live").className = "live off";
}

async function start() {
  const login = location.hash.match(/^#login=([\w-]+)$/);
  if (login) {
    history.replaceState(null, "", location.pathname);   // the token leaves the address bar
    await signIn({ loginToken: login[1] });
  }
  const me = await api("GET", "api/session");
  if (me.status !== 200) { showSignIn(); return; }
  S.role = me.data.role;
  $("sign-in").hidden = true; $("dashboard").hidden = false;
  $("sign-out").hidden = !me.data.auth;
  $("role").textContent = me.data.auth ? `signed in: ${S.role}` : "open cluster (no auth)";
  const owner = S.role === "owner";
  $("inject").hidden = !owner; $("read-only").hidden = owner;
  document.body.dataset.role = S.role;
  if (!S.drawn) await drawWorld();
  stream();
}

// -- the event stream ---------------------------------------------------------------

async function stream() {
  if (S.stream) S.stream.abort();
  const ctl = new AbortController();
  S.stream = ctl;
  try {
    const r = await fetch("api/events", { headers: { Authorization: "Bearer " + S.session },
                                          signal: ctl.signal, cache: "no-store" });
    if (r.status === 401) { showSignIn(); return; }
    if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}`);
    $("live").textContent = "live"; $("live").className = "live on";
    let drawn = false;               // the backoff starts over only once a frame was drawn
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data) continue;
        try {                        // one bad frame is skipped; the stream goes on
          render(JSON.parse(data));
          if (!drawn) { drawn = true; S.retry = 1000; }
        } catch (e) {
          console.error("dashboard: a frame could not be drawn", e);
        }
      }
    }
  } catch (e) {
    if (ctl.signal.aborted) return;
  }
  if (S.stream !== ctl || !S.session) return;
  $("live").textContent = "reconnecting…"; $("live").className = "live off";
  setTimeout(stream, S.retry);
  S.retry = Math.min(S.retry * 2, 30000);                   // bounded backoff
}

// -- the map ------------------------------------------------------------------------

async function drawWorld() {
  const r = await fetch("static/world.json");
  const world = await r.json();
  const land = $("land");
  const ring = (pts) => "M" + pts.map(([lon, lat]) => xy(lon, lat).join(",")).join("L") + "Z";
  for (const pts of Object.values(world.land)) land.appendChild(el("svg:path", { d: ring(pts) }));
  for (const pts of Object.values(world.water)) land.appendChild(el("svg:path", { d: ring(pts), class: "water" }));
  S.drawn = true;
}

// Nodes sit on a small circle around their region's point; regions closer than
// a few degrees (westeurope / northeurope) are nudged apart so both read.
function layout(regions) {
  const at = {};
  for (const g of regions) {
    let [x, y] = xy(g.lon, g.lat);
    for (const other of Object.values(at)) {
      const dx = x - other[0], dy = y - other[1], d = Math.hypot(dx, dy);
      if (d < 9) { const k = (9 - d) / (d || 1); x += dx * k || 9; y += dy * k; }
    }
    at[g.name] = [x, y];
  }
  return at;
}

// The view: the regions' extent with a margin, never narrower than twice its
// height (a phone shows the regions, not the whole world at a quarter size).
function fitView(at) {
  const pts = Object.values(at);
  if (!pts.length) return;
  const pad = 30, minWidth = 150;
  let x0 = Math.min(...pts.map((p) => p[0])) - pad, x1 = Math.max(...pts.map((p) => p[0])) + pad;
  let y0 = Math.min(...pts.map((p) => p[1])) - pad, y1 = Math.max(...pts.map((p) => p[1])) + pad;
  if (x1 - x0 < minWidth) { const grow = (minWidth - (x1 - x0)) / 2; x0 -= grow; x1 += grow; }
  if (x1 - x0 < 2 * (y1 - y0)) { const grow = (2 * (y1 - y0) - (x1 - x0)) / 2; x0 -= grow; x1 += grow; }
  else { const grow = ((x1 - x0) / 2 - (y1 - y0)) / 2; y0 -= grow; y1 += grow; }
  x0 = Math.max(x0, -180); x1 = Math.min(x1, 180); y0 = Math.max(y0, -80); y1 = Math.min(y1, 60);
  const box = [x0, y0, x1 - x0, y1 - y0].map((v) => v.toFixed(1)).join(" ");
  if ($("map").getAttribute("viewBox") !== box) $("map").setAttribute("viewBox", box);
}

function renderMap(state) {
  const at = layout(state.regions);
  fitView(at);
  const links = $("links"); links.replaceChildren();
  for (const l of state.links) {
    if (!at[l.a] || !at[l.b]) continue;
    const [x1, y1] = at[l.a], [x2, y2] = at[l.b];
    const line = el("svg:line", { x1, y1, x2, y2, class: `link ${l.state}`, "data-link": `${l.a}-${l.b}`,
                                  "data-state": l.state });
    const bw = l.bandwidth_mbps ? `${l.bandwidth_mbps} Mbit/s` : "unlimited";
    const [ab, ba] = l.bytes_per_s || [null, null];
    line.appendChild(el("svg:title", {}, `${l.a} ↔ ${l.b}: ${l.state}, ${l.latency_ms.toFixed(0)} ms one way, ${bw}; ` +
                                         `${l.a} → ${l.b} ${rateText(ab)}, ${l.b} → ${l.a} ${rateText(ba)}, ` +
                                         `${l.queued_kib} KiB queued`));
    links.appendChild(line);
    const both = ab === null || ba === null ? null : ab + ba;
    const label = el("svg:text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 1, class: "link-label",
                                   "text-anchor": "middle", "data-link-label": `${l.a}-${l.b}` },
                     l.state === "cut" ? "cut" : `${l.latency_ms.toFixed(0)} ms · ${rateText(both)}`);
    links.appendChild(label);
  }
  const copies = $("copies"); copies.replaceChildren();
  for (const c of state.paired_copies) {
    if (c.lon === undefined || !at[c.keeps]) continue;
    const [x, y] = xy(c.lon, c.lat);
    copies.appendChild(el("svg:line", { x1: at[c.keeps][0], y1: at[c.keeps][1], x2: x, y2: y, class: "copy-line" }));
    const sq = el("svg:rect", { x: x - 1.6, y: y - 1.6, width: 3.2, height: 3.2,
                                class: "copy" + (c.healthy ? "" : " down"), "data-copy": c.name });
    sq.appendChild(el("svg:title", {}, `${c.name}: paired copy of ${c.keeps} in ${c.region}`));
    copies.appendChild(sq);
  }
  const regions = $("regions"); regions.replaceChildren();
  for (const g of state.regions) {
    const [x, y] = at[g.name];
    const group = el("svg:g", { "data-region": g.name });
    const ring = el("svg:circle", { cx: x, cy: y, r: 4.2, class: "region-ring" + (g.home ? " home" : "") });
    ring.appendChild(el("svg:title", {}, `${g.display}${g.home ? " (home)" : ""}: ${g.status ? g.status.displayStatus : ""}`));
    ring.addEventListener("click", () => { $("fault-region").value = g.name; });
    group.appendChild(ring);
    g.nodes.forEach((n, i) => {
      const a = (2 * Math.PI * i) / Math.max(g.nodes.length, 1) - Math.PI / 2;
      const off = g.nodes.length > 1 ? 2.2 : 0;
      const health = n.healthy ? "ok" : "down";
      const dot = el("svg:circle", { cx: x + off * Math.cos(a), cy: y + off * Math.sin(a), r: 1.5,
                                     class: `node ${health}${n.routing ? "" : " norouting"}`,
                                     "data-node": n.name, "data-health": health,
                                     "data-routing": n.routing ? "on" : "off" });
      dot.appendChild(el("svg:title", {}, `${n.name} (zone ${n.zone}): ${n.health}` +
                                          `${n.reason ? " — " + n.reason : ""}; routing ${n.routing ? "on" : "off"}; ` +
                                          `${n.behind} events behind`));
      group.appendChild(dot);
    });
    group.appendChild(el("svg:text", { x, y: y + 8, class: "region-label", "text-anchor": "middle" }, g.name));
    const [done, total] = g.sync ? g.sync.images : [0, 0];
    if (done < total) {
      group.appendChild(el("svg:text", { x, y: y + 12, class: "sync-label", "text-anchor": "middle" },
                           `syncing ${done}/${total}`));
    }
    regions.appendChild(group);
  }
}

function renderReplicas(state) {
  const body = $("replicas").tBodies[0]; body.replaceChildren();
  for (const g of state.regions) {
    const shown = g.status ? g.status.displayStatus : "";
    const tr = el("tr", { "data-sync": g.name });
    tr.title = g.status ? g.status.message : "";
    tr.append(el("td", {}, g.name), el("td", { class: shown === "Ready" ? "" : "bad" }, shown));
    if (!g.sync) {                        // none of its nodes is up: what it holds is not known
      tr.dataset.complete = "unknown";
      tr.append(el("td", {}, "–"), el("td"), el("td", {}, "–"));
    } else {
      const [done, total] = g.sync.images, [bytesDone, bytesTotal] = g.sync.bytes;
      tr.dataset.complete = done >= total ? "yes" : "no";
      const bar = el("td");
      bar.appendChild(el("progress", { max: String(Math.max(total, 1)), value: String(total ? done : 1) }));
      tr.append(el("td", {}, `${done}/${total}`), bar, el("td", {}, sizeText(Math.max(bytesTotal - bytesDone, 0))));
    }
    body.appendChild(tr);
  }
}

function renderLinks(state) {
  const body = $("link-table").tBodies[0]; body.replaceChildren();
  for (const l of state.links) {
    const [ab, ba] = l.bytes_per_s || [null, null];
    const tr = el("tr", { "data-link-row": `${l.a}-${l.b}` });
    tr.append(el("td", {}, `${l.a} ↔ ${l.b}`), el("td", { class: l.state === "ok" ? "" : "bad" }, l.state),
              el("td", {}, `${l.latency_ms.toFixed(0)} ms`),
              el("td", { "data-rate": `${l.a}-${l.b}`, title: `${l.a} → ${l.b}` }, rateText(ab)),
              el("td", { "data-rate": `${l.b}-${l.a}`, title: `${l.b} → ${l.a}` }, rateText(ba)),
              el("td", {}, l.queued_kib ? `${l.queued_kib} KiB` : "–"));
    body.appendChild(tr);
  }
}

function renderNodes(state) {
  const body = $("nodes").tBodies[0]; body.replaceChildren();
  for (const g of state.regions) for (const n of g.nodes) {
    const tr = el("tr", { "data-node-row": n.name });
    tr.append(el("td", {}, n.name), el("td", {}, String(n.zone)),
              el("td", { class: n.healthy ? "" : "bad" }, n.health),
              el("td", {}, n.routing ? "on" : "off"), el("td", {}, String(n.behind)),
              el("td", {}, n.peers), el("td", {}, String(n.images)));
    body.appendChild(tr);
  }
}

// -- faults -------------------------------------------------------------------------

function renderFaults(state) {
  const list = $("faults"); list.replaceChildren();
  if (!state.faults.length) list.appendChild(el("li", { class: "none" }, "no active faults"));
  for (const f of state.faults) {
    const li = el("li", { "data-fault": f.id });
    const left = f.remaining_s === null ? "until healed" : `${Math.ceil(f.remaining_s)} s left`;
    li.appendChild(el("span", {}, `${f.id} ${f.description} (${left})`));
    if (S.role === "owner") {
      const b = el("button", { type: "button", "data-heal": f.id }, "heal");
      b.addEventListener("click", () => faultCall("DELETE", `api/faults/${encodeURIComponent(f.id)}`));
      li.appendChild(b);
    }
    list.appendChild(li);
  }
  for (const id of ["fault-region", "fault-other"]) {
    const sel = $(id), keep = sel.value;
    const names = state.regions.map((g) => g.name);
    if ([...sel.options].map((o) => o.value).join() !== names.join()) {
      sel.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
      if (id === "fault-other" && names.length > 1) sel.value = names[1];
    }
    if (names.includes(keep)) sel.value = keep;
  }
}

function showFields() {
  const kind = $("fault-kind").value;
  for (const label of document.querySelectorAll("#inject label[data-for]")) {
    label.hidden = !label.dataset.for.split(" ").includes(kind);
  }
}

async function faultCall(method, path, body) {
  $("fault-error").textContent = "";
  const r = await api(method, path, body);
  if (r.status >= 400) $("fault-error").textContent = errorText(r);
  return r;
}

function injectBody() {
  const kind = $("fault-kind").value, region = $("fault-region").value, other = $("fault-other").value;
  const body = { kind };
  const duration = parseFloat($("fault-duration").value);
  if (duration > 0) body.duration_s = duration;
  if (kind === "region-outage") Object.assign(body, { region, mode: $("fault-mode").value });
  if (kind === "zone-outage") Object.assign(body, { region, zone: $("fault-zone").value, mode: $("fault-mode").value });
  if (kind === "partition") Object.assign(body, { a: region, b: other });
  if (kind === "link") Object.assign(body, { a: region, b: other,
                                             latency_ms: parseFloat($("fault-latency").value) || 0,
                                             bandwidth_mbps: parseFloat($("fault-bandwidth").value) || 0 });
  if (kind === "routing") Object.assign(body, { region, enabled: false });
  if (kind === "disk") Object.assign(body, { region, full: true });
  return body;
}

// -- lag, endpoints -------------------------------------------------------------------

function heatColour(ms) {
  if (ms === null || ms === undefined) return "";
  const t = Math.min(Math.log10(Math.max(ms, 1)) / 4, 1);        // 1 ms … 10 s
  return `hsl(${Math.round(120 - 120 * t)}, 70%, 80%)`;
}

function renderLag(state) {
  const names = state.regions.map((g) => g.name);
  const table = $("lag"); table.replaceChildren();
  const head = el("tr"); head.appendChild(el("th", {}, "origin ↓ / to →"));
  for (const d of names) head.appendChild(el("th", {}, d));
  table.appendChild(head);
  for (const o of names) {
    const tr = el("tr"); tr.appendChild(el("th", {}, o));
    for (const d of names) {
      const cell = (state.lag[o] || {})[d];
      const td = el("td", { "data-lag": `${o}-${d}` });
      if (o === d) td.textContent = "·";
      else if (cell && cell.count) {
        td.textContent = `${cell.p50_ms} / ${cell.p99_ms}`;
        td.title = `${cell.count} images arrived ${cell.over === "window" ? "in the last minute" : "since start"}` +
                   " (counted by each zone node of a zone-redundant region)";
        td.style.background = heatColour(cell.p99_ms);
      } else td.textContent = "–";
      tr.appendChild(td);
    }
    table.appendChild(tr);
  }
}

function renderEndpoints(state) {
  const body = $("endpoints").tBodies[0]; body.replaceChildren();
  for (const [name, e] of Object.entries(state.endpoints)) {
    const per = Object.entries(e.requests).map(([n, c]) => `${n} ${c}`).join(", ") || "none";
    const tr = el("tr");
    tr.append(el("td", {}, name), el("td", {}, per), el("td", {}, String(e.failovers)),
              el("td", { class: e.unavailable ? "bad" : "" }, String(e.unavailable)));
    body.appendChild(tr);
  }
  const refused = $("refused").tBodies[0]; refused.replaceChildren();
  for (const g of state.regions) {
    const total = Object.values(g.refused || {}).reduce((a, b) => a + b, 0);
    const tr = el("tr");
    tr.append(el("td", {}, g.name), el("td", { class: total ? "bad" : "" }, String(total)));
    refused.appendChild(tr);
  }
}

// -- a chaos scenario's timeline -----------------------------------------------------------

// One strip: pushes acknowledged (green) and errors (red) per bucket above, a
// bar per fault its steps injected (from injected to healed, or to now while it
// is in effect), a tick per step (filled once applied), a dashed line per
// failover and a line at now.
function renderChaos(run) {
  const panel = $("chaos-panel");
  panel.hidden = !run;
  if (!run) return;
  const span = Math.max(run.duration_s, run.at_s, 1);
  const W = 600, pad = 8, top = 34, row = 11;
  const x = (t) => pad + (Math.min(Math.max(t, 0), span) / span) * (W - 2 * pad);
  const H = top + 14 + row * run.faults.length + 14;
  const svg = $("chaos-timeline");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const errors = run.acknowledged.map((_, i) => Object.values(run.errors).reduce((a, s) => a + (s[i] || 0), 0));
  const peak = Math.max(1, ...run.acknowledged, ...errors);
  const w = Math.max(((W - 2 * pad) * run.bucket_s) / span - 0.5, 0.5);
  run.acknowledged.forEach((n, i) => {
    const h = (n / peak) * (top - 4);
    if (n) svg.appendChild(el("svg:rect", { x: x(i * run.bucket_s), y: top - h, width: w, height: h, class: "acked" }));
    const e = (errors[i] / peak) * (top - 4);
    if (errors[i]) svg.appendChild(el("svg:rect", { x: x(i * run.bucket_s), y: top - h - e, width: w, height: e, class: "errs" }));
  });
  svg.appendChild(el("svg:line", { x1: pad, x2: W - pad, y1: top, y2: top, class: "axis" }));
  run.steps.forEach((s, i) => {
    const state = s.error ? "error" : s.applied_at_s === null ? "pending" : "applied";
    const t = s.applied_at_s === null ? s.at_s : s.applied_at_s;
    const tick = el("svg:path", { d: `M${x(t)},${top + 1}l-3,6h6z`, class: `step ${state}`, "data-step": String(i),
                                  "data-state": state });
    tick.appendChild(el("svg:title", {}, `${s.step}${s.fault ? " → " + s.fault : ""}${s.error ? ": " + s.error : ""}`));
    svg.appendChild(tick);
  });
  run.faults.forEach((f, i) => {
    const y = top + 12 + i * row, to = f.to_s === null ? run.at_s : f.to_s;
    const bar = el("svg:rect", { x: x(f.from_s), y, width: Math.max(x(to) - x(f.from_s), 1), height: row - 3,
                                 class: `fault ${f.in_effect ? "in-effect" : f.to_s === null ? "off" : "healed"}`,
                                 "data-chaos-fault": f.id, "data-state": f.to_s === null ? "active" : "healed" });
    bar.appendChild(el("svg:title", {}, `${f.id} ${f.description}: t+${f.from_s.toFixed(1)} s → ` +
                                        (f.to_s === null ? "now" : `t+${f.to_s.toFixed(1)} s`)));
    svg.appendChild(bar);
    svg.appendChild(el("svg:text", { x: x(f.from_s) + 2, y: y + row - 5, class: "fault-label" }, `${f.id} ${f.description}`));
  });
  for (const f of run.failovers) {
    const line = el("svg:line", { x1: x(f.at_s), x2: x(f.at_s), y1: 2, y2: H - 12, class: "failover" });
    line.appendChild(el("svg:title", {}, `t+${f.at_s.toFixed(1)} s: clients in ${f.client} now served by ${f.to}`));
    svg.appendChild(line);
  }
  const silent = run.phase !== "done" && run.silent_s !== null && run.silent_s !== undefined;
  if (run.phase !== "done" && !silent) svg.appendChild(el("svg:line", { x1: x(run.at_s), x2: x(run.at_s), y1: 0, y2: H - 12, class: "now" }));
  for (const t of [0, span / 2, span]) {
    svg.appendChild(el("svg:text", { x: x(t), y: H - 2, class: "tick", "text-anchor": "middle" }, `${t.toFixed(0)} s`));
  }
  const outcome = run.phase !== "done"
    ? (silent ? `${run.phase}, but no word from the run for ${run.silent_s} s or more (stopped?)` : run.phase)
    : run.passed === null ? "ended before its checks (it failed or was stopped)"
    : run.passed ? "passed" : "FAILED";
  $("chaos-title").textContent = `${run.scenario} (seed ${run.seed}): ${outcome}, t+${run.at_s.toFixed(0)} s of ${run.duration_s.toFixed(0)} s`;
  $("chaos-panel").dataset.phase = silent ? "silent" : run.phase;
  const codes = Object.entries(run.errors).map(([c, s]) => `${c} ${s.reduce((a, b) => a + b, 0)}`).join(", ") || "none";
  $("chaos-summary").textContent = `pushes: ${run.pushes.acknowledged} acknowledged, ${run.pushes.refused} refused, ` +
    `${run.pushes.indefinite} indefinite of ${run.pushes.attempted} · errors: ${codes} · ` +
    `failovers: ${run.failovers.length}`;
}

// -- an image's journey ----------------------------------------------------------------

async function showImage() {
  clearTimeout(S.imageTimer);
  const ref = S.imageRef;
  if (!ref) return;
  const at = ref.lastIndexOf("@") > 0 ? ref.lastIndexOf("@") : ref.lastIndexOf(":");
  if (at <= 0) { $("image-summary").textContent = "give repository:tag or repository@digest"; return; }
  const q = new URLSearchParams({ repository: ref.slice(0, at), reference: ref.slice(at + 1) });
  const r = await api("GET", `api/images?${q}`);
  const body = $("image").tBodies[0]; body.replaceChildren();
  if (r.status !== 200) { $("image-summary").textContent = errorText(r); return; }
  const img = r.data;
  $("image-summary").textContent = `${img.digest || "not pushed"} · origin ${img.origin.region || "?"} · ` +
                                   (img.complete ? "on every replica" : "replicating…");
  for (const rep of img.replicas) {
    const tr = el("tr", { "data-replica": rep.name, "data-state": rep.state });
    tr.append(el("td", {}, rep.name), el("td", { class: rep.state === "present" ? "" : "bad" }, rep.state),
              el("td", {}, rep.arrived_at || rep.reason || ""),
              el("td", {}, rep.lag_ms === undefined || rep.lag_ms === null ? "" : String(rep.lag_ms)));
    body.appendChild(tr);
  }
  // Until complete, bounded; a reference nothing was pushed to stops after a few looks.
  const polls = img.digest ? 60 : 3;
  if (!img.complete && ++S.imagePolls < polls) S.imageTimer = setTimeout(showImage, 2000);
}

// -- wiring ------------------------------------------------------------------------------

function render(state) {
  S.state = state;
  $("registry").textContent = `${state.registry} (${state.tier}, home ${state.home_region})`;
  // Each panel on its own: one that cannot draw this frame leaves the others drawn.
  const panels = [renderMap, renderReplicas, renderNodes, renderLinks, renderFaults,
                  (s) => renderChaos(s.chaos), renderLag, renderEndpoints];
  for (const draw of panels) {
    try { draw(state); } catch (e) { console.error("dashboard: a panel could not be drawn", e); }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const credential = $("credential").value.trim();
    const body = credential ? { credential } : { identity: $("identity").value.trim(), secret: $("secret").value.trim() };
    $("credential").value = ""; $("secret").value = "";
    if (await signIn(body)) start();
  });
  $("sign-out").addEventListener("click", async () => { await api("DELETE", "api/session"); showSignIn(); });
  $("fault-kind").addEventListener("change", showFields);
  $("inject").addEventListener("submit", async (ev) => { ev.preventDefault(); await faultCall("POST", "api/faults", injectBody()); });
  $("heal-all").addEventListener("click", () => faultCall("DELETE", "api/faults"));
  $("image-form").addEventListener("submit", (ev) => {
    ev.preventDefault(); S.imageRef = $("image-ref").value.trim(); S.imagePolls = 0; showImage();
  });
  showFields();
  start();
});
