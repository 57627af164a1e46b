// ldmgraph's extension of ComfyUI's editor: its first graph is one that runs on this server.
//
// When there is no open workflow to restore (a new browser, a new data folder), the editor shows a
// default graph built into it, made for models this server does not have. This module replaces the
// contents of that built-in graph, before the editor draws it, with the server's own default graph:
// ComfyUI's classic text-to-image nodes on the bundled model. "Load Default" gives it too.
import { app } from "../../scripts/app.js";

const builtIn = window.comfyAPI?.defaultGraph?.defaultGraph;
const response = await fetch(new URL("default_graph.json", import.meta.url), { cache: "no-store" });
if (builtIn && response.ok) {
  const graph = await response.json();
  for (const key of Object.keys(builtIn)) delete builtIn[key];
  Object.assign(builtIn, graph);
}

app.registerExtension({ name: "ldmgraph.defaultGraph" });
