// saliencylab workbench page: plain JavaScript, talks only to the server that served it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, result: null, methods: [], classesFor: null, busy: false };

// ---- the API, with the token when the server needs one ------------------------------------------
const token = (() => {
  const fromUrl = new URLSearchParams(location.search).get("token");
  if (fromUrl) { sessionStorage.setItem("saliencylab-token", fromUrl); history.replaceState(null, "", location.pathname); }
  return sessionStorage.getItem("saliencylab-token") || "";
})();

// images carry the HttpOnly cookie that the server sets on the first API call with the token
function withToken(url) { return url; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, { headers }));
  } catch (err) {
    throw new Error("the server did not answer (" + err.message + "); is `saliencylab serve` still running?");
  }
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    let msg = (body && body.error) || ("HTTP " + response.status);
    if (response.status === 503) msg += " (the model is busy; retry in " + (response.headers.get("Retry-After") || "a few") + " s)";
    throw new Error(msg);
  }
  return body;
}

const pct = (v, digits = 0) => (v === null || v === undefined ? "n/a" : (100 * v).toFixed(digits) + "%");

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

// ---- status and progress -------------------------------------------------------------------------
function progress(prefix, on, text) {
  $(prefix === "teach" ? "teach-progress" : "progress").hidden = !on;
  $(prefix === "teach" ? "teach-status" : "status-text").textContent = text;
}

function showError(prefix, message) {
  const box = $(prefix === "teach" ? "teach-error" : "error");
  box.textContent = message || "";
  box.hidden = !message;
}

function ticking(prefix, label) {
  const t0 = performance.now();
  progress(prefix, true, label + "…");
  const timer = setInterval(() => progress(prefix, true, label + "… " + ((performance.now() - t0) / 1000).toFixed(0) + " s"), 1000);
  return () => { clearInterval(timer); return (performance.now() - t0) / 1000; };
}

// ---- tabs ------------------------------------------------------------------------------------------
function setupTabs() {
  const tabs = [$("tab-explain"), $("tab-teach")];
  const select = (tab) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (tab.id === "tab-teach" && teach.exercises.length) {
      fillExercises();
      if ($("exercise").value === OWN) startExercise();  // the Explain tab's image may have changed
    }
    tab.focus();
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
        e.preventDefault();
        select(tabs[(i + (e.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length]);
      }
    });
  });
}

// ---- catalogue -------------------------------------------------------------------------------------
async function loadCatalogue() {
  const [models, methods] = await Promise.all([api("/api/models"), api("/api/methods")]);
  for (const select of [$("model"), $("teach-model")]) {
    select.replaceChildren(...models.models.map((m) => el("option", { value: m.label, text: m.label })));
    select.value = models.default;
  }
  state.methods = methods.methods;
  setOpacity(methods.display.alpha);  // the CLI's --alpha default (render.maps.DEFAULT_ALPHA)
  const box = $("methods");
  let family = null;
  for (const m of methods.methods) {
    if (m.family !== family) { family = m.family; box.append(el("div", { class: "family", text: family })); }
    const input = el("input", { type: "checkbox", name: "methods", value: m.name, id: "m-" + m.name });
    input.checked = m.name === "gradcam";
    input.addEventListener("change", renderOptions);
    box.append(el("label", { for: "m-" + m.name, title: m.paper }, input, m.name));
  }
  $("teach-method").replaceChildren(...methods.methods.map((m) => el("option", { value: m.name, text: m.name })));
  $("teach-method").value = "gradcam";
  renderOptions();
  loadClasses();
}

function chosenMethods() {
  return Array.from(document.querySelectorAll('#methods input[type="checkbox"]:checked')).map((i) => i.value);
}

function renderOptions() {
  const box = $("options");
  const keep = {};
  box.querySelectorAll("input").forEach((i) => { keep[i.id] = i.value; });
  box.replaceChildren();
  for (const name of chosenMethods()) {
    const spec = state.methods.find((m) => m.name === name);
    if (!spec || !spec.options.length) continue;
    const group = el("div", { class: "opt-group" }, el("h3", { text: name }));
    for (const o of spec.options) {
      const id = "opt-" + name + "-" + o.name;
      const input = el("input", { id, "data-method": name, "data-option": o.name,
        "data-default": o.default === null ? "" : String(o.default), placeholder: o.default === null ? "default" : "" });
      input.value = id in keep ? keep[id] : (o.default === null ? "" : String(o.default));
      group.append(el("div", { class: "row" }, el("label", { for: id, text: o.name }), input));
    }
    box.append(group);
  }
  if (!box.children.length) box.append(el("p", { class: "help", text: "The chosen methods have no options." }));
}

