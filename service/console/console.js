// MISSRec console: plain browser JavaScript over the service's own HTTP API (no build step, no library).
// Every value from the API is put in the page with textContent (item texts are user data, never markup).
"use strict";

const API = new URL("..", document.baseURI); // the console lives at <service>/console/
const POLL_MS = 2000;
const WINDOW = 60; // points kept per chart
const itemCache = new Map();

// ----- HTTP ------------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) {
    super(`${message} (HTTP ${status}, ${code})`);
    this.status = status;
    this.code = code;
  }
}

async function api(path, { method = "GET", json, form, write = false } = {}) {
  const headers = {};
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets multipart/form-data with its boundary
  }
  const key = sessionStorage.getItem("missrec-api-key");
  if (write && key) headers["X-API-Key"] = key;
  let response;
  try {
    response = await fetch(new URL(path, API), { method, headers, body });
  } catch (exc) {
    throw new ApiError(0, "network_error", `the service did not answer: ${exc.message}`);
  }
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const err = data && data.error;
    const message = err ? err.message : `${response.status} ${response.statusText}`;
    const hint = response.status === 401 ? " Enter the API key at the top of the page." : "";
    throw new ApiError(response.status, err ? err.code : "error", message + hint);
  }
  return data;
}

const enc = encodeURIComponent;

// Item reads name the id in the query (GET /v1/item?id=...): a URL path cannot carry the ids "." and ".." (the
// URL parser removes them, and %2E / %2E%2E, as dot segments), a query value can carry any id.
function itemUrl(id, what = "", params = "") {
  return `v1/item${what}?id=${enc(id)}${params}`;
}

async function itemInfo(id) {
  if (!itemCache.has(id)) {
    itemCache.set(id, api(itemUrl(id)).catch((exc) => ({ item_id: id, text: null, missing: exc.message })));
  }
  return itemCache.get(id);
}

// ----- DOM helpers -------------------------------------------------------------------------------------------
const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function announce(text) {
  $("#announce").textContent = text;
}

function showError(view, exc) {
  const box = $(`#view-${view} [data-error]`);
  box.textContent = exc ? `Error: ${exc.message}` : "";
}

function facts(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
}

function itemLink(id) {
  return el("a", { href: `#item/${enc(id)}`, class: "item-id", text: id });
}

function thumb(info) {
  if (!info.has_image) return null;
  return el("img", { src: new URL(itemUrl(info.item_id, "/image"), API), alt: `Photo of ${info.item_id}`, class: "thumb" });
}

function itemText(info) {
  return el("p", { class: "text", text: info.missing ? info.missing : info.text || "(no text)" });
}

// A part's share of the score (shares sum to 1; a part that pulls the score down is negative: an empty bar).
function bar(label, share) {
  const pct = (100 * share).toFixed(1);
  const fill = el("span", { class: `bar-fill ${label}`, "aria-hidden": "true" });
  fill.style.width = `${Math.min(100, Math.max(0, 100 * share)).toFixed(1)}%`; // CSSOM: the CSP allows no inline styles
  return el(
    "div",
    { class: "bar", role: "img", "aria-label": `${label} share of the score ${pct}%` },
    el("span", { class: "bar-label", text: `${label} ${pct}%`, "aria-hidden": "true" }),
    fill,
  );
}

// "Because of": the history items whose removal lowers this score most, with the drop.
function becauseOf(items) {
  const node = el("p", { class: "because" }, el("span", { text: "because of " }));
  items.forEach((b, i) => {
    if (i) node.append(el("span", { text: ", " }));
    node.append(itemLink(b.item_id), el("span", { class: "drop", text: ` (${b.contribution >= 0 ? "+" : ""}${b.contribution.toFixed(4)})` }));
  });
  return node;
}

