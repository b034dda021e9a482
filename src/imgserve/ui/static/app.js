// The dashboard (docs/operating.md, "Dashboard"). Everything shown comes from the
// API with the key the user typed, sent as `Authorization: Bearer` (never in a URL):
// GET /jobs and /jobs/<id> for the table, GET /events for live changes (read with
// fetch, since EventSource cannot send a header), GET /ui/history for the chart and
// GET /health for workers and nodes. Job fields are put in the page as text only.
import { thumbHashToRGBA } from "/ui/thumbhash.js";

const KEY = "imgserve.apiKey";
const LIMIT = 50;
const HEALTH_EVERY_MS = 5000;
const HISTORY_EVERY_MS = 10000;

const jobs = new Map(); // jobId -> the job's view (GET /jobs/<id>)
const opened = new Set(); // jobIds whose detail row is shown
let filter = ""; // a state, or "" for every state
let authorized = false;
let chart = null;
let generation = 0; // bumped when the key or the filter changes: older replies are dropped
let session = 0; // bumped when the key changes: the stream of the old key ends
let streamAbort = null;

const $ = (id) => document.getElementById(id);

class Unauthorized extends Error {
  constructor(body) {
    super(body.detail || "unauthorized");
    this.body = body;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY);
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: authHeaders(), cache: "no-store" });
  const body = await resp.json().catch(() => ({}));
  if (resp.status === 401) throw new Unauthorized(body);
  if (!resp.ok) {
    throw new Error(`${path}: HTTP ${resp.status}${body.code ? ` (${body.code})` : ""} ${body.detail || ""}`);
  }
  return body;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "data") Object.assign(node.dataset, value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function problem(text) {
  $("problem").textContent = text || "";
  $("problem").hidden = !text;
}

// --- the key ------------------------------------------------------------------------

function showPrompt(body) {
  authorized = false;
  generation += 1;
  session += 1;
  if (streamAbort) streamAbort.abort();
  const known = body && body.code === 141;
  $("keymessage").textContent = known
    ? "That key was refused (code 141: unknown key). Check it and enter it again."
    : apiKey()
      ? `The key was refused (code ${body && body.code}).`
      : "This imgserve needs an API key (code 140): enter one to see its jobs.";
  $("keyprompt").hidden = false;
  $("dashboard").hidden = true;
  $("forget").hidden = !apiKey();
  $("keyinput").focus();
}

$("keyform").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("keyinput").value.trim());
  $("keyinput").value = "";
  open();
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  jobs.clear();
  renderJobs();
  showPrompt(null);
});

// --- jobs ---------------------------------------------------------------------------

let listRead = 0; // numbers each list request: only the newest reply is applied

async function loadJobs() {
  const mine = generation;
  const read = ++listRead;
  const query = new URLSearchParams({ limit: String(LIMIT) });
  if (filter) query.set("state", filter);
  const body = await getJSON(`/jobs?${query}`);
  // A slower, older reply must not overwrite a newer one.
  if (mine !== generation || read !== listRead) return;
  jobs.clear();
  for (const view of body.jobs) jobs.set(view.jobId, view);
  renderJobs();
}

const pending = new Set();
let pendingTimer = null;
let refreshing = false; // one refresh at a time; changes meanwhile wait in pending

const MAX_SINGLE_READS = 10;

// A change on the stream: fetch the job's view again (changes of one job that come
// close together, queued -> running -> done, cost one request). A change to a
// state the filter hides, of a job not shown, needs no request.
function changed(jobId, state) {
  if (filter && state && state !== filter && !jobs.has(jobId)) return;
  pending.add(jobId);
  scheduleRefresh();
}

function scheduleRefresh() {
  if (pendingTimer === null && !refreshing) pendingTimer = setTimeout(refreshPending, 100);
}

// Single-flight: a busy spell costs one refresh at a time, never overlapping ones
// (whose replies could land out of order); what changed meanwhile is the next one.
async function refreshPending() {
  pendingTimer = null;
  refreshing = true;
  try {
    await refreshOnce();
  } finally {
    refreshing = false;
    if (pending.size) scheduleRefresh();
  }
}

