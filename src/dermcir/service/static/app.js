// dermcir web page: builds the query form from /checklist, posts to /search, shows the grid and the comparison.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, previewUrl: null, response: null, selected: null, search: null, maxUploadBytes: null,
                fileRefused: false, caseImageReady: false };
// A search that has not answered by then is given up, so a hung service or proxy cannot lock the page (a search
// takes well under a second; 120 s leaves room for a long queue). Tests set window.dermcirSearchTimeoutS.
const SEARCH_TIMEOUT_S = window.dermcirSearchTimeoutS || 120;

function setStatus(message, isError = false) {
  const el = $("status");
  el.textContent = message;
  el.classList.toggle("error", isError);
}

// A reply is read as text and parsed only if it is JSON: an error may come from something in front of the service
// (a proxy's HTML 502 or 413 page) or be a plain-text 500, and res.json() would then hide it behind a SyntaxError.
async function readReply(res) {
  const text = await res.text();
  try {
    return { body: JSON.parse(text), text };
  } catch {
    return { body: null, text };
  }
}

// What a reply that is not the service's own JSON says, in words: an HTML error page (a proxy's 413 or 502) by its
// title or text, never as markup.
function plainText(text) {
  if (!/^\s*</.test(text)) return text;
  const doc = new DOMParser().parseFromString(text, "text/html");
  return (doc.title || doc.body.textContent || "").replace(/\s+/g, " ");
}

// Answers the service does not give itself, explained: nginx, for one, refuses uploads over 1 MB unless told more.
const STATUS_HINTS = {
  413: "the upload is larger than the service, or a proxy in front of it, accepts",
  502: "a proxy in front of the service could not reach it; is it running?",
  503: "the service is busy or not running; try again shortly",
  504: "a proxy gave up waiting for the service",
};

function errorMessage(res, body, text) {
  if (body && body.detail !== undefined) {
    return `Error ${res.status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
  }
  if (res.ok) return `The service's reply was not a search result (${res.status}, ${contentType(res)})`;
  const said = plainText(text).trim().slice(0, 200) || res.statusText;
  const hint = STATUS_HINTS[res.status];
  return `Error ${res.status}: ${said}` + (hint ? ` (${hint})` : "");
}

function contentType(res) { return res.headers.get("content-type") || "no content type"; }

async function loadChecklist() {
  const res = await fetch("/checklist");
  const { body: spec, text } = await readReply(res);
  if (!res.ok || spec === null || typeof spec.fields !== "object") throw new Error(errorMessage(res, spec, text));
  const box = $("checklist");
  for (const [name, field] of Object.entries(spec.fields)) {
    const label = document.createElement("label");
    label.textContent = field.label;
    const select = document.createElement("select");
    select.name = name;
    select.id = "field-" + name;
    select.append(new Option("(not given)", ""));
    for (const value of field.values) select.append(new Option(value, value));
    label.append(select);
    box.append(label);
  }
  $("k-input").max = spec.max_k;
  state.maxUploadBytes = spec.max_upload_bytes;
}

// An object URL keeps its file in memory until revoked: the previous preview's is released when it is replaced.
function setPreview(file) {
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = file ? URL.createObjectURL(file) : null;
  const preview = $("image-preview");
  if (state.previewUrl) preview.src = state.previewUrl;
  else preview.removeAttribute("src");
  preview.alt = file ? `chosen image: ${file.name}` : "";
  preview.hidden = !file;
  $("drop-hint").textContent = DROP_HINT;
  $("drop-hint").hidden = Boolean(file);
  $("clear-image").hidden = !file;
}

const DROP_HINT = "Drop an image here or click to choose one (optional)";

// A file this browser cannot display (a TIFF, a file of unknown type) may still be one the service reads: the zone
// names it instead of showing a broken image, and the search says whether the service could read it.
function previewFailed() {
  if (!state.file) return;
  $("image-preview").hidden = true;
  const hint = $("drop-hint");
  hint.textContent = `${state.file.name}: no preview (this browser cannot display it; the search will say whether ` +
    "the service can read it)";
  hint.hidden = false;
}

const FORM_ROOM_BYTES = 64 * 1024;  // a search form's parts besides the image: at most ~40 kB of text, ~2 kB else

function megabytes(bytes) { return (bytes / (1024 * 1024)).toFixed(1) + " MB"; }

function refuseFile(message) {
  setStatus(message + "; the image was not changed.", true);
  state.fileRefused = true;
  // the input would go on naming the refused file (to a screen reader, as the chosen one), and choosing it again
  // would fire no change event, so no message
  $("image-input").value = "";
}

function chooseFile(file) {
  if (!file) return;
  // A drop is easily a slip (a PDF aimed at the text box): a file the browser knows is no image keeps the chosen
  // one. A file of unknown type is taken; the service says if it cannot read it.
  if (file.type && !file.type.startsWith("image/")) {
    refuseFile(`${file.name} is not an image (${file.type})`);
    return;
  }
  // the service would refuse it with a 413 only after the whole upload; say so before sending anything. Its limit is
  // on the whole form, so room is kept for the rest of it (the text, up to 10,000 characters, and the fields).
  const maxImageBytes = state.maxUploadBytes && state.maxUploadBytes - FORM_ROOM_BYTES;
  if (maxImageBytes && file.size > maxImageBytes) {
    refuseFile(`${file.name} is ${megabytes(file.size)}; this service takes images up to ${megabytes(maxImageBytes)}`);
    return;
  }
  if (state.fileRefused) setStatus("");  // the refusal is answered by this choice
  state.fileRefused = false;
  state.file = file;
  setPreview(file);
}

function clearFile() {
  state.file = null;
  $("image-input").value = "";
  setPreview(null);
  $("image-input").focus();  // the focused button has just hidden itself; the keyboard stays at the image
}

function carriesFiles(e) { return e.dataTransfer && [...e.dataTransfer.types].includes("Files"); }

function setupDropZone() {
  const zone = $("drop-zone");
  $("image-input").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  $("clear-image").addEventListener("click", clearFile);
  $("image-preview").addEventListener("error", previewFailed);
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("dragover"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("dragover"); });
  }
  zone.addEventListener("drop", (e) => chooseFile(e.dataTransfer.files[0]));
  // A file dropped beside the zone would make the browser open it in place of the page, losing the form: the page
  // takes it as the image instead. Only file drags are caught, so dragging text into the text box still works.
  for (const type of ["dragover", "drop"]) {
    document.addEventListener(type, (e) => { if (carriesFiles(e)) e.preventDefault(); });
  }
  document.addEventListener("drop", (e) => {
    if (carriesFiles(e) && !zone.contains(e.target)) chooseFile(e.dataTransfer.files[0]);
  });
}

