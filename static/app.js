// The page's behaviour, over the public API only. Data from the server (names, messages, errors) is
// always set as text (textContent, text nodes), never parsed as markup: messages are untrusted.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "persona-lora.api-key";  // sessionStorage: gone when the tab closes
const HEALTH_EVERY_MS = 3000;

// --- small helpers -------------------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = Object.assign(document.createElement(tag), props || {});
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function say(id, text, isError = false) {
  const node = $(id);
  node.textContent = text || "";
  node.classList.toggle("error", !!isError);
}

const path = (name) => encodeURIComponent(name);
const fmt = (x, digits = 3) => (x === null || x === undefined ? "—" : typeof x === "number" ? String(+x.toFixed(digits)) : String(x));
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.round(seconds));
  return s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${Math.floor(s / 3600)} h ${Math.floor(s / 60) % 60} min`;
}

function table(headers, rows) {
  return el("div", { className: "scroll" }, el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col", textContent: h })))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c, i) => el(i ? "td" : "th", i ? { textContent: fmt(c) } : { scope: "row", textContent: fmt(c) })))))));
}

// --- the API ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(extra) {
  const h = new Headers(extra || {});
  const key = sessionStorage.getItem(KEY);
  if (key) h.set("Authorization", `Bearer ${key}`);
  return h;
}

async function describe(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const detail = body ? body.detail ?? body.error?.message : null;
  let text = Array.isArray(detail)
    ? detail.map((p) => `${(p.loc || []).filter((x) => x !== "body").join(" › ") || "request"}: ${p.msg}`).join("; ")
    : typeof detail === "string" ? detail : `${response.status} ${response.statusText}`;
  if (response.status === 401) {
    text += ". Enter the server's API key at the top of the page.";
    showBanner("This server needs an API key: enter it in the field at the top of the page.");
    $("key-box").open = true;  // collapsed until the server asks for a key
  }
  const retry = response.headers.get("Retry-After");
  if (retry) text += ` (try again in ${retry} s)`;
  return text;
}

async function send(method, url, body, extra = {}) {
  const init = { method, headers: headers(), ...extra };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers.set("Content-Type", "application/json"); }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    unreachable();
    throw new ApiError(0, "The server cannot be reached: is it running?");
  }
  reachable();
  if (!response.ok) throw new ApiError(response.status, await describe(response));
  return response;
}

const api = async (method, url, body) => (await send(method, url, body)).json();

// Server-Sent Events read from fetch (EventSource cannot send the Authorization header).
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const event = { event: "message", id: null, data: [] };
      for (const line of block.split(/\r?\n/)) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(value);
        else if (field === "event") event.event = value;
        else if (field === "id") event.id = value;
      }
      if (event.data.length) yield { ...event, data: event.data.join("\n") };
    }
  }
}

// --- the server's state and the key ------------------------------------------------------------------

let wasUnreachable = false;

function showBanner(text) { const b = $("banner"); b.textContent = text; b.hidden = false; }

function unreachable() {
  wasUnreachable = true;
  showBanner(`The server at ${location.origin} cannot be reached: it may be stopped, or the network is down. ` +
             "This page keeps trying every few seconds.");
  say("server-status", "Server: unreachable", true);
}

function reachable() {
  if (!wasUnreachable) return;
  wasUnreachable = false;
  $("banner").hidden = true;
  refreshAll();
}

async function health() {
  try {
    const h = await api("GET", "/health");
    say("server-status", `Server: ${h.status || "ok"} · model ${h.model} · ${h.jobs_running} training, ${h.jobs_queued} queued`);
  } catch (err) {
    if (err.status) say("server-status", `Server: ${err.message}`, true);
  }
}

function showKey() {
  $("key-summary").textContent = sessionStorage.getItem(KEY) ? "API key (set for this tab)" : "API key";
}

$("api-key").value = sessionStorage.getItem(KEY) || "";
showKey();
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
  $("banner").hidden = true;
  $("key-box").open = false;
  showKey();
  refreshAll();
});
$("key-forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  $("api-key").value = "";
  showKey();
  refreshAll();
});

// --- speakers ------------------------------------------------------------------------------------------

let speakers = [];

// The held-out loss of base and adapter, and whether the adapter made it worse (said in words, not only numbers).
async function evaluationSummary(s) {
  if (!s.adapter) return { text: "no adapter" };
  try {
    const r = await api("GET", `/speakers/${path(s.speaker)}/evaluation`);
    const h = r.held_out;
    if (!h) return { text: r.note || "no held-out samples" };
    const worse = h.base.loss !== null && h.adapter.loss !== null && h.adapter.loss > h.base.loss;
    return { text: `${fmt(h.base.loss)} → ${fmt(h.adapter.loss)}${worse ? ": worse than the base model" : ""}`, worse };
  } catch (err) {
    return { text: err.status === 404 ? "not evaluated" : err.message };
  }
}

const COLUMNS = ["Messages", "Adapter", "Last training", "Held-out loss: base → adapter", "Actions"];

async function refreshSpeakers() {
  try {
    const list = await api("GET", "/speakers");
    speakers = list.data;
  } catch (err) {
    say("speakers-msg", `Could not list the speakers: ${err.message}`, true);
    return;
  }
  const body = $("speakers-table").tBodies[0];
  body.replaceChildren();
  $("speakers-empty").hidden = speakers.length > 0;
  for (const s of speakers) {
    const summary = el("td", { textContent: "…" });
    const remove = el("button", { type: "button", textContent: "Delete", className: "danger" });
    remove.setAttribute("aria-label", `Delete ${s.speaker}`);
    remove.addEventListener("click", () => deleteSpeaker(s.speaker));
    const remembered = s.memory === null || s.memory === undefined ? "" : ` · ${s.memory} in memory`;
    const cells = [el("td", { textContent: s.error ? `unreadable: ${s.error}` : `${s.messages}${remembered}` }),
      el("td", { textContent: s.adapter ? "trained" : "none" }), el("td", { textContent: when(s.trained_at) }),
      summary, el("td", {}, remove)];
    cells.forEach((cell, i) => { if (i < 4) cell.dataset.label = COLUMNS[i]; });  // shown on a phone, where rows are cards
    body.append(el("tr", {}, el("th", { scope: "row", textContent: s.speaker }), cells));
    evaluationSummary(s).then(({ text, worse }) => { summary.textContent = text; summary.classList.toggle("warning", !!worse); });
  }
  fill($("train-speaker"), speakers.map((s) => s.speaker));
  fill($("eval-speaker"), speakers.filter((s) => s.adapter).map((s) => s.speaker));
  if ($("speakers-msg").classList.contains("error")) say("speakers-msg", "");  // an earlier failure, now gone
}

function fill(select, names, labels) {
  const keep = select.value;
  select.replaceChildren(...names.map((n, i) => el("option", { value: n, textContent: labels ? labels[i] : n })));
  if (names.includes(keep)) select.value = keep;
}

async function deleteSpeaker(name) {
  if (!confirm(`Delete everything stored for "${name}": their messages, evaluation, checkpoints and adapter? This cannot be undone.`)) return;
  try {
    const r = await api("DELETE", `/speakers/${path(name)}`);
    say("speakers-msg", `${r.message}: ${r.deleted.length} files removed.`);
  } catch (err) {
    say("speakers-msg", `Could not delete ${name}: ${err.message}`, true);
  }
  await refreshSpeakers();
  refreshModels();
}

$("speakers-refresh").addEventListener("click", refreshSpeakers);

// --- import --------------------------------------------------------------------------------------------

let exportFile = null;

async function inspect(file) {
  exportFile = file;
  $("import-form").hidden = true;
  $("import-report").replaceChildren();
  say("inspect-msg", `Reading ${file.name}…`);
  const form = new FormData();
  form.append("file", file);
  let found;
  try {
    found = await api("POST", "/exports/inspect", form);
  } catch (err) {
    say("inspect-msg", `${file.name}: ${err.message}`, true);
    return;
  }
  say("inspect-msg", `${file.name}: a ${found.format} export. Pick the persona and import.`);
  const facts = [["Format", found.format], ["Chats", found.chats.join(", ")],
                 ["From", when(found.first_message)], ["To", when(found.last_message)]];
  $("inspect-summary").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v })]));
  $("persona-options").replaceChildren(...found.participants.map((p, i) => el("label", {},
    el("input", { type: "radio", name: "persona", value: p.name, checked: i === 0, required: true }),
    ` ${p.name} (${p.messages} messages)`)));
  $("chat-pick").hidden = found.chats.length < 2;
  fill($("import-chat"), ["all", ...found.chats], ["All chats", ...found.chats]);
  $("import-form").hidden = false;
}

$("export-file").addEventListener("change", (e) => { if (e.target.files[0]) inspect(e.target.files[0]); });
const drop = $("drop");
for (const type of ["dragenter", "dragover"]) drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  if (e.dataTransfer.files[0]) inspect(e.dataTransfer.files[0]);
});
// A file dropped anywhere else must not replace the page.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

function uploadReport(r) {
  const parts = [el("p", { textContent: `${r.message}: ${r.added} new, ${r.duplicates} already stored, ${r.total} in all.` })];
  for (const w of r.warnings || []) parts.push(el("p", { className: "warning", textContent: `Warning: ${w}` }));
  if (r.report) parts.push(el("h3", { textContent: "What cleaning did" }), table(["Step", "Messages"], Object.entries(r.report)));
  if (r.speakers) {
    parts.push(el("h3", { textContent: `Speakers in the export (tokens counted by ${r.token_counter})` }),
               table(["Speaker", "Messages", "Tokens"], Object.entries(r.speakers).map(([n, s]) => [n, s.messages, s.tokens])));
  }
  return parts;
}

async function afterUpload(speaker) {
  await refreshSpeakers();
  $("train-speaker").value = speaker;
}

$("import-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const persona = e.target.querySelector("input[name=persona]:checked");
  if (!exportFile || !persona) return;
  const form = new FormData();
  form.append("file", exportFile);
  form.append("speaker", persona.value);
  if (!$("chat-pick").hidden && $("import-chat").value !== "all") form.append("chat", $("import-chat").value);
  for (const box of e.target.querySelectorAll("input[type=checkbox]")) form.append(box.name, box.checked ? "true" : "false");
  form.append("split_gap_minutes", $("split-gap").value || "0");
  $("import-report").replaceChildren(el("p", { textContent: "Importing…" }));
  try {
    const r = await api("POST", "/upload-file", form);
    $("import-report").replaceChildren(...uploadReport(r));
    await afterUpload(r.speaker);
  } catch (err) {
    $("import-report").replaceChildren(el("p", { className: "error", textContent: `Import failed: ${err.message}` }));
  }
});

$("paste-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  let dialog;
  try {
    dialog = JSON.parse($("paste-json").value);
  } catch (err) {
    $("paste-report").replaceChildren(el("p", { className: "error", textContent: `Not valid JSON: ${err.message}` }));
    return;
  }
  if (dialog && !Array.isArray(dialog)) dialog = dialog.dialog;
  try {
    const r = await api("POST", "/upload-text", { dialog, speaker: $("paste-speaker").value });
    $("paste-report").replaceChildren(...uploadReport(r));
    await afterUpload(r.speaker);
  } catch (err) {
    $("paste-report").replaceChildren(el("p", { className: "error", textContent: `Upload failed: ${err.message}` }));
  }
});

// --- charts (SVG, drawn from numbers only) ------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
const svg = (tag, attrs, text) => {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
};

function lineChart(target, points) {
  const [w, h, left, bottom] = [600, 200, 48, 20];
  target.replaceChildren();
  if (!points.length) return;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys, Math.min(...ys) + 1e-6)];
  const X = (x) => left + ((x - x0) / (x1 - x0)) * (w - left - 8);
  const Y = (y) => 8 + (1 - (y - y0) / (y1 - y0)) * (h - bottom - 16);
  target.append(
    svg("line", { x1: left, y1: h - bottom, x2: w, y2: h - bottom, class: "axis" }),
    svg("line", { x1: left, y1: 0, x2: left, y2: h - bottom, class: "axis" }),
    svg("text", { x: left - 4, y: 14, class: "label end" }, fmt(y1)),
    svg("text", { x: left - 4, y: h - bottom, class: "label end" }, fmt(y0)),
    svg("text", { x: w - 4, y: h - 4, class: "label end" }, `step ${x1}`),
    svg("polyline", { points: points.map(([x, y]) => `${X(x)},${Y(y)}`).join(" "), class: "line" }));
}

function barChart(bars) {
  const [w, row] = [600, 34];
  const max = Math.max(...bars.map((b) => b[1]), 1e-6);
  const chart = svg("svg", { viewBox: `0 0 ${w} ${bars.length * row + 4}`, class: "chart", role: "img" });
  chart.setAttribute("aria-label", bars.map(([n, v]) => `${n}: ${fmt(v)}`).join(", "));
  bars.forEach(([name, value, cls], i) => {
    const width = ((w - 260) * value) / max;
    chart.append(svg("text", { x: 0, y: i * row + 22, class: "label" }, name),
                 svg("rect", { x: 190, y: i * row + 6, width, height: row - 10, class: cls }),
                 svg("text", { x: 196 + width, y: i * row + 22, class: "label" }, fmt(value)));
  });
  return chart;
}

// --- training --------------------------------------------------------------------------------------------

const FINISHED = ["succeeded", "failed", "cancelled"];
let job = null, lastEventId = 0, losses = [], watching = null;

function showJob() {
  const p = job.progress;
  $("job").hidden = false;
  const done = job.status === "succeeded";
  const fraction = done ? 1 : p && p.total_steps ? p.step / p.total_steps : 0;
  $("job-progress").value = fraction;
  const stepText = p ? ` · step ${p.step} of ${p.total_steps}, epoch ${fmt(p.epoch, 2)}, loss ${fmt(p.loss)}` : "";
  say("job-status", `${job.speaker}: ${job.status} · ${Math.round(fraction * 100)}%${stepText}`);
  $("job-eta").textContent = job.status === "running" && p && p.eta_s !== null ? `about ${duration(p.eta_s)} left` : "";
  $("job-cancel").hidden = FINISHED.includes(job.status);
  const resumable = ["failed", "cancelled"].includes(job.status);
  $("job-resume").hidden = !(resumable && job.checkpoint);
  const errors = [];
  if (job.status === "failed") errors.push(`Training failed: ${job.error || "no reason recorded"}`);
  if (resumable && !job.checkpoint) errors.push("There is no checkpoint to resume from (the server saves them with CHECKPOINT_STEPS); train again instead.");
  if (job.status === "cancelled") errors.unshift("Training was cancelled; the previous adapter, if any, stays.");
  say("job-error", errors.join(" "), job.status === "failed");
  $("job-warning").textContent = done ? (job.result?.warnings || []).map((w) => `Warning: ${w}.`).join(" ") : "";
  lineChart($("loss-chart"), losses);
}

function onEvent(event) {
  lastEventId = Number(event.id) || lastEventId;
  const data = JSON.parse(event.data);
  if (event.event === "progress") {
    job.progress = data;
    if (data.loss !== null && data.loss !== undefined) losses.push([data.step, data.loss]);
  } else if (data.status) {
    job.status = data.status;
    if (data.error) job.error = data.error;
    if (data.status === "queued") job.error = null;
  }
  showJob();
}

async function watch(started) {
  if (!job || job.job_id !== started.job_id) { lastEventId = 0; losses = []; }
  job = started;
  showJob();
  const controller = new AbortController();
  watching?.abort();
  watching = controller;
  while (!controller.signal.aborted) {
    try {
      const response = await send("GET", `/jobs/${job.job_id}/events?after=${lastEventId}`, undefined, { signal: controller.signal });
      for await (const event of events(response)) onEvent(event);
      job = await api("GET", `/jobs/${job.job_id}`);  // the stream ended with the job: its final state
      showJob();
      if (FINISHED.includes(job.status)) break;
    } catch (err) {
      if (controller.signal.aborted) return;
      if (err.status) { say("job-error", `Lost the job's progress: ${err.message}`, true); return; }
      await new Promise((resolve) => setTimeout(resolve, 2000));  // unreachable: the banner says so; try again
    }
  }
  if (job.status === "succeeded") {
    await refreshSpeakers();
    chatChosen = false;  // chat opens on the persona just trained
    refreshModels();
    $("eval-speaker").value = job.speaker;
    showEvaluation(job.speaker);
  }
}

