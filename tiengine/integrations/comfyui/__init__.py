"""ComfyUI custom node package "tiengine": A1111 prompts and embeddings as ComfyUI CONDITIONING.

ComfyUI loads this folder as a custom node package (it reads NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS from this file): link the folder into `ComfyUI/custom_nodes/`, or put there a
one-line file `from tiengine.integrations.comfyui import *` (README, "Using tiengine from ComfyUI"). tiengine
must be installed in ComfyUI's Python. The node itself is in tiengine.integrations.comfyui.nodes.
"""

from __future__ import annotations

from tiengine.integrations.comfyui.nodes import (
    NODE_CLASS_MAPPINGS,
    NODE_DISPLAY_NAME_MAPPINGS,
)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
