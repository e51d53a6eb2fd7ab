// The page at /: plain JavaScript, no framework, no build step, nothing from another origin.
// It calls the public API any client would (see /docs): /v2/repository/index for the models,
// /v1/models for the card, /v1/classify for an image, /v1/cost for the cost report.

import { costChart } from "/static/cost_chart.js";
import {
  el,
  fmtCompact,
  fmtDate,
  fmtList,
  fmtPct,
  fmtShare,
  integer,
} from "/static/format.js";

const $ = (id) => document.getElementById(id);
const MAX_LABELS = 60;

const state = {
  model: null, // {name, version} picked in the model picker; null = the server's default
  info: null, // GET /v1/models
  cost: null, // GET /v1/cost (with .profile once measured)
  lastFile: null, // re-sent when "labels to show" changes
  previewUrl: null,
  retryTimer: null,
};

// ------------------------------------------------------------------------------- API calls

class ApiError extends Error {
  constructor(status, code, detail, retryAfter) {
    super(detail);
    this.status = status; // 0: no answer at all
    this.code = code;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(0, "network", `cannot reach the server (${err.message})`, null);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    // /v1 errors are {"error": code, "detail": sentence}; the OIP ones {"error": sentence}.
    const detail = (body && (body.detail || body.error)) || text || response.statusText;
    const code = body && body.detail ? body.error : `http_${response.status}`;
    const retryAfter = Number(response.headers.get("Retry-After")) || null;
    throw new ApiError(response.status, code, String(detail), retryAfter);
  }
  return body;
}

/** `path` with `params`, plus model and version when one was picked (never otherwise). */
function withModel(path, params = {}) {
  const query = new URLSearchParams(params);
  if (state.model) {
    query.set("model", state.model.name);
    if (state.model.version) query.set("version", state.model.version);
  }
  const q = query.toString();
  return q ? `${path}?${q}` : path;
}

// ------------------------------------------------------------------------------- page state

function setStatus(kind, text) {
  const status = $("status");
  status.className = `status status-${kind}`;
  status.textContent = text;
}

function showBanner(text) {
  $("banner").textContent = text;
  $("banner").hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

function showError(id, text) {
  $(id).textContent = text;
  $(id).hidden = false;
}

async function loadConfig() {
  try {
    const config = await api("/ui/config");
    if (config.dashboard_url) {
      $("dashboard-link").href = config.dashboard_url;
      $("dashboard-link").hidden = false;
    }
    if (!config.docs_url) $("docs-link").hidden = true;
    else $("docs-link").href = config.docs_url;
    $("footer-version").textContent = `sepconv-serve ${config.version}`;
  } catch {
    // The page works without it: only the dashboard link stays hidden.
  }
}

/** The picker lists the READY models of the repository index, when there is a choice. */
async function loadPicker() {
  let entries = [];
  try {
    entries = await api("/v2/repository/index", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ready: true }),
    });
  } catch {
    entries = [];
  }
  const ready = (Array.isArray(entries) ? entries : []).filter((e) => e.state === "READY");
  const select = $("model-select");
  if (ready.length < 2) {
    $("model-picker").hidden = true;
    state.model = null;
    return;
  }
  const previous = select.value;
  const options = ready.map((e) => {
    const text = e.version ? `${e.name} · v${e.version}` : e.name;
    return new Option(text, JSON.stringify([e.name, e.version || ""]));
  });
  select.replaceChildren(new Option("Default model", ""), ...options);
  select.value = [...select.options].some((o) => o.value === previous) ? previous : "";
  state.model = pickedModel();
  $("model-picker").hidden = false;
}

function pickedModel() {
  const value = $("model-select").value;
  if (!value) return null;
  const [name, version] = JSON.parse(value);
  return { name, version };
}

/** Picker, card and cost report; while the server is not ready, says so and tries again. */
async function loadAll() {
  clearTimeout(state.retryTimer);
  try {
    await loadPicker();
    await loadModel();
    hideBanner();
  } catch (err) {
    if (err.status === 503 || err.status === 0) {
      const wait = Math.max(1, err.retryAfter || 2);
      const what = err.status === 503 ? "The server is not ready (503)" : "No answer";
      setStatus("wait", "not ready");
      showBanner(`${what}: ${err.detail}. Trying again in ${wait} s.`);
      state.retryTimer = setTimeout(loadAll, wait * 1000);
    } else {
      setStatus("down", "error");
      showBanner(`Cannot describe the model (${err.status}): ${err.detail}`);
    }
  }
}

async function loadModel() {
  const info = await api(withModel("/v1/models"));
  state.info = info;
  renderModel(info);
  setStatus("ready", "ready");
  $("profile-button").disabled = false;
  await loadCost();
}

// ------------------------------------------------------------------------------- model card