$("train-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = { speaker: $("train-speaker").value };
  for (const input of e.target.querySelectorAll("details input")) if (input.value !== "") body[input.name] = Number(input.value);
  say("job-error", "");
  try {
    watch(await api("POST", "/train", body));
  } catch (err) {
    $("job").hidden = false;
    say("job-error", `Could not start training: ${err.message}`, true);
  }
});

$("job-cancel").addEventListener("click", async () => {
  try {
    job = { ...job, ...(await api("POST", `/jobs/${job.job_id}/cancel`)) };
    say("job-status", `${job.speaker}: cancelling at the next step…`);
  } catch (err) {
    say("job-error", `Could not cancel: ${err.message}`, true);
  }
});

$("job-resume").addEventListener("click", async () => {
  try {
    watch(await api("POST", `/jobs/${job.job_id}/resume`));
  } catch (err) {
    say("job-error", `Could not resume: ${err.message}`, true);
  }
});

async function attachToActiveJob() {
  for (const status of ["running", "queued"]) {
    try {
      const list = await api("GET", `/jobs?status=${status}&kind=train&limit=1`);
      if (list.data.length) return watch(list.data[0]);
    } catch { return; }
  }
}

// --- evaluation -------------------------------------------------------------------------------------------

async function showEvaluation(speaker, run = false) {
  const out = $("eval-out");
  if (!speaker) { say("eval-msg", "No speaker has an adapter yet: train one first."); return; }
  say("eval-msg", run ? `Evaluating ${speaker}…` : `Loading the report of ${speaker}…`);
  let r;
  try {
    r = await api(run ? "POST" : "GET", `/speakers/${path(speaker)}/${run ? "evaluate" : "evaluation"}`);
  } catch (err) {
    out.replaceChildren();
    say("eval-msg", err.message, true);
    return;
  }
  say("eval-msg", `${r.speaker}: evaluated ${when(r.created_at)} on ${r.held_out_samples} held-out samples (base weights: ${r.base_weights}).`);
  // First: would you know who said it ("sounds like Олена: 71% of the persona's replies, …"), or why no judge was trained.
  const judged = r.judge && (r.judge.text || r.judge.note);
  const parts = judged ? [el("p", { className: "judge", textContent: `${judged[0].toUpperCase()}${judged.slice(1)}.` })] : [];
  parts.push(...(r.warnings || []).map((w) => el("p", { className: "warning", textContent: `Warning: ${w}.` })));
  if (r.note) parts.push(el("p", { textContent: r.note }));
  if (r.held_out) {
    const bars = [["base", r.held_out.base.loss, "base"], ["adapter", r.held_out.adapter.loss, "adapter"]];
    if (r.specificity) bars.push(["adapter, others' replies", r.specificity.adapter_loss_others, "other"]);
    parts.push(el("h3", { textContent: "Held-out loss (lower: the person's replies are less surprising)" }),
               barChart(bars.filter((b) => b[1] !== null)),
               el("p", { textContent: `Perplexity: base ${fmt(r.held_out.base.perplexity)}, adapter ${fmt(r.held_out.adapter.perplexity)}; loss reduction ${fmt(r.held_out.loss_reduction)}.` }));
  }
  if (r.generation) {
    const g = r.generation, rows = [["ends its turn", "ends_turn"], ["caught in a loop", "loops"], ["median words", "median_words"],
      ["length / the person's", "length_ratio"], ["distinct-2", "distinct_2"], ["style distance", "style_distance"]];
    parts.push(el("h3", { textContent: `Replies to ${g.contexts} held-out contexts (the person's median: ${fmt(g.base.person_median_words)} words)` }),
               table(["", "base", "adapter"], rows.map(([label, k]) => [label, g.base[k], g.adapter[k]])));
  }
  if (r.end_of_turn) parts.push(el("p", { textContent: `Probability of ending the turn where the person did: base ${fmt(r.end_of_turn.base)}, adapter ${fmt(r.end_of_turn.adapter)}.` }));
  if (r.style) {
    const keys = ["mean_words", "emoji_per_100_chars", "punctuation_per_100_chars", "vocabulary_overlap", "distance"];
    parts.push(el("h3", { textContent: "Style" }),
               table(["", "the person", "base", "adapter"], keys.map((k) => [k.replaceAll("_", " "), r.style.true[k], r.style.base[k], r.style.adapter[k]])));
  }
  if (r.samples && r.samples.length) {
    parts.push(el("h3", { textContent: "Replies beside the true ones" }));
    for (const s of r.samples) {
      parts.push(el("article", { className: "sample" },
        el("ol", { className: "context" }, s.context.map((t) => el("li", {}, el("b", { textContent: `${t.speaker}: ` }), t.content))),
        el("dl", { className: "replies" },
          el("dt", { textContent: "True" }), el("dd", { textContent: s.true }),
          el("dt", { textContent: "Base" }), el("dd", { textContent: s.base }),
          el("dt", { textContent: "Adapter" }), el("dd", { textContent: s.adapter }))));
    }
  }
  out.replaceChildren(...parts);
  lossPlot(speaker, out);
}

