// Side-Step for ComfyUI: the live loss chart on "Train Adapter" with a play button for its latest preview, and the
// result text of every Side-Step node. Plain JavaScript, no build step. Only ComfyUI's public app/api modules are used;
// everything is drawn on the node's canvas (no extra widgets), so saved workflows keep exactly the node's own values.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "SideStep";
const TRAIN = "SideStepTrainAdapter";
const EVENT = "sidestep.train";
const PREVIEW_EVENT = "sidestep.preview";
const BUTTON_H = 22;
const CHART_H = 150;
const LINE_H = 14;
const MAX_LINES = 10;
const MAX_POINTS = 4000;

function state(node) {
  if (!node.__sidestep) {
    node.__sidestep = { text: "", steps: [], loss: [], smooth: [], total: 0, status: "", run: "" };
  }
  return node.__sidestep;
}

function fmtSeconds(s) {
  if (s == null || !isFinite(s)) return "";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(r).padStart(2, "0")}s` : `${r}s`;
}

function widgetsBottom(node) {
  let y = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
  for (const w of node.widgets ?? []) {
    if (w.hidden || (w.advanced && !node.showAdvanced)) continue;
    const h = w.computeSize ? w.computeSize(node.size[0])[1] : (LiteGraph.NODE_WIDGET_HEIGHT ?? 20);
    if (w.last_y != null) y = Math.max(y, w.last_y + h);
  }
  return y + 6;
}

function wrap(ctx, text, width) {
  const out = [];
  for (const para of String(text).split("\n")) {
    let line = "";
    for (const word of para.split(" ")) {
      const next = line ? `${line} ${word}` : word;
      if (ctx.measureText(next).width > width && line) {
        out.push(line);
        line = word;
      } else {
        line = next;
      }
    }
    out.push(line);
  }
  return out;
}

function drawChart(ctx, st, x, y, w, h) {
  ctx.fillStyle = "#1b1b1f";
  ctx.fillRect(x, y, w, h);
  ctx.strokeStyle = "#3c3c44";
  ctx.strokeRect(x, y, w, h);
  const pts = st.steps.length;
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#ccc";
  if (!pts) {
    ctx.fillText(st.status || "waiting for the first step…", x + 8, y + h / 2);
    return;
  }
  let lo = Infinity, hi = -Infinity;
  for (const arr of [st.loss, st.smooth]) for (const v of arr) if (isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  const s0 = st.steps[0], s1 = Math.max(st.steps[pts - 1], st.total || 0, s0 + 1);
  const px = (s) => x + 36 + ((s - s0) / (s1 - s0)) * (w - 44);
  const py = (v) => y + 18 + (1 - (v - lo) / (hi - lo)) * (h - 30);
  const line = (arr, color, width) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    arr.forEach((v, i) => (i ? ctx.lineTo(px(st.steps[i]), py(v)) : ctx.moveTo(px(st.steps[i]), py(v))));
    ctx.stroke();
  };
  line(st.loss, "#6f9ede", 1);
  line(st.smooth, "#ffaa3c", 2);
  ctx.lineWidth = 1;
  ctx.fillStyle = "#aaa";
  ctx.fillText(hi.toPrecision(3), x + 2, y + 22);
  ctx.fillText(lo.toPrecision(3), x + 2, y + h - 10);
  ctx.fillStyle = "#ddd";
  ctx.fillText(st.status, x + 36, y + 12);
}

function draw(node, ctx) {
  const st = node.__sidestep;
  if (!st || (!st.text && !st.steps.length && !st.status)) return;
  const width = node.size[0] - 16;
  let y = widgetsBottom(node);
  if (node.comfyClass === TRAIN && (st.steps.length || st.status)) {
    drawChart(ctx, st, 8, y, width, CHART_H);
    y += CHART_H + 6;
  }
  if (st.preview) {
    // A canvas-drawn button (not a widget, so saved workflows keep only the node's own values).
    st.previewButton = [8, y, width, BUTTON_H];
    ctx.fillStyle = "#2a2f3a";
    ctx.fillRect(8, y, width, BUTTON_H);
    ctx.strokeStyle = "#4a5266";
    ctx.strokeRect(8, y, width, BUTTON_H);
    ctx.font = "12px sans-serif";
    ctx.fillStyle = "#ddd";
    const playing = st.audio && !st.audio.paused;
    ctx.fillText(`${playing ? "■ stop" : "▶ play"} preview of step ${st.preview.step}`, 16, y + 15);
    y += BUTTON_H + 6;
  }
  if (st.text) {
    ctx.font = "11px monospace";
    ctx.fillStyle = "#bbb";
    const lines = wrap(ctx, st.text, width);
    const shown = lines.slice(0, MAX_LINES);
    if (lines.length > MAX_LINES) shown.push(`… (${lines.length - MAX_LINES} more lines)`);
    shown.forEach((l, i) => ctx.fillText(l, 8, y + 11 + i * LINE_H));
    y += shown.length * LINE_H + 6;
  }
  if (node.size[1] < y) node.setSize([node.size[0], y]);
}

function onTrainEvent(ev) {
  const d = ev.detail ?? {};
  const node = app.graph?.getNodeById?.(Number(d.node)) ?? app.graph?.getNodeById?.(d.node);
  if (!node || node.comfyClass !== TRAIN) return;
  const st = state(node);
  if (d.event === "plan") {
    if (!d.start || d.run !== st.run) Object.assign(st, { steps: [], loss: [], smooth: [] });
    st.run = d.run;
    st.total = d.total || 0;
    st.status = `${d.run}: starting at step ${d.start || 0} of ${st.total}`;
  } else if (d.event === "step") {
    st.steps.push(d.step);
    st.loss.push(d.loss);
    st.smooth.push(d.smoothed_loss);
    if (st.steps.length > MAX_POINTS) {
      for (const k of ["steps", "loss", "smooth"]) st[k] = st[k].filter((_, i) => i % 2 === 0);
    }
    st.total = d.total || st.total;
    const eta = fmtSeconds(d.eta_s);
    st.status = `step ${d.step}/${st.total}  loss ${Number(d.loss).toFixed(4)} (avg ${Number(d.smoothed_loss).toFixed(4)})` +
      `  lr ${Number(d.lr).toExponential(1)}${eta ? `  ETA ${eta}` : ""}`;
  } else if (d.event === "checkpoint") {
    st.text = `checkpoint at step ${d.step}: ${d.path}`;
  } else if (d.event === "done") {
    st.status = `${d.status} at step ${d.step}/${d.total}`;
  } else {
    return;
  }
  node.setDirtyCanvas(true, true);
}

function onPreviewEvent(ev) {
  const d = ev.detail ?? {};
  const node = app.graph?.getNodeById?.(Number(d.node)) ?? app.graph?.getNodeById?.(d.node);
  if (!node || node.comfyClass !== TRAIN || !d.audio?.filename) return;
  const q = new URLSearchParams({ filename: d.audio.filename, subfolder: d.audio.subfolder ?? "", type: d.audio.type ?? "output" });
  state(node).preview = { step: d.step, url: api.apiURL(`/view?${q}`) };
  node.setDirtyCanvas(true, true);
}

function togglePreview(node) {
  const st = state(node);
  if (st.audio && !st.audio.paused) {
    st.audio.pause();
  } else {
    if (!st.audio || st.audio.dataset.url !== st.preview.url) {
      st.audio = new Audio(st.preview.url);
      st.audio.dataset.url = st.preview.url;
      st.audio.addEventListener("ended", () => node.setDirtyCanvas(true, true));
    }
    st.audio.currentTime = 0;
    st.audio.play();
  }
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "sidestep.nodes",
  async setup() {
    api.addEventListener(EVENT, onTrainEvent);
    api.addEventListener(PREVIEW_EVENT, onPreviewEvent);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(PREFIX)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) {
        state(this).text = [].concat(message.text).join("\n");
        this.setDirtyCanvas(true, true);
      }
    };
    const onMouseDown = nodeType.prototype.onMouseDown;
    nodeType.prototype.onMouseDown = function (e, pos) {
      const b = this.__sidestep?.previewButton;
      if (this.__sidestep?.preview && b && pos[0] >= b[0] && pos[0] <= b[0] + b[2] && pos[1] >= b[1] && pos[1] <= b[1] + b[3]) {
        togglePreview(this);
        return true;
      }
      return onMouseDown?.apply(this, arguments);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.flags?.collapsed) draw(this, ctx);
    };
  },
});
