"""The AUTOMATIC1111 web UI's random sources and noise rules, so that its pictures can be made again here.

Written from the behaviour of A1111's ``modules/rng.py`` (``ImageRNG``), ``modules/rng_philox.py``,
``modules/processing.py`` and ``modules/sd_samplers_common.py`` (v1.6 to v1.10); names below are A1111's.

- Sources (A1111's "Random number generator source" option, ``RNG_SOURCES`` in lower case):
  "cpu": ``torch.randn`` with a CPU ``torch.Generator`` (tiengine's default, as before this module);
  "gpu": ``torch.randn`` with a CUDA generator on the card (A1111's default; on "mps" devices A1111 draws
  with a CPU generator instead, and so does this module); "nv": NVIDIA's Philox 4x32-10 stream plus
  Box-Muller computed on the CPU (``philox_randn``), which reproduces CUDA noise on any device.
- Generators (``ImageRNG``): image i of a batch has its own generator seeded ``seeds[i]``. Its first draw
  is the image's initial noise; later draws are the noise of ancestral / SDE sampler steps (A1111 routes
  k-diffusion's ``torch.randn_like`` to ``ImageRNG.next()``, whose first call returns the initial noise).
  So image i of a batch equals a batch of one made from its seed.
- Variation seeds: with ``subseed_strength`` s != 0, the initial noise is ``slerp(s, noise(seed),
  noise(subseed))`` where each noise is the first draw of a fresh generator. ``slerp`` is A1111's: it
  normalizes over dim 1 (the latent's rows) and falls back to ``low * s + high * (1 - s)`` (weights in
  that order) when the mean cosine exceeds 0.9995. A1111 gives every image of a variation batch the same
  seed and subseeds subseed + i (``image_seeds``).
- Seed resize ("Seed resize from" W x H pixels): the seed's noise is drawn at (C, H0 // 8, W0 // 8),
  slerped with the subseed's noise of that size, then pasted centred onto the image's own first draw:
  ``d = (new - old) // 2`` (floor) per axis; if d >= 0 all old rows/columns land at offset d; otherwise
  ``old + 2 d`` of them, starting at old index -d, land at offset 0 (an odd difference leaves the last
  row/column of the new canvas with the generator's own noise).
- ENSD ("Eta noise seed delta", option ``eta_noise_seed_delta``): when nonzero, once the initial noise is
  drawn every image's generator is replaced by a fresh one seeded ``seed + delta``; later draws come from
  it. A1111 does this whatever the sampler (``ImageRNG.first``); only samplers that draw noise see it, and
  its infotext writes "ENSD" only for samplers flagged "uses_ensd" ("Euler a", "DPM2 a", "DPM++ 2S a",
  "DPM fast", "DPM adaptive") with eta != 0 (``is_sampler_using_eta_noise_seed_delta``).
- Infotext (``create_infotext``): "Variation seed" and "Variation seed strength" when the strength is
  nonzero, "Seed resize from" as "WxH" when both are > 0, "ENSD" as above, "RNG" ("CPU" / "NV") unless
  the source is "gpu"; a text with no "RNG" was made with GPU noise.

Philox 4x32-10 is Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011): multipliers
0xD2511F53, 0xCD9E8D57 and Weyl key increments 0x9E3779B9, 0xBB67AE85. cuRAND (and so PyTorch on CUDA)
gives element i of a fresh generator's draw the counter (offset, 0, i, 0) and key (seed low 32 bits, seed
high 32 bits), and its normal is ``sqrt(-2 log u) sin(v)`` of the first two 32-bit outputs x, y with
``u = x 2^-32 + 2^-33``, ``v = y 2^-32 2 pi + 2^-33 2 pi`` (cuRAND's ``_curand_box_muller``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from tiengine.diffusion.names import RNG_SOURCES
from tiengine.diffusion.schedules import SamplingError

ENSD_SAMPLERS = ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive")  # A1111's "uses_ensd"
LATENT_FACTOR = 8  # A1111's seed resize divides the pixel size by 8 (its `opt_f`)
SLERP_LERP_ABOVE = 0.9995  # mean cosine above which A1111's slerp falls back to a linear blend

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_PHILOX_MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10
# Box-Muller scales as cuRAND's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI, float32 (A1111 spells them
# 2.3283064e-10 and 2.3283064e-10 * 6.2831855, the product taken in float64 and then rounded).
_TWO_POW32_INV = np.float32(2.3283064e-10)
_TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)
_MAX_SEED = 2**64  # seeds are the 64-bit Philox key / torch seed
_MAX_COUNT = 2**32  # the element index and the draw offset are one 32-bit counter word each
_SEED_RESIZE = re.compile(r"^(\d+)x(\d+)$")


def _philox4x32_10(c0: np.ndarray, c2: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """First two 32-bit outputs of Philox 4x32-10 for counters (c0, 0, c2, 0) and a 64-bit seed key.

    Words are held in uint64 arrays, so a 32 x 32-bit product is exact; hi / lo are its upper / lower halves.
    """
    c1 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    key0, key1 = seed & 0xFFFFFFFF, seed >> 32
    for round_index in range(_PHILOX_ROUNDS):
        if round_index:
            key0 = (key0 + _PHILOX_KEY_STEPS[0]) & 0xFFFFFFFF
            key1 = (key1 + _PHILOX_KEY_STEPS[1]) & 0xFFFFFFFF
        product0 = c0 * _PHILOX_MULTIPLIERS[0]
        product2 = c2 * _PHILOX_MULTIPLIERS[1]
        c0, c1, c2, c3 = (
            (product2 >> _SHIFT32) ^ c1 ^ np.uint64(key0),
            product2 & _MASK32,
            (product0 >> _SHIFT32) ^ c3 ^ np.uint64(key1),
            product0 & _MASK32,
        )
    return c0, c1


def _box_muller_sin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``sqrt(-2 log u) sin(v)`` of 32-bit words, in float64 rounded once to float32 (A1111's numpy order)."""
    u = x.astype(np.float64) * np.float64(_TWO_POW32_INV) + np.float64(_TWO_POW32_INV / np.float32(2))
    v = y.astype(np.float64) * np.float64(_TWO_POW32_INV_2PI) + np.float64(_TWO_POW32_INV_2PI / np.float32(2))
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