async function refreshOnce() {
  const ids = [...pending];
  pending.clear();
  if (ids.length > MAX_SINGLE_READS) {
    // A busy spell: one page of the list instead of a request per job.
    await loadJobs().catch(failed);
    await loadHealth().catch(failed);
    return;
  }
  const mine = generation;
  await Promise.all(
    ids.map(async (jobId) => {
      try {
        const view = await getJSON(`/jobs/${jobId}`);
        if (mine === generation) upsert(view);
      } catch (err) {
        if (err instanceof Unauthorized) showPrompt(err.body);
        // 605: pruned or another key's job; nothing to show.
      }
    }),
  );
  renderJobs();
  await loadHealth().catch(failed); // its counts moved too
}

function upsert(view) {
  if (filter && view.state !== filter) {
    jobs.delete(view.jobId);
    return;
  }
  jobs.set(view.jobId, view);
}

function newestFirst() {
  const list = [...jobs.values()].sort(
    (a, b) => b.createdAt - a.createdAt || (a.jobId < b.jobId ? 1 : -1),
  );
  for (const view of list.slice(LIMIT)) jobs.delete(view.jobId);
  return list.slice(0, LIMIT);
}

let renderQueued = false;

function renderJobs() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    const rows = [];
    for (const view of newestFirst()) {
      rows.push(jobRow(view));
      if (opened.has(view.jobId)) rows.push(detailRow(view));
    }
    $("jobs").tBodies[0].replaceChildren(...rows);
    $("nojobs").hidden = rows.length > 0;
    $("nojobs").textContent = filter ? `No ${filter} jobs.` : "No jobs yet.";
  });
}

function jobRow(view) {
  const outputs = view.outputs || [];
  const row = el(
    "tr",
    { class: "job", data: { jobId: view.jobId, state: view.state }, title: view.jobId },
    el("td", {}, clock(view.createdAt)),
    el("td", {}, el("span", { class: `state state-${view.state}` }, view.state)),
    el("td", {}, view.operationType),
    el("td", {}, el("div", { class: "outputs" }, ...outputs.map(outputCell))),
    el("td", {}, outputs.map((out) => (out.bytes === undefined ? "–" : bytes(out.bytes))).join(", ")),
    el("td", { class: "nowrap" }, durations(view)),
    el(
      "td",
      { class: "error" },
      view.error ? el("span", { class: "code" }, view.error.code) : null,
      view.error ? el("span", { class: "detailtext" }, ` ${view.error.detail}`) : null,
    ),
    el("td", {}, view.key ?? "–"),
  );
  row.addEventListener("click", () => {
    if (opened.has(view.jobId)) {
      opened.delete(view.jobId);
    } else {
      opened.add(view.jobId);
      changed(view.jobId); // its webhook attempts change with no change on the stream
    }
    renderJobs();
  });
  return row;
}

function outputCell(out) {
  return el(
    "span",
    { class: "output", title: out.url },
    preview(out.thumbhash),
    `${out.width}×${out.height} ${out.format}`,
  );
}

// The output's ThumbHash drawn on a canvas (an empty one until the job is done).
function preview(hash) {
  const canvas = el("canvas", { class: "thumb none", width: "1", height: "1" });
  if (!hash) return canvas;
  try {
    const bytes = Uint8Array.from(atob(hash), (ch) => ch.charCodeAt(0));
    const { w, h, rgba } = thumbHashToRGBA(bytes);
    canvas.width = w;
    canvas.height = h;
    canvas.getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(rgba), w, h), 0, 0);
    canvas.className = "thumb";
    canvas.dataset.drawn = "yes";
  } catch {
    canvas.title = "unreadable ThumbHash";
  }
  return canvas;
}

function detailRow(view) {
  const info = el("dl", { class: "kv" });
  const add = (name, value) => {
    if (value === null || value === undefined) return;
    info.append(el("dt", {}, name), el("dd", {}, value));
  };
  add("job", view.jobId);
  add("source", view.srcURL ?? "(uploaded)");
  add("attempts", view.attempts);
  add("node", view.node);
  add("priority", view.priority);
  (view.outputs || []).forEach((out, i) => add(`outputs[${i}]`, out.url));
  const parts = [info];
  if (view.error) {
    const err = el("dl", { class: "kv error" });
    err.append(
      el("dt", {}, "code"), el("dd", { class: "code" }, view.error.code),
      el("dt", {}, "message"), el("dd", {}, view.error.message),
      el("dt", {}, "detail"), el("dd", {}, view.error.detail),
    );
    parts.push(el("h3", {}, "Error"), err);
  }
  parts.push(el("h3", {}, "Webhook delivery"), delivery(view));
  const cell = el("td", { colspan: "8" }, ...parts);
  return el("tr", { class: "detail", data: { jobId: view.jobId } }, cell);
}

