// Opens the miniature-world demo workflow when the page is loaded as /?miniworld_demo (make demo).
import { app } from "../../scripts/app.js";

app.registerExtension({
    name: "dreammatcher.miniworld.demo",
    async setup() {
        if (!new URLSearchParams(window.location.search).has("miniworld_demo")) return;
        const url = "/api/workflow_templates/dreammatcher_miniworld/miniworld_demo.json";
        const res = await fetch(url);
        if (!res.ok) {
            console.error("miniworld demo: could not fetch " + url + " (" + res.status + ")");
            return;
        }
        await app.loadGraphData(await res.json(), true, true, "miniworld_demo");
    },
});
