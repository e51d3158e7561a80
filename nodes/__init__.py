"""ComfyUI nodes of the ReconX pack: thin adapters over reconx_core (parse inputs, call, wrap outputs)."""

from . import (confidence_nodes, dust3r_nodes, evaluation_nodes, gaussian_nodes, loader_nodes, structure_nodes,
               video_nodes)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (loader_nodes, dust3r_nodes, structure_nodes, video_nodes, confidence_nodes, gaussian_nodes,
                evaluation_nodes):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
