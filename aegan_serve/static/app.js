// The latent explorer. Plain JavaScript, no dependencies: every request goes to the service's
// public HTTP API (/info, /generate, /decode, /reconstruct, /interpolate, /similar, /gallery/image)
// on the page's own origin.
"use strict";

const SLIDERS = 8; // directions shown in Edit
const SLIDER_RANGE = 3; // each slider moves the latent by up to this many standard deviations

const state = {
  info: null,
  directions: null, // {source, components: [[...]], scales: [...], labels: [...]}
  base: null, // latent of the selection, before slider moves
  current: null, // latent shown in Edit (base + slider moves)
  currentImage: null, // data URL of `current`
  label: "",
  ends: { a: null, b: null }, // {latent, image, label}
  decode: { pending: null, busy: false },
  downloads: [], // object URLs to release on the next interpolation
  neighbourUrls: [], // object URLs of the neighbours shown in Similar
};

const $ = (id) => document.getElementById(id);
const api = (name) => new URL(`../${name}`, document.baseURI).href;

// --- talking to the service -------------------------------------------------------------------

class ApiError extends Error {}

// A server with API keys on answers 401 without one: the page asks for the key and keeps it for
// this tab only (sessionStorage: gone when the tab closes, never sent to another origin).
const KEY_ITEM = "aegan-api-key";

function askForKey(refused) {
  const key = window.prompt(
    refused ? "That API key was refused. API key:" : "This server needs an API key. API key:"
  );
  if (key) sessionStorage.setItem(KEY_ITEM, key.trim());
  else sessionStorage.removeItem(KEY_ITEM);
  return Boolean(key);
}

async function call(name, body, as = "json") {
  const isForm = body instanceof FormData;
  let response;
  for (let attempt = 0; ; attempt++) {
    const headers = isForm ? {} : { "Content-Type": "application/json" };
    const key = sessionStorage.getItem(KEY_ITEM);
    if (key) headers.Authorization = `Bearer ${key}`;
    try {
      response = await fetch(api(name), {
        method: "POST",
        headers,
        body: isForm ? body : JSON.stringify(body ?? {}),
      });
    } catch (err) {
      throw new ApiError(`/${name}: the service did not answer (${err.message}).`);
    }
    if (response.status !== 401 || attempt >= 2) break;
    // Another call of the page may have asked for the key meanwhile: try the one it stored.
    const stored = sessionStorage.getItem(KEY_ITEM);
    if (stored && stored !== key) continue;
    if (!askForKey(Boolean(key))) break;
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const payload = await response.json();
      message = payload.error || (payload.detail || []).map((d) => d.msg).join("; ") || message;
    } catch (_) {
      // not JSON: keep the status line
    }
    throw new ApiError(`/${name} refused the request: ${message} (HTTP ${response.status})`);
  }
  return as === "blob" ? response.blob() : response.json();
}

function showError(err) {
  $("error-text").textContent = err instanceof ApiError ? err.message : `Unexpected problem: ${err.message || err}`;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// Run a user action: clear the old message, show a new one if the action fails.
function action(fn) {
  return async (event) => {
    if (event && event.preventDefault) event.preventDefault();
    clearError();
    try {
      await fn(event);
    } catch (err) {
      showError(err);
    }
  };
}

const png = (b64) => `data:image/png;base64,${b64}`;

// --- model and directions ---------------------------------------------------------------------

function describeModel(info) {
  const m = info.model;
  const shape = m.data_shape.join("×");
  const parts = [m.name, `${m.kind} ${shape}`, `latent ${m.latent_dim}`, info.runtime.provider.replace("ExecutionProvider", "")];
  if (m.kind === "image") {
    parts.push(m.directions ? `directions: PCA of ${m.directions.samples} training latents` : "directions: random (the bundle has none)");
  }
  return parts.join(" · ");
}

// Deterministic random orthonormal directions (Gram-Schmidt on Gaussian vectors), prior scale 1.
function randomDirections(dim, count, seed = 1) {
  let s = seed >>> 0;
  const uniform = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const gauss = () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform());
  const rows = [];
  while (rows.length < count) {
    let v = Array.from({ length: dim }, gauss);
    for (const r of rows) {
      const dot = r.reduce((acc, x, i) => acc + x * v[i], 0);
      v = v.map((x, i) => x - dot * r[i]);
    }
    const norm = Math.hypot(...v);
    if (norm > 1e-6) rows.push(v.map((x) => x / norm));
  }
  return rows;
}