function buildQuery() {
  const data = new FormData();
  if (state.file) data.append("image", state.file, state.file.name);
  const text = $("text-input").value;
  if (text.trim()) data.append("text", text);
  for (const select of $("checklist").querySelectorAll("select")) {
    if (select.value) data.append(select.name, select.value);
  }
  // the number the browser read ("1e1" is 10 to it, not to the service); an empty box is the default
  const k = $("k-input").valueAsNumber;
  data.append("k", Number.isFinite(k) ? String(k) : "10");
  data.append("heatmaps", "true");
  return data;
}

async function runSearch(event) {
  event.preventDefault();
  const button = $("search-button");
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort("timeout"), SEARCH_TIMEOUT_S * 1000);
  state.search = controller;
  // a disabled button loses the keyboard focus to the page: it goes to Cancel meanwhile, and comes back after
  const keyboardHere = document.activeElement === button;
  button.disabled = true;
  $("cancel-search").hidden = false;
  if (keyboardHere) $("cancel-search").focus({ preventScroll: true });
  // The previous query's results must not stay on screen under the new query, above all if this one fails.
  $("results-section").hidden = true;
  $("compare").hidden = true;
  state.response = state.selected = null;
  setStatus("Searching…");
  state.fileRefused = false;
  try {
    const res = await fetch("/search", { method: "POST", body: buildQuery(), signal: controller.signal });
    const { body, text } = await readReply(res);
    if (!res.ok || body === null || !Array.isArray(body.results)) {
      setStatus(errorMessage(res, body, text), true);
      return;
    }
    state.response = body;
    renderResults(body);
    setStatus(`${body.results.length} case(s), ${body.query.mode} query, ${body.took_ms} ms`);
  } catch (err) {
    if (controller.signal.reason === "timeout") {
      setStatus(`The service did not answer within ${SEARCH_TIMEOUT_S} s. Try again later.`, true);
    } else if (controller.signal.aborted) {
      setStatus("Search cancelled.");
    } else {
      setStatus("Could not reach the service (is it running, and is the network up?).", true);
      console.warn("search failed:", err);
    }
  } finally {
    reveal($("status"));
    clearTimeout(timer);
    state.search = null;
    button.disabled = false;
    const cancelHadFocus = document.activeElement === $("cancel-search");
    $("cancel-search").hidden = true;
    if (cancelHadFocus || document.activeElement === document.body) button.focus({ preventScroll: true });
  }
}

