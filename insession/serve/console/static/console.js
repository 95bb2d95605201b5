// insession console: one small script for every page (no framework, no build step).
// The API key (when the server checks keys) lives in this tab's sessionStorage and travels as the
// X-API-Key header on every request, including the server-sent-event streams, which are read with
// fetch because EventSource cannot send headers. User data is always inserted as text, never as HTML.
"use strict";

const KEY = "insession.apiKey";
const $ = (id) => document.getElementById(id);

function apiKey() { return sessionStorage.getItem(KEY); }

function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  return fetch(path, Object.assign({}, options, { headers }));
}

// el("td", {class: "num"}, "text", childNode, ...): an element with attributes and text/element children.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function fill(tbody, rows, empty) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 9, class: "muted" }, empty || "none"))]));
}

function kv(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

const num = (v, digits = 0) => (v === null || v === undefined) ? "–" : Number(v).toLocaleString("en", { maximumFractionDigits: digits });
const time = (ms) => ms > 0 ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "–";

function duration(ms) {
  if (!ms) return "0";
  for (const [unit, size] of [["d", 86400000], ["h", 3600000], ["min", 60000], ["s", 1000]]) {
    if (ms % size === 0) return `${ms / size} ${unit}`;
  }
  return `${ms} ms`;
}

async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return body.detail || body.error || text;
  } catch (e) {
    return text || response.statusText;
  }
}

// Reads a server-sent-event stream with fetch, calling onData with each JSON message, until aborted.
// The server ends each stream after a few seconds: reconnect at once then, a second after a failure.
// onState("open" | "retry" | "error", message) follows the connection; "error" (refused) is final.
function stream(path, onData, onState) {
  const controller = new AbortController();
  const run = async () => {
    while (!controller.signal.aborted) {
      try {
        const response = await api(path, { signal: controller.signal });
        if (!response.ok) { onState("error", `${response.status}: ${await errorText(response)}`); return; }
        onState("open");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;  // the server's normal end of a stream
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const chunk = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const data = chunk.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
            if (data) onData(JSON.parse(data));
          }
        }
        continue;
      } catch (e) {
        if (controller.signal.aborted) return;
      }
      onState("retry");
      await new Promise((r) => setTimeout(r, 1000));
    }
  };
  run();
  return controller;
}

function liveState(state, message) {
  const live = $("live");
  if (!live) return;
  live.className = "live " + state;
  live.textContent = { open: "live", retry: "reconnecting…", error: message || "error" }[state] || state;
}

// -- login -------------------------------------------------------------------------------------------

async function whoami() {
  const response = await api("/console/api/whoami");
  return response.json();
}

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("login-key").focus();
}

async function boot() {
  const who = await whoami();
  if (!who.valid) {
    showLogin(apiKey() ? "That key was not accepted." : "");
    return;
  }
  $("login").hidden = true;
  if (who.auth) {
    $("who").hidden = false;
    $("who-name").textContent = `${who.name} (${who.roles.join(", ")})`;
  }
  $("main").hidden = false;
  if (!who.roles.some((r) => r === "serve" || r === "analytics")) {
    $("main").prepend(el("p", { class: "error", role: "alert" },
      `The key ${who.name} has the roles ${who.roles.join(", ")}; the console needs serve, analytics or admin.`));
    return;
  }
  const init = PAGES[document.body.dataset.page];
  if (init) init(who);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("login-key").value.trim());
    $("login-key").value = "";
    boot();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    location.reload();
  });
  boot();
});

// -- overview ----------------------------------------------------------------------------------------

const POINTS = 120;
const LANES = ["serving", "analytics", "rank"];

