"""The option strings of the diffusion stage, importable without torch (the CLI's `--help` reads them).

SAMPLER_NAMES are A1111's sampler names, in the order `tiengine.diffusion.samplers.SAMPLERS` registers
them (a test checks the two agree); SCHEDULERS are the sigma schedules of
`tiengine.diffusion.schedules.get_sigmas` (A1111 / k-diffusion names).
"""

from __future__ import annotations

SAMPLER_NAMES: tuple[str, ...] = (
    "Euler", "Euler a", "Heun", "DPM2", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "LMS", "DDIM",
)
SCHEDULERS: tuple[str, ...] = ("normal", "karras", "exponential", "ddim_uniform")
