"""How many CPU threads torch gets for a model when nobody chose: the work-size thread policy.

torch's CPU ops run on an OpenMP pool of one thread per core. Every convolution, matmul and norm is a
parallel region that ends at a barrier, so an op takes as long as its slowest thread. On a machine where
another program is busy, one of the pool's threads is often descheduled and the others spin-wait for it
at the barrier: with the built-in model (16x16 latents, 32-64 channels, thousands of ops of a few
microseconds each per image) one UNet call took 2.8 s on torch's default 2 threads beside one busy
process, against 27 ms on 1 thread (22 ms idle; benchmarks/threads.py, figures in
benchmarks/RESULTS.md, "CPU threads"). Such small ops gain nothing from a second thread even on an
idle machine. The other half of the cause is OpenMP's wait policy: GNU
OpenMP (the runtime torch's CPU wheels ship) spins a waiting thread for a while before sleeping, so a
thread that finished its share keeps a core busy that the late thread, or the neighbour, needed. With
OMP_WAIT_POLICY=PASSIVE (waiting threads sleep at once) a full-size SD1.5 UNet call at 128x128 beside
the busy neighbour took 2.4 s on 2 threads instead of 10.1 s (1 thread: 2.2-2.6 s); on an idle machine
2 threads still gain 1.3-1.8x from the built-in model at 128x128 up.

The policy, in two parts:
- the wait policy: the `tiengine` command line sets OMP_WAIT_POLICY=PASSIVE (unless the user set it)
  before torch is imported (tiengine.cli.PASSIVE_WAIT_ENVIRONMENT); OpenMP reads it once, when torch
  loads, so only a process's entry point can set it: a program importing tiengine decides for itself.
- the thread count: one thread when the model's widest full-resolution convolution is below
  SMALL_WORK_MACS multiply-adds per image, else every CPU this process may run on. It is applied by
  the `tiengine` command lines (after `--threads N` and $OMP_NUM_THREADS / $MKL_NUM_THREADS, which win,
  in that order), never by the library on its own: a program that imports tiengine keeps whatever
  torch thread count it set, and may call `apply_cpu_threads` itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tiengine.errors import TiengineError
from tiengine.models.config import ModelConfig

# Below this many multiply-adds per image in the UNet's widest full-resolution 3x3 convolution, a second
# thread costs more in fork/join and barrier waits than it saves once another process is busy (measured
# on a 2-core machine with passive waiting, benchmarks/threads.py, RESULTS.md "CPU threads": the built-in
# model at 128x128 (9.4 M) is 1.37x slower on 2 threads beside a busy neighbour, at 256x256 (38 M) 1.16x
# faster; idle, 2 threads are 0.8x at 64x64 (2.4 M) and 1.3x at 128x128).
SMALL_WORK_MACS = 20_000_000
# environment variables through which a user already told OpenMP / MKL how many threads to use
THREAD_ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count a run uses and why: "--threads", "$OMP_NUM_THREADS", "small work" or "large work"."""

    threads: int
    reason: str


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def widest_conv_macs(config: ModelConfig, width: int | None = None, height: int | None = None) -> int:
    """Multiply-adds per image of the UNet's first-level 3x3 convolution (its widest, at full latent
    resolution) for width x height pixels (None: the model's native size)."""
    latent_factor = 2 ** (len(config.vae.block_out_channels) - 1)  # the VAE halves the size per down block
    native = config.unet.sample_size
    latent_width = native if width is None else max(1, width // latent_factor)
    latent_height = native if height is None else max(1, height // latent_factor)
    channels = config.unet.block_out_channels[0]
    return channels * channels * 9 * latent_width * latent_height


def choose_threads(
    config: ModelConfig, width: int | None = None, height: int | None = None, *, cpus: int | None = None
) -> ThreadChoice:
    """The policy's thread count for this model and image size (None: native size) on `cpus` CPUs
    (None: available_cpus())."""
    cpus = available_cpus() if cpus is None else cpus
    if widest_conv_macs(config, width, height) < SMALL_WORK_MACS:
        return ThreadChoice(1, "small work")
    return ThreadChoice(cpus, "large work")


def apply_cpu_threads(
    requested: int | None,
    config: ModelConfig | None,
    width: int | None = None,
    height: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> ThreadChoice | None:
    """Set torch's CPU thread count for a run: `requested` (a `--threads N`) if given; else leave torch as
    the environment configured it when $OMP_NUM_THREADS or $MKL_NUM_THREADS is set; else the policy's
    choice for `config` at width x height (no config: leave torch alone). Returns what was applied or kept,
    None when torch was left at its own default. A TiengineError for a requested count below 1."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        if requested < 1:
            raise TiengineError(f"--threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
        return ThreadChoice(requested, "--threads")
    for name in THREAD_ENVIRONMENT:
        if environ.get(name, "").strip():
            return ThreadChoice(torch.get_num_threads(), f"${name}")
    if config is None:
        return None
    choice = choose_threads(config, width, height)
    torch.set_num_threads(choice.threads)
    return choice