function delivery(view) {
  const hook = view.webhook;
  if (!hook) {
    const why = ["done", "failed", "cancelled"].includes(view.state)
      ? "No webhook event: no webhook URL was set for this job."
      : "No webhook event yet: one is sent when the job ends.";
    return el("p", { class: "note" }, why);
  }
  const rows = hook.attempts.map((attempt, i) =>
    el(
      "tr",
      {},
      el("td", {}, i + 1),
      el("td", {}, attempt.at ? clock(attempt.at) : "–"),
      el("td", {}, attempt.status ?? "no answer"),
      el("td", {}, attempt.error ?? ""),
    ),
  );
  return el(
    "div",
    { class: "webhook" },
    el("p", {}, `${hook.type} to ${hook.url}: ${hook.state} (event ${hook.eventId})`),
    rows.length
      ? el(
          "table",
          { class: "attempts" },
          el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "at"), el("th", {}, "status"), el("th", {}, "error"))),
          el("tbody", {}, ...rows),
        )
      : el("p", { class: "note" }, "No attempt yet."),
  );
}

function clock(at) {
  return at ? new Date(at * 1000).toLocaleTimeString([], { hour12: false }) : "–";
}

function seconds(s) {
  return s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(0)} s`;
}

function durations(view) {
  const parts = [];
  if (view.startedAt && view.createdAt) parts.push(`wait ${seconds(view.startedAt - view.createdAt)}`);
  if (view.finishedAt && view.startedAt) parts.push(`run ${seconds(view.finishedAt - view.startedAt)}`);
  return parts.join(" · ") || "–";
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

for (const button of $("filter").querySelectorAll("button")) {
  button.addEventListener("click", () => {
    filter = button.dataset.state;
    for (const other of $("filter").querySelectorAll("button")) {
      other.setAttribute("aria-pressed", String(other === button));
    }
    generation += 1;
    jobs.clear();
    renderJobs();
    loadJobs().catch(failed);
  });
}

// --- the change stream --------------------------------------------------------------

function setLive(live) {
  $("live").dataset.live = live ? "yes" : "no";
  $("live").textContent = live ? "live" : "not live";
}

// GET /events through fetch (EventSource cannot send the Authorization header):
// reconnects with Last-Event-ID after a wait that doubles from 1 s to 30 s (with
// jitter, so many pages do not come back at once), or what Retry-After says; a 400
// (703: an id it cannot resume from) starts afresh. The server pings every
// 15 s, so a connection silent for three pings is taken as dead. The list is
// reloaded on every connect: what changed while away is in it.
async function stream(mine) {
  let lastId = null;
  let failures = 0;
  while (mine === session && authorized) {
    const abort = new AbortController();
    streamAbort = abort;
    let waitMs = null; // from Retry-After
    try {
      const headers = authHeaders();
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const resp = await fetch("/events", { headers, signal: abort.signal, cache: "no-store" });
      if (resp.status === 401) {
        showPrompt(await resp.json().catch(() => ({})));
        return;
      }
      if (resp.status === 400) {
        lastId = null;
        throw new Error("GET /events: HTTP 400 (cannot resume); starting afresh");
      }
      if (!resp.ok) {
        waitMs = retryAfterMs(resp.headers.get("Retry-After"));
        const body = await resp.json().catch(() => ({}));
        throw new Error(`GET /events: HTTP ${resp.status}${body.code ? ` (${body.code})` : ""}`);
      }
      failures = 0;
      setLive(true);
      problem("");
      await loadJobs();
      await readEvents(resp.body, (id) => {
        lastId = id;
      });
    } catch (err) {
      if (abort.signal.aborted) return;
      problem(`Live updates interrupted (${err.message}); reconnecting.`);
    }
    setLive(false);
    failures += 1;
    await new Promise((resolve) => setTimeout(resolve, waitMs ?? backoffMs(failures)));
  }
}

const BACKOFF_FIRST_MS = 1000;
const BACKOFF_MAX_MS = 30000;
const SILENCE_MS = 45000; // three of the server's 15 s pings

// The wait before the nth reconnect: doubling, capped, with half of it random.
function backoffMs(failures) {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** (failures - 1));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

// Retry-After in seconds (the API sends no dates); null when absent or unreadable.
function retryAfterMs(header) {
  const seconds = Number(header);
  return header !== null && Number.isFinite(seconds) && seconds >= 0 ? Math.min(seconds * 1000, 300000) : null;
}

// Reads the SSE body until it ends, or until it is silent for SILENCE_MS (a
// half-open connection would otherwise look live forever); onId gets each event id.
async function readEvents(body, onId) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let silent = null;
  const watch = () => {
    clearTimeout(silent);
    silent = setTimeout(() => reader.cancel("no ping from the server"), SILENCE_MS);
  };
  watch();
  let buffer = "";
  let carry = ""; // a chunk's last \r may be the first half of a \r\n
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      watch();
      let text = carry + value;
      carry = text.endsWith("\r") ? "\r" : "";
      if (carry) text = text.slice(0, -1);
      buffer += text.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const id = sseEvent(block);
        if (id !== null) onId(id);
      }
    }
  } finally {
    clearTimeout(silent);
  }
}

// One SSE block (lines of `field: value`; `:` starts a comment): its id, if any.
function sseEvent(block) {
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (data.length) {
    try {
      const change = JSON.parse(data.join("\n"));
      if (change.jobId) changed(change.jobId, change.state);
    } catch {
      // not a change (a comment or a future event type): nothing to do
    }
  }
  return id;
}

// --- history and health -------------------------------------------------------------

async function loadHistory() {
  const body = await getJSON("/ui/history");
  const samples = body.samples;
  const { data, gaps } = withGaps(samples, body.intervalS, [
    samples.map((s) => s.at),
    samples.map((s) => s.queued),
    samples.map((s) => s.running),
    perMinute(samples, "doneSince"),
    perMinute(samples, "failedSince"),
  ]);
  const missed = gaps ? ` ${gaps} ${gaps === 1 ? "gap" : "gaps"} where the queue could not be read.` : "";
  $("chartnote").textContent = `${samples.length} samples, one every ${body.intervalS} s, kept by this API process.${missed}`;
  if (chart === null) {
    chart = new uPlot(chartOptions(), data, $("chart"));
  } else {
    chart.setData(data);
  }
}

// A null point between two samples more than 1.5 intervals apart, so uPlot draws
// a gap there (samples the queue could not give) rather than a straight line.
function withGaps(samples, intervalS, series) {
  const data = series.map(() => []);
  let gaps = 0;
  samples.forEach((sample, i) => {
    if (i > 0 && sample.at - samples[i - 1].at > 1.5 * intervalS) {
      gaps += 1;
      data[0].push((sample.at + samples[i - 1].at) / 2);
      for (const values of data.slice(1)) values.push(null);
    }
    series.forEach((values, k) => data[k].push(values[i]));
  });
  return { data, gaps };
}

const RATE_WINDOW = 6; // samples: a minute at 10 s

// Jobs per minute at each sample, over the minute before it (one 10 s step alone
// is too spiky to read); null where there is nothing before.
function perMinute(samples, field) {
  return samples.map((sample, i) => {
    const from = Math.max(0, i - RATE_WINDOW);
    if (i === from) return null;
    let ended = 0;
    for (let j = from + 1; j <= i; j++) ended += samples[j][field] ?? 0;
    return (ended * 60) / (sample.at - samples[from].at);
  });
}

function chartOptions() {
  const css = getComputedStyle(document.documentElement);
  const colour = (name) => css.getPropertyValue(name).trim();
  return {
    width: chartWidth(),
    height: 220,
    scales: {
      // Always the last hour, however few samples there are yet.
      x: { time: true, range: () => { const now = Date.now() / 1000; return [now - 3600, now]; } },
      jobs: { range: (_u, _min, max) => [0, Math.max(1, max)] }, rate: { range: (_u, _min, max) => [0, Math.max(1, max)] } },
    axes: [
      {},
      { scale: "jobs", label: "jobs" },
      { scale: "rate", side: 1, label: "jobs/min", grid: { show: false } },
    ],
    series: [
      {},
      { label: "queued", scale: "jobs", stroke: colour("--queued"), width: 2 },
      { label: "running", scale: "jobs", stroke: colour("--running"), width: 2 },
      { label: "done/min", scale: "rate", stroke: colour("--done"), width: 2, fill: "rgba(31,157,85,0.08)" },
      { label: "failed/min", scale: "rate", stroke: colour("--failed"), width: 2 },
    ],
  };
}

function chartWidth() {
  return Math.max(300, $("chart").clientWidth || 600);
}

window.addEventListener("resize", () => {
  if (chart) chart.setSize({ width: chartWidth(), height: 220 });
});

async function loadHealth() {
  let body;
  try {
    const resp = await fetch("/health", { cache: "no-store" });
    body = await resp.json();
  } catch {
    $("status").dataset.status = "down";
    $("status").textContent = "not answering";
    return;
  }
  // A 503 with an error body (608: the queue cannot be reached) has no status
  // fields: say what is wrong instead of drawing undefined ones.
  if (body === null || typeof body !== "object" || body.code !== undefined || !body.status) {
    const code = body ? body.code : undefined;
    const why = code === 608 ? "queue unavailable (608)" : code !== undefined ? `${body.msg || "error"} (${code})` : "no status";
    $("status").dataset.status = "down";
    $("status").textContent = body && body.detail ? `${why}: ${body.detail}` : why;
    return;
  }
  const intake = body.intake || {};
  $("status").dataset.status = body.status;
  $("status").textContent = body.status;
  $("version").textContent = body.version ? `v${body.version}` : "";
  $("uptime").textContent = Number.isFinite(body.uptimeS) ? `up ${duration(body.uptimeS)}` : "";
  const summary = [
    ["workers alive", `${body.workersAlive ?? "–"} of ${body.workers ?? "–"}`],
    ["running", body.running ?? "–"],
    ["queued", body.queueDepth ?? "–"],
    ["failed (kept)", body.failed ?? "–"],
    ["being checked", `${intake.jobs ?? 0} jobs, ${bytes(intake.bytes ?? 0)}`],
  ];
  if (body.detail) summary.push(["why", body.detail]);
  $("summary").replaceChildren(...summary.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
  const now = Date.now() / 1000;
  const rows = (body.nodes || []).map((node) =>
    el(
      "tr",
      { data: { node: node.name } },
      el("td", {}, node.name),
      el("td", {}, node.pid ?? "–"),
      el("td", {}, `${node.workersAlive} of ${node.workers}`),
      el("td", {}, node.running ?? "–"),
      el("td", {}, node.at ? `${Math.max(0, now - node.at).toFixed(0)} s ago` : "–"),
    ),
  );
  if (!rows.length) {
    const where = body.workers ? "this process runs the jobs (embedded queue)" : "no worker node has announced itself";
    rows.push(el("tr", {}, el("td", { colspan: "5", class: "note" }, `No worker nodes: ${where}.`)));
  }
  $("nodes").tBodies[0].replaceChildren(...rows);
}

function duration(s) {
  if (s < 120) return `${s.toFixed(0)} s`;
  if (s < 7200) return `${(s / 60).toFixed(0)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

// --- start --------------------------------------------------------------------------

function failed(err) {
  if (err instanceof Unauthorized) showPrompt(err.body);
  else problem(err.message);
}

// Show the dashboard if the key (or no key, without keys configured) is accepted.
async function open() {
  if (streamAbort) streamAbort.abort();
  generation += 1;
  session += 1;
  const mine = session;
  try {
    await loadJobs();
  } catch (err) {
    failed(err);
    return;
  }
  if (mine !== session) return;
  authorized = true;
  problem("");
  $("keyprompt").hidden = true;
  $("dashboard").hidden = false;
  $("forget").hidden = !apiKey();
  loadHistory().catch(failed);
  stream(mine);
}

loadHealth().catch(failed);
setInterval(() => loadHealth().catch(failed), HEALTH_EVERY_MS);
setInterval(() => {
  if (authorized) loadHistory().catch(failed);
}, HISTORY_EVERY_MS);
open();
