// Side-Step for ComfyUI: what the pack's nodes show beyond their widgets, on both canvases (classic LiteGraph and
// Nodes 2.0). Plain JavaScript, no build step; only ComfyUI's public app/api modules are used.
//
// - Every Side-Step node gets one DOM widget ("sidestep_panel", never serialized: saved workflows keep exactly the
//   node's own widget values) holding Train Adapter's live loss chart, a play button for the newest preview, and
//   the node's result text, wrapped inside the node; on Compare Adapters, a grid of play buttons (rows:
//   checkpoints, columns: strengths) filled as the renders finish.
// - Train Adapter shows only the options of the chosen adapter type (inputs carrying "sidestep_adapters" in their
//   definition). Every node keeps its advanced inputs behind a toggle: Nodes 2.0 has its own footer button; the
//   classic canvas gets a button widget (canvas-only, never serialized).
// - The chart is redrawn from the run's loss.csv after a page reload (the run is remembered in node.properties).
// - After Export Adapter and Merge Adapters, model lists are refreshed so the new file can be picked at once.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "SideStep";
const TRAIN = "SideStepTrainAdapter";
const WRITERS = new Set(["SideStepExportAdapter", "SideStepMergeAdapters"]); // nodes that write into models/
const COMPARE = "SideStepCompareAdapters";
const TRAIN_EVENT = "sidestep.train";
const PREVIEW_EVENT = "sidestep.preview";
const COMPARE_EVENT = "sidestep.compare";
const PANEL = "sidestep_panel";
const TOGGLE = "sidestep_advanced";
const ADAPTER_KEY = "sidestep_adapters"; // in an input's definition: shown only for these adapter types
const PROP_LOG = "sidestep_loss_log"; // node.properties: /view reference of the last run's loss.csv
const PROP_PREVIEW = "sidestep_preview"; // node.properties: {step, filename, subfolder, type} of its newest preview
const PROP_GRID = "sidestep_grid"; // node.properties: Compare's grid {rows, strengths, cost, cells: [[ref|null]]}
const CELL_H = 24;
const CHART_H = 150;
const MAX_POINTS = 4000;
const COLORS = { loss: "#6f9ede", smoothed: "#ffaa3c" };

const STYLE = `
.sidestep-panel { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; width: 100%;
  font: 11px sans-serif; color: #ccc; overflow: hidden; }
.sidestep-panel > * { flex-shrink: 0; }
.sidestep-panel [hidden] { display: none !important; }
.sidestep-chart-box { display: flex; flex-direction: column; gap: 2px; }
.sidestep-status { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; color: #ddd; }
.sidestep-chart { width: 100%; height: ${CHART_H}px; display: block; background: #1b1b1f; border: 1px solid #3c3c44;
  box-sizing: border-box; }
.sidestep-legend { display: flex; gap: 12px; align-items: center; color: #aaa; }
.sidestep-legend i { display: inline-block; width: 14px; height: 3px; margin-right: 4px; vertical-align: middle; }
.sidestep-play { font: 12px sans-serif; color: #ddd; background: #2a2f3a; border: 1px solid #4a5266; border-radius: 4px;
  padding: 3px 8px; text-align: left; cursor: pointer; }
.sidestep-play:hover { background: #343a48; }
.sidestep-grid-box { display: flex; flex-direction: column; gap: 2px; }
.sidestep-grid { border-collapse: collapse; width: 100%; table-layout: fixed; }
.sidestep-grid th { font: 11px sans-serif; color: #aaa; font-weight: normal; text-align: center; padding: 1px 2px;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; height: ${CELL_H - 4}px; }
.sidestep-grid th.sidestep-row { text-align: left; color: #ddd; }
.sidestep-grid td { padding: 1px 2px; height: ${CELL_H}px; }
.sidestep-cell { width: 100%; height: ${CELL_H - 2}px; font: 12px sans-serif; color: #ddd; background: #2a2f3a;
  border: 1px solid #4a5266; border-radius: 4px; cursor: pointer; padding: 0; }
.sidestep-cell:hover:not(:disabled) { background: #343a48; }
.sidestep-cell:disabled { color: #666; cursor: default; }
.sidestep-cell.playing { background: #4a3a58; border-color: #a070d0; }
.sidestep-result { font: 11px monospace; color: #bbb; white-space: pre-wrap; overflow-wrap: anywhere;
  word-break: break-word; max-height: 180px; overflow-y: auto; }
`;

