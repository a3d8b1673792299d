// LIMoE Serve's web page: classify images against labels and show how each was routed through
// the experts. A client of the public API only (GET /v1/models, POST /v1/classify with explain);
// it talks to no other host (the page's Content-Security-Policy says so too).

const API = { models: "/v1/models", classify: "/v1/classify" };
const SAMPLES = "/web/samples/";

const state = {
  model: null, // /v1/models' entry for the model the page classifies with (the picker's choice)
  models: [], // every model the server serves, at its current version
  images: [], // {name, file, url}: the images the next request sends
  labels: [], // committed label chips
  shown: null, // {images, answer, ms}: the answer on screen and the images it is about
  busy: false,
};

// -- small helpers ---------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

/** An element: h("li", {class: "row", text: "cat", onclick: f, style: {width: "5%"}}, ...children). */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "style") Object.assign(el.style, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
const sum = (values) => values.reduce((a, b) => a + b, 0);

function percent(score) {
  const p = score * 100;
  if (p >= 10) return `${p.toFixed(1)}%`;
  return p >= 0.01 ? `${p.toFixed(2)}%` : "<0.01%";
}

// Distinct colours for up to 32 experts: Tableau 10, then golden-angle hues at two lightnesses.
const TABLEAU = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                 "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

function expertColor(e) {
  if (e < TABLEAU.length) return TABLEAU[e];
  const hue = ((e - TABLEAU.length) * 137.508 + 15) % 360;
  return `hsl(${hue.toFixed(0)} 65% ${e % 2 ? 40 : 64}%)`;
}

/** "expert 0: 5, expert 3: 12; 4 dropped" for screen readers and tooltips. */
function describeCounts(counts, dropped) {
  const taken = counts.flatMap((n, e) => (n ? [`expert ${e}: ${n}`] : []));
  return `${taken.join(", ") || "no tokens"}${dropped ? `; ${dropped} dropped` : ""}`;
}

// -- the API ----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body, retryAfter = null) {
    super(body?.error ?? `HTTP ${status}`);
    this.status = status;
    this.code = body?.code ?? null;
    this.retryAfter = retryAfter;
  }
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The JSON answer of a request to this server; ApiError with the error body's words otherwise. */
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...options.headers } });
  } catch (e) {
    throw new ApiError(0, { error: `cannot reach the server (${e.message})`, code: "network" });
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body, response.headers.get("Retry-After"));
  return body;
}

const ERROR_TITLES = {
  0: "No connection",
  400: "Bad request",
  401: "API key needed",
  408: "Upload too slow",
  413: "Too large",
  415: "Unsupported media type",
  422: "The server cannot use this input",
  429: "The server is busy",
  500: "Server error",
  503: "Not ready",
  504: "No answer in time",
};

function advice(err) {
  if (err.status === 401) return "Enter a key in the API key field above, then try again.";
  if (err.status === 413) return "Choose a smaller image, or fewer images at once.";
  if (err.status === 429) return `Try again${err.retryAfter ? ` in ${err.retryAfter} s` : " shortly"}.`;
  if (err.status === 503) return "Try again in a few seconds.";
  return null;
}

/** An API error in words: status and title, the error body's message and code, and what to do. */
function showError(err) {
  const title = err.status ? `${err.status} ${ERROR_TITLES[err.status] ?? "Error"}` : ERROR_TITLES[0];
  renderError(title, err.message, err.code, advice(err));
  if (err.status === 401) showAuth(err.message);
}

function renderError(title, message, code = null, todo = null) {
  $("error").replaceChildren(...[
    h("strong", { text: `${title}: ` }),
    h("span", { class: "error-text", text: message }),
    code && h("span", { class: "error-code", text: ` (${code})` }),
    todo && h("span", { class: "error-advice", text: todo }),
  ].filter(Boolean));
}

const clearError = () => $("error").replaceChildren();

function setStatus(text) {
  $("status").textContent = text;
}

// -- the model and the API key ----------------------------------------------------------------------

async function loadModel() {
  try {
    const { models } = await api(API.models);
    state.models = models.filter((m) => m.current);
    const chosen = $("model-picker").value;
    state.model = state.models.find((m) => m.name === chosen) ?? state.models.find((m) => m.default) ?? state.models[0];
    renderPicker();
    renderModel(state.model);
    if (!state.model.ready) setTimeout(loadModel, 2000);
    return true;
  } catch (err) {
    if (err.status === 401) showAuth(err.message);
    else showError(err);
    return false;
  }
}