function facts(list, rows) {
  list.replaceChildren(
    ...rows.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: value })]),
  );
}

function renderModel(info) {
  const opt = info.optimization;
  $("model-id").textContent = `${info.name} · v${info.version}`;
  const rows = [
    ["Name", info.name],
    ["Version", info.version],
    ["Test accuracy", info.accuracy == null ? "not recorded" : fmtPct(info.accuracy, 2)],
    ["Dataset", info.dataset || "not recorded"],
    ["Recipe", info.epochs ? `${info.recipe}, ${info.epochs} epochs` : info.recipe || "—"],
    ["Built", fmtDate(info.build_date)],
    ["Width multiplier α", String(info.alpha)],
    ["Convolutions", opt.conv === "separable" ? "depthwise separable" : `${opt.conv} (full)`],
    ["Precision", info.precision],
    ["Pruned", opt.prune_ratio ? `${fmtPct(opt.prune_ratio, 0)} of each layer's channels` : "no"],
  ];
  if (opt.teacher) rows.push(["Distilled from", opt.teacher]);
  rows.push(["Runs on", info.providers.join(", ")]);
  facts($("model-card"), rows);

  const input = info.input;
  facts($("contract"), [
    ["Tensor", `${input.name}: ${input.shape.join(" × ")}, ${input.dtype}`],
    ["Colour", input.color_mode === "L" ? "L (greyscale)" : input.color_mode],
    ["Resize", `${input.resize} to ${input.size} × ${input.size} px, ${input.resample}`],
    ["Normalise", `mean ${fmtList(input.mean)}; std ${fmtList(input.std)}`],
  ]);
  // A thousand ImageNet classes would bury the card: the first ones, then how many more.
  const many = info.labels.length > MAX_LABELS;
  const shown = many ? info.labels.slice(0, MAX_LABELS - 10) : info.labels;
  const chips = shown.map((label) => el("li", { text: label }));
  if (shown.length < info.labels.length) {
    chips.push(el("li", { class: "more", text: `+ ${info.labels.length - shown.length} more` }));
  }
  $("labels").replaceChildren(...chips);
  $("model-wait").hidden = true;
  $("model-details").hidden = false;

  const topK = $("top-k");
  topK.max = String(info.num_classes);
  if (Number(topK.value) > info.num_classes) topK.value = String(info.num_classes);
}

// ------------------------------------------------------------------------------- classify

function refusal(err) {
  if (err.status === 503) return `The model is not ready yet: ${err.detail}`;
  if (err.status === 429) return `The server is busy, try again shortly: ${err.detail}`;
  if (err.status === 0) return `No answer: ${err.detail}`;
  if (err.status >= 500) return `The server failed (${err.status} ${err.code}): ${err.detail}`;
  return `The server refused this image (${err.status} ${err.code}): ${err.detail}`;
}

async function classify(file) {
  if (!file) return;
  state.lastFile = file;
  $("classify-error").hidden = true;
  const zone = $("drop-zone");
  zone.classList.add("busy");
  const topK = Math.max(1, Number.parseInt($("top-k").value, 10) || 5);
  // An unknown type goes as octet-stream: the server's 415 then names what it accepts.
  const type = file.type || "application/octet-stream";
  const started = performance.now();
  try {
    const answer = await api(withModel("/v1/classify", { top_k: String(topK) }), {
      method: "POST",
      headers: { "Content-Type": type },
      body: file,
    });
    renderPrediction(answer, performance.now() - started, file);
  } catch (err) {
    $("result").hidden = true;
    showError("classify-error", refusal(err));
  } finally {
    zone.classList.remove("busy");
  }
}

function renderPrediction(answer, ms, file) {
  const predictions = answer.results[0].predictions;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  $("preview").src = state.previewUrl;
  $("preview-name").textContent = file.name || "pasted image";
  $("top-label").textContent = predictions[0].label;
  $("top-prob").textContent = fmtPct(predictions[0].probability);
  $("predictions").replaceChildren(
    ...predictions.map((p) => {
      const fill = el("span", { class: "fill" });
      fill.style.width = `${(p.probability * 100).toFixed(2)}%`;
      return el(
        "li",
        { "data-label": p.label },
        el("span", { class: "label", text: p.label }),
        el("span", { class: "meter" }, fill),
        el("span", { class: "prob", text: fmtPct(p.probability) }),
      );
    }),
  );
  $("timing").textContent =
    `Answered in ${ms.toFixed(1)} ms, round trip from this browser, ` +
    `by ${answer.model.name} v${answer.model.version}.`;
  $("result").hidden = false;
}