function chart(target, series, colors) {
  const width = () => Math.max(target.clientWidth - 8, 240);
  const opts = {
    width: width(), height: 200,
    series: [{}, ...series.map((label, i) => ({ label, stroke: colors[i], width: 2, spanGaps: true }))],
    axes: [{}, { size: 60 }],
    scales: { x: { time: true } },
    legend: { live: false },
  };
  const data = [[], ...series.map(() => [])];
  const plot = new uPlot(opts, data, target);
  window.addEventListener("resize", () => plot.setSize({ width: width(), height: 200 }));
  return {
    push(t, values) {
      data[0].push(t);
      values.forEach((v, i) => data[i + 1].push(v));
      if (data[0].length > POINTS) data.forEach((d) => d.shift());
      plot.setData(data);
    },
  };
}

function overviewPage() {
  const ingest = chart($("c-ingest"), ["events/s"], ["#2563eb"]);
  const latency = chart($("c-latency"), LANES, ["#059669", "#d97706", "#7c3aed"]);
  stream("/console/api/overview/stream", (o) => {
    const t = Date.now() / 1000;
    ingest.push(t, [o.ingest.events_per_s]);
    latency.push(t, LANES.map((l) => (o.latency_ms[l] || {}).p99 ?? null));
    $("t-ingest").textContent = num(o.ingest.events_per_s, 1);
    $("t-fresh").textContent = num(o.freshness_ms.p99, 1);
    $("t-rank").textContent = num(o.latency_ms.rank.p99, 1);
    const fallbacks = Object.values(o.fallbacks.by_reason).reduce((a, b) => a + b, 0);
    $("t-fallbacks").textContent = num(fallbacks);
    $("t-ranks").textContent = num(o.fallbacks.rank_requests);
    $("t-queue").textContent = num(o.analytics.queue_depth);
    $("t-429").textContent = num(o.analytics.rejected_429);
    $("t-mem").textContent = num(o.memory.resident_bytes / 1048576, 0);
    fill($("lanes"), Object.entries(o.latency_ms).map(([lane, p]) =>
      el("tr", {}, el("th", { scope: "row" }, lane), el("td", { class: "num" }, num(p.count)),
        el("td", { class: "num" }, num(p.p50, 2)), el("td", { class: "num" }, num(p.p95, 2)), el("td", { class: "num" }, num(p.p99, 2)))));
    const f = o.freshness_ms;
    $("freshness").textContent = f.count ? `p50 ${num(f.p50, 2)} · p95 ${num(f.p95, 2)} · p99 ${num(f.p99, 2)} (${num(f.count)} groups applied)` : "no events applied in the last 10 s";
    kv($("lag"), [
      ["log offset", num(o.lag.log_offset)], ["not yet exported (events)", num(o.lag.export_lag)],
      ["since the last snapshot (events)", num(o.lag.snapshot_lag)], ["not yet applied to features", num(o.lag.feature_lag)],
      ["late events dropped", num(o.lag.late_events)], ["feature watermark (UTC)", time(o.lag.watermark_ms)],
      ["ingest total (events)", num(o.ingest.events_total)], ["unknown items", num(o.ingest.unknown_items)],
    ]);
    fill($("fallbacks"), Object.entries(o.fallbacks.by_reason).map(([r, n]) =>
      el("tr", {}, el("th", { scope: "row" }, r), el("td", { class: "num" }, num(n)))), "no fallback so far");
    fill($("hygiene"), o.hygiene_drops.map((d) =>
      el("tr", {}, el("td", {}, d.feature), el("td", {}, d.reason), el("td", { class: "num" }, num(d.total)))), "no drops so far");
    kv($("analytics"), [["queued", num(o.analytics.queue_depth)], ["running", num(o.analytics.running)],
      ["refused with 429", num(o.analytics.rejected_429)], ["timed out", num(o.analytics.timeouts)]]);
    fill($("errors"), [
      ...o.ingest.errors.map((e) => el("tr", {}, el("td", {}, `ingest ${e.table}`), el("td", {}, e.status), el("td", { class: "num" }, num(e.total)))),
      ...o.query_errors.map((e) => el("tr", {}, el("td", {}, `query ${e.lane}`), el("td", {}, e.status), el("td", { class: "num" }, num(e.total)))),
    ], "no errors so far");
  }, liveState);
}