function setUpDirections(model) {
  const count = Math.min(SLIDERS, model.latent_dim);
  const d = model.directions;
  if (d) {
    const k = Math.min(count, d.components.length);
    state.directions = {
      components: d.components.slice(0, k),
      scales: d.variances.slice(0, k).map(Math.sqrt),
      labels: d.variances.slice(0, k).map((v, i) => `PC${i + 1} · ${(100 * v / d.total_variance).toFixed(1)} %`),
    };
    $("directions-note").textContent =
      `Sliders move the latent along the ${k} leading principal components of the encoder's latents ` +
      `of ${d.data} (${d.samples} images), in standard deviations; the share of variance each explains is in its label.` +
      (d.variances[0] / d.total_variance < 1.5 / model.latent_dim
        ? ` Here the spectrum is nearly flat (${(100 / model.latent_dim).toFixed(1)} % each would be isotropic): no direction stands out much.`
        : "");
  } else {
    state.directions = {
      components: randomDirections(model.latent_dim, count),
      scales: Array(count).fill(1),
      labels: Array.from({ length: count }, (_, i) => `random ${i + 1}`),
    };
    $("directions-note").textContent =
      "This bundle has no latent directions, so the sliders use random orthonormal directions " +
      "(add principal directions with: aegan directions BUNDLE_DIR).";
  }
  const box = $("sliders");
  box.replaceChildren();
  state.directions.components.forEach((_, i) => {
    const label = document.createElement("label");
    label.className = "slider";
    const name = document.createElement("span");
    name.textContent = state.directions.labels[i];
    const input = document.createElement("input");
    Object.assign(input, { type: "range", min: -SLIDER_RANGE, max: SLIDER_RANGE, step: 0.1, value: 0, disabled: true });
    input.id = `direction-${i}`;
    const out = document.createElement("output");
    out.textContent = "0.0";
    input.addEventListener("input", () => {
      out.textContent = Number(input.value).toFixed(1);
      onSliders();
    });
    label.append(name, input, out);
    box.append(label);
  });
}

// --- Sample -----------------------------------------------------------------------------------

async function sample() {
  const n = Number($("count").value);
  const seed = Number($("seed").value);
  const truncation = Number($("truncation").value);
  const out = await call("generate", { n, seed, truncation });
  const grid = $("grid");
  grid.replaceChildren();
  out.images.forEach((b64, i) => {
    const img = document.createElement("img");
    img.src = png(b64);
    img.alt = `sample ${i + 1} of seed ${out.seed}`;
    img.className = "tile";
    img.tabIndex = 0;
    const pick = () => {
      grid.querySelectorAll(".tile.selected").forEach((t) => t.classList.remove("selected"));
      img.classList.add("selected");
      select(out.latents[i], img.src, `seed ${out.seed}, sample ${i + 1}`);
    };
    img.addEventListener("click", pick);
    img.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && pick());
    grid.append(img);
  });
}

// --- Edit -------------------------------------------------------------------------------------

function select(latent, image, label) {
  state.base = latent.slice();
  state.current = latent.slice();
  state.currentImage = image;
  state.label = label;
  document.querySelectorAll("#sliders input").forEach((s) => {
    s.value = 0;
    s.disabled = false;
    s.nextElementSibling.textContent = "0.0";
  });
  ["reset-sliders", "use-a", "use-b"].forEach((id) => ($(id).disabled = false));
  $("similar-selection").disabled = !state.info.gallery;
  const img = $("selected-image");
  img.src = image;
  img.hidden = false;
  $("selected-caption").textContent = label;
  $("decode-time").textContent = "";
}