/** The model picker: one option per model served (the server's default first), shown when there are several. */
function renderPicker() {
  const picker = $("model-picker");
  const sorted = [...state.models].sort((a, b) => (b.default - a.default) || a.name.localeCompare(b.name));
  picker.replaceChildren(...sorted.map((m) =>
    h("option", { value: m.name, selected: m.name === state.model.name,
                  text: m.default ? `${m.name} (default)` : m.name })));
  $("model-picker-field").hidden = state.models.length < 2;
}

function pickModel() {
  state.model = state.models.find((m) => m.name === $("model-picker").value) ?? state.model;
  renderModel(state.model);
  setStatus(`Classifying with ${state.model.name} v${state.model.version}.`);
}

function renderModel(m) {
  const moe = m.manifest.moe ?? {};
  const layers = moe.layers?.length ?? 0;
  const routing = moe.inference_routing === "dropless"
    ? "dropless" : `capacity factor ${moe.eval_capacity_factor ?? "?"} (full experts drop tokens)`;
  const rows = [
    ["Model", `${m.name} v${m.version}`],
    ["Backend", m.backend],
    ["Device", m.device],
    ["Experts", layers ? `${plural(layers, "MoE layer")} × ${moe.num_experts}, top-${moe.top_k}` : "none (dense)"],
    layers ? ["Routing", routing] : null,
    ["Status", m.ready ? "ready" : "warming up…"],
  ];
  $("model-info").replaceChildren(...rows.filter(Boolean).map(([k, v]) =>
    h("div", {}, h("dt", { text: k }), h("dd", { text: v }))));
  $("templates").placeholder = (m.manifest.templates ?? []).join("\n");
  $("templates-hint").textContent = `Empty: the model's own ${plural(m.manifest.templates?.length ?? 0, "template")}.`;
}

function showAuth(message) {
  const panel = $("auth");
  const wasHidden = panel.hidden;
  panel.hidden = false;
  $("auth-message").textContent = $("api-key").value
    ? `The server refused this key: ${message}`
    : "This server requires an API key for its API.";
  if (wasHidden) $("api-key").focus();
}

async function useKey(event) {
  event.preventDefault();
  clearError();
  if (await loadModel()) $("auth-message").textContent = "Key accepted.";
}

// -- images: file input, drag and drop, paste, samples ----------------------------------------------

function addFiles(files, replace = false) {
  const added = [...files].map((file) => ({ name: file.name || "pasted image", file, url: URL.createObjectURL(file) }));
  const replaced = replace ? state.images : [];
  state.images = replace ? added : [...state.images, ...added];
  replaced.forEach(release);
  renderSelection();
}

/** Free an image's object URL once neither the selection nor the answer on screen shows it. */
function release(item) {
  if (!state.images.includes(item) && !state.shown?.images.includes(item)) URL.revokeObjectURL(item.url);
}

function removeImage(item) {
  state.images = state.images.filter((i) => i !== item);
  release(item);
  renderSelection();
  $("image-input").focus();
}

function renderSelection() {
  $("selection").replaceChildren(...state.images.map((item) => h("li", { class: "thumb" },
    h("img", { src: item.url, alt: "" }),
    h("span", { class: "thumb-name", text: item.name }),
    h("button", { type: "button", class: "remove", "aria-label": `Remove ${item.name}`, text: "×",
                  onclick: () => removeImage(item) }))));
}

function watchDrops() {
  const zone = $("drop-zone");
  document.addEventListener("dragover", (e) => {
    e.preventDefault(); // a drop anywhere adds the images instead of leaving the page
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) zone.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    if (e.dataTransfer?.files.length) addFiles(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files ?? [])].filter((f) => f.type.startsWith("image/"));
    if (!files.length) return; // text: pasted as usual
    e.preventDefault();
    addFiles(files);
  });
  $("image-input").addEventListener("change", (e) => {
    addFiles(e.target.files);
    e.target.value = ""; // choosing the same file again still fires "change"
  });
}

async function loadSamples() {
  let samples;
  try {
    samples = await api(`${SAMPLES}samples.json`);
  } catch {
    return; // the gallery is an extra; the page works without it
  }
  $("samples").replaceChildren(...samples.map((s) => h("li", {},
    h("button", { type: "button", class: "sample", onclick: () => classifySample(s) },
      h("img", { src: SAMPLES + s.file, alt: "", width: 64, height: 64 }),
      h("span", { text: s.label })))));
  if (!state.labels.length && !$("labels").value) addLabels(samples.map((s) => s.label));
}