def _check_seed(seed: object, what: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < _MAX_SEED:
        raise SamplingError(f"{what}: expected an integer in [0, 2**64), found {seed!r}")
    return int(seed)


def philox_randn(seed: int, shape: Sequence[int], offset: int = 0) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` on the CPU: A1111's "NV" source, NVIDIA's GPU stream.

    Draw ``offset`` (0 for the first) of a generator seeded ``seed``: A1111's ``rng_philox.Generator`` counts
    one per draw, as CUDA's Philox offset advances by one counter per ``torch.randn`` call that gives every
    element its own thread (latent-sized tensors). Bit-equal to A1111's numpy code, which takes Box-Muller
    in float64 and rounds once; CUDA rounds it in float32 with the fast ``__sincosf``, so CUDA's own values
    (the 12 A1111 quotes for seed 0, shape (3, 4), among them) differ from these by up to a few ulps.
    """
    seed = _check_seed(seed, "Philox seed")
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise SamplingError(f"noise shape: expected sizes >= 0, found {shape}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < _MAX_COUNT:
        raise SamplingError(f"Philox offset: expected an integer in [0, 2**32), found {offset!r}")
    count = math.prod(shape)
    if count >= _MAX_COUNT:
        raise SamplingError(f"Philox noise: expected fewer than 2**32 elements, found {count} for shape {shape}")
    index = np.arange(count, dtype=np.uint64)  # element i: counter (offset, 0, i, 0)
    x, y = _philox4x32_10(np.full(count, offset, dtype=np.uint64), index, seed)
    return torch.from_numpy(_box_muller_sin(x, y).reshape(shape))


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed blend of (C, H, W) noises: ``low`` at strength 0, ``high`` at strength 1.

    Spherical interpolation per (channel, column) over the rows (dim 1); when the mean cosine is above
    0.9995 it returns ``low * strength + high * (1 - strength)`` instead, weights as A1111 writes them.
    """
    low_unit = low / torch.linalg.vector_norm(low, dim=1, keepdim=True)  # (C, H, W)
    high_unit = high / torch.linalg.vector_norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)  # (C, W)
    if cosine.mean() > SLERP_LERP_ABOVE:
        return low * strength + high * (1 - strength)
    angle = torch.acos(cosine)
    sin_angle = torch.sin(angle)
    low_weight = (torch.sin((1.0 - strength) * angle) / sin_angle).unsqueeze(1)  # (C, 1, W)
    high_weight = (torch.sin(strength * angle) / sin_angle).unsqueeze(1)
    return low_weight * low + high_weight * high


def _paste_centred(old: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """A1111's seed resize: ``old`` (C, h0, w0) centred onto ``canvas`` (C, H, W), cropped where larger."""
    _, old_h, old_w = old.shape
    _, new_h, new_w = canvas.shape
    shift_y, shift_x = (new_h - old_h) // 2, (new_w - old_w) // 2  # floor, as Python's // on negatives
    rows = old_h if shift_y >= 0 else old_h + 2 * shift_y
    cols = old_w if shift_x >= 0 else old_w + 2 * shift_x
    to_y, to_x = max(shift_y, 0), max(shift_x, 0)
    from_y, from_x = max(-shift_y, 0), max(-shift_x, 0)
    pasted = canvas.clone()
    pasted[:, to_y:to_y + rows, to_x:to_x + cols] = old[:, from_y:from_y + rows, from_x:from_x + cols]
    return pasted


class _NoiseStream:
    """One image's generator (A1111's ``create_generator``): draws float32 noise on ``draw_device``."""

    def __init__(self, seed: int, source: str, draw_device: torch.device) -> None:
        self.seed = seed
        self.offset = 0  # draws so far ("nv")
        self.generator = None if source == "nv" else torch.Generator(draw_device).manual_seed(seed)

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.generator is None:
            noise = philox_randn(self.seed, shape, self.offset)
            self.offset += 1
            return noise
        return torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)


def _draw_device(source: str, device: torch.device) -> torch.device:
    """Where the source's generators live: the CUDA card for "gpu", else the CPU (A1111: "mps" too)."""
    if source != "gpu" or device.type == "mps":
        return torch.device("cpu")
    if device.type != "cuda":
        raise SamplingError(
            f'noise source "gpu": draws with a CUDA generator and needs a CUDA device, found device {device}; '
            f'use "nv" (NVIDIA GPU noise reproduced on any device) or "cpu"'
        )
    return device


class ImageNoise:
    """Per-image noise as A1111's ImageRNG: image i from seeds[i] (and subseeds[i] at subseed_strength,
    slerp), seed resize, source cpu/gpu/nv; ``first()`` -> the initial latent noise (B, C, H, W);
    ``randn_like(x)`` -> the next per-image draw for ancestral/SDE samplers (A1111's ``rng.next()``).

    ``shape`` is one image's latent (C, H, W), as A1111's ``ImageRNG(shape, seeds)``; the batch is
    len(seeds). ``seed_resize_from`` is (width, height) in pixels, or None. ``eta_noise_seed_delta``
    reseeds the generators after the initial noise whatever the sampler, as A1111 does (module docstring).
    Noise is drawn on the source's device, moved to ``device`` (float32), and blended there, as A1111 does
    on its device; ``randn_like`` returns x's device and dtype.
    """

    def __init__(
        self,
        shape: Sequence[int],
        seeds: Sequence[int],
        *,
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from: tuple[int, int] | None = None,
        source: str = "cpu",
        eta_noise_seed_delta: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3 or any(n < 1 for n in self.shape):
            raise SamplingError(f"noise shape: expected one image's latent (C, H, W) of sizes >= 1, found {shape}")
        self.seeds = [_check_seed(seed, f"seed {i}") for i, seed in enumerate(seeds)]
        if not self.seeds:
            raise SamplingError("seeds: expected one seed per image, found none")
        if source not in RNG_SOURCES:
            raise SamplingError(f"noise source: expected one of {RNG_SOURCES}, found {source!r}")
        self.source = source
        self.subseed_strength = float(subseed_strength)
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise SamplingError(f"variation seed strength: expected a value in [0, 1], found {subseed_strength!r}")
        self.subseeds = None if subseeds is None else [_check_seed(s, f"subseed {i}") for i, s in enumerate(subseeds)]
        if self.subseed_strength and (self.subseeds is None or len(self.subseeds) != len(self.seeds)):
            found = "none" if self.subseeds is None else len(self.subseeds)
            raise SamplingError(f"subseeds: expected {len(self.seeds)} (one per image) for a variation strength of "
                                f"{self.subseed_strength}, found {found}")
        self.seed_resize_from = None if seed_resize_from is None else tuple(int(n) for n in seed_resize_from)
        if self.seed_resize_from is not None and (len(self.seed_resize_from) != 2 or min(self.seed_resize_from) < 1):
            raise SamplingError(f"seed resize from: expected (width, height) in pixels >= 1, found {seed_resize_from!r}")
        if self.seed_resize_from is not None and min(self.seed_resize_from) < LATENT_FACTOR:
            raise SamplingError(f"seed resize from: expected a size of at least {LATENT_FACTOR} pixels, found "
                                f"{seed_resize_from!r}")
        self.eta_noise_seed_delta = int(eta_noise_seed_delta)
        if self.eta_noise_seed_delta:
            for seed in self.seeds:
                _check_seed(seed + self.eta_noise_seed_delta, f"seed {seed} + eta noise seed delta")
        self.device = torch.device(device)
        self._draw_device = _draw_device(source, self.device)
        self._streams = [_NoiseStream(seed, source, self._draw_device) for seed in self.seeds]
        self._first_drawn = False

    def _noise_shape(self) -> tuple[int, int, int]:
        """The seed's noise size: the image's latent, or the "Seed resize from" size // 8."""
        if self.seed_resize_from is None:
            return self.shape
        width, height = self.seed_resize_from
        return (self.shape[0], height // LATENT_FACTOR, width // LATENT_FACTOR)

    def _fresh_draw(self, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
        """First draw of a new generator seeded ``seed`` (A1111's ``randn(seed, shape)``), on ``device``."""
        return _NoiseStream(seed, self.source, self._draw_device).draw(shape).to(self.device)

    def first(self) -> torch.Tensor:
        """The initial latent noise (B, C, H, W), float32 on ``device``; drawn once per ImageNoise."""
        if self._first_drawn:
            raise SamplingError("initial noise: already drawn from this ImageNoise (its generators have moved "
                                "on); make a new ImageNoise for a new picture")
        self._first_drawn = True
        noise_shape = self._noise_shape()
        images = []
        for index, (seed, stream) in enumerate(zip(self.seeds, self._streams)):
            resized = noise_shape != self.shape
            if resized:
                noise = self._fresh_draw(seed, noise_shape)
            else:
                noise = stream.draw(self.shape).to(self.device)
            if self.subseeds is not None and self.subseed_strength:
                noise = slerp(self.subseed_strength, noise, self._fresh_draw(self.subseeds[index], noise_shape))
            if resized:
                noise = _paste_centred(noise, stream.draw(self.shape).to(self.device))
            images.append(noise)
        if self.eta_noise_seed_delta:
            self._streams = [_NoiseStream(seed + self.eta_noise_seed_delta, self.source, self._draw_device)
                             for seed in self.seeds]
        return torch.stack(images)  # (B, C, H, W)

    def next(self) -> torch.Tensor:
        """A1111's ``ImageRNG.next()``: the initial noise on the first call, then each image's next draw."""
        if not self._first_drawn:
            return self.first()
        return torch.stack([stream.draw(self.shape) for stream in self._streams]).to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """The next per-image draw shaped like x (B, C, H, W), on x's device and dtype (a sampler's noise)."""
        expected = (len(self.seeds), *self.shape)
        if tuple(x.shape) != expected:
            raise SamplingError(f"sampler noise: this ImageNoise draws {expected} (B, C, H, W), the sampler asked "
                                f"for {tuple(x.shape)}")
        return self.next().to(device=x.device, dtype=x.dtype)


def image_seeds(
    seed: int, count: int, *, subseed: int | None = None, subseed_strength: float = 0.0
) -> tuple[list[int], list[int] | None]:
    """A1111's seeds of a batch of ``count`` images: (seeds, subseeds).

    Image i gets seed + i, except with a nonzero variation strength, where every image gets ``seed`` and
    the variation comes from subseed + i (``process_images_inner``). subseeds is None without a subseed.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SamplingError(f"image count: expected an integer >= 1, found {count!r}")
    seeds = [_check_seed(seed + (i if subseed_strength == 0 else 0), f"seed of image {i}") for i in range(count)]
    if subseed is None:
        return seeds, None
    return seeds, [_check_seed(subseed + i, f"subseed of image {i}") for i in range(count)]


def records_eta_noise_seed_delta(sampler: str, eta: float = 1.0) -> bool:
    """Whether A1111 writes "ENSD" for this sampler: one flagged "uses_ensd", run with eta != 0."""
    return sampler in ENSD_SAMPLERS and eta != 0


def infotext_fields(
    *,
    sampler: str,
    eta: float = 1.0,
    source: str = "cpu",
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    seed_resize_from: tuple[int, int] | None = None,
    eta_noise_seed_delta: int = 0,
) -> dict[str, str]:
    """One image's noise fields of A1111's infotext, in A1111's order, only those it writes.

    ``subseed`` is this image's (A1111 writes image i's subseed). "Variation seed strength" is written as
    Python's float text (0.25); "Seed resize from" as "WxH".
    """
    if source not in RNG_SOURCES:
        raise SamplingError(f"noise source: expected one of {RNG_SOURCES}, found {source!r}")
    fields: dict[str, str] = {}
    if subseed_strength != 0:
        if subseed is None:
            raise SamplingError(f"variation seed: expected the image's subseed for a strength of {subseed_strength}")
        fields["Variation seed"] = str(int(subseed))
        fields["Variation seed strength"] = str(float(subseed_strength))
    if seed_resize_from is not None and min(seed_resize_from) > 0:
        width, height = seed_resize_from
        fields["Seed resize from"] = f"{int(width)}x{int(height)}"
    if eta_noise_seed_delta != 0 and records_eta_noise_seed_delta(sampler, eta):
        fields["ENSD"] = str(int(eta_noise_seed_delta))
    if source != "gpu":
        fields["RNG"] = source.upper()
    return fields


def _field_number(fields: Mapping[str, str], key: str, kind: type) -> int | float | None:
    if key not in fields:
        return None
    text = str(fields[key]).strip()
    try:
        return kind(text)
    except ValueError:
        raise SamplingError(f'infotext "{key}": expected {"an integer" if kind is int else "a number"}, '
                            f'found {text!r}') from None


def settings_from_infotext(fields: Mapping[str, str]) -> dict:
    """The noise settings in parsed infotext fields (key -> value text), as ImageNoise / image_seeds arguments.

    Returns {"source", "subseed" (int or None), "subseed_strength", "seed_resize_from" ((width, height) or
    None), "eta_noise_seed_delta"}. No "RNG" field means "gpu" (A1111's default, written for anything else).
    """
    rng = str(fields.get("RNG", "GPU")).strip()
    if rng.lower() not in RNG_SOURCES:
        raise SamplingError(f'infotext "RNG": expected one of "CPU", "GPU", "NV", found {rng!r}')
    resize = None
    if "Seed resize from" in fields:
        match = _SEED_RESIZE.match(str(fields["Seed resize from"]).strip())
        if match is None:
            raise SamplingError(f'infotext "Seed resize from": expected "WxH" in pixels, '
                                f'found {fields["Seed resize from"]!r}')
        width, height = int(match.group(1)), int(match.group(2))
        resize = (width, height) if width > 0 and height > 0 else None
    strength = _field_number(fields, "Variation seed strength", float)
    delta = _field_number(fields, "ENSD", int)
    return {
        "source": rng.lower(),
        "subseed": _field_number(fields, "Variation seed", int),
        "subseed_strength": 0.0 if strength is None else strength,
        "seed_resize_from": resize,
        "eta_noise_seed_delta": 0 if delta is None else delta,
    }