// On a phone the status line and the results lie below the Search button, off screen: without this the button
// greys out for a moment and nothing else seems to happen. Nothing moves when the line is already in view.
function reveal(el) {
  const box = el.getBoundingClientRect();
  if (box.top < 0 || box.bottom > window.innerHeight) el.scrollIntoView({ behavior: scrolling(), block: "start" });
}

// Smooth scrolling, unless the user asked the system for less motion.
function scrolling() {
  return window.matchMedia("(prefers-reduced-motion: reduce)").matches ? "auto" : "smooth";
}

function fmt(x) { return Number(x).toFixed(3); }

// image_url already carries a query (?v=, the image's version, so a replaced image is not shown from the cache)
function sized(url, size) { return url + (url.includes("?") ? "&" : "?") + "size=" + size; }

function renderResults(body) {
  const grid = $("results");
  grid.replaceChildren();
  $("compare").hidden = true;
  $("results-section").hidden = false;
  $("results-meta").textContent = `(index ${body.index.version}, ${body.index.cases} cases)`;
  // the checklist phrases and the free text as the model read them (as the CLI prints them); none for an image alone
  $("query-text-value").textContent = body.query.text || "no text (image-only query)";
  for (const r of body.results) {
    const item = document.createElement("li");
    const card = document.createElement("button");
    card.type = "button";
    card.className = "result-card";
    card.dataset.caseId = r.case_id;
    const img = document.createElement("img");
    img.src = sized(r.image_url, 192);
    img.alt = "";  // the card's own words name the case: an alt would read its id twice
    img.loading = "lazy";
    img.addEventListener("error", () => thumbnailFailed(img));
    const title = document.createElement("div");
    title.className = "diagnosis cat-" + r.category.replace(/[^a-z]/g, "");
    title.textContent = `#${r.rank} ${r.diagnosis}`;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `${r.category} · case ${r.case_id}`;
    const scores = document.createElement("div");
    scores.className = "meta score";
    scores.textContent = `score ${fmt(r.score)} (local ${fmt(r.local)}, global ${fmt(r.global)})`;
    card.append(img, title, meta, scores);
    card.addEventListener("click", () => showCompare(r, card));
    item.append(card);
    grid.append(item);
  }
}

// A case whose image cannot be served (its file gone, the service stopped) says so, not a broken-image icon.
function thumbnailFailed(img) {
  const note = document.createElement("div");
  note.className = "thumb-missing";
  note.textContent = "image could not be loaded";
  img.replaceWith(note);
}

// Colour ramp for the overlay: dark purple (low attention) → blue → green → bright yellow (high), viridis's stops.
// It grows lighter all the way, so it reads in the right order without telling red from green.
function ramp(t) {
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.max(0, Math.min(1, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  return stops[i].map((c, j) => Math.round(c + f * (stops[i + 1][j] - c)));
}

// Draws a heatmap grid over its image, scaled smoothly. Colours span each map's own range (min → max); a map with
// almost no contrast (attention spread evenly) is drawn in one neutral colour rather than amplifying noise.
function drawHeatmap(canvas, grid) {
  const ctx = canvas.getContext("2d");
  const box = canvas.parentElement.getBoundingClientRect();
  canvas.width = Math.max(1, Math.round(box.width));
  canvas.height = Math.max(1, Math.round(box.height));
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!grid || !$("heatmap-toggle").checked) return;
  const h = grid.length, w = grid[0].length;
  const values = grid.flat();
  const lo = Math.min(...values), hi = Math.max(...values);
  const flat = hi - lo < 0.05;
  const small = document.createElement("canvas");
  small.width = w;
  small.height = h;
  const sctx = small.getContext("2d");
  const pixels = sctx.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const t = flat ? 0.5 : (grid[y][x] - lo) / (hi - lo);
      const [r, g, b] = ramp(t);
      const i = 4 * (y * w + x);
      pixels.data.set([r, g, b, Math.round(255 * (0.2 + 0.35 * t))], i);
    }
  }
  sctx.putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
}

function redrawHeatmaps() {
  if (!state.selected) return;
  const level = Number($("level-select").value);
  const q = state.response.query.heatmaps;
  drawHeatmap($("query-heat"), q ? q[level] : null);
  // a case's heatmap means nothing over another case's image, or over none: drawn once its own image has loaded
  const caseHeat = state.caseImageReady && state.selected.heatmaps ? state.selected.heatmaps[level] : null;
  drawHeatmap($("case-heat"), caseHeat);
}