// -- shopper -----------------------------------------------------------------------------------------

function eventItem(e) {
  return el("li", { "data-item": e.item_id },
    el("time", { datetime: new Date(e.ts).toISOString() }, time(e.ts)), " ",
    el("span", { class: "action " + e.action }, e.action), " ",
    el("strong", {}, e.item_id), e.category ? el("span", { class: "muted" }, ` ${e.category}`) : null);
}

function attended(events) {
  if (!events || !events.length) return el("span", { class: "muted" }, "–");
  return el("ul", { class: "attn" }, events.map((e) =>
    el("li", {}, el("span", { class: "bar", style: `width:${Math.round(e.weight * 60)}px` }), ` ${e.item_id} `,
      el("span", { class: "muted" }, `${e.action} ${num(e.weight, 3)}`))));
}

function inputsCell(values) {
  if (!values) return el("span", { class: "muted" }, "–");
  const nonzero = Object.entries(values).filter(([, v]) => v !== 0);
  return el("details", {}, el("summary", {}, `${nonzero.length} non-zero`),
    el("ul", { class: "inputs" }, Object.entries(values).map(([k, v]) => el("li", {}, `${k} = ${num(v, 4)}`))));
}

// A feature's value: inline JSON, or a collapsed list when it holds more than a few entries.
function featureValue(value) {
  if (!Array.isArray(value) || value.length <= 3) return el("code", {}, JSON.stringify(value));
  return el("details", {}, el("summary", {}, `${value.length} entries`),
    el("ol", { class: "values" }, value.map((v) => el("li", {}, el("code", {}, JSON.stringify(v))))));
}

function renderShopper(s) {
  $("shopper").hidden = false;
  const r = s.ranking;
  const why = Object.fromEntries((r.explanations || []).map((x) => [x.item_id, x]));
  const explained = (r.explanations || []).length;
  $("rank-meta").textContent = `${r.fallback ? "fallback " + r.fallback : "model " + r.model_version} · ${r.candidates} candidates from ${r.candidate_source} · ${num(r.timings_ms.total, 1)} ms` +
    (explained ? ` · attention and gate for the top ${explained}` : "");
  $("rank-fallback").hidden = !r.fallback;
  $("rank-fallback").textContent = r.fallback ? `A fallback answered (${r.fallback}) because: ${r.fallback_reason}.` : "";
  fill($("ranking").tBodies[0], r.items.map((item, i) => {
    const x = why[item.item_id];
    return el("tr", { "data-item": item.item_id },
      el("td", { class: "num" }, i + 1), el("th", { scope: "row" }, item.item_id), el("td", {}, item.category || "–"),
      el("td", { class: "num" }, num(item.score, 4)), el("td", { class: "num" }, x ? num(x.session_weight, 3) : "–"),
      el("td", {}, attended(x && x.history)), el("td", {}, attended(x && x.session)), el("td", {}, inputsCell(s.inputs[item.item_id])));
  }), "no items to rank");
  $("session-count").textContent = `${s.session_events} events`;
  $("history-count").textContent = `${s.history_events} events (newest ${s.history.length} shown)`;
  fill($("session"), [...s.session].reverse().map(eventItem), "no current session");
  fill($("history"), [...s.history].reverse().map(eventItem), "no history");
  $("features-meta").textContent = `at watermark ${time(s.watermark_ms)} UTC`;
  fill($("features").tBodies[0], Object.entries(s.features).map(([name, value]) =>
    el("tr", {}, el("th", { scope: "row" }, name, s.feature_fallbacks[name] ? el("span", { class: "muted" }, ` (fallback: ${s.feature_fallbacks[name]})`) : null),
      el("td", {}, featureValue(value)))));
  $("live").className = "live open";
  $("live").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
}