// One entry of a list of items: id, text, image, and (for a recommendation) score and explanation.
async function itemEntry(id, rec, extra) {
  const info = await itemInfo(id);
  const li = el("li", { class: "entry", "data-item": id });
  const head = el("div", { class: "entry-head" }, itemLink(id));
  if (rec) head.append(el("span", { class: "score", text: `score ${rec.score.toFixed(4)}` }));
  li.append(head);
  const body = el("div", { class: "entry-body" }, thumb(info), itemText(info));
  li.append(body);
  const why = rec && rec.explanation;
  if (why) {
    const cluster = why.interest === null ? "none" : why.interest;
    const bars = (why.score_split || []).map((p) => bar(p.part, p.share));
    li.append(el("div", { class: "why" }, ...bars, el("span", { class: "cluster", text: `interest cluster ${cluster}` })));
    if (why.because && why.because.length) li.append(becauseOf(why.because));
  }
  if (extra) li.append(extra);
  return li;
}

async function fillList(list, entries) {
  list.replaceChildren(...(await Promise.all(entries)));
}

function recMeta(node, r) {
  const parts = [`model ${r.model_version}`, r.exact ? "exact top-k" : "approximate top-k"];
  if (r.fallback) parts.push(`fallback: ${r.fallback} (no usable history)`);
  if (r.skipped_item_ids && r.skipped_item_ids.length) parts.push(`skipped (deleted): ${r.skipped_item_ids.join(", ")}`);
  node.textContent = parts.join(" · ");
}

function scored(items) {
  return items.map((r) => itemEntry(r.item_id, r));
}

// A recommendation response into #<prefix>-meta (model, exact, fallback, skipped) and #<prefix>-recs.
async function showRecs(prefix, recs) {
  recMeta($(`#${prefix}-meta`), recs);
  await fillList($(`#${prefix}-recs`), scored(recs.items));
}