function onSliders() {
  if (!state.base) return;
  const { components, scales } = state.directions;
  const z = state.base.slice();
  document.querySelectorAll("#sliders input").forEach((s, i) => {
    const step = Number(s.value) * scales[i];
    if (step !== 0) components[i].forEach((c, j) => (z[j] += step * c));
  });
  state.current = z;
  requestDecode(z);
}

// Only the newest slider position is decoded: while one /decode is in flight, later moves replace
// each other, so the image follows the slider without a backlog of stale requests.
function requestDecode(z) {
  state.decode.pending = z;
  if (!state.decode.busy) pumpDecode();
}

async function pumpDecode() {
  state.decode.busy = true;
  while (state.decode.pending) {
    const z = state.decode.pending;
    state.decode.pending = null;
    const started = performance.now();
    try {
      const out = await call("decode", { latents: [z] });
      state.currentImage = png(out.images[0]);
      $("selected-image").src = state.currentImage;
      const ms = performance.now() - started;
      $("decode-time").textContent = `/decode answered in ${ms.toFixed(0)} ms`;
      $("selected-caption").textContent = `${state.label}, edited`;
    } catch (err) {
      showError(err);
    }
  }
  state.decode.busy = false;
}

function resetSliders() {
  if (!state.base) return;
  document.querySelectorAll("#sliders input").forEach((s) => {
    s.value = 0;
    s.nextElementSibling.textContent = "0.0";
  });
  onSliders();
}

function useAs(which) {
  if (!state.current) return;
  state.ends[which] = { latent: state.current.slice(), image: state.currentImage, label: $("selected-caption").textContent };
  const img = $(`end-${which}`);
  img.src = state.currentImage;
  img.hidden = false;
  $(`end-${which}-caption`).textContent = `${which.toUpperCase()}: ${state.ends[which].label}`;
  $("interpolate-button").disabled = !(state.ends.a && state.ends.b);
}

// --- Upload -----------------------------------------------------------------------------------

async function upload(file) {
  if (!file) return;
  $("upload-result").hidden = true;
  $("psnr").textContent = `Reconstructing ${file.name}…`;
  const form = new FormData();
  form.append("images", file, file.name);
  let out;
  try {
    out = await call("reconstruct", form);
  } catch (err) {
    $("psnr").textContent = `${file.name} was not reconstructed: ${err.message}`;
    $("psnr").className = "bad";
    throw err;
  }
  $("psnr").className = "";
  await drawAsModelSees(file);
  $("upload-recon").src = png(out.images[0]);
  $("upload-result").hidden = false;
  $("psnr").textContent =
    `${file.name}: PSNR ${out.psnr[0].toFixed(2)} dB (MSE ${out.mse[0].toFixed(4)}, pixels in [0, 1]). ` +
    "Its latent is now the selection in Edit.";
  select(out.latents[0], png(out.images[0]), `reconstruction of ${file.name}`);
}

// The upload as the model takes it: centre-cropped to the model's aspect ratio, resized, flattened
// onto white and, for grey models, converted to luma (the service does the same in images.py;
// this drawing is for the eye, the PSNR is the service's).
async function drawAsModelSees(file) {
  const [channels, height, width] = state.info.model.data_shape;
  const canvas = $("upload-input");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch (_) {
    ctx.fillStyle = "#888";
    ctx.fillText("?", width / 2 - 3, height / 2 + 4);
    return; // the service read it, this browser cannot show it
  }
  const scale = Math.min(bitmap.width / width, bitmap.height / height);
  const sw = width * scale;
  const sh = height * scale;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, (bitmap.width - sw) / 2, (bitmap.height - sh) / 2, sw, sh, 0, 0, width, height);
  if (channels === 1) {
    const pixels = ctx.getImageData(0, 0, width, height);
    const p = pixels.data;
    for (let i = 0; i < p.length; i += 4) {
      const y = Math.round(0.299 * p[i] + 0.587 * p[i + 1] + 0.114 * p[i + 2]);
      p[i] = p[i + 1] = p[i + 2] = y;
    }
    ctx.putImageData(pixels, 0, 0);
  }
}

// --- Similar ----------------------------------------------------------------------------------