function shopperPage() {
  let current = null;
  const open = (user) => {
    if (current) current.abort();
    $("shopper-error").textContent = "";
    history.replaceState(null, "", `?user=${encodeURIComponent(user)}`);
    current = stream(`/console/api/shopper/${encodeURIComponent(user)}/stream`, renderShopper, (state, message) => {
      if (state === "error") $("shopper-error").textContent = message;
      else if (state !== "open") liveState(state);
    });
  };
  $("shopper-form").addEventListener("submit", (event) => {
    event.preventDefault();
    open($("user-id").value.trim());
  });
  const user = new URLSearchParams(location.search).get("user");
  if (user) {
    $("user-id").value = user;
    open(user);
  }
}

// -- features ----------------------------------------------------------------------------------------

function windowText(w) {
  if (w.kind === "sliding") return `sliding ${duration(w.length_ms)}, ${w.tiles} tiles of ${duration(w.tile_ms)}`;
  return w.kind.replace("_", " ");
}

async function featuresPage() {
  const response = await api("/console/api/features");
  if (!response.ok) { $("main").prepend(el("p", { class: "error", role: "alert" }, await errorText(response))); return; }
  const d = await response.json();
  const f = d.freshness_ms;
  kv($("features-meta"), [
    ["declaration hash", el("code", {}, d.feature_hash)], ["watermark (UTC)", time(d.watermark_ms)],
    ["allowed lateness", duration(d.lateness_ms)], ["session gap", duration(d.session_gap_ms)],
    ["late events dropped", num(d.late_events)],
    ["freshness since start (ms)", f.count ? `p50 ${num(f.p50, 2)} · p99 ${num(f.p99, 2)} over ${num(f.count)} groups` : "no events applied yet"],
    ["other hygiene drops", Object.entries(d.hygiene_drops_other).map(([where, reasons]) =>
      `${where}: ` + Object.entries(reasons).map(([r, n]) => `${r} ${num(n)}`).join(", ")).join("; ") || "none"],
  ]);
  fill($("declarations").tBodies[0], d.features.map((x) => el("tr", { id: "feature-" + x.name },
    el("th", { scope: "row" }, x.name), el("td", {}, x.entity), el("td", {}, x.agg), el("td", {}, windowText(x.window)),
    el("td", {}, el("code", { class: "sql" }, x.sql)),
    el("td", {}, Object.keys(x.hygiene_drops).length ? Object.entries(x.hygiene_drops).map(([r, n]) => `${r}: ${n}`).join(", ") : "0"))));
}

// -- query -------------------------------------------------------------------------------------------

function caret(sql, position) {
  const line = sql.split("\n")[(position.line || 1) - 1] || "";
  return `line ${position.line}, column ${position.col}\n${line}\n${" ".repeat(Math.max((position.col || 1) - 1, 0))}^`;
}