function kOf(input) {
  const k = Number.parseInt(input.value, 10);
  return Number.isFinite(k) ? k : 10;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

// ----- overview: status cards and live charts --------------------------------------------------------------
const CHARTS = [
  { id: "rate", title: "API requests per second", unit: "req/s", series: ["rate"] },
  { id: "request", title: "request latency (ms)", unit: "ms", series: ["p50", "p99"] },
  { id: "queue", title: "queue wait (ms)", unit: "ms", series: ["p50", "p99"] },
  { id: "user_tower", title: "user tower (ms)", unit: "ms", series: ["p50", "p99"] },
  { id: "search", title: "search (ms)", unit: "ms", series: ["p50", "p99"] },
  { id: "batch", title: "mean batch size", unit: "requests", series: ["mean"] },
];
const OWN_ROUTES = /^(\/console|\/v1\/status|\/metrics|\/healthz|\/readyz|unmatched)/;
const history = Object.fromEntries(CHARTS.map((c) => [c.id, []]));
let previous = null;
let pollTimer = null;

// Quantile q of the observations between two cumulative histograms (Prometheus' histogram_quantile rule).
function windowQuantile(now, before, q) {
  const counts = now.cumulative_counts.map((c, i) => c - (before ? before.cumulative_counts[i] : 0));
  const total = counts[counts.length - 1];
  if (total <= 0) return null;
  const rank = q * total;
  for (let i = 0; i < counts.length; i++) {
    if (counts[i] >= rank) {
      if (i === now.upper_bounds.length) return now.upper_bounds[i - 1]; // +Inf bucket: its lower bound
      const lo = i === 0 ? 0 : now.upper_bounds[i - 1];
      const below = i === 0 ? 0 : counts[i - 1];
      const inBucket = counts[i] - below;
      return lo + (now.upper_bounds[i] - lo) * (inBucket ? (rank - below) / inBucket : 1);
    }
  }
  return null;
}

function apiRequests(status) {
  return Object.entries(status.requests).reduce((n, [route, c]) => (OWN_ROUTES.test(route) ? n : n + c), 0);
}

function push(id, point) {
  history[id].push(point);
  if (history[id].length > WINDOW) history[id].shift();
}

function sample(status) {
  if (previous) {
    const dt = (status.uptime_seconds - previous.uptime_seconds) || POLL_MS / 1000;
    push("rate", { rate: Math.max(0, apiRequests(status) - apiRequests(previous)) / dt });
    for (const stage of ["request", "queue", "user_tower", "search"]) {
      const now = status.stages[stage];
      const before = previous.stages[stage];
      const ms = (q) => (now ? windowQuantile(now, before, q) : null);
      const p50 = ms(0.5);
      const p99 = ms(0.99);
      push(stage, { p50: p50 === null ? null : 1000 * p50, p99: p99 === null ? null : 1000 * p99 });
    }
    const n = status.batch_size.count - previous.batch_size.count;
    push("batch", { mean: n > 0 ? (status.batch_size.sum - previous.batch_size.sum) / n : null });
  }
  previous = status;
}

function drawChart(chart) {
  const points = history[chart.id];
  const w = 320;
  const h = 110;
  const pad = 4;
  const values = points.flatMap((p) => chart.series.map((s) => p[s])).filter((v) => v !== null);
  const top = Math.max(1e-9, ...values);
  const span = Math.max(points.length - 1, 10); // few points spread over the left part, then scroll
  const x = (i) => pad + (i * (w - 2 * pad)) / span;
  const y = (v) => h - pad - ((h - 2 * pad) * v) / top;
  const svg = svgEl("svg", { viewBox: `0 0 ${w} ${h}`, "aria-hidden": "true" });
  chart.series.forEach((s, j) => {
    const coords = points.map((p, i) => (p[s] === null ? null : [x(i), y(p[s])])).filter((c) => c !== null);
    svg.append(svgEl("polyline", { points: coords.map((c) => c.join(",")).join(" "), class: `series s${j}` }));
    for (const [cx, cy] of coords) svg.append(svgEl("circle", { cx, cy, r: 2.2, class: `dot s${j}` }));
  });
  const last = points.length ? points[points.length - 1] : {};
  const fmt = (v) => (v === null || v === undefined ? "–" : v < 10 ? v.toFixed(2) : v.toFixed(0));
  const caption = el("figcaption", { text: `${chart.title}: ` });
  chart.series.forEach((s, j) => {
    caption.append(el("span", { class: `legend s${j}`, text: `${s} ${fmt(last[s])}` }), j < chart.series.length - 1 ? ", " : "");
  });
  caption.append(` ${chart.unit} (max ${fmt(values.length ? top : null)})`);
  return el("figure", { class: "chart", "data-chart": chart.id, "data-points": points.length }, svg, caption);
}

function renderOverview(status) {
  const m = status.model;
  facts($("#model-facts"), [
    ["kind", m.kind],
    ["version", m.version],
    ["scorer", m.scorer],
    ["modalities", m.modalities.join(", ")],
    ["history used", `last ${m.max_history_used} items`],
  ]);
  const c = status.catalogue;
  facts($("#catalogue-facts"), [
    ["bundle items", c.bundle_items],
    ["ingested (live)", c.ingested],
    ["deleted", c.deleted],
    ["servable now", c.live],
    ["catalogue version", c.seq],
  ]);
  const ingests = Object.entries(status.ingest).map(([k, v]) => `${k} ${v}`).join(", ") || "none yet";
  facts($("#check-facts"), [
    ["Redis", status.checks.redis],
    ["ingestion", status.checks.ingestion],
    ["stored items", status.checks.items],
    ["ingests", ingests],
    ["errors (4xx/5xx)", status.errors],
    ["uptime", `${Math.round(status.uptime_seconds)} s`],
  ]);
  $("#charts").replaceChildren(...CHARTS.map(drawChart));
}

async function pollOverview() {
  try {
    const status = await api("v1/status");
    sample(status);
    renderOverview(status);
    showError("overview", null);
  } catch (exc) {
    showError("overview", exc);
  }
}

// ----- user view ---------------------------------------------------------------------------------------------
async function showUser(event) {
  if (event) event.preventDefault();
  const userId = $("#user-id").value.trim();
  if (!userId) return;
  showError("user", null);
  try {
    const [hist, recs] = await Promise.all([
      api(`v1/users/${enc(userId)}/history`),
      api("v1/recommend", {
        method: "POST",
        json: { user_id: userId, k: kOf($("#user-k")), exclude_seen: $("#user-exclude").checked, explain: true },
      }),
    ]);
    await fillList($("#user-history"), hist.item_ids.map((id) => itemEntry(id)));
    if (!hist.item_ids.length) $("#user-history").replaceChildren(el("li", { text: "no stored history" }));
    await showRecs("user", recs);
    announce(`user ${userId}: ${hist.item_ids.length} history items, ${recs.items.length} recommendations`);
  } catch (exc) {
    showError("user", exc);
  }
}

// ----- playground ----------------------------------------------------------------------------------------------
const playHistory = [];

async function search(event) {
  event.preventDefault();
  showError("playground", null);
  try {
    const q = $("#search-q").value;
    const found = await api(`v1/items?q=${enc(q)}&limit=20`);
    $("#search-meta").textContent = `${found.total} match(es), showing ${found.items.length}`;
    found.items.forEach((i) => itemCache.set(i.item_id, Promise.resolve(i)));
    await fillList(
      $("#search-results"),
      found.items.map((i) =>
        itemEntry(i.item_id, null, el("button", { type: "button", text: "Add to history", "aria-label": `Add ${i.item_id} to the history`, onclick: () => addToHistory(i.item_id) })),
      ),
    );
    announce(`${found.total} items match "${q}"`);
  } catch (exc) {
    showError("playground", exc);
  }
}

function addToHistory(id) {
  playHistory.push(id);
  renderPlayground();
}

let playRender = 0; // the latest render: an older one's answers (slower under load) must not overwrite it

async function renderPlayground() {
  const render = ++playRender;
  const history = [...playHistory];
  const rows = await Promise.all(
    history.map((id, pos) =>
      itemEntry(id, null, el("button", { type: "button", text: "Remove", "aria-label": `Remove ${id} from the history`, onclick: () => { playHistory.splice(pos, 1); renderPlayground(); } })),
    ),
  );
  if (render !== playRender) return;
  $("#play-history").replaceChildren(...rows);
  if (!history.length) {
    $("#play-recs").replaceChildren();
    $("#play-meta").textContent = "add items to see recommendations";
    return;
  }
  try {
    const body = { history, k: kOf($("#play-k")), exclude_seen: true, explain: true };
    if (playFilters.length) body.filter = playFilters.length === 1 ? playFilters[0] : { op: "and", args: playFilters };
    const recs = await api("v1/recommend", { method: "POST", json: body });
    const entries = await Promise.all(scored(recs.items));
    if (render !== playRender) return;
    recMeta($("#play-meta"), recs);
    if (recs.matched !== null && recs.matched !== undefined) $("#play-meta").append(` · ${recs.matched} items match the filter`);
    $("#play-recs").replaceChildren(...entries);
    announce(`${recs.items.length} recommendations for a history of ${history.length} items`);
    showError("playground", null);
  } catch (exc) {
    if (render === playRender) showError("playground", exc);
  }
}

// ----- item view -------------------------------------------------------------------------------------------------
async function showItem(event) {
  if (event) event.preventDefault();
  const id = $("#item-id").value.trim();
  if (!id) return;
  showError("item", null);
  itemCache.delete(id);
  try {
    const [info, near] = await Promise.all([
      api(itemUrl(id)),
      api(itemUrl(id, "/similar", `&k=${kOf($("#item-k"))}&explain=true`)),
    ]);
    itemCache.set(id, Promise.resolve(info));
    const ingested = info.source === "ingested";
    const dl = el("dl");
    facts(dl, [
      ["id", info.item_id],
      ["source", ingested ? "ingested through POST /v1/items" : "bundle (trained catalogue)"],
      ["ingested at", ingested && info.created_at ? new Date(info.created_at * 1000).toISOString() : "–"],
      ["how", ingested ? `open_clip ${info.has_image ? "image + text" : "text only"} -> item tower, version ${info.version}` : "features from the bundle"],
      ["text cluster", info.text_cluster ?? "–"],
      ["image cluster", info.image_cluster ?? "–"],
    ]);
    $("#item-card").replaceChildren(el("div", { class: "entry-body" }, thumb(info), itemText(info)), dl, attributeChips(info));
    await fillList($("#item-similar"), scored(near.items));
    announce(`item ${id}: ${near.items.length} nearest items`);
  } catch (exc) {
    $("#item-card").replaceChildren();
    $("#item-similar").replaceChildren();
    showError("item", exc);
  }
}

// ----- ingest --------------------------------------------------------------------------------------------------
async function ingest(event) {
  event.preventDefault();
  showError("ingest", null);
  const form = new FormData($("#ingest-form"));
  const file = form.get("image");
  if (file instanceof File && !file.size) form.delete("image"); // no file chosen
  const id = String(form.get("item_id")).trim();
  try {
    const created = await api("v1/items", { method: "POST", form, write: true });
    itemCache.delete(id);
    const info = await itemInfo(id);
    const dl = el("dl");
    facts(dl, [
      ["id", created.item_id],
      ["version", created.version],
      ["replaced an item", created.replaced ? "yes" : "no"],
      ["text cluster", created.text_cluster ?? "–"],
      ["image cluster", created.image_cluster ?? "–"],
    ]);
    $("#ingest-card").replaceChildren(el("div", { class: "entry-body" }, thumb(info), itemText(info)), dl);
    const recs = await api("v1/recommend", { method: "POST", json: { history: [id], k: 10, exclude_seen: false, explain: true } });
    await showRecs("ingest", recs);
    const rank = recs.items.findIndex((r) => r.item_id === id);
    announce(`ingested ${id}; ${rank >= 0 ? `it is recommendation ${rank + 1}` : "it is not in the top 10"}`);
  } catch (exc) {
    $("#ingest-card").replaceChildren();
    $("#ingest-recs").replaceChildren();
    showError("ingest", exc);
  }
}

function setUpDrop() {
  const zone = $("#drop-zone");
  const input = $("#ingest-image");
  for (const target of [zone, input]) {
    target.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    target.addEventListener("dragleave", () => zone.classList.remove("over"));
    target.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      if (e.dataTransfer.files.length) {
        input.files = e.dataTransfer.files;
        zone.textContent = `Photo: ${input.files[0].name}`;
      }
    });
  }
  input.addEventListener("change", () => { zone.textContent = input.files.length ? `Photo: ${input.files[0].name}` : "Drop a photo here"; });
}