function describeGallery(gallery) {
  if (!gallery) {
    return "This server has no gallery to search. Encode a collection (aegan encode), index it " +
      "(aegan index) and start the server with AEGAN_GALLERY set to it.";
  }
  const search = gallery.kind === "exact" ? "exact search" : `approximate search (recall@10 ${gallery.recall_at_10})`;
  return `Gallery: ${gallery.size} images (${search}). Search with the selection in Edit, or with an image of your own; ` +
    "neighbours are shown decoded from their stored latents, nearest first, with the distance between the latents.";
}

// The k nearest gallery images of a query: {latents: [z]} or a FormData with the upload.
async function searchSimilar(query, what) {
  const k = Number($("similar-k").value);
  $("similar-status").textContent = `Searching for ${what}…`;
  $("similar-status").className = "";
  let out;
  if (query instanceof FormData) {
    query.append("k", String(k));
    out = await call("similar", query);
  } else {
    out = await call("similar", { ...query, k });
  }
  const neighbours = out.results[0];
  const pictures = await Promise.all(neighbours.map((n) => call("gallery/image", { id: n.id }, "blob")));
  state.neighbourUrls.forEach((u) => URL.revokeObjectURL(u));
  state.neighbourUrls = pictures.map((blob) => URL.createObjectURL(blob));
  const box = $("similar-results");
  box.replaceChildren();
  neighbours.forEach((n, i) => {
    const figure = document.createElement("figure");
    figure.className = "neighbour";
    const img = document.createElement("img");
    img.className = "thumb";
    img.src = state.neighbourUrls[i];
    img.alt = `neighbour ${i + 1}: ${n.id}`;
    const caption = document.createElement("figcaption");
    caption.textContent = `${n.id} · ${n.distance.toFixed(3)}`;
    figure.append(img, caption);
    box.append(figure);
  });
  $("similar-status").textContent = `${neighbours.length} nearest gallery images to ${what}.`;
}

async function similarToFile(file) {
  if (!file) return;
  const form = new FormData();
  form.append("images", file, file.name);
  try {
    await searchSimilar(form, file.name);
  } catch (err) {
    $("similar-status").textContent = `${file.name} was not searched: ${err.message}`;
    $("similar-status").className = "bad";
    throw err;
  }
}

// --- Interpolate ------------------------------------------------------------------------------

async function runInterpolation() {
  const { a, b } = state.ends;
  if (!a || !b) throw new ApiError("Choose A and B first (Edit: Use as A, Use as B).");
  const common = {
    latents: [a.latent, b.latent],
    steps: Number($("steps").value),
    method: $("method").value,
  };
  const [gif, strip] = await Promise.all([
    call("interpolate", { ...common, format: "gif", frame_ms: Number($("frame-ms").value) }, "blob"),
    call("interpolate", { ...common, format: "png" }, "blob"),
  ]);
  state.downloads.forEach((u) => URL.revokeObjectURL(u));
  const gifUrl = URL.createObjectURL(gif);
  const pngUrl = URL.createObjectURL(strip);
  state.downloads = [gifUrl, pngUrl];
  $("animation").src = gifUrl;
  $("strip").src = pngUrl;
  $("download-gif").href = gifUrl;
  $("download-png").href = pngUrl;
  $("interpolation").hidden = false;
}

// --- vector models ----------------------------------------------------------------------------