// The new case's image replaces the previous one only once it has loaded: until then the box shows "loading", so one
// case's lesion is never shown under another case's caption and scores.
function showCaseImage(result) {
  const caseImg = $("compare-case");
  const note = $("case-image-note");
  const url = sized(result.image_url, 384);
  state.caseImageReady = false;
  caseImg.hidden = true;
  note.textContent = "loading the case image…";
  note.hidden = false;
  caseImg.onload = () => {
    if (state.selected !== result) return;
    state.caseImageReady = true;
    caseImg.hidden = false;
    note.hidden = true;
    redrawHeatmaps();
  };
  caseImg.onerror = () => {
    if (state.selected !== result) return;
    note.textContent = `the image of case ${result.case_id} could not be loaded`;
  };
  caseImg.alt = `case ${result.case_id}, ${result.diagnosis} (${result.category}), as the model saw it`;
  caseImg.removeAttribute("src");  // so that the same case clicked again loads (and says so) again
  caseImg.src = url;
}

function showCompare(result, card) {
  state.selected = result;
  // said, not only shown: a screen reader reads the chosen card as the current one
  for (const c of $("results").querySelectorAll(".result-card")) c.setAttribute("aria-current", String(c === card));
  const view = state.response.query.view;
  $("compare-query").hidden = !view;
  $("no-query-image").hidden = Boolean(view);
  if (view) $("compare-query").src = view;
  showCaseImage(result);
  $("compare-caption").textContent =
    `#${result.rank} case ${result.case_id}: ${result.diagnosis} (${result.category}), score ${fmt(result.score)}`;
  // column and row headers, and a caption: read cell by cell, each number says which part and level it is
  const table = $("parts-table");
  table.replaceChildren();
  table.createCaption().textContent = `Score parts of case ${result.case_id}`;
  const head = table.insertRow();
  for (const t of ["part", "level 1", "level 2", "level 3", "sum"]) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = t;
    head.append(th);
  }
  // A checkpoint with a frozen-backbone companion adds its own parts (companion_local_1, ...), and the card's local
  // and global are then both models' sums (as in the CLI and the JSON): the table names each model's rows and ends
  // with those two sums, so that "local" and "global" are the same figures on the card and in the table.
  const companion = "companion_local_1" in result.parts;
  const rows = companion
    ? [["main model: local", ["local"]], ["main model: global", ["global"]],
       ["companion: local", ["companion_local"]], ["companion: global", ["companion_global"]],
       ["local", ["local", "companion_local"], result.local], ["global", ["global", "companion_global"], result.global]]
    : [["local", ["local"]], ["global", ["global"]]];
  for (const [label, kinds, total] of rows) {
    const row = table.insertRow();
    if (total !== undefined) row.className = "total";
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = label;
    row.append(name);
    let sum = 0;
    for (let l = 1; l <= 3; l++) {
      const v = kinds.reduce((s, kind) => s + result.parts[`${kind}_${l}`], 0);
      sum += v;
      row.insertCell().textContent = fmt(v);
    }
    row.insertCell().textContent = fmt(total === undefined ? sum : total);  // a total: the card's own figure
  }
  $("compare").hidden = false;
  redrawHeatmaps();
  // the keyboard goes where the eyes go: otherwise Tab would walk through every remaining result card first
  $("compare-heading").focus({ preventScroll: true });
  $("compare").scrollIntoView({ behavior: scrolling(), block: "nearest" });
}

function closeCompare() {
  $("compare").hidden = true;
  const card = $("results").querySelector('.result-card[aria-current="true"]');
  if (card) card.focus();
}

function init() {
  setupDropZone();
  $("query-form").addEventListener("submit", runSearch);
  $("heatmap-toggle").addEventListener("change", redrawHeatmaps);
  $("level-select").addEventListener("change", redrawHeatmaps);
  $("close-compare").addEventListener("click", closeCompare);
  // Escape closes the comparison, as it closes panels elsewhere, when the focus is in it
  $("compare").addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("compare").hidden) closeCompare();
  });
  $("cancel-search").addEventListener("click", () => { if (state.search) state.search.abort("cancelled"); });
  window.addEventListener("resize", redrawHeatmaps);
  loadChecklist().catch((err) => setStatus("Could not load the checklist fields: " + (err.message || err), true));
}

init();