async function classifySample(sample) {
  const response = await fetch(SAMPLES + sample.file).catch(() => null);
  if (!response?.ok) return renderError("Sample not loaded", `the server did not send ${sample.file}.`);
  const blob = await response.blob();
  addFiles([new File([blob], sample.file, { type: blob.type })], true);
  await classify();
}

// -- labels (chips) and templates ---------------------------------------------------------------------

const splitLabels = (text) => text.split(",").map((t) => t.trim()).filter(Boolean);

function addLabels(labels) {
  for (const label of labels) if (!state.labels.includes(label)) state.labels.push(label);
  renderChips();
}

function removeLabel(label) {
  state.labels = state.labels.filter((l) => l !== label);
  renderChips();
  $("labels").focus();
}

function renderChips() {
  $("label-chips").replaceChildren(...state.labels.map((label) => h("li", { class: "chip" },
    h("span", { text: label }),
    h("button", { type: "button", "aria-label": `Remove label ${label}`, text: "×",
                  onclick: () => removeLabel(label) }))));
}

/** Typing "a, b, c": every part before the last comma becomes a chip; the rest stays in the field. */
function onLabelsInput(e) {
  const field = e.target;
  if (!field.value.includes(",")) return;
  const parts = field.value.split(",");
  field.value = parts.pop().trimStart();
  addLabels(parts.map((p) => p.trim()).filter(Boolean));
}

function onLabelsKey(e) {
  const field = e.target;
  if (e.key === "Enter" && field.value.trim()) {
    e.preventDefault(); // a label, not a submission
    addLabels(splitLabels(field.value));
    field.value = "";
  } else if (e.key === "Backspace" && !field.value && state.labels.length) {
    state.labels.pop();
    renderChips();
  }
}

function labelsToSend() {
  const labels = [...state.labels];
  for (const label of splitLabels($("labels").value)) if (!labels.includes(label)) labels.push(label);
  return labels;
}

const templatesToSend = () => $("templates").value.split("\n").map((t) => t.trim()).filter(Boolean);

// -- classify ------------------------------------------------------------------------------------------

function setBusy(busy) {
  state.busy = busy;
  const button = $("classify");
  button.setAttribute("aria-disabled", String(busy));
  button.textContent = busy ? "Classifying…" : "Classify";
  $("results").setAttribute("aria-busy", String(busy));
}

async function classify() {
  if (state.busy) return;
  clearError();
  const labels = labelsToSend();
  const images = [...state.images];
  if (!images.length) return renderError("No image", "choose an image first, or click a sample.");
  if (!labels.length) return renderError("No labels", "enter at least one label.");
  const form = new FormData();
  for (const item of images) form.append("images", item.file, item.name);
  for (const label of labels) form.append("labels", label);
  for (const template of templatesToSend()) form.append("templates", template);
  form.append("explain", "true");
  if (state.model && !state.model.default) form.append("model", state.model.name);
  setBusy(true);
  setStatus(`Classifying ${plural(images.length, "image")}…`);
  const started = performance.now();
  try {
    const answer = await api(API.classify, { method: "POST", body: form });
    show({ images, answer, ms: performance.now() - started });
  } catch (err) {
    setStatus("");
    showError(err);
  } finally {
    setBusy(false);
  }
}

function show(shown) {
  const previous = state.shown;
  state.shown = shown;
  previous?.images.forEach(release);
  const failed = shown.answer.results.filter((r) => r.error).length;
  setStatus(`${plural(shown.images.length, "image")} classified in ${Math.round(shown.ms)} ms`
            + (failed ? ` (${failed} failed)` : "") + ".");
  renderResults(shown);
  renderRoutingPicker(shown);
}

// -- scores --------------------------------------------------------------------------------------------

function renderResults({ images, answer, ms }) {
  const summary = h("p", { class: "summary" },
    `${answer.model} v${answer.version} · ${plural(images.length, "image")} · `,
    h("span", { class: "timing", text: `${Math.round(ms)} ms` }));
  const cards = answer.results.map((result) => resultCard(images[result.index], result));
  $("results").replaceChildren(summary, h("div", { class: "result-cards" }, cards));
}

