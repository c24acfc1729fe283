"""tiengine inside other Stable Diffusion programs: diffusers pipelines and ComfyUI graphs.

- `tiengine.integrations.diffusers`: A1111 conditioning as the `prompt_embeds` / `negative_prompt_embeds`
  (and SDXL's pooled) keyword arguments of a diffusers pipeline call, computed with the pipeline's own
  text encoders (`PipelineEncoder.from_pipeline`) or with a tiengine engine's (`PipelineEncoder.from_engine`).
- `tiengine.integrations.comfyui`: the ComfyUI custom node "tiengine A1111 text encode" (CLIP + text ->
  CONDITIONING); the folder is the custom node package.
- `tiengine.integrations.cache`: `EngineCache`, engines kept per model path for repeated calls in one process.
- `tiengine.integrations.shared_encoders`: the common part, tiengine encoders whose parameters are another
  program's tensors, an engine that only encodes, and the one-call conditioning those programs take.

Nothing here is imported by `import tiengine`; the engine never imports this package.
"""