async function runQuery(explain) {
  let sql = $("sql").value.trim();
  if (explain && !/^explain\b/i.test(sql)) sql = "EXPLAIN " + sql;
  let params;
  try {
    params = JSON.parse($("params").value || "{}");
  } catch (e) {
    $("query-error").hidden = false;
    $("query-error").textContent = `Parameters are not a JSON object: ${e.message}`;
    return;
  }
  $("query-status").textContent = "running…";
  $("query-error").hidden = true;
  const response = await api("/v1/query", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ sql, params }) });
  const text = await response.text();
  let body;
  try { body = JSON.parse(text); } catch (e) { body = { error: text }; }
  if (!response.ok) {
    $("query-status").textContent = "";
    $("query-result").hidden = true;
    const box = $("query-error");
    box.hidden = false;
    if (response.status === 429) {
      const wait = response.headers.get("Retry-After") || body.retry_after_s;
      box.textContent = `The analytics lane is busy (429: its queue is full). Try again in ${wait} s. ${body.error || ""}`;
    } else {
      box.textContent = `${response.status} ${body.code || ""}: ${body.error || body.detail || text}` +
        (body.position ? "\n" + caret(sql, body.position) : "");
    }
    return;
  }
  const parts = [`lane: ${body.lane}`];
  if (body.feature) parts.push(`feature: ${body.feature}`);
  parts.push(`${body.rows.length} rows`, `${num(body.elapsed_ms, 2)} ms`);
  if (body.truncated) parts.push("truncated by a limit");
  if (body.fallbacks && Object.keys(body.fallbacks).length) parts.push(`fallbacks: ${JSON.stringify(body.fallbacks)}`);
  $("query-status").textContent = parts.join(" · ");
  $("query-result").hidden = false;
  const table = $("result");
  table.tHead.replaceChildren(el("tr", {}, body.columns.map((c) => el("th", { scope: "col" }, c))));
  fill(table.tBodies[0], body.rows.map((row) => el("tr", {}, row.map((v) =>
    el("td", {}, typeof v === "string" && v.includes("\n") ? el("pre", {}, v) : (typeof v === "object" && v !== null ? JSON.stringify(v) : v))))), "no rows");
}

function queryPage() {
  $("query-form").addEventListener("submit", (event) => { event.preventDefault(); runQuery(false); });
  $("explain").addEventListener("click", () => runQuery(true));
  $("sql").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); runQuery(false); }
  });
}

// -- models ------------------------------------------------------------------------------------------

async function showCurve(version) {
  const response = await api(`/console/api/models/${encodeURIComponent(version)}/curve.png`);
  if (!response.ok) return;
  const img = $("curve");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(await response.blob());
  $("curve-version").textContent = version;
  $("curve-card").hidden = false;
}

async function reload(version) {
  $("reload-status").textContent = `loading ${version}…`;
  const response = await api("/v1/admin/reload", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ version }) });
  if (!response.ok) {
    $("reload-status").textContent = `reload refused (${response.status}): ${await errorText(response)}`;
    return;
  }
  await modelsPage.load();
  $("reload-status").textContent = `now serving ${version}`;
}

const modelsPage = {
  who: null,
  async load() {
    const response = await api("/console/api/models");
    if (!response.ok) { $("reload-status").textContent = await errorText(response); return; }
    const d = await response.json();
    const admin = modelsPage.who.roles.includes("admin");
    kv($("models-meta"), [
      ["serving", d.active ? `${d.active.version} (${d.active.backend}), loaded ${time(d.active.loaded_at_ms)} UTC` : "no model: every ranking is a fallback"],
      ["model directory", d.model_dir || "–"], ["running feature hash", el("code", {}, d.running_feature_hash)],
      ["last reload error", d.last_reload_error || "none"],
      ["newer versions skipped", Object.keys(d.skipped).length ? Object.entries(d.skipped).map(([v, why]) => `${v}: ${why}`).join("; ") : "none"],
    ]);
    fill($("versions").tBodies[0], d.versions.map((v) => {
      const metrics = Object.entries(v.metrics).filter(([, x]) => typeof x !== "object").map(([k, x]) => `${k}: ${typeof x === "number" ? num(x, 4) : x}`).join(" · ");
      const load = el("button", {
        type: "button", class: "reload", "data-version": v.version, disabled: !admin || v.active || !v.fits_features,
        title: !admin ? "reloading needs an admin key" : (!v.fits_features ? "trained on other feature declarations" : null),
      }, v.active ? "serving" : "Load");
      load.addEventListener("click", () => reload(v.version));
      const curve = el("button", { type: "button", disabled: !v.has_curve }, "Curve");
      curve.addEventListener("click", () => showCurve(v.version));
      return el("tr", { "data-version": v.version, class: v.active ? "active" : null },
        el("th", { scope: "row" }, v.version), el("td", {}, v.active ? "serving" : (v.fits_features ? "ready" : "other features")),
        el("td", {}, el("code", {}, (v.feature_hash || "–").slice(0, 12))), el("td", { class: "metrics" }, metrics || "–"),
        el("td", { class: "actions" }, load, " ", curve));
    }), "no model trained yet (insession train DATA --out DATA/models)");
    if (!admin) $("reload-status").textContent = "Reloading a model needs an admin key.";
    const shown = d.versions.find((v) => v.active && v.has_curve) || d.versions.find((v) => v.has_curve);
    if (shown) await showCurve(shown.version);
  },
};