function resultCard(image, result) {
  const head = h("div", { class: "card-head" },
    h("img", { src: image.url, alt: "", class: "card-thumb" }),
    h("h3", { text: image.name }));
  if (result.error) {
    return h("article", { class: "result-card failed" }, head,
      h("p", { class: "item-error", text: `Not classified: ${result.error} (${result.code})` }));
  }
  return h("article", { class: "result-card" }, head,
    h("ol", { class: "scores" }, result.labels.map((s, i) => scoreRow(s, i === 0))));
}

function scoreRow({ label, score }, best) {
  return h("li", { class: best ? "result-row best" : "result-row" },
    h("span", { class: "label", text: label }),
    h("span", { class: "bar", "aria-hidden": "true" },
      h("span", { class: "fill", style: { width: `${(score * 100).toFixed(2)}%` } })),
    h("span", { class: "pct", text: percent(score) }));
}

// -- routing -------------------------------------------------------------------------------------------

function renderRoutingPicker(shown) {
  const routed = shown.answer.results.filter((r) => r.routing);
  const picker = $("routing-picker");
  if (routed.length < 2) {
    picker.replaceChildren();
  } else {
    const select = h("select", { id: "routing-image", onchange: (e) => renderRouting(shown, Number(e.target.value)) },
      routed.map((r) => h("option", { value: r.index, text: shown.images[r.index].name })));
    picker.replaceChildren(h("label", { for: "routing-image", text: "Image" }), select);
  }
  if (routed.length) renderRouting(shown, routed[0].index);
  else $("routing").replaceChildren(h("p", { class: "placeholder", text: "No image was classified." }));
}

function renderRouting(shown, index) {
  const { routing } = shown.answer.results[index];
  const prompts = shown.answer.label_routing ?? [];
  const promptDrops = prompts.some((l) => l.prompts.some((p) => p.routing.layers.some((x) => x.dropped)));
  const drops = promptDrops || routing.layers.some((layer) => layer.dropped);
  renderLegend(routing.num_experts, drops);
  const layers = routing.layers.map((layer, m) => routingLayer(layer, m, routing, shown.images[index], prompts));
  $("routing").replaceChildren(...(layers.length ? layers
    : [h("p", { class: "placeholder", text: "This model has no MoE layers." })]));
}

function renderLegend(numExperts, drops) {
  const items = Array.from({ length: numExperts }, (_, e) => h("li", {},
    h("span", { class: "swatch", "aria-hidden": "true", style: { background: expertColor(e) } }),
    `Expert ${e}`));
  if (drops) items.push(h("li", {}, h("span", { class: "swatch dropped", "aria-hidden": "true" }), "Dropped"));
  $("legend").replaceChildren(...items);
}

function routingLayer(layer, m, routing, image, prompts) {
  const title = `MoE layer ${m + 1} of ${routing.layers.length}`;
  return h("section", { class: "routing-layer", "aria-label": title },
    h("h3", {}, title, h("span", { class: "block", text: ` · block ${layer.layer}` })),
    figure(`${routing.grid}×${routing.grid} patches; ${layer.dropped} dropped`, patchMap(layer, routing.grid, image)),
    figure("Image tokens per expert", histogram(layer.tokens_per_expert, layer.dropped)),
    prompts.length ? figure("Label prompts' tokens per expert (all templates)", promptBars(prompts, m)) : null);
}

const figure = (caption, content) => h("figure", {}, content, h("figcaption", { text: caption }));

function patchMap(layer, grid, image) {
  const canvas = h("canvas", { width: 480, height: 480, class: "patch-map", role: "img",
    "aria-label": `Patches by expert: ${describeCounts(layer.tokens_per_expert, layer.dropped)}` });
  canvas.routing = { top1: layer.top1_expert, grid, image };
  loadImage(image).then(() => drawPatches(canvas));
  return canvas;
}

function loadImage(item) {
  if (!item.element) {
    item.element = new Image();
    item.element.src = item.url;
    item.loaded = item.element.decode().catch(() => null); // undecodable here: patches on white
  }
  return item.loaded;
}

