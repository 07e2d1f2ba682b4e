// The search page: pick or drop an image, drag a box to crop, see ranked results, click one to
// search with it (the click is logged through POST /events). No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { blob: null, name: null, crop: null, queryId: null, config: null, objectUrls: [] };

function apiKey() {
  return $("key").value || localStorage.getItem("vsearch-api-key") || "";
}

function headers() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.className = "status" + (isError ? " error" : "");
  el.dataset.state = isError ? "error" : "ok";
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return body.error;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status} ${resp.statusText}`;
}

// ------------------------------------------------------------------ loading the query image

async function loadConfig() {
  try {
    const resp = await fetch("/api/config", { headers: headers() });
    if (resp.status === 401) { $("key-row").hidden = false; return; }
    if (!resp.ok) return;
    state.config = await resp.json();
    $("k").max = state.config.k_max;
    $("k").value = Math.min(state.config.k_default, state.config.k_max);
    showModel(state.config.model);
    if (state.config.api_key_required) $("key-row").hidden = false;
  } catch (e) {
    setStatus("The search service cannot be reached.", true);
  }
}

// The model that answered, as a person reads it (never the internal collection name).
function showModel(model) {
  if (!model || !model.name) return;
  $("model").textContent = model.version ? `model ${model.name}, version ${model.version}` : `model ${model.name}`;
}

// The query panel and the results go back to empty: nothing of a previous search stays
// next to an error about this one.
function clearQuery() {
  $("stage").hidden = true;
  $("drop-hint").hidden = false;
  $("query").removeAttribute("src");
  clearResults();
}

function clearResults() {
  render([]);
  $("weak").hidden = true;
}

function useImage(blob, name) {
  if (!blob || !blob.type.startsWith("image/")) {
    state.blob = null;
    $("go").disabled = true;
    clearQuery();
    setStatus(`${name || "That file"} is not an image: choose a JPEG, PNG, WebP or GIF file.`, true);
    return Promise.resolve(false);
  }
  state.blob = blob;
  state.name = name || "query";
  state.crop = null;
  const img = $("query");
  const url = URL.createObjectURL(blob);
  return new Promise((resolve) => {
    img.onload = () => {
      $("stage").hidden = false;
      $("drop-hint").hidden = true;
      $("go").disabled = false;
      $("whole").disabled = false;
      drawBox();
      resolve(true);
    };
    img.onerror = () => {
      // No broken-image icon: the browser cannot show it; the server says whether it can read it.
      clearQuery();
      setStatus(`${state.name} could not be shown as an image; asking the server…`, true);
      $("go").disabled = false;
      resolve(true);
    };
    img.src = url;
  });
}

// ------------------------------------------------------------------ crop selection

let drag = null;

function pointIn(ev) {
  const r = $("query").getBoundingClientRect();
  return {
    x: Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width)),
    y: Math.min(1, Math.max(0, (ev.clientY - r.top) / r.height)),
  };
}

function drawBox() {
  const box = $("box");
  const c = state.crop || (drag && drag.box);
  if (!c) {
    box.hidden = true;
    $("crop-text").textContent = "Whole image";
    return;
  }
  box.hidden = false;
  box.style.left = `${c[0] * 100}%`;
  box.style.top = `${c[1] * 100}%`;
  box.style.width = `${(c[2] - c[0]) * 100}%`;
  box.style.height = `${(c[3] - c[1]) * 100}%`;
  $("crop-text").textContent = "Crop " + c.map((v) => v.toFixed(3)).join(", ");
}

function boxFrom(a, b) {
  return [Math.min(a.x, b.x), Math.min(a.y, b.y), Math.max(a.x, b.x), Math.max(a.y, b.y)];
}

function onDown(ev) {
  if (ev.button !== 0) return;
  ev.preventDefault();
  $("stage").setPointerCapture(ev.pointerId);
  drag = { start: pointIn(ev), box: null };
}

function onMove(ev) {
  if (!drag) return;
  drag.box = boxFrom(drag.start, pointIn(ev));
  state.crop = null;
  drawBox();
}

function onUp(ev) {
  if (!drag) return;
  const box = boxFrom(drag.start, pointIn(ev));
  drag = null;
  // A click (or a sliver) means the whole image; a real box is a crop.
  state.crop = (box[2] - box[0] > 0.02 && box[3] - box[1] > 0.02) ? box : null;
  drawBox();
  search();
}

// ------------------------------------------------------------------ searching

async function search() {
  if (!state.blob) { setStatus("Choose an image first.", true); return; }
  const k = parseInt($("k").value, 10);
  const form = new FormData();
  form.append("image", state.blob, state.name);
  const cropText = state.crop ? state.crop.map((v) => v.toFixed(6)).join(",") : "";
  if (cropText) form.append("crop", cropText);
  $("crop-text").dataset.sent = cropText;
  if (!Number.isNaN(k)) form.append("k", String(k));
  setStatus("Searching…");
  $("go").disabled = true;
  let resp;
  try {
    resp = await fetch("/search", { method: "POST", body: form, headers: headers() });
  } catch (e) {
    setStatus("The search service cannot be reached: " + e.message, true);
    $("go").disabled = false;
    return;
  }
  $("go").disabled = false;
  if (!resp.ok) {
    if (resp.status === 401) $("key-row").hidden = false;
    const reason = await errorText(resp);
    const hint = { 400: "The query was refused", 401: "Not allowed", 413: "Too large",
                   503: "Search is unavailable right now" }[resp.status] || "Search failed";
    clearResults();
    setStatus(`${hint}: ${reason}`, true);
    return;
  }
  const body = await resp.json();
  state.queryId = body.query_id;
  state.token = body.token;            // signed by the server: any replica logs its clicks
  showModel(body.model);
  const results = body.results || [];
  render(results);
  const n = results.length;
  setStatus(n ? `${n} result${n === 1 ? "" : "s"}, most similar first.` : "No results: the catalog may still be filling.");
  // Nearest is not the same as near: say so when even the best result is far.
  const weakAt = state.config ? state.config.weak_match_score : null;
  const best = n ? Number(results[0].score) : null;
  if (best !== null && weakAt !== null && weakAt !== undefined && best < weakAt) {
    $("weak").textContent = `Nothing in the catalog is close to this image: the best score is ${best.toFixed(3)} ` +
      `(under ${Number(weakAt).toFixed(2)}). These are the least different images, not matches.`;
    $("weak").hidden = false;
  } else {
    $("weak").hidden = true;
  }
}

function render(results) {
  for (const u of state.objectUrls) URL.revokeObjectURL(u);
  state.objectUrls = [];
  const list = $("results");
  list.textContent = "";
  results.forEach((r, i) => {
    const li = document.createElement("li");
    li.className = "card";
    li.tabIndex = 0;
    li.dataset.testid = "result";
    li.setAttribute("data-testid", "result");
    li.dataset.id = r.id;
    li.dataset.rank = String(i + 1);
    li.dataset.score = String(r.score);
    li.title = `${r.id}\n${JSON.stringify(r.metadata || {})}`;
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    const img = document.createElement("img");
    img.alt = r.id;
    img.loading = "lazy";
    thumb.appendChild(img);
    const meta = document.createElement("div");
    meta.className = "meta";
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = `${i + 1}. ${r.id}`;
    id.title = r.id;                     // whole, also when it wraps
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = Number(r.score).toFixed(3);
    meta.append(id, score);
    li.append(thumb, meta);
    li.addEventListener("click", () => clickResult(r));
    li.addEventListener("keydown", (ev) => { if (ev.key === "Enter") clickResult(r); });
    list.appendChild(li);
    loadThumb(img, r.id);
  });
}

function imageUrl(id) {
  return "/images/" + encodeURIComponent(id);
}

// A catalog image: with an API key the request carries it, and then must never follow a
// redirect (a redirect to another origin would hand the key to whoever serves the image).
function fetchImage(id) {
  return fetch(imageUrl(id), { headers: headers(), redirect: apiKey() ? "error" : "follow" });
}

async function loadThumb(img, id) {
  if (!apiKey()) { img.src = imageUrl(id); return; }
  // With an API key the image request must carry the header: fetch it as a blob.
  try {
    const resp = await fetchImage(id);
    if (!resp.ok) return;
    const url = URL.createObjectURL(await resp.blob());
    state.objectUrls.push(url);
    img.src = url;
  } catch (e) { /* leave the grey square */ }
}

async function clickResult(r) {
  try {
    const resp = await fetch("/events", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...headers() },
      body: JSON.stringify({ type: "click", token: state.token, item_id: r.id }),
    });
    if (!resp.ok) setStatus("The click was not recorded: " + await errorText(resp), true);
  } catch (e) {
    setStatus("The click was not recorded: " + e.message, true);
  }
  // Search with the clicked image.
  let resp;
  try {
    resp = await fetchImage(r.id);
  } catch (e) {
    setStatus("Could not load that image: " + e.message, true);
    return;
  }
  if (!resp.ok) {
    setStatus("Could not load that image: " + await errorText(resp), true);
    return;
  }
  if (await useImage(await resp.blob(), r.id)) await search();
}

// ------------------------------------------------------------------ wiring

// A first-party cookie that names this browser (a random id, nothing else): during an online
// experiment the search service keeps it in the same arm across searches. Sent with every
// same-origin request; set once, kept for a year.
function ensureUserId() {
  if (/(?:^|;\s*)vsearch_uid=[\x21-\x3a\x3c-\x7e]{1,200}(?:;|$)/.test(document.cookie)) return;
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  const id = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  document.cookie = `vsearch_uid=${id}; path=/; max-age=31536000; SameSite=Lax`;
}

function init() {
  ensureUserId();
  const saved = localStorage.getItem("vsearch-api-key");
  if (saved) $("key").value = saved;
  $("key").addEventListener("change", () => {
    localStorage.setItem("vsearch-api-key", $("key").value);
    loadConfig();
  });
  $("file").addEventListener("change", async (ev) => {
    const f = ev.target.files[0];
    if (f && await useImage(f, f.name)) search();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const f = ev.dataTransfer.files[0];
    if (!f) { setStatus("Drop an image file.", true); return; }
    if (await useImage(f, f.name)) search();
  });
  const stage = $("stage");
  stage.addEventListener("pointerdown", onDown);
  stage.addEventListener("pointermove", onMove);
  stage.addEventListener("pointerup", onUp);
  $("whole").addEventListener("click", () => { state.crop = null; drawBox(); search(); });
  $("go").addEventListener("click", search);
  $("k").addEventListener("keydown", (ev) => { if (ev.key === "Enter") search(); });
  loadConfig();
}

init();