// -- cluster -----------------------------------------------------------------------------------------

const CLUSTER_EVERY_MS = 1000;

function yesNo(v) { return v === null || v === undefined ? "–" : (v ? "yes" : "no"); }

function renderCluster(c) {
  $("cluster-embedded").hidden = c.replicated;
  $("cluster").hidden = !c.replicated;
  if (!c.replicated) return;
  $("t-quorum").textContent = c.quorum ? "held" : "lost";
  $("t-quorum").className = "value " + (c.quorum ? "ok" : "bad");
  $("t-leader").textContent = `leader ${c.leader || "none"}`;
  $("t-stale").textContent = c.stale ? "stale" : "current";
  $("t-stale").className = "value " + (c.stale ? "bad" : "ok");
  $("t-lag").textContent = num(c.consumer_lag);
  $("t-up").textContent = num(c.servers.filter((s) => s.up).length);
  $("t-servers").textContent = `of ${c.servers.length}`;
  $("cluster-reason").hidden = !c.reason;
  $("cluster-reason").textContent = c.reason;
  fill($("servers").tBodies[0], c.servers.map((s) => el("tr", { "data-server": s.name, class: s.role === "leader" ? "active" : null },
    el("th", { scope: "row" }, s.name), el("td", { class: s.up === false ? "bad" : null }, yesNo(s.up)), el("td", {}, s.role || "–"),
    el("td", { class: s.current === false ? "bad" : null }, yesNo(s.current)), el("td", { class: "num" }, num(s.lag)),
    el("td", { class: "num" }, num(s.seen_s_ago, 1)), el("td", {}, s.monitor ? el("code", {}, s.monitor) : "–"))), "no server answered yet");
  kv($("stream-meta"), [
    ["stream", el("code", {}, c.stream)], ["newest offset", num(c.stream_last_offset)],
    ["applied here", num(c.applied_offset)], ["consumer lag (events)", num(c.consumer_lag)],
    ["exports the history", yesNo(c.exporting)],
    ["checked", c.checked_s_ago === null ? "not yet" : `${num(c.checked_s_ago, 1)} s ago`],
  ]);
  fill($("partitions").tBodies[0], c.partitions.map((p) => el("tr", { "data-partition": p.partition, class: p.held ? null : "muted" },
    el("th", { scope: "row" }, p.partition), el("td", { class: "num" }, p.last_offset < 0 ? "–" : num(p.last_offset)),
    el("td", { class: "num" + (p.lag > 0 ? " warn" : "") }, num(p.lag)), el("td", {}, p.held ? "yes" : "no (forwarded)"),
    el("td", {}, p.holders.length ? p.holders.flatMap((h, i) => [i ? " " : null, el("code", { title: h === c.node ? "this node" : null }, h)]) : "every node"))));
}

function clusterPage() {
  const tick = async () => {
    try {
      const response = await api("/console/api/cluster");
      if (!response.ok) { liveState("error", `${response.status}: ${await errorText(response)}`); return; }
      renderCluster(await response.json());
      liveState("open");
      $("live").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      liveState("retry");
    }
    setTimeout(tick, CLUSTER_EVERY_MS);
  };
  tick();
}

const PAGES = {
  overview: overviewPage,
  shopper: shopperPage,
  features: featuresPage,
  query: queryPage,
  models: (who) => { modelsPage.who = who; modelsPage.load(); },
  cluster: clusterPage,
};