function optionPairs() {
  const pairs = [];
  $("options").querySelectorAll("input").forEach((i) => {
    const v = i.value.trim();
    if (v !== "" && v !== i.dataset.default) pairs.push(i.dataset.method + "." + i.dataset.option + "=" + v);
  });
  return pairs;
}

async function loadClasses() {
  const model = $("model").value;
  if (state.classesFor === model) return;
  state.classesFor = model;
  try {
    const info = await api("/api/classes?model=" + encodeURIComponent(model));
    const names = ["predicted"].concat(info.binary ? ["positive", "negative"] : [], info.classes);
    $("classes").replaceChildren(...names.map((c) => el("option", { value: c })));
  } catch (err) { showError("explain", err.message); }
}

// ---- choosing a file ---------------------------------------------------------------------------------
function isDicomName(name) { return /\.(dcm|dicom)$/i.test(name); }

async function isDicom(file) {
  if (isDicomName(file.name)) return true;
  const head = new Uint8Array(await file.slice(128, 132).arrayBuffer());
  return String.fromCharCode(...head) === "DICM";
}

async function chooseFile(file) {
  if (!file) return;
  state.file = file;
  state.result = null;
  $("file-name").textContent = file.name + " (" + (file.size / 1024).toFixed(0) + " KB)";
  $("window-row").hidden = !(await isDicom(file));
  if ($("window-row").hidden) $("window").value = "file";
  $("run").disabled = false;
  await showPreview();
}

async function showPreview() {
  showError("explain", "");
  const form = new FormData();
  form.append("image", state.file);
  form.append("window", $("window").value);
  const done = ticking("explain", "Reading the image");
  try {
    const p = await api("/api/preview", { method: "POST", body: form });
    clearResults(p.size);
    const img = $("preview");
    img.src = p.png;
    img.hidden = false;
    const note = p.decoded.window ? " · " + p.decoded.window : "";
    progress("explain", false, p.filename + ": " + p.size[1] + "×" + p.size[0] + " " + p.decoded.format + note);
  } catch (err) {
    progress("explain", false, "Could not read the file.");
    showError("explain", err.message);
  } finally { done(); }
}

function setupDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); chooseFile(e.dataTransfer.files[0]); });
  $("window").addEventListener("change", () => { if (state.file) showPreview(); });
}

// ---- results -------------------------------------------------------------------------------------------
function aspectOf(size) { return size ? String(size[1] / size[0]) : "1"; }

function clearResults(size) {
  const figs = $("figures");
  figs.querySelectorAll(".fig.method").forEach((f) => f.remove());
  $("fig-image").querySelector(".frame").style.setProperty("--aspect", aspectOf(size));
  $("top5").hidden = true;
  $("loc").hidden = true;
  $("downloads").hidden = true;
}

function displayQuery() {
  const q = new URLSearchParams({ sign: $("sign").value, smooth: $("smooth").value || "0", normalise: $("normalise").value,
    alpha: $("opacity").value });
  if ($("cmap").value) q.set("cmap", $("cmap").value);
  return q.toString();
}

function withDisplay(url) { return withToken(url.split("?")[0] + "?" + displayQuery()); }

function placeholders(methods, size) {
  const figs = $("figures");
  figs.querySelectorAll(".fig.method").forEach((f) => f.remove());
  for (const name of methods) {
    const frame = el("div", { class: "frame" });
    frame.style.setProperty("--aspect", aspectOf(size));
    const fig = el("figure", { class: "fig method loading", "data-method": name }, frame,
      el("figcaption", {}, el("span", { text: name }), el("span", { class: "secs", text: "computing…" })));
    figs.append(fig);
  }
}

function showResult(r) {
  state.result = r;
  for (const [name, info] of Object.entries(r.methods)) {
    const fig = document.querySelector('.fig.method[data-method="' + name + '"]');
    const frame = fig.querySelector(".frame");
    frame.replaceChildren(el("img", { src: withToken(r.image.url), alt: "" }),
      el("img", { class: "heat", src: withDisplay(info.heat), alt: name + " saliency over the image", "data-heat": name }));
    fig.classList.remove("loading");
    fig.querySelector(".secs").textContent = info.seconds.toFixed(2) + " s";
  }
  const tbody = $("top5").querySelector("tbody");
  tbody.replaceChildren(...r.top.map((t) => el("tr", { "data-index": t.index },
    el("td", { text: String(t.rank) }), el("td", { text: t.class }), el("td", { class: "num", text: pct(t.probability, 1) }))));
  $("top5").hidden = false;
  renderLocalisation(r);
  renderDownloads();
  const secs = Object.entries(r.seconds).map(([k, v]) => k + " " + v.toFixed(2) + " s").join(", ");
  progress("explain", false, "Target: " + r.target.class + " (" + pct(r.target.probability, 1) + "). " + secs + ".");
}

