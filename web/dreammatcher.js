// DreamMatcher frontend extensions.
//
// 1. "dreammatcher.report": every DM_* node that returns `ui.text` (the inverter's reconstruction
//    error, AMA Diagnostics' per-step table, the guidance sampler's AMA figures, the inspector's
//    coverage) shows that text in a read-only panel on the node, because the stock frontend has no
//    generic text display.
// 2. "dreammatcher.inspector", the correspondence inspector, described below.
//
// When DM_InspectMatch (or DM_SemanticMatch with its inspector sockets) has run, its `ui.dm_match` payload carries the reference
// and target previews (temp files) and, per target cell, the matched reference cell, the
// confidence and the soft mask. This extension shows reference | target side by side on the node;
// hovering a target pixel marks its matched reference pixel and shows the confidence there.
// Written against the public extension API only (app.registerExtension, node.onExecuted,
// node.addDOMWidget). Without it, the node still works and shows its composite via ui.images.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// Both nodes send the same `ui.dm_match` payload.
const MATCH_INSPECTORS = new Set(["DM_InspectMatch", "DM_SemanticMatch"]);

function viewUrl(file) {
  const q = new URLSearchParams({ filename: file.filename, subfolder: file.subfolder || "", type: file.type || "temp" });
  return api.apiURL(`/view?${q.toString()}`);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = reject;
    img.src = src;
  });
}

function buildPanel() {
  const root = document.createElement("div");
  root.className = "dm-inspector";
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;font:11px sans-serif;color:#ddd";
  const row = document.createElement("div");
  row.style.cssText = "display:flex;gap:6px;width:100%";
  const ref = document.createElement("canvas");
  const tgt = document.createElement("canvas");
  ref.className = "dm-ref";
  tgt.className = "dm-tgt";
  for (const c of [ref, tgt]) c.style.cssText = "flex:1 1 0;min-width:0;width:50%;image-rendering:pixelated";
  tgt.style.cursor = "crosshair";
  row.append(ref, tgt);
  const info = document.createElement("div");
  info.className = "dm-info";
  info.textContent = "reference | target — hover the target";
  root.append(row, info);
  return { root, ref, tgt, info };
}

function draw(panel, marker) {
  const { ref, tgt, data, refImg, tgtImg } = panel;
  if (!refImg || !tgtImg) return;
  const rc = ref.getContext("2d");
  rc.drawImage(refImg, 0, 0, ref.width, ref.height);
  const tc = tgt.getContext("2d");
  tc.drawImage(tgtImg, 0, 0, tgt.width, tgt.height);
  if (!marker) return;
  const [ht, wt] = data.grid;
  const [hr, wr] = data.ref_grid;
  const cellT = { w: tgt.width / wt, h: tgt.height / ht };
  const cellR = { w: ref.width / wr, h: ref.height / hr };
  const conf = data.confidence[marker.cell];
  const colour = conf ? "#30ff60" : "#ff4040";
  // target cell outline
  tc.strokeStyle = colour;
  tc.lineWidth = 2;
  tc.strokeRect(marker.tx * cellT.w, marker.ty * cellT.h, cellT.w, cellT.h);
  // matched reference cell: crosshair + circle
  const cx = (marker.rx + 0.5) * cellR.w;
  const cy = (marker.ry + 0.5) * cellR.h;
  const r = Math.max(4, 1.5 * Math.max(cellR.w, cellR.h));
  rc.strokeStyle = colour;
  rc.lineWidth = 2;
  rc.beginPath();
  rc.arc(cx, cy, r, 0, 2 * Math.PI);
  rc.moveTo(cx - 2 * r, cy);
  rc.lineTo(cx + 2 * r, cy);
  rc.moveTo(cx, cy - 2 * r);
  rc.lineTo(cx, cy + 2 * r);
  rc.stroke();
}

function onHover(panel, ev) {
  const data = panel.data;
  if (!data) return;
  const rect = panel.tgt.getBoundingClientRect();
  if (rect.width <= 0 || rect.height <= 0) return;
  const [ht, wt] = data.grid;
  const [, wr] = data.ref_grid;
  const tx = Math.min(wt - 1, Math.max(0, Math.floor(((ev.clientX - rect.left) / rect.width) * wt)));
  const ty = Math.min(ht - 1, Math.max(0, Math.floor(((ev.clientY - rect.top) / rect.height) * ht)));
  const cell = ty * wt + tx;
  const m = data.match[cell];
  const marker = { cell, tx, ty, rx: m % wr, ry: Math.floor(m / wr) };
  draw(panel, marker);
  const conf = data.confidence[cell];
  const mask = data.mask[cell];
  panel.info.textContent = `target (${tx},${ty}) → reference (${marker.rx},${marker.ry}) · confidence ${conf} · mask ${mask.toFixed(2)}`;
  // state for tests and other tools
  const ds = panel.root.dataset;
  ds.targetCell = `${tx},${ty}`;
  ds.markerCell = `${marker.rx},${marker.ry}`;
  ds.markerX = String((marker.rx + 0.5) * (panel.ref.width / wr));
  ds.markerY = String((marker.ry + 0.5) * (panel.ref.height / data.ref_grid[0]));
  ds.confidence = String(conf);
}

