// ReconX node pack: front-end touches. Colours the five stages so a ReconX graph reads left to right.
// Tooltips need no code here: ComfyUI's frontend (1.49, NodeTooltip in GraphView-*.js) already shows a node's
// DESCRIPTION when the mouse rests on its title bar, and each input's or output's "tooltip" over that slot or
// widget; the node library's preview shows the DESCRIPTION too.
import { app } from "../../scripts/app.js";

const STAGE_COLOURS = {
  ReconXDust3rLoader: "#2a4858", ReconXDust3rAlign: "#2a4858",
  ReconXEncodePointCloud: "#3d3a5c", ReconXRenderPointCloud: "#3d3a5c",
  ReconXVideoModelLoader: "#4f3a5c", ReconXInterpolate: "#4f3a5c", ReconXFramesToViews: "#4f3a5c",
  ReconXConfidence: "#5c4a3a",
  ReconXFitGaussians: "#3a5c45", ReconXRenderGaussians: "#3a5c45",
  ReconXEvaluateHeldOut: "#5c3a3a",
};

app.registerExtension({
  name: "reconx.stages",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const colour = STAGE_COLOURS[nodeData.name];
    if (!colour) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.color = colour;
      this.bgcolor = "#1e2226";
      return result;
    };
  },
});