function renderLocalisation(r) {
  const tbody = $("loc").querySelector("tbody");
  tbody.replaceChildren();
  if (!r.localisation) { $("loc").hidden = true; return; }
  for (const [method, loc] of Object.entries(r.localisation)) {
    for (const region of ["lungs", "border"]) {
      if (!loc[region]) continue;
      const v = loc[region];
      tbody.append(el("tr", { "data-method": method, "data-region": region }, el("td", { text: method }),
        el("td", { text: region === "border" ? "image border (10%)" : region }),
        el("td", { class: "num", text: pct(v.mass) }), el("td", { class: "num", text: pct(v.chance) }),
        el("td", { text: v.reading })));
    }
  }
  $("loc").hidden = false;
}

function renderDownloads() {
  const r = state.result;
  if (!r) return;
  $("dl-zip").href = withDisplay(r.downloads.maps_zip);
  $("dl-settings").href = withDisplay(r.downloads.settings);
  $("dl-npy").replaceChildren("Raw maps (float32 .npy, original size): ",
    ...Object.entries(r.methods).flatMap(([name, info], i) =>
      [i ? " · " : "", el("a", { href: withToken(info.npy), download: name + ".npy", text: name })]));
  $("cli").textContent = r.settings.command;
  $("downloads").hidden = false;
}

function redrawDisplay() {
  const smooth = parseFloat($("smooth").value);
  if (!(smooth >= 0 && smooth <= 0.5)) { showError("explain", "Smoothing: use a fraction between 0 and 0.5."); return; }
  showError("explain", "");
  if (!state.result) return;
  document.querySelectorAll("img[data-heat]").forEach((img) => {
    img.src = withDisplay(state.result.methods[img.dataset.heat].heat);
  });
  refreshCommand();
}

async function refreshCommand() {
  if (!state.result) return;
  renderDownloads();
  try {
    const s = await api(withDisplay(state.result.downloads.settings));
    $("cli").textContent = s.command;
  } catch (_) { /* the links still work */ }
}

async function runExplain(e) {
  e.preventDefault();
  if (!state.file || state.busy) return;
  const methods = chosenMethods();
  if (!methods.length) { showError("explain", "Choose at least one method."); return; }
  showError("explain", "");
  const form = new FormData();
  form.append("image", state.file);
  form.append("model", $("model").value);
  form.append("methods", methods.join(","));
  form.append("target", $("target").value.trim() || "predicted");
  for (const pair of optionPairs()) form.append("set", pair);
  for (const k of ["sign", "smooth", "normalise", "window"]) form.append(k, $(k).value);
  if ($("cmap").value) form.append("cmap", $("cmap").value);
  form.append("alpha", $("opacity").value);
  if ($("lung-mask").files[0]) form.append("lung_mask", $("lung-mask").files[0]);
  const size = state.result ? state.result.image.size : null;
  placeholders(methods, size || previewSize());
  setBusy(true);
  const done = ticking("explain", "Computing " + methods.join(", "));
  try {
    showResult(await api("/api/explain", { method: "POST", body: form }));
  } catch (err) {
    document.querySelectorAll(".fig.method").forEach((f) => f.remove());
    progress("explain", false, "No result.");
    showError("explain", err.message);
  } finally { done(); setBusy(false); }
}

function previewSize() {
  const img = $("preview");
  return img.naturalWidth ? [img.naturalHeight, img.naturalWidth] : null;
}

async function runClassify() {
  if (!state.file || state.busy) return;
  showError("explain", "");
  const form = new FormData();
  form.append("image", state.file);
  form.append("model", $("model").value);
  form.append("window", $("window").value);
  setBusy(true);
  const done = ticking("explain", "Classifying");
  try {
    const r = await api("/api/classify", { method: "POST", body: form });
    const tbody = $("top5").querySelector("tbody");
    tbody.replaceChildren(...r.top.map((t) => el("tr", { "data-index": t.index },
      el("td", { text: String(t.rank) }), el("td", { text: t.class }), el("td", { class: "num", text: pct(t.probability, 1) }))));
    $("top5").hidden = false;
    progress("explain", false, "Top class: " + r.top[0].class + " (" + pct(r.top[0].probability, 1) + ").");
  } catch (err) {
    progress("explain", false, "No result.");
    showError("explain", err.message);
  } finally { done(); setBusy(false); }
}