async function lossPlot(speaker, out) {
  try {
    const blob = await (await send("GET", `/speakers/${path(speaker)}/loss.png`)).blob();
    out.append(el("h3", { textContent: "Training and held-out loss" }),
               el("img", { src: URL.createObjectURL(blob), alt: `Training and held-out loss of ${speaker}`, className: "plot" }));
  } catch { /* drawn only when an adapter was evaluated */ }
}

$("eval-form").addEventListener("submit", (e) => { e.preventDefault(); showEvaluation($("eval-speaker").value); });
$("eval-run").addEventListener("click", () => showEvaluation($("eval-speaker").value, true));

// --- chat ------------------------------------------------------------------------------------------------

let conversation = [], chatAbort = null, chatChosen = false;  // chatChosen: the person picked whom to talk to

// The persona trained last: the one chat opens on (not the base model).
function latestPersona() {
  const trained = speakers.filter((s) => s.adapter && s.trained_at);
  trained.sort((a, b) => new Date(b.trained_at) - new Date(a.trained_at));
  return trained.length ? trained[0].speaker : null;
}

async function refreshModels() {
  try {
    const models = (await api("GET", "/v1/models")).data.map((m) => m.id);
    const speakerNames = new Set(speakers.map((s) => s.speaker));
    fill($("chat-model"), models, models.map((m) => (speakerNames.has(m) ? m : `${m} (the base model alone)`)));
    const latest = latestPersona();
    if (!chatChosen && latest && models.includes(latest)) $("chat-model").value = latest;
    if ($("chat-msg").classList.contains("error")) say("chat-msg", "");
  } catch (err) {
    say("chat-msg", `Could not list the personas: ${err.message}`, true);
  }
}