async function show(node, data) {
  let panel = node.__dmPanel;
  if (!panel) {
    panel = buildPanel();
    node.__dmPanel = panel;
    if (typeof node.addDOMWidget !== "function") return; // old frontend: the ui.images preview remains
    node.addDOMWidget("dm_inspector", "dm_inspector", panel.root, { serialize: false, hideOnZoom: false });
    panel.tgt.addEventListener("mousemove", (ev) => onHover(panel, ev));
    panel.tgt.addEventListener("mouseleave", () => draw(panel, null));
  }
  panel.data = data;
  try {
    const [refImg, tgtImg] = await Promise.all([loadImage(viewUrl(data.reference)), loadImage(viewUrl(data.target))]);
    panel.refImg = refImg;
    panel.tgtImg = tgtImg;
    panel.ref.width = refImg.naturalWidth;
    panel.ref.height = refImg.naturalHeight;
    panel.tgt.width = tgtImg.naturalWidth;
    panel.tgt.height = tgtImg.naturalHeight;
    draw(panel, null);
    panel.root.dataset.ready = "1";
    node.setSize?.([Math.max(node.size[0], 420), Math.max(node.size[1], node.computeSize?.()[1] ?? 0)]);
    node.setDirtyCanvas?.(true, true);
  } catch (err) {
    panel.info.textContent = "DreamMatcher inspector: could not load the previews";
    console.warn("[dreammatcher]", err);
  }
}

function showReport(node, lines) {
  let pre = node.__dmReport;
  if (!pre) {
    if (typeof node.addDOMWidget !== "function") return; // old frontend: nothing to show it with
    pre = document.createElement("pre");
    pre.className = "dm-report";
    pre.style.cssText =
      "margin:0;padding:4px 6px;max-height:260px;overflow:auto;white-space:pre-wrap;font:11px/14px monospace;" +
      "color:#ddd;background:rgba(0,0,0,0.25);border-radius:4px;user-select:text;box-sizing:border-box";
    // Room for every line, wrapped ones included, up to the max-height (the panel scrolls beyond it).
    // The frontend gives a DOM widget its height minus a 10 px margin above and below: add it back.
    const rows = () => (pre.textContent || "").split("\n").length;
    const widget = node.addDOMWidget("dm_report", "dm_report", pre, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => Math.min(260, Math.max(14 * rows() + 12, pre.scrollHeight || 0)) + 20,
    });
    if (widget) widget.serialize = false; // never part of widgets_values (saved workflows stay stable)
    node.__dmReport = pre;
  }
  pre.textContent = lines.join("\n");
  pre.dataset.nodeType = node.type || node.comfyClass || "";
  // grow the node to fit, now and once the frontend has laid out the rest of the output (e.g. images)
  const fit = () => {
    const need = node.computeSize?.() ?? node.size;
    const w = Math.max(node.size[0], 420);
    const h = Math.max(node.size[1], need[1]);
    if (w !== node.size[0] || h !== node.size[1]) node.setSize?.([w, h]);
    node.setDirtyCanvas?.(true, true);
  };
  fit();
  requestAnimationFrame(fit);
  setTimeout(fit, 300);
  setTimeout(fit, 1500);
}

// Chain a display after the node type's own onExecuted: `pick(message)` selects our payload (falsy:
// nothing to show), `fn(node, payload)` shows it; a display failure never breaks the node.
function chainOnExecuted(nodeType, label, pick, fn) {
  const previous = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    const r = previous?.apply(this, arguments);
    const payload = pick(message);
    if (payload) {
      try {
        fn(this, payload);
      } catch (err) {
        console.warn(`[dreammatcher] ${label} unavailable:`, err);
      }
    }
    return r;
  };
}

app.registerExtension({
  name: "dreammatcher.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("DM_")) return;
    chainOnExecuted(nodeType, "report",
      (m) => (Array.isArray(m?.text) && m.text.length ? m.text.map(String) : null), showReport);
  },
});

app.registerExtension({
  name: "dreammatcher.inspector",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!MATCH_INSPECTORS.has(nodeData?.name)) return;
    chainOnExecuted(nodeType, "inspector", (m) => m?.dm_match?.[0], show);
  },
});