function setBusy(on) {
  state.busy = on;
  $("run").disabled = on || !state.file;
  $("classify").disabled = on;
}

// ---- teaching mode -----------------------------------------------------------------------------------
const teach = { mask: null, marks: null, cursor: null, drawing: false, exercises: [] };

async function loadExercises() {
  const list = await api("/api/teaching/exercises");
  teach.exercises = list.exercises;
  fillExercises();
  $("exercise").addEventListener("change", startExercise);
  startExercise();
}

const OWN = "own-image";

function fillExercises() {
  const keep = $("exercise").value;
  const options = teach.exercises.map((x) => el("option", { value: x.id, text: x.title }));
  if (state.file && $("preview").naturalWidth) {
    options.push(el("option", { value: OWN, text: "Your image: " + state.file.name +
      ($("lung-mask").files[0] ? " (with its lung mask)" : "") }));
  }
  $("exercise").replaceChildren(...options);
  if (Array.from($("exercise").options).some((o) => o.value === keep)) $("exercise").value = keep;
}

function startExercise() {
  const own = $("exercise").value === OWN;
  const ex = own ? { image: $("preview").src, size: [$("preview").naturalHeight, $("preview").naturalWidth] }
    : teach.exercises.find((x) => x.id === $("exercise").value);
  const canvas = $("teach-canvas");
  canvas.width = ex.size[1];
  canvas.height = ex.size[0];
  for (const frame of document.querySelectorAll("#panel-teach .frame")) frame.style.setProperty("--aspect", aspectOf(ex.size));
  for (const key of ["mask", "marks"]) {
    teach[key] = document.createElement("canvas");
    teach[key].width = canvas.width;
    teach[key].height = canvas.height;
  }
  const m = teach.mask.getContext("2d");
  m.fillStyle = "#000";
  m.fillRect(0, 0, canvas.width, canvas.height);
  teach.cursor = null;
  $("teach-img").src = withToken(ex.image);
  for (const id of ["teach-base", "teach-heat", "teach-lungs", "teach-lesions", "teach-marker", "teach-student"]) $(id).hidden = true;
  $("teach-table").hidden = true;
  $("teach-reading").replaceChildren();
  $("teach-go").disabled = true;
  showError("teach", "");
  progress("teach", false, "Mark where you would look.");
  redrawCanvas();
}

function paint(x, y) {
  const r = Number($("brush").value);
  for (const [key, colour] of [["mask", "#fff"], ["marks", "rgba(60, 255, 120, 0.45)"]]) {
    const ctx = teach[key].getContext("2d");
    ctx.fillStyle = colour;
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fill();
  }
  $("teach-go").disabled = false;
  redrawCanvas();
}