// ----- attributes, filters, experiments -----------------------------------------------------------------------
function attributeChips(info) {
  const chips = el("ul", { class: "chips", id: "item-attrs", "aria-label": "Attributes" });
  for (const [field, value] of Object.entries(info.attributes || {})) {
    for (const v of Array.isArray(value) ? value : [value]) chips.append(el("li", { class: "chip", text: `${field}: ${v}` }));
  }
  if (info.available === false) chips.append(el("li", { class: "chip unavailable", text: "unavailable" }));
  return chips;
}

const playFilters = [];

function filterValue(op, raw) {
  if (op === "in" || op === "not_in") return raw.split(",").map((v) => v.trim()).filter((v) => v);
  if (op !== "eq") return Number(raw);
  if (raw === "true" || raw === "false") return raw === "true";
  return raw.trim() !== "" && !Number.isNaN(Number(raw)) ? Number(raw) : raw;
}

function renderFilters() {
  $("#play-filters").replaceChildren(...playFilters.map((f, pos) => {
    const shown = Array.isArray(f.values) ? f.values.join(", ") : String(f.value);
    return el("li", { class: "chip" }, el("span", { text: `${f.field} ${f.op} ${shown}` }),
      el("button", { type: "button", text: "×", "aria-label": `Remove the condition on ${f.field}`, onclick: () => { playFilters.splice(pos, 1); renderFilters(); renderPlayground(); } }));
  }));
}