function injectStyle() {
  if (document.getElementById("sidestep-style")) return;
  const s = document.createElement("style");
  s.id = "sidestep-style";
  s.textContent = STYLE;
  document.head.appendChild(s);
}

function el(tag, cls, parent) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  parent?.appendChild(e);
  return e;
}

function fmtSeconds(s) {
  if (s == null || !isFinite(s)) return "";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(r).padStart(2, "0")}s` : `${r}s`;
}

function viewURL(ref) {
  const q = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "output" });
  return api.apiURL(`/view?${q}`);
}

function nodeById(id) {
  return app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
}

// Node properties changed outside a user's edit: let the workflow's change tracker store them (the open workflow is
// kept across a page reload from what it stored). Once more a moment later: the tracker skips a capture while the
// graph is in the middle of another change.
function remember() {
  const capture = () => {
    const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker;
    if (tracker?.captureCanvasState) tracker.captureCanvasState();
    else tracker?.checkState?.();
  };
  capture();
  setTimeout(capture, 1000);
}

// ----- the panel (one DOM widget per node) -----

function panel(node) {
  if (node.__sidestep) return node.__sidestep;
  injectStyle();
  const root = el("div", "sidestep-panel");
  root.dataset.sidestepNode = String(node.id);
  const st = { node, root, steps: [], loss: [], smooth: [], total: 0, run: "", text: "", preview: null, audio: null,
    grid: null };
  if (node.comfyClass === TRAIN) {
    st.chartBox = el("div", "sidestep-chart-box", root);
    st.status = el("div", "sidestep-status", st.chartBox);
    st.canvas = el("canvas", "sidestep-chart", st.chartBox);
    st.canvas.dataset.points = "0";
    const legend = el("div", "sidestep-legend", st.chartBox);
    for (const [key, label] of [["loss", "loss"], ["smoothed", "smoothed loss"]]) {
      const item = el("span", `sidestep-legend-${key}`, legend);
      el("i", "", item).style.background = COLORS[key];
      item.appendChild(document.createTextNode(label));
    }
    el("span", "sidestep-legend-axis", legend).textContent = "x: optimizer step";
    st.play = el("button", "sidestep-play", root);
    st.play.type = "button";
    st.play.addEventListener("click", (e) => {
      e.stopPropagation();
      togglePreview(st);
    });
    new ResizeObserver(() => drawChart(st)).observe(st.canvas);
  }
  if (node.comfyClass === COMPARE) {
    st.gridBox = el("div", "sidestep-grid-box", root);
    st.cost = el("div", "sidestep-status sidestep-cost", st.gridBox);
    st.table = el("table", "sidestep-grid", st.gridBox);
    st.table.addEventListener("click", (e) => {
      const b = e.target.closest?.("button.sidestep-cell");
      if (!b || b.disabled) return;
      e.stopPropagation();
      toggleAudio(st, b.dataset.url);
    });
  }
  st.result = el("div", "sidestep-result", root);
  node.__sidestep = st;
  const widget = node.addDOMWidget(PANEL, "sidestep", root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => panelSpace(st),
    getMaxHeight: () => panelSpace(st),
  });
  widget.serialize = false; // not in widgets_values (options.serialize keeps it out of the API prompt)
  st.widget = widget;
  render(st);
  return st;
}

// The height the widget asks for: the classic canvas draws a DOM widget 2 × its margin shorter than that (Nodes 2.0
// lays the element out at its content's height).
function panelSpace(st) {
  const h = panelHeight(st);
  return h && !LiteGraph.vueNodesMode ? h + 2 * (st.widget?.margin ?? 0) : h;
}

function panelHeight(st) {
  const visible = [...st.root.children].filter((c) => !c.hidden);
  if (!visible.length) return 0;
  // The children's own heights: the panel itself is stretched to whatever height the canvas gives it.
  if (st.root.isConnected && st.root.offsetParent !== null) {
    return visible.reduce((h, c) => h + c.offsetHeight, 0) + 4 * (visible.length - 1);
  }
  // Not laid out yet (off screen): an estimate, corrected once it is drawn.
  let h = 0;
  if (st.chartBox && !st.chartBox.hidden) h += CHART_H + 36;
  if (st.play && !st.play.hidden) h += 28;
  if (st.gridBox && !st.gridBox.hidden) h += 18 + (CELL_H + 2) * (st.grid.rows.length + 1);
  if (st.text) h += Math.min(180, 14 * (st.text.split("\n").length + 1));
  return h + 4 * (visible.length - 1);
}

function hasChart(st) {
  return !!st.canvas && (st.steps.length > 0 || !!st.statusText);
}

function render(st) {
  st.root.dataset.sidestepNode = String(st.node.id); // the id is assigned when the node joins a graph
  if (st.chartBox) {
    st.chartBox.hidden = !hasChart(st);
    st.status.textContent = st.statusText ?? "";
    st.chartBox.dataset.run = st.run;
    drawChart(st);
  }
  if (st.play) {
    st.play.hidden = !st.preview;
    if (st.preview) {
      const playing = st.audio && !st.audio.paused && st.audio.dataset.url === st.preview.url;
      st.play.textContent = `${playing ? "■ stop" : "▶ play"} preview of step ${st.preview.step}`;
      st.play.dataset.step = String(st.preview.step);
      st.play.dataset.url = st.preview.url;
    }
  }
  if (st.gridBox) renderGrid(st);
  st.result.hidden = !st.text;
  st.result.textContent = st.text;
  // Nodes 2.0 grows a node to its content by itself but never shrinks it below its size: fit only on shrinking.
  const h = panelHeight(st);
  if (!LiteGraph.vueNodesMode || h < (st.height ?? 0)) fit(st.node);
  st.height = h;
}

// Grow or shrink the node to its visible widgets and the panel's content (the classic canvas's measure; on Nodes
// 2.0 the node element then grows back to what its content needs).
function fit(node) {
  requestAnimationFrame(() => {
    if (!node.graph) return;
    const h = node.computeSize([node.size[0], 0])[1];
    if (Math.abs(h - node.size[1]) > 1) node.setSize([node.size[0], h]);
    node.setDirtyCanvas(true, true);
  });
}

// ----- the loss chart -----

function niceTicks(lo, hi, n) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(Math.round(v * 1e6) / 1e6);
  return out;
}

function drawChart(st) {
  const c = st.canvas;
  if (!c || !hasChart(st)) return;
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth || 300, h = c.clientHeight || CHART_H;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
    c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
  }
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "10px sans-serif";
  const n = st.steps.length;
  c.dataset.points = String(n);
  if (!n) {
    ctx.fillStyle = "#aaa";
    ctx.fillText("waiting for the first step…", 8, h / 2);
    c.dataset.xTicks = "";
    return;
  }
  let lo = Infinity, hi = -Infinity;
  for (const arr of [st.loss, st.smooth]) for (const v of arr) if (isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.05;
  lo -= pad; hi += pad;
  const s0 = Math.min(st.steps[0], 0), s1 = Math.max(st.steps[n - 1], st.total || 0, s0 + 1);
  const L = 42, R = 8, T = 6, B = 18;
  const px = (s) => L + ((s - s0) / (s1 - s0)) * (w - L - R);
  const py = (v) => T + (1 - (v - lo) / (hi - lo)) * (h - T - B);
  // grid and axes: loss on the left, optimizer step along the bottom
  ctx.strokeStyle = "#33333b";
  ctx.fillStyle = "#999";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  for (const v of niceTicks(lo, hi, 4)) {
    ctx.beginPath(); ctx.moveTo(L, py(v)); ctx.lineTo(w - R, py(v)); ctx.stroke();
    ctx.fillText(v.toPrecision(3), L - 4, py(v) + 3);
  }
  const xt = niceTicks(s0, s1, Math.max(2, Math.floor((w - L - R) / 60)));
  ctx.textAlign = "center";
  for (const s of xt) {
    ctx.beginPath(); ctx.moveTo(px(s), h - B); ctx.lineTo(px(s), h - B + 3); ctx.stroke();
    ctx.fillText(String(s), px(s), h - 4);
  }
  ctx.strokeStyle = "#666";
  ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, h - B); ctx.lineTo(w - R, h - B); ctx.stroke();
  c.dataset.xTicks = xt.join(",");
  const line = (arr, color, width) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    let started = false;
    arr.forEach((v, i) => {
      if (!isFinite(v)) return;
      const x = px(st.steps[i]), y = py(v);
      started ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
      started = true;
    });
    if (n === 1) ctx.arc(px(st.steps[0]), py(arr[0]), 2, 0, 2 * Math.PI);
    ctx.stroke();
  };
  line(st.loss, COLORS.loss, 1);
  line(st.smooth, COLORS.smoothed, 2);
  ctx.textAlign = "left";
}

function addPoint(st, step, loss, smooth) {
  st.steps.push(step);
  st.loss.push(loss);
  st.smooth.push(smooth ?? loss);
  if (st.steps.length > MAX_POINTS) {
    for (const k of ["steps", "loss", "smooth"]) st[k] = st[k].filter((_, i) => i % 2 === 0);
  }
}

function parseLossCsv(text) {
  const rows = text.trim().split(/\r?\n/);
  const head = (rows.shift() ?? "").split(",");
  const iS = head.indexOf("step"), iL = head.indexOf("loss"), iM = head.indexOf("smoothed_loss");
  const out = [];
  if (iS < 0 || iL < 0) return out;
  for (const r of rows) {
    const c = r.split(",");
    const s = Number(c[iS]), l = Number(c[iL]), m = iM >= 0 && c[iM] !== "" ? Number(c[iM]) : l;
    if (Number.isFinite(s) && c[iL] !== "") out.push([s, l, m]);
  }
  return out;
}

// The run's loss log (after a reload, or the steps a resumed run did before): points before the first live one.
async function loadLossLog(st, ref) {
  setLossLog(st, ref);
  let text;
  try {
    const r = await api.fetchApi(`/view?${new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "output" })}`, { cache: "no-store" });
    if (!r.ok) return;
    text = await r.text();
  } catch {
    return;
  }
  if (JSON.stringify(st.node.properties[PROP_LOG]) !== JSON.stringify(ref)) return; // a newer run took over
  const first = st.steps.length ? st.steps[0] : Infinity;
  const old = parseLossCsv(text).filter(([s]) => s < first);
  if (!old.length) return;
  const live = { steps: st.steps, loss: st.loss, smooth: st.smooth };
  Object.assign(st, { steps: [], loss: [], smooth: [] });
  for (const [s, l, m] of old) addPoint(st, s, l, m);
  live.steps.forEach((s, i) => addPoint(st, s, live.loss[i], live.smooth[i]));
  if (!st.statusText) {
    const last = old[old.length - 1];
    st.statusText = `${ref.subfolder.split("/").pop()}: step ${last[0]}  loss ${last[1].toFixed(4)} (avg ${last[2].toFixed(4)})`;
  }
  render(st);
}

function setLossLog(st, ref) {
  if (JSON.stringify(st.node.properties[PROP_LOG]) === JSON.stringify(ref)) return;
  st.node.properties[PROP_LOG] = ref;
  remember();
}

// ----- previews -----

function setPreview(st, preview) {
  st.preview = preview ? { ...preview, url: viewURL(preview) } : null;
  const before = JSON.stringify(st.node.properties[PROP_PREVIEW]);
  if (preview) st.node.properties[PROP_PREVIEW] = { step: preview.step, filename: preview.filename, subfolder: preview.subfolder, type: preview.type };
  else delete st.node.properties[PROP_PREVIEW];
  if (JSON.stringify(st.node.properties[PROP_PREVIEW]) !== before) remember();
  render(st);
}

function stopAudio(st) {
  if (st.audio && !st.audio.paused) st.audio.pause();
}

function togglePreview(st) {
  if (st.preview) toggleAudio(st, st.preview.url);
}

// One player per node: a second click on what plays stops it, a click elsewhere switches to that.
function toggleAudio(st, url) {
  if (st.audio && !st.audio.paused && st.audio.dataset.url === url) {
    st.audio.pause();
  } else {
    stopAudio(st);
    if (!st.audio || st.audio.dataset.url !== url) {
      st.audio = new Audio(url);
      st.audio.dataset.url = url;
      st.audio.addEventListener("ended", () => render(st));
      st.audio.addEventListener("pause", () => render(st));
      st.audio.addEventListener("play", () => render(st));
    }
    st.audio.currentTime = 0;
    st.audio.play().catch(() => {});
  }
  render(st);
}

// ----- Compare Adapters: the grid of play buttons -----

function setGrid(st, grid) {
  st.grid = grid ? { ...grid, cells: grid.rows.map((_, r) => [...(grid.cells?.[r] ?? grid.strengths.map(() => null))]) } : null;
  const before = JSON.stringify(st.node.properties[PROP_GRID]);
  if (st.grid && st.grid.cells.every((row) => row.every((c) => c))) st.node.properties[PROP_GRID] = st.grid;
  else delete st.node.properties[PROP_GRID];
  if (JSON.stringify(st.node.properties[PROP_GRID]) !== before) remember();
  render(st);
}

function fmtStrength(s) {
  return String(Math.round(Number(s) * 1000) / 1000);
}

function renderGrid(st) {
  const g = st.grid;
  st.gridBox.hidden = !g;
  if (!g) return;
  st.cost.textContent = g.cost ?? "";
  const shape = JSON.stringify([g.rows, g.strengths]);
  if (st.table.dataset.shape !== shape) {
    st.table.replaceChildren();
    const head = el("tr", "", el("thead", "", st.table));
    el("th", "", head).textContent = "checkpoint";
    for (const s of g.strengths) el("th", "", head).textContent = `× ${fmtStrength(s)}`;
    const body = el("tbody", "", st.table);
    g.rows.forEach((label, r) => {
      const tr = el("tr", "", body);
      const th = el("th", "sidestep-row", tr);
      th.textContent = label;
      th.title = label;
      g.strengths.forEach((s, c) => {
        const b = el("button", "sidestep-cell", el("td", "", tr));
        b.type = "button";
        Object.assign(b.dataset, { row: String(r), col: String(c), label, strength: fmtStrength(s) });
      });
    });
    st.table.dataset.shape = shape;
  }
  for (const b of st.table.querySelectorAll("button.sidestep-cell")) {
    const ref = g.cells[Number(b.dataset.row)]?.[Number(b.dataset.col)];
    const url = ref ? viewURL(ref) : "";
    const playing = !!url && st.audio && !st.audio.paused && st.audio.dataset.url === url;
    b.disabled = !url;
    b.dataset.url = url;
    b.classList.toggle("playing", playing);
    b.textContent = !url ? "…" : playing ? "■" : "▶";
    b.title = url ? `${b.dataset.label} at strength ${b.dataset.strength}: ${playing ? "stop" : "play"}` : "not rendered yet";
  }
}

function onCompareEvent(ev) {
  const d = ev.detail ?? {};
  const node = nodeById(d.node);
  if (!node || node.comfyClass !== COMPARE) return;
  const st = panel(node);
  if (d.event === "plan") {
    setGrid(st, { rows: d.rows, strengths: d.strengths, cost: d.cost, cells: d.cells });
  } else if (d.event === "cell" && st.grid?.cells?.[d.row]) {
    st.grid.cells[d.row][d.col] = d.audio;
    setGrid(st, st.grid);
  }
}

// ----- a new run on a node clears the previous one -----

function startRun(st) {
  stopAudio(st);
  Object.assign(st, { steps: [], loss: [], smooth: [], total: 0, run: "", text: "", statusText: undefined });
  delete st.node.properties[PROP_LOG];
  setPreview(st, null);
  if (st.gridBox) setGrid(st, null);
}

function onExecuting(ev) {
  const id = ev.detail;
  if (id == null) return;
  const node = nodeById(typeof id === "object" ? id.node ?? id.display_node : id);
  if (!node?.__sidestep) return;
  startRun(node.__sidestep);
}

function onTrainEvent(ev) {
  const d = ev.detail ?? {};
  const node = nodeById(d.node);
  if (!node || node.comfyClass !== TRAIN) return;
  const st = panel(node);
  if (d.event === "plan") {
    if (d.run !== st.run) Object.assign(st, { steps: [], loss: [], smooth: [] });
    st.run = d.run;
    st.total = d.total || 0;
    st.statusText = `${d.run}: starting at step ${d.start || 0} of ${st.total}`;
    if (d.loss_log) {
      if (d.start) loadLossLog(st, d.loss_log);
      else setLossLog(st, d.loss_log);
    }
  } else if (d.event === "step") {
    addPoint(st, d.step, d.loss, d.smoothed_loss);
    st.total = d.total || st.total;
    const eta = fmtSeconds(d.eta_s);
    st.statusText = `step ${d.step}/${st.total}  loss ${Number(d.loss).toFixed(4)} (avg ${Number(d.smoothed_loss).toFixed(4)})` +
      `  lr ${Number(d.lr).toExponential(1)}${eta ? `  ETA ${eta}` : ""}`;
  } else if (d.event === "checkpoint") {
    st.text = `checkpoint at step ${d.step}: ${d.path}`;
  } else if (d.event === "done") {
    st.statusText = `${d.status} at step ${d.step}/${d.total}`;
  } else {
    return;
  }
  render(st);
}

function onPreviewEvent(ev) {
  const d = ev.detail ?? {};
  const node = nodeById(d.node);
  if (!node || node.comfyClass !== TRAIN || !d.audio?.filename) return;
  setPreview(panel(node), { step: d.step, ...d.audio });
}

function onExecuted(node, message) {
  const st = panel(node);
  if (message?.text) st.text = [].concat(message.text).join("\n");
  if (node.comfyClass === TRAIN) {
    const log = message?.sidestep_loss_log?.[0];
    if (log && !st.steps.length) loadLossLog(st, log); // a reused run: nothing was trained, draw its log
    else if (log) setLossLog(st, log);
    const preview = message?.sidestep_preview?.[0];
    if (preview && preview.step !== st.preview?.step) setPreview(st, preview);
  }
  if (node.comfyClass === COMPARE && message?.sidestep_grid?.[0]) setGrid(st, message.sidestep_grid[0]);
  if (WRITERS.has(node.comfyClass)) app.refreshComboInNodes?.(); // the new file in every LoRA / model list
  render(st);
}

// After a reload (or opening a saved workflow): the chart from the run's loss log, the newest preview's button.
function restore(node) {
  const st = panel(node);
  const log = node.properties?.[PROP_LOG];
  const preview = node.properties?.[PROP_PREVIEW];
  if (preview?.filename) setPreview(st, preview);
  if (log?.filename && !st.steps.length) {
    st.statusText = `${log.subfolder.split("/").pop()}: loading the loss log…`;
    loadLossLog(st, log);
  }
  render(st);
}

// ----- widgets: Train Adapter's options of the chosen adapter type, every node's advanced toggle -----

function inputOptions(nodeData, name) {
  const spec = nodeData.input?.required?.[name] ?? nodeData.input?.optional?.[name];
  return Array.isArray(spec) && spec[1] && typeof spec[1] === "object" ? spec[1] : {};
}

function alwaysShowAdvanced() {
  return !!app.extensionManager?.setting?.get?.("Comfy.Node.AlwaysShowAdvancedWidgets");
}

function otherAdapterType(node, w) {
  const only = w.__sidestepAdapters;
  const adapter = node.widgets?.find((x) => x.name === "adapter");
  return !!only && !!adapter && !only.includes(adapter.value);
}

// The classic canvas lays out every widget that is not `hidden` (an advanced one too, leaving a gap), so there
// `hidden` is computed: another adapter type's option, or an advanced one while Advanced is off. Nodes 2.0 reads
// `options.hidden` (set for other adapter types) and handles advanced inputs itself.
function manageVisibility(node, w) {
  let own = w.hidden ?? false;
  Object.defineProperty(w, "hidden", {
    configurable: true,
    get: () => own || otherAdapterType(node, w) || (!!w.advanced && !node.showAdvanced && !alwaysShowAdvanced()),
    set: (v) => { own = v; },
  });
}

function applyAdapterType(node) {
  let changed = false;
  for (const w of node.widgets ?? []) {
    if (!w.__sidestepAdapters) continue;
    const hide = otherAdapterType(node, w);
    w.options ??= {};
    if (!!w.options.hidden !== hide) changed = true;
    w.options.hidden = hide;
  }
  if (changed) refreshWidgets(node);
  fit(node);
}

// Nodes 2.0 rebuilds a node's widget list only when the list itself changes: re-set it so hidden flags are read.
function refreshWidgets(node) {
  const ws = node.widgets;
  if (!ws?.length) return;
  const last = ws[ws.length - 1];
  node.widgets = ws.slice(0, -1);
  node.widgets = [...node.widgets, last];
}

function advancedCount(node) {
  return (node.widgets ?? []).filter((w) => w.advanced && !otherAdapterType(node, w)).length;
}

function setupWidgets(node, nodeData) {
  for (const w of node.widgets ?? []) {
    const opts = inputOptions(nodeData, w.name);
    if (opts.advanced) w.advanced = true; // the classic canvas reads the widget's own flag (context menu, outline)
    if (Array.isArray(opts[ADAPTER_KEY])) w.__sidestepAdapters = opts[ADAPTER_KEY];
    if (w.advanced || w.__sidestepAdapters) manageVisibility(node, w);
  }
  const adapterWidget = node.widgets?.find((w) => w.name === "adapter");
  if (adapterWidget && node.widgets.some((w) => w.__sidestepAdapters)) {
    const cb = adapterWidget.callback;
    adapterWidget.callback = function () {
      const r = cb?.apply(this, arguments);
      applyAdapterType(node);
      return r;
    };
  }
  if (!node.hasAdvancedWidgets?.()) return;
  // Advanced on and off, also from the context menu: fit the node to what is shown.
  const toggleAdvanced = node.toggleAdvanced;
  node.toggleAdvanced = function () {
    const r = toggleAdvanced.apply(this, arguments);
    fit(this);
    return r;
  };
  // The classic canvas's own switch is only in the node's context menu; Nodes 2.0 draws a footer button instead.
  const toggle = node.addWidget("button", TOGGLE, "", () => node.toggleAdvanced(), { serialize: false, canvasOnly: true });
  toggle.serialize = false;
  Object.defineProperty(toggle, "label", {
    configurable: true,
    get: () => node.showAdvanced ? "▴ hide advanced settings" : `▾ show advanced settings (${advancedCount(node)})`,
    set: () => {},
  });
  Object.defineProperty(toggle, "hidden", { configurable: true, get: alwaysShowAdvanced, set: () => {} });
}

app.registerExtension({
  name: "sidestep.nodes",
  async setup() {
    api.addEventListener(TRAIN_EVENT, onTrainEvent);
    api.addEventListener(PREVIEW_EVENT, onPreviewEvent);
    api.addEventListener(COMPARE_EVENT, onCompareEvent);
    api.addEventListener("executing", onExecuting);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(PREFIX)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      setupWidgets(this, nodeData);
      applyAdapterType(this);
      panel(this);
      fit(this);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      applyAdapterType(this);
      if (nodeData.name === TRAIN) restore(this);
      if (nodeData.name === COMPARE && this.properties?.[PROP_GRID]?.rows) setGrid(panel(this), this.properties[PROP_GRID]);
      fit(this);
      return r;
    };
    const onExecutedOrig = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecutedOrig?.apply(this, arguments);
      onExecuted(this, message);
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      if (this.__sidestep) stopAudio(this.__sidestep);
      return onRemoved?.apply(this, arguments);
    };
  },
});