function redrawCanvas() {
  const canvas = $("teach-canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (teach.marks) ctx.drawImage(teach.marks, 0, 0);
  if (teach.cursor) {
    const [x, y] = teach.cursor;
    ctx.strokeStyle = "#ffbf47";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.arc(x, y, Number($("brush").value), 0, 2 * Math.PI);
    ctx.moveTo(x - 6, y); ctx.lineTo(x + 6, y); ctx.moveTo(x, y - 6); ctx.lineTo(x, y + 6);
    ctx.stroke();
  }
}

function canvasPoint(e) {
  const canvas = $("teach-canvas");
  const box = canvas.getBoundingClientRect();
  return [(e.clientX - box.left) * canvas.width / box.width, (e.clientY - box.top) * canvas.height / box.height];
}

function setupCanvas() {
  const canvas = $("teach-canvas");
  canvas.addEventListener("pointerdown", (e) => { teach.drawing = true; canvas.setPointerCapture(e.pointerId); paint(...canvasPoint(e)); });
  canvas.addEventListener("pointermove", (e) => { if (teach.drawing) paint(...canvasPoint(e)); });
  for (const ev of ["pointerup", "pointercancel"]) canvas.addEventListener(ev, () => { teach.drawing = false; });
  canvas.addEventListener("focus", () => { teach.cursor = teach.cursor || [canvas.width / 2, canvas.height / 2]; redrawCanvas(); });
  canvas.addEventListener("blur", () => { teach.cursor = null; redrawCanvas(); });
  canvas.addEventListener("keydown", (e) => {
    const step = e.shiftKey ? 16 : 4;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (moves[e.key]) {
      e.preventDefault();
      const [dx, dy] = moves[e.key];
      teach.cursor = [Math.min(canvas.width, Math.max(0, teach.cursor[0] + dx)),
        Math.min(canvas.height, Math.max(0, teach.cursor[1] + dy))];
      redrawCanvas();
    } else if (e.key === " " || e.key === "Enter") {
      e.preventDefault();
      paint(...teach.cursor);
    }
  });
  $("brush").addEventListener("input", () => { $("brush-value").textContent = $("brush").value; redrawCanvas(); });
  $("teach-clear").addEventListener("click", startExercise);
  $("teach-go").addEventListener("click", runAttempt);
}

async function runAttempt() {
  showError("teach", "");
  const blob = await new Promise((resolve) => teach.mask.toBlob(resolve, "image/png"));
  const form = new FormData();
  form.append("region", blob, "region.png");
  if ($("exercise").value === OWN) {
    form.append("image", state.file);
    form.append("window", $("window").value);
    if ($("lung-mask").files[0]) form.append("lung_mask", $("lung-mask").files[0]);
  } else {
    form.append("exercise", $("exercise").value);
  }
  form.append("model", $("teach-model").value);
  form.append("method", $("teach-method").value);
  $("teach-go").disabled = true;
  const done = ticking("teach", "Asking the model");
  try {
    const r = await api("/api/teaching/attempt", { method: "POST", body: form });
    showAttempt(r);
  } catch (err) {
    progress("teach", false, "No result.");
    showError("teach", err.message);
  } finally { done(); $("teach-go").disabled = false; }
}

function showAttempt(r) {
  const t = r.teaching;
  $("teach-base").src = withToken(r.image.url);
  $("teach-heat").src = withToken(r.methods[t.method].heat);
  for (const kind of ["lungs", "lesions", "marker", "student"]) {
    const img = $("teach-" + kind);
    img.hidden = !r.masks[kind];
    if (r.masks[kind]) img.src = withToken(r.masks[kind]);
  }
  $("teach-base").hidden = false;
  $("teach-heat").hidden = false;
  const names = { student: "your marks", lungs: "lungs", lesions: "lesions (the answer)", marker: "'L' marker", border: "image border" };
  const tbody = $("teach-table").querySelector("tbody");
  tbody.replaceChildren();
  for (const key of ["student", "lungs", "lesions", "marker", "border"]) {
    const v = t.localisation[key];
    if (!v) continue;
    tbody.append(el("tr", { "data-region": key }, el("td", { text: names[key] }), el("td", { class: "num", text: pct(v.mass) }),
      el("td", { class: "num", text: pct(v.chance) }), el("td", { text: v.reading })));
  }
  $("teach-table").hidden = false;
  const lines = t.reading.slice();
  const s = t.student;
  if (s.lesion_covered !== null) lines.unshift("Your marks cover " + pct(s.lesion_covered) + " of the lesions (Dice overlap " + s.dice.toFixed(2) + ").");
  else lines.unshift(s.note);
  $("teach-reading").replaceChildren(...lines.map((line) => el("li", { text: line })));
  progress("teach", false, "The model predicts " + r.target.class + " (" + pct(r.target.probability, 1) + ").");
}

function setOpacity(value) {
  $("opacity").value = value;
  document.documentElement.style.setProperty("--opacity", $("opacity").value);
  $("opacity-value").textContent = Number($("opacity").value).toFixed(2);
}

// ---- start -------------------------------------------------------------------------------------------------
function start() {
  setupTabs();
  setupDrop();
  setupCanvas();
  $("explain-form").addEventListener("submit", runExplain);
  $("classify").addEventListener("click", runClassify);
  $("model").addEventListener("change", loadClasses);
  $("opacity").addEventListener("input", () => setOpacity($("opacity").value));
  $("opacity").addEventListener("change", () => { if (state.result) renderDownloads(); refreshCommand(); });
  for (const id of ["cmap", "sign", "normalise", "smooth"]) $(id).addEventListener("change", redrawDisplay);
  Promise.all([loadCatalogue(), loadExercises()]).catch((err) => showError("explain", err.message));
}

document.addEventListener("DOMContentLoaded", start);
