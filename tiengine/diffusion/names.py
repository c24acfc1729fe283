"""The option strings of the diffusion stage, importable without torch (the CLI's `--help` reads them).

SAMPLER_NAMES are A1111's sampler names, in the order `tiengine.diffusion.samplers.SAMPLERS` registers
them (a test checks the two agree); SCHEDULERS are the sigma schedules of
`tiengine.diffusion.schedules.get_sigmas` (A1111 / k-diffusion names); LATENT_UPSCALERS are the hires
fix's latent upscale modes (`tiengine.diffusion.hires`).
"""

from __future__ import annotations

SAMPLER_NAMES: tuple[str, ...] = (
    "Euler", "Euler a", "Heun", "DPM2", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "LMS", "DDIM",
)
SCHEDULERS: tuple[str, ...] = ("normal", "karras", "exponential", "ddim_uniform")
# A1111's latent upscale modes for the hires fix (`shared.latent_upscale_modes`), in A1111's order; what each
# one does is tiengine.diffusion.hires.LATENT_UPSCALE_MODES (a test checks the two agree).
LATENT_UPSCALERS: tuple[str, ...] = (
    "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
    "Latent (nearest-exact)",
)