function addFilter(event) {
  event.preventDefault();
  const op = $("#filter-op").value;
  const value = filterValue(op, $("#filter-value").value);
  const field = $("#filter-field").value.trim();
  playFilters.push(Array.isArray(value) ? { op, field, values: value } : { op, field, value });
  renderFilters();
  renderPlayground();
}

async function showExperiment(event) {
  if (event) event.preventDefault();
  const name = $("#experiment-name").value.trim();
  showError("experiments", null);
  try {
    const stats = await api(`v1/admin/experiments/${enc(name)}`, { write: true });
    $("#experiment-meta").textContent = `${stats.name}: ${stats.state}, started ${new Date(stats.started * 1000).toISOString()}`;
    const rows = stats.variants.map((v) => {
      const diff = Object.entries(v).find(([k, d]) => k.startsWith("difference_vs_") && d);
      const d = diff ? `${diff[1].difference.toFixed(4)} [${diff[1].low.toFixed(4)}, ${diff[1].high.toFixed(4)}] vs ${diff[0].slice(14)}` : "–";
      const cells = [v.name, v.bundle, v.share, v.impressions, v.hits, v.hit_rate === null ? "–" : v.hit_rate.toFixed(4), d];
      return el("tr", { "data-variant": v.name }, ...cells.map((c) => el("td", { text: String(c) })));
    });
    $("#experiment-table tbody").replaceChildren(...rows);
  } catch (exc) {
    $("#experiment-table tbody").replaceChildren();
    showError("experiments", exc);
  }
}