/** The image as the model saw it (centre square on white), each patch tinted by its expert. */
function drawPatches(canvas) {
  const { top1, grid, image } = canvas.routing;
  const ctx = canvas.getContext("2d");
  const size = canvas.width;
  const cell = size / grid;
  const img = image.element;
  ctx.globalAlpha = 1;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, size, size);
  if (img.naturalWidth) {
    const side = Math.min(img.naturalWidth, img.naturalHeight);
    ctx.drawImage(img, (img.naturalWidth - side) / 2, (img.naturalHeight - side) / 2, side, side, 0, 0, size, size);
  }
  const tint = Number($("tint").value) / 100;
  top1.forEach((expert, t) => {
    const x = (t % grid) * cell;
    const y = Math.floor(t / grid) * cell;
    if (expert >= 0) {
      ctx.globalAlpha = tint;
      ctx.fillStyle = expertColor(expert);
      ctx.fillRect(x, y, cell, cell);
    } else {
      markDropped(ctx, x, y, cell, tint);
    }
  });
  ctx.globalAlpha = 1;
  ctx.strokeStyle = "rgba(255, 255, 255, 0.6)";
  ctx.lineWidth = 1;
  for (let i = 1; i < grid; i++) {
    ctx.beginPath();
    ctx.moveTo(i * cell, 0);
    ctx.lineTo(i * cell, size);
    ctx.moveTo(0, i * cell);
    ctx.lineTo(size, i * cell);
    ctx.stroke();
  }
}

/** A dropped patch: greyed and crossed out (as the legend's "Dropped" swatch), even with no tint. */
function markDropped(ctx, x, y, cell, tint) {
  ctx.globalAlpha = 0.6 * tint;
  ctx.fillStyle = "#3a3f47";
  ctx.fillRect(x, y, cell, cell);
  ctx.globalAlpha = 1;
  const pad = cell * 0.3;
  cross(ctx, x + pad, y + pad, cell - 2 * pad, "rgba(0, 0, 0, 0.6)", Math.max(3, cell / 8));
  cross(ctx, x + pad, y + pad, cell - 2 * pad, "#fff", Math.max(1.5, cell / 16));
}

function cross(ctx, x, y, side, color, width) {
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.lineCap = "round";
  ctx.beginPath();
  ctx.moveTo(x, y);
  ctx.lineTo(x + side, y + side);
  ctx.moveTo(x + side, y);
  ctx.lineTo(x, y + side);
  ctx.stroke();
}

function histogram(counts, dropped) {
  const max = Math.max(1, ...counts, dropped);
  const column = (n, label, title, color) => h("div", { class: "hist-col", title },
    h("span", { class: "hist-count", text: n }),
    h("span", { class: "hist-track" },
      h("span", { class: color ? "hist-bar" : "hist-bar dropped",
                  style: { height: `${(100 * n) / max}%`, background: color } })),
    h("span", { class: "hist-label", text: label }));
  const columns = counts.map((n, e) => column(n, String(e), `expert ${e}: ${n}`, expertColor(e)));
  if (dropped) columns.push(column(dropped, "✕", `dropped: ${dropped}`, null));
  return h("div", { class: counts.length > 16 ? "histogram dense" : "histogram", role: "img",
                    "aria-label": `Image tokens per expert: ${describeCounts(counts, dropped)}` }, columns);
}

/** One stacked bar per label: its prompts' tokens per expert in this layer, summed over templates. */
function promptBars(labelRouting, m) {
  return h("ul", { class: "prompt-bars" }, labelRouting.map(({ label, prompts }) => {
    const layers = prompts.map((p) => p.routing.layers[m]);
    const counts = layers[0].tokens_per_expert.map((_, e) => sum(layers.map((x) => x.tokens_per_expert[e])));
    const dropped = sum(layers.map((x) => x.dropped));
    const segments = counts.map((n, e) => (n ? h("span", { class: "seg", title: `expert ${e}: ${n}`,
      style: { flexGrow: n, background: expertColor(e) } }) : null));
    if (dropped) segments.push(h("span", { class: "seg dropped", title: `dropped: ${dropped}`,
                                           style: { flexGrow: dropped } }));
    return h("li", { class: "prompt-row" },
      h("span", { class: "prompt-label", text: label }),
      h("span", { class: "stack", role: "img", "aria-label": `${label}: ${describeCounts(counts, dropped)}` },
        segments));
  }));
}

function redrawPatches() {
  document.querySelectorAll("canvas.patch-map").forEach(drawPatches);
}

// -- start ---------------------------------------------------------------------------------------------

function start() {
  $("classify-form").addEventListener("submit", (e) => {
    e.preventDefault();
    classify();
  });
  $("auth-form").addEventListener("submit", useKey);
  $("model-picker").addEventListener("change", pickModel);
  $("labels").addEventListener("input", onLabelsInput);
  $("labels").addEventListener("keydown", onLabelsKey);
  $("tint").addEventListener("input", redrawPatches);
  watchDrops();
  loadModel();
  loadSamples();
}

start();