function wireClassify() {
  const zone = $("drop-zone");
  const input = $("file-input");
  input.addEventListener("change", () => {
    const file = input.files[0];
    input.value = ""; // the same file picked again is a new change
    classify(file);
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    classify(event.dataTransfer.files[0]);
  });
  // A file dropped beside the zone must not make the browser leave the page to open it.
  for (const name of ["dragover", "drop"]) {
    window.addEventListener(name, (event) => event.preventDefault());
  }
  document.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData?.files || [])][0];
    if (item) classify(item);
  });
  $("top-k").addEventListener("change", () => classify(state.lastFile));
  $("model-select").addEventListener("change", () => {
    state.model = pickedModel();
    $("result").hidden = true;
    state.lastFile = null;
    loadModel().catch((err) => showBanner(`Cannot describe the model: ${err.detail}`));
  });
}

// ------------------------------------------------------------------------------- cost report

async function loadCost() {
  $("cost-error").hidden = true;
  try {
    state.cost = await api(withModel("/v1/cost"));
    renderCost(state.cost);
  } catch (err) {
    showError("cost-error", `No cost report (${err.status} ${err.code}): ${err.detail}`);
  }
}

async function measure() {
  const button = $("profile-button");
  button.disabled = true;
  button.textContent = "Measuring…";
  $("cost-error").hidden = true;
  try {
    state.cost = await api(withModel("/v1/cost", { profile: "true" }));
    renderCost(state.cost);
    button.textContent = "Measure again";
  } catch (err) {
    showError("cost-error", `Profiling failed (${err.status} ${err.code}): ${err.detail}`);
    button.textContent = "Measure time per layer";
  } finally {
    button.disabled = false;
  }
}

function renderCost(report) {
  renderSummary(report);
  $("cost-chart").replaceChildren(costChart(report));
  renderShares(report);
}

function tile(title, value, note) {
  return el(
    "div",
    { class: "tile" },
    el("div", { class: "tile-title", text: title }),
    el("div", { class: "tile-value", text: value }),
    el("div", { class: "tile-note", text: note }),
  );
}

function renderSummary(report) {
  const t = report.totals;
  const pairs = report.separable_pairs;
  const agree = pairs.filter((p) => p.agrees).length;
  const tiles = [
    tile("Mult-adds per image", fmtCompact(t.mult_adds), `${integer.format(t.mult_adds)} exactly`),
    tile(
      "Parameters",
      fmtCompact(t.params + t.other_params),
      `${integer.format(t.params)} in conv and FC layers`,
    ),
    tile(
      "With standard convolutions",
      fmtCompact(t.full_conv_mult_adds),
      `${t.mult_adds_reduction.toFixed(2)}× the mult-adds, ` +
        `${t.params_reduction.toFixed(2)}× the parameters`,
    ),
    tile(
      "Separable pairs",
      String(pairs.length),
      pairs.length === agree
        ? "every ratio equals 1/N + 1/Dk² exactly"
        : `${pairs.length - agree} differ from 1/N + 1/Dk²`,
    ),
  ];
  const p = report.profile;
  if (p) {
    tiles.push(
      tile(
        "Measured run",
        `${p.wall_ms_median.toFixed(2)} ms`,
        `median of ${p.runs} at batch 1, ${p.intra_op_threads} thread` +
          `${p.intra_op_threads === 1 ? "" : "s"}, ${p.providers[0]}`,
      ),
    );
  }
  $("cost-summary").replaceChildren(...tiles);
}

function renderShares(report) {
  const table = $("shares");
  const timing = new Map((report.profile ? report.profile.kinds : []).map((k) => [k.label, k]));
  const heads = ["Layer kind", "Layers", "Mult-adds", "Share", "Params share"];
  heads.push("Mult-adds per byte");
  if (report.profile) heads.push("Time share", "G mult-adds/s");
  const cols = heads.map((h) => el("th", { scope: "col", text: h }));
  table.tHead.replaceChildren(el("tr", {}, ...cols));
  table.tBodies[0].replaceChildren(
    ...report.shares.map((s) => {
      const cells = [
        s.label,
        String(s.layers),
        fmtCompact(s.mult_adds),
        fmtShare(s.mult_adds_share),
        fmtShare(s.params_share),
        s.arithmetic_intensity.toFixed(2),
      ];
      if (report.profile) {
        const t = timing.get(s.label);
        cells.push(t ? fmtShare(t.time_share) : "—", t ? t.gmacs_per_s.toFixed(2) : "—");
      }
      const swatch = el("span", { class: `swatch k-${s.kind}` });
      const [first, ...rest] = cells;
      return el(
        "tr",
        {},
        el("th", { scope: "row" }, swatch, first),
        ...rest.map((c) => el("td", { text: c })),
      );
    }),
  );
  table.hidden = false;
}

// ------------------------------------------------------------------------------- start

$("profile-button").addEventListener("click", measure);
wireClassify();
loadConfig();
loadAll();
