"""Stage 4, diffusion: noise schedules, denoisers and samplers.

- schedules: the discrete DDPM schedule, sigma schedules (normal, karras, exponential, ddim_uniform),
  eps / v denoiser wrappers, seeds and initial noise, img2img starting points.
- samplers: k-diffusion-style samplers as plain functions over a denoiser `(x, sigma) -> x0`, and the
  classifier-free-guidance / AND / prompt-schedule wrappers that return a new denoiser.
"""
