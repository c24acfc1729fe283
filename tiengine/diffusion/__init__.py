"""Stage 4, diffusion: noise schedules, denoisers and samplers.

- names: sampler and schedule names, A1111 labels and aliases (torch-free, for the CLI and settings).
- schedules: the discrete DDPM schedule, A1111's sigma schedule types (get_sigmas), eps / v denoiser
  wrappers, seeds and initial noise, img2img starting points; beta_dist: the Beta schedule's quantiles.
- samplers: the registry of A1111's samplers (SamplerInfo, get_sampler, resolve_sampler) over the
  k-diffusion-style sampler functions in samplers_k, samplers_sde, samplers_dpm_solver, samplers_restart
  and lcm (plain functions over a denoiser `(x, sigma) -> x0`, shared pieces in sampler_core), and the
  classifier-free-guidance / AND / prompt-schedule wrappers (guidance) that return a new denoiser.
- brownian: the SDE samplers' per-image seeded Brownian-tree noise (A1111's).
"""