// The person's messages recalled for a reply (the /v1 extension `memory`), collapsed under it.
function showRecalled(item, recalled) {
  const list = el("ul", {}, ...recalled.map((r) => el("li", { textContent: r.text })));
  const noun = recalled.length === 1 ? "message" : "messages";
  item.append(el("details", { className: "recalled" }, el("summary", { textContent: `Recalled ${recalled.length} of their ${noun}` }), list));
}

function addTurn(role, text) {
  const body = el("span", { className: "text", textContent: text });
  const who = role === "user" ? "You" : $("chat-model").value;
  $("chat-log").append(el("li", { className: role }, el("b", { textContent: `${who}: ` }), body));
  return body;
}

$("chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || chatAbort) return;
  conversation.push({ role: "user", content: text });
  addTurn("user", text);
  $("chat-input").value = "";
  const reply = addTurn("assistant", "");
  reply.parentElement.setAttribute("aria-busy", "true");
  const body = { model: $("chat-model").value, messages: conversation, stream: true };
  for (const input of e.target.querySelectorAll("details input")) if (input.value !== "") body[input.name] = Number(input.value);
  chatAbort = new AbortController();
  $("chat-stop").disabled = false;
  $("chat-send").disabled = true;
  say("chat-msg", "");
  try {
    const response = await send("POST", "/v1/chat/completions", body, { signal: chatAbort.signal });
    for await (const event of events(response)) {
      if (event.data === "[DONE]") break;
      const chunk = JSON.parse(event.data);
      if (chunk.error) throw new ApiError(500, chunk.error.message);
      if (chunk.memory?.length) showRecalled(reply.parentElement, chunk.memory);
      const choice = chunk.choices[0];
      if (choice?.delta?.content) reply.textContent += choice.delta.content;
      if (choice?.finish_reason === "length") say("chat-msg", "The reply was cut at the token limit (Max tokens).");
    }
  } catch (err) {
    if (err.name !== "AbortError") say("chat-msg", `No reply: ${err.message}`, true);
  }
  reply.parentElement.removeAttribute("aria-busy");
  if (reply.textContent) conversation.push({ role: "assistant", content: reply.textContent });
  chatAbort = null;
  $("chat-stop").disabled = true;
  $("chat-send").disabled = false;
});

$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
$("chat-stop").addEventListener("click", () => chatAbort?.abort());
$("chat-clear").addEventListener("click", () => { conversation = []; $("chat-log").replaceChildren(); say("chat-msg", ""); });
$("chat-model").addEventListener("change", () => { chatChosen = true; conversation = []; $("chat-log").replaceChildren(); });

// --- start ---------------------------------------------------------------------------------------------------

async function refreshAll() {
  health();
  await refreshSpeakers();
  refreshModels();
  if (!job || FINISHED.includes(job.status)) attachToActiveJob();
}

refreshAll();
setInterval(health, HEALTH_EVERY_MS);