// ----- routing: #view or #item/<id> -----------------------------------------------------------------------------
function route() {
  const hash = location.hash.replace(/^#/, "");
  const slash = hash.indexOf("/");
  const name = slash < 0 ? hash : hash.slice(0, slash);
  const arg = slash < 0 ? "" : hash.slice(slash + 1); // an item id may hold "/" (encoded or not)
  const view = ["overview", "user", "playground", "item", "ingest", "experiments"].includes(name) ? name : "overview";
  document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== `view-${view}`; });
  document.querySelectorAll("nav a").forEach((a) => {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  document.title = `${view[0].toUpperCase()}${view.slice(1)} · MISSRec console`;
  clearInterval(pollTimer);
  if (view === "overview") {
    pollOverview();
    pollTimer = setInterval(pollOverview, POLL_MS);
  }
  if (view === "item" && arg) {
    let id;
    try {
      id = decodeURIComponent(arg);
    } catch {  // a malformed link (a broken percent-escape): say so, no script error
      showError("item", new Error(`malformed link: "#${hash}" is not a percent-encoded item id`));
      return;
    }
    $("#item-id").value = id;
    showItem();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const key = $("#api-key");
  key.value = sessionStorage.getItem("missrec-api-key") || "";
  key.addEventListener("input", () => sessionStorage.setItem("missrec-api-key", key.value));
  $("#key-form").addEventListener("submit", (e) => e.preventDefault());
  $("#user-form").addEventListener("submit", showUser);
  $("#search-form").addEventListener("submit", search);
  $("#play-clear").addEventListener("click", () => { playHistory.length = 0; renderPlayground(); });
  $("#play-k").addEventListener("change", renderPlayground);
  $("#item-form").addEventListener("submit", showItem);
  $("#ingest-form").addEventListener("submit", ingest);
  $("#filter-form").addEventListener("submit", addFilter);
  $("#experiment-form").addEventListener("submit", showExperiment);
  setUpDrop();
  window.addEventListener("hashchange", route);
  route();
});