async function vectors() {
  const n = state.info.limits.AEGAN_MAX_N;
  const out = await call("generate", { n, seed: Number($("vector-seed").value) });
  const rows = out.vectors;
  const table = $("vector-table");
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  ["#", ...rows[0].map((_, j) => `x${j + 1}`)].forEach((t) => (head.insertCell().textContent = t));
  const body = table.createTBody();
  rows.slice(0, 16).forEach((v, i) => {
    const row = body.insertRow();
    row.insertCell().textContent = String(i + 1);
    v.forEach((x) => (row.insertCell().textContent = x.toFixed(3)));
  });
  const svg = $("vector-plot");
  svg.replaceChildren();
  if (rows[0].length < 2) return;
  const xs = rows.map((v) => v[0]);
  const ys = rows.map((v) => v[1]);
  const span = (a) => [Math.min(...a), Math.max(...a) + 1e-9];
  const [x0, x1] = span(xs);
  const [y0, y1] = span(ys);
  const ns = "http://www.w3.org/2000/svg";
  const frame = document.createElementNS(ns, "rect");
  Object.entries({ x: 10, y: 10, width: 340, height: 340, class: "frame" }).forEach(([k, v]) => frame.setAttribute(k, v));
  svg.append(frame);
  const text = (x, y, words, anchor = "start") => {
    const t = document.createElementNS(ns, "text");
    Object.entries({ x, y, "text-anchor": anchor }).forEach(([k, v]) => t.setAttribute(k, v));
    t.textContent = words;
    svg.append(t);
  };
  text(20, 374, x0.toFixed(2));
  text(340, 374, x1.toFixed(2), "end");
  text(180, 374, "x1", "middle");
  text(6, 340, y0.toFixed(2), "end");
  text(6, 24, y1.toFixed(2), "end");
  text(6, 184, "x2", "end");
  rows.forEach((v) => {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", 20 + 320 * (v[0] - x0) / (x1 - x0));
    dot.setAttribute("cy", 340 - 320 * (v[1] - y0) / (y1 - y0));
    dot.setAttribute("r", 3);
    svg.append(dot);
  });
}

// --- start ------------------------------------------------------------------------------------

function limitInputs(limits) {
  $("count").max = limits.AEGAN_MAX_N;
  $("count").value = Math.min(16, limits.AEGAN_MAX_N);
  $("steps").max = limits.AEGAN_MAX_STEPS;
  $("steps").value = Math.min(10, limits.AEGAN_MAX_STEPS);
}

async function start() {
  $("error-close").addEventListener("click", clearError);
  let info;
  try {
    info = await call("info");
  } catch (err) {
    $("model-line").textContent = "The service could not describe its model.";
    showError(err);
    return;
  }
  state.info = info;
  $("model-line").textContent = describeModel(info);
  document.body.dataset.kind = info.model.kind;
  if (info.model.kind !== "image") {
    $("vector-note").textContent =
      `${info.model.name} is a vector model: each sample is ${info.model.data_shape[0]} numbers, not an image, ` +
      "so sampling grids, editing, uploads and interpolation (which need an image model) are not shown. " +
      `Below: ${info.limits.AEGAN_MAX_N} vectors from /generate, plotted by their first two coordinates, the first 16 in the table.`;
    $("vector-ui").hidden = false;
    $("vector-form").addEventListener("submit", action(vectors));
    await action(vectors)();
    return;
  }
  limitInputs(info.limits);
  setUpDirections(info.model);
  $("image-ui").hidden = false;

  $("sample-form").addEventListener("submit", action(sample));
  $("new-seed").addEventListener("click", action(async () => {
    $("seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
    await sample();
  }));
  $("truncation").addEventListener("input", () => ($("truncation-value").textContent = Number($("truncation").value).toFixed(2)));
  $("reset-sliders").addEventListener("click", action(resetSliders));
  $("use-a").addEventListener("click", action(() => useAs("a")));
  $("use-b").addEventListener("click", action(() => useAs("b")));
  $("interpolate-form").addEventListener("submit", action(runInterpolation));
  $("similar-note").textContent = describeGallery(info.gallery);
  $("similar-file").disabled = !info.gallery;
  $("similar-form").addEventListener("submit", action(() => searchSimilar({ latents: [state.current] }, $("selected-caption").textContent)));
  $("similar-file").addEventListener("change", action(async () => {
    try {
      await similarToFile($("similar-file").files[0]);
    } finally {
      $("similar-file").value = "";
    }
  }));
  $("file-input").addEventListener("change", action(async () => {
    try {
      await upload($("file-input").files[0]);
    } finally {
      $("file-input").value = ""; // choosing the same file again uploads it again
    }
  }));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", action(async (e) => {
    zone.classList.remove("over");
    await upload(e.dataTransfer.files[0]);
  }));
  await action(sample)();
}

document.addEventListener("DOMContentLoaded", start);
