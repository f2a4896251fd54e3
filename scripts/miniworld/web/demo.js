// Opens the miniature-world demo workflow when the page is loaded as /?miniworld_demo (make demo),
// once, and frames its results (the comparison and AMA Diagnostics) at a readable zoom.
import { app } from "../../scripts/app.js";

const NAME = "miniworld_demo";
const TEMPLATE = "/api/workflow_templates/dreammatcher_miniworld/miniworld_demo.json";
// Zoom limits of the framing: below MIN_SCALE the canvas draws text in low quality.
const MIN_SCALE = 0.7;
const MAX_SCALE = 1.0;
const MARGIN = 24; // screen pixels kept free around the framed nodes
// Window pixels that the frontend's own panels may cover over the canvas: the side toolbar on the
// left, the tab bar and the run toolbar at the top (the newer frontends draw the canvas under them).
const INSET_LEFT = 64;
const INSET_TOP = 96;

// The demo's tab, if one is open already: the frontend restores open workflows on a reload, and
// the start-up may run extension set-up more than once, so the demo is opened only when absent.
function openDemoTab(store) {
    const tabs = (store && store.openWorkflows) || [];
    return tabs.find((w) => (w.path || "").split("/").pop() === NAME + ".json") || null;
}

// Fits the bounding box of the result nodes (the comparison preview and AMA Diagnostics) into the
// visible canvas: the largest zoom in [MIN_SCALE, MAX_SCALE] that fits, centred.
export function frameResults() {
    const graph = app.graph;
    const canvas = app.canvas;
    const nodes = (graph._nodes || []).filter(
        (n) => n.type === "DM_AMADiagnostics" || (n.type === "PreviewImage" && /^Compare/.test(n.title || ""))
    );
    if (!nodes.length || !canvas || !canvas.ds) return false;
    const title = (window.LiteGraph && window.LiteGraph.NODE_TITLE_HEIGHT) || 30;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]);
        y0 = Math.min(y0, n.pos[1] - title);
        x1 = Math.max(x1, n.pos[0] + n.size[0]);
        y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const rect = canvas.canvas.getBoundingClientRect();
    // the part of the window where the canvas shows and no panel covers it, in window pixels
    const visLeft = Math.max(rect.left, INSET_LEFT);
    const visTop = Math.max(rect.top, INSET_TOP);
    const visW = Math.min(rect.right, window.innerWidth) - visLeft - 2 * MARGIN;
    const visH = Math.min(rect.bottom, window.innerHeight) - visTop - 2 * MARGIN;
    const fit = Math.min(visW / (x1 - x0), visH / (y1 - y0));
    const scale = Math.max(MIN_SCALE, Math.min(MAX_SCALE, fit));
    canvas.ds.scale = scale;
    // screen = (graph + offset) * scale: centre the box in the visible part (its top-left when it
    // does not fit, so the comparison is what shows)
    const left = fit >= scale ? (visW / scale - (x1 - x0)) / 2 : 0;
    const top = fit >= scale ? (visH / scale - (y1 - y0)) / 2 : 0;
    canvas.ds.offset[0] = (visLeft - rect.left + MARGIN) / scale + left - x0;
    canvas.ds.offset[1] = (visTop - rect.top + MARGIN) / scale + top - y0;
    canvas.setDirty(true, true);
    return true;
}

// The frontend opens its start-up workflow (the one restored from the last visit, or the default)
// only after every extension's set-up, so the demo waits for that: loading it during set-up made the
// start-up restore open the just-stored demo a second time, in a tab "miniworld_demo (2)".
async function startupDone(store) {
    for (let i = 0; i < 300 && !(store && store.activeWorkflow); i++) {
        await new Promise((r) => setTimeout(r, 100));
    }
    await new Promise((r) => setTimeout(r, 300)); // let the start-up load finish drawing
}

async function openDemo() {
    const store = app.extensionManager && app.extensionManager.workflow;
    await startupDone(store);
    const open = openDemoTab(store);
    if (open) {
        if (store.activeWorkflow !== open && store.openWorkflow) await store.openWorkflow(open);
    } else {
        const res = await fetch(TEMPLATE);
        if (!res.ok) {
            console.error("miniworld demo: could not fetch " + TEMPLATE + " (" + res.status + ")");
            return;
        }
        const previous = store && store.activeWorkflow;
        await app.loadGraphData(await res.json(), true, true, NAME);
        // a fresh visit's start-up opened an empty, untouched default tab: the demo takes its place
        if (previous && previous !== store.activeWorkflow && previous.isTemporary && !previous.isModified
            && store.closeWorkflow) {
            await store.closeWorkflow(previous);
        }
    }
    // the canvas takes its size after the first layout pass: frame on the next frames, and once more
    // a second later, after a restored tab has put back its own saved view
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    frameResults();
    await new Promise((r) => setTimeout(r, 1000));
    frameResults();
}

let opening = null;

app.registerExtension({
    name: "dreammatcher.miniworld.demo",
    setup() {
        if (!new URLSearchParams(window.location.search).has(NAME)) return;
        // not awaited: the frontend's start-up workflow load comes after set-up returns
        opening = opening || openDemo();
    },
});
