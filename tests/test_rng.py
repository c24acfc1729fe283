"""A1111's random sources and noise rules: Philox "NV" noise, per-image generators, variation seeds, seed
resize, ENSD and the infotext fields.

References, each restated here from its source rather than taken from tiengine:
- Philox 4x32-10 (Salmon et al. 2011) in plain Python integers, checked first against Random123's
  known-answer vectors (kat_vectors, "philox4x32 10" lines); cuRAND's Box-Muller (first output,
  ``sqrt(-2 ln u) sin v``, constants CURAND_2POW32_INV = 2^-32 and CURAND_2POW32_INV_2PI = 2^-32 *
  float32(2 pi)) in Python floats (float64), rounded once to float32 as A1111's numpy code does.
- The 12 values A1111 documents in ``modules/rng_philox.py`` for seed 0, shape (3, 4). They are CUDA's
  own output, not its numpy code's: CUDA's Box-Muller takes ``__sincosf`` (max abs error 2^-21.41 per
  NVIDIA's CUDA Math API) and float32 ``logf``, so our float64-then-float32 values differ from them by up
  to 6 float32 ulps (2.4e-7); the bound asserted is s * 2^-21.41 with s = sqrt(-2 ln u), the error of the
  sine scaled by the radius (the largest measured ratio is 0.44 of it).
- A1111's ImageRNG rules (slerp, seed resize, ENSD, batch seeds, infotext keys) restated in numpy / loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiengine.diffusion.rng import (
    ENSD_SAMPLERS,
    RNG_SOURCES,
    ImageNoise,
    image_seeds,
    infotext_fields,
    philox_randn,
    records_eta_noise_seed_delta,
    settings_from_infotext,
    slerp,
)
from tiengine.diffusion.sampler_core import draw_noise
from tiengine.diffusion.schedules import SamplingError, batch_generators, initial_noise

A1111_SEED0_3X4 = [  # modules/rng_philox.py docstring, Generator(seed=0).randn(shape=(3, 4))
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]
SHAPE = (4, 6, 5)  # one image's latent (C, H, W), small
M32 = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Salmon et al.'s Philox4x32 with 10 rounds; the key is bumped by the Weyl constants between rounds."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p2 >> 32) ^ c1 ^ k0) & M32, p2 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
    return c0, c1, c2, c3


TWO_PI_32 = float(np.float32(2 * math.pi))  # float32(6.2831855)


def reference_normal(seed: int, index: int, offset: int) -> float:
    """Element ``index`` of draw ``offset``: counter (offset, 0, index, 0), key (seed lo, seed hi)."""
    x, y, _, _ = philox4x32_10((offset, 0, index, 0), (seed & M32, seed >> 32))
    u = x * 2.0**-32 + 2.0**-33
    v = y * (2.0**-32 * TWO_PI_32) + 2.0**-33 * TWO_PI_32
    return float(np.float32(math.sqrt(-2.0 * math.log(u)) * math.sin(v)))


def reference_randn(seed: int, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
    values = [reference_normal(seed, i, offset) for i in range(math.prod(shape))]
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def reference_slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's slerp in float64: per (channel, column), over the rows; its linear fallback above 0.9995."""
    a, b = low.double().numpy(), high.double().numpy()
    cosine = np.einsum("chw,chw->cw", a / np.linalg.norm(a, axis=1, keepdims=True),
                       b / np.linalg.norm(b, axis=1, keepdims=True))
    if cosine.mean() > 0.9995:
        return torch.from_numpy(a * strength + b * (1 - strength))
    omega = np.arccos(cosine)[:, None, :]
    return torch.from_numpy((np.sin((1 - strength) * omega) * a + np.sin(strength * omega) * b) / np.sin(omega))


def reference_paste(old: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """Seed resize pixel by pixel: shift d = floor((new - old) / 2); growing, old index i lands at i + d;
    shrinking, the new index j takes old j - d for j < old + 2 d (the odd last row/column keeps its own)."""
    out = canvas.clone()
    (_, old_h, old_w), (_, new_h, new_w) = old.shape, canvas.shape
    dy, dx = math.floor((new_h - old_h) / 2), math.floor((new_w - old_w) / 2)
    span_y = old_h if dy >= 0 else old_h + 2 * dy
    span_x = old_w if dx >= 0 else old_w + 2 * dx
    for j in range(new_h):
        for i in range(new_w):
            inside_y = dy <= j < dy + span_y if dy >= 0 else j < span_y
            inside_x = dx <= i < dx + span_x if dx >= 0 else i < span_x
            if inside_y and inside_x:
                out[:, j, i] = old[:, j - dy, i - dx]
    return out


def fresh(seed: int, shape: tuple[int, ...], source: str) -> torch.Tensor:
    """The first draw of a new generator seeded ``seed`` (A1111's randn(seed, shape))."""
    if source == "nv":
        return reference_randn(seed, shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def slerp_tolerance(*tensors: torch.Tensor) -> float:
    """float32 slerp against float64: a dozen roundings of 2^-24 relative (norms, dots, acos, sines,
    quotients), amplified where sin(omega) is small: 32 * 2^-24 * max|x| (the worst of 1000 random (4, 6, 5)
    pairs at five strengths measured 6.9 * 2^-24 * max|x|)."""
    return 32 * 2.0**-24 * max(float(t.abs().max()) for t in tensors)


# --- Philox -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_reference_philox_matches_random123_known_answers(counter, key, expected):
    assert philox4x32_10(counter, key) == expected


def test_philox_randn_matches_a1111_documented_vector_within_cuda_sine_error():
    ours = philox_randn(0, (3, 4))
    assert ours.dtype == torch.float32 and ours.shape == (3, 4)
    documented = torch.tensor(A1111_SEED0_3X4, dtype=torch.float32)
    x = torch.tensor([philox4x32_10((0, 0, i, 0), (0, 0))[0] for i in range(12)], dtype=torch.float64)
    radius = torch.sqrt(-2 * torch.log(x * 2.0**-32 + 2.0**-33)).reshape(3, 4)
    assert torch.all((ours.double() - documented.double()).abs() <= radius * 2.0**-21.41)
    assert torch.equal(ours, reference_randn(0, (3, 4)))  # and bit-equal to the float64 restatement


@pytest.mark.parametrize("seed, shape, offset", [
    (0, (2, 3, 5), 0), (0, (2, 3, 5), 1), (1234567, (4, 3, 2), 3), (2**32 + 7, (7,), 0),
    (2**64 - 1, (3, 3), 2**32 - 1), (31337, (1, 1, 1), 12),
])
def test_philox_randn_bit_equal_to_restated_algorithm(seed, shape, offset):
    assert torch.equal(philox_randn(seed, shape, offset), reference_randn(seed, shape, offset))


def test_philox_randn_statistics_and_bad_input():
    sample = philox_randn(42, (64, 64, 16))  # 65536 draws: mean and std within 5 sigma of N(0, 1)
    assert abs(float(sample.mean())) < 5 / 256 and abs(float(sample.std()) - 1) < 5 * math.sqrt(2) / 256
    assert philox_randn(3, (0, 4)).shape == (0, 4)
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(SamplingError, match="Philox seed"):
            philox_randn(seed, (2,))
    with pytest.raises(SamplingError, match="offset"):
        philox_randn(0, (2,), offset=-1)


# --- the "cpu" source is tiengine's noise so far ----------------------------------------------------


def test_cpu_source_equals_initial_noise_and_sampler_draws():
    seeds = [5, 6, 7]
    noise = ImageNoise(SHAPE, seeds, source="cpu")
    assert torch.equal(noise.first(), initial_noise(5, (3, *SHAPE)))
    generators = batch_generators(5, 3)
    initial_noise(generators, (3, *SHAPE))
    x = torch.zeros(3, *SHAPE)
    for _ in range(3):
        assert torch.equal(noise.randn_like(x), draw_noise(x, generators, "Euler a"))


def test_randn_like_follows_x_dtype_and_checks_shape():
    noise = ImageNoise(SHAPE, [1, 2])
    first = noise.first()
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    half = noise.randn_like(torch.zeros(2, *SHAPE, dtype=torch.float16))
    assert half.dtype == torch.float16
    with pytest.raises(SamplingError, match=r"\(2, 4, 6, 5\).*\(1, 4, 6, 5\)"):
        noise.randn_like(torch.zeros(1, *SHAPE))
    with pytest.raises(SamplingError, match="already drawn"):
        noise.first()


def test_next_before_first_is_the_initial_noise():
    a, b = ImageNoise(SHAPE, [9], source="nv"), ImageNoise(SHAPE, [9], source="nv")
    assert torch.equal(a.randn_like(torch.zeros(1, *SHAPE)), b.first())
    assert torch.equal(a.next(), b.next())


# --- per-image generators, nv draws, ENSD -----------------------------------------------------------


@pytest.mark.parametrize("source", ["cpu", "nv"])
@pytest.mark.parametrize("delta", [0, 31337])
def test_draw_sequence_and_eta_noise_seed_delta(source, delta):
    seeds = [11, 2**33 + 1]
    noise = ImageNoise(SHAPE, seeds, source=source, eta_noise_seed_delta=delta)
    x = torch.zeros(2, *SHAPE)
    draws = [noise.first(), noise.randn_like(x), noise.randn_like(x)]
    for image, seed in enumerate(seeds):
        if source == "nv":  # one Philox offset per draw; ENSD: a new generator (offset 0) at seed + delta
            expected = [reference_randn(seed, SHAPE, 0)]
            expected += [reference_randn(seed + delta, SHAPE, k) if delta else reference_randn(seed, SHAPE, k + 1)
                         for k in range(2)]
        else:
            generator = torch.Generator().manual_seed(seed)
            expected = [torch.randn(SHAPE, generator=generator)]
            if delta:
                generator = torch.Generator().manual_seed(seed + delta)
            expected += [torch.randn(SHAPE, generator=generator) for _ in range(2)]
        for draw, reference in zip(draws, expected):
            assert torch.equal(draw[image], reference)


# --- variation seeds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["cpu", "nv"])
@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
def test_variation_seed_slerp(source, strength):
    noise = ImageNoise(SHAPE, [100, 100], subseeds=[7, 8], subseed_strength=strength, source=source)
    first = noise.first()
    for image, subseed in enumerate([7, 8]):
        low, high = fresh(100, SHAPE, source), fresh(subseed, SHAPE, source)
        if strength == 0:  # A1111 skips the blend at strength 0
            assert torch.equal(first[image], low)
            continue
        expected = reference_slerp(strength, low, high)
        assert torch.allclose(first[image].double(), expected, rtol=0, atol=slerp_tolerance(low, high))
    # later draws go on from the seed's generator, not the subseed's
    assert torch.equal(noise.randn_like(first)[0], fresh_second(100, SHAPE, source))


def fresh_second(seed: int, shape: tuple[int, ...], source: str) -> torch.Tensor:
    if source == "nv":
        return reference_randn(seed, shape, 1)
    generator = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator)


def test_slerp_linear_fallback_keeps_a1111_weight_order():
    low = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    high = low + 1e-3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))  # cosine ~ 1
    assert torch.equal(slerp(0.25, low, high), low * 0.25 + high * 0.75)
    far = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    result = slerp(0.25, low, far)
    assert torch.allclose(result.double(), reference_slerp(0.25, low, far), rtol=0, atol=slerp_tolerance(low, far))


# --- seed resize -------------------------------------------------------------------------------------


@pytest.mark.parametrize("resize_from", [(24, 32), (64, 72), (88, 40), (40, 48), (56, 8)])
@pytest.mark.parametrize("source", ["cpu", "nv"])
def test_seed_resize_pastes_centred_noise(resize_from, source):
    # image latent (4, 6, 5) = 40 x 48 pixels; old sizes smaller, larger, odd differences, mixed
    noise = ImageNoise(SHAPE, [77], seed_resize_from=resize_from, source=source)
    width, height = resize_from
    old_shape = (SHAPE[0], height // 8, width // 8)
    canvas = fresh(77, SHAPE, source)  # the image generator's own first draw
    expected = canvas if old_shape == SHAPE else reference_paste(fresh(77, old_shape, source), canvas)
    assert torch.equal(noise.first()[0], expected)
    assert torch.equal(noise.randn_like(torch.zeros(1, *SHAPE))[0], fresh_second(77, SHAPE, source))


def test_seed_resize_with_variation_blends_only_the_old_size_noise():
    noise = ImageNoise(SHAPE, [3], subseeds=[4], subseed_strength=0.5, seed_resize_from=(56, 32))
    old_shape = (4, 4, 7)
    blended = reference_slerp(0.5, fresh(3, old_shape, "cpu"), fresh(4, old_shape, "cpu")).float()
    expected = reference_paste(blended, fresh(3, SHAPE, "cpu"))
    first = noise.first()[0]
    assert torch.allclose(first, expected, rtol=0, atol=slerp_tolerance(expected))
    unpasted = torch.ones(SHAPE, dtype=torch.bool)
    unpasted[:, 1:5, :] = False  # the old 4 rows land at offset 1; the 7 columns crop to 5 from index 1
    assert torch.equal(first[unpasted], fresh(3, SHAPE, "cpu")[unpasted])


# --- per-image property --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["cpu", "nv"])
def test_image_of_a_batch_equals_a_batch_of_one(source):
    options = {"subseed_strength": 0.4, "seed_resize_from": (48, 40), "source": source, "eta_noise_seed_delta": 5}
    seeds, subseeds = [20, 20, 21], [30, 31, 32]
    batch = ImageNoise(SHAPE, seeds, subseeds=subseeds, **options)
    singles = [ImageNoise(SHAPE, [seed], subseeds=[sub], **options) for seed, sub in zip(seeds, subseeds)]
    x_batch, x_one = torch.zeros(3, *SHAPE), torch.zeros(1, *SHAPE)
    batch_draws = [batch.first(), batch.randn_like(x_batch), batch.randn_like(x_batch)]
    for image, single in enumerate(singles):
        single_draws = [single.first(), single.randn_like(x_one), single.randn_like(x_one)]
        for in_batch, alone in zip(batch_draws, single_draws):
            assert torch.equal(in_batch[image], alone[0])


# --- sources and bad input -------------------------------------------------------------------------------


def test_gpu_source_needs_cuda():
    assert RNG_SOURCES == ("cpu", "gpu", "nv")
    with pytest.raises(SamplingError, match='"gpu".*CUDA.*"nv"'):
        ImageNoise(SHAPE, [1], source="gpu", device="cpu")
    with pytest.raises(SamplingError, match="noise source"):
        ImageNoise(SHAPE, [1], source="GPU")


@pytest.mark.parametrize("kwargs, message", [
    ({"shape": (2, 4, 6, 5)}, "one image's latent"),
    ({"seeds": []}, "one seed per image"),
    ({"seeds": [-3]}, "seed 0"),
    ({"subseed_strength": 0.5}, "subseeds: expected 1"),
    ({"subseeds": [1, 2], "subseed_strength": 0.5}, "found 2"),
    ({"subseed_strength": 1.5, "subseeds": [1]}, r"strength: expected a value in \[0, 1\]"),
    ({"seed_resize_from": (0, 64)}, "seed resize from"),
    ({"seed_resize_from": (4, 64)}, "at least 8"),
    ({"eta_noise_seed_delta": -10}, r"eta noise seed delta"),
])
def test_bad_settings_are_named(kwargs, message):
    arguments = {"shape": SHAPE, "seeds": [3]} | kwargs
    with pytest.raises(SamplingError, match=message):
        ImageNoise(arguments.pop("shape"), arguments.pop("seeds"), **arguments)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_gpu_source_is_one_cuda_generator_per_image():
    noise = ImageNoise(SHAPE, [0, 1], source="gpu", device="cuda")
    first, second = noise.first(), noise.randn_like(torch.zeros(2, *SHAPE, device="cuda"))
    for image, seed in enumerate([0, 1]):
        generator = torch.Generator("cuda").manual_seed(seed)
        assert torch.equal(first[image], torch.randn(SHAPE, generator=generator, device="cuda"))
        assert torch.equal(second[image], torch.randn(SHAPE, generator=generator, device="cuda"))


@needs_cuda
def test_nv_source_reproduces_cuda_randn_within_its_sine_error():
    """CUDA rounds Box-Muller in float32 with __sincosf: allow twice its documented sine error times the
    radius s, plus a few float32 ulps of logf / sqrtf / the product."""
    for seed in (0, 123456789, 2**40 + 3):
        generator = torch.Generator("cuda").manual_seed(seed)
        for offset in range(3):
            cuda = torch.randn(SHAPE, generator=generator, device="cuda").cpu().double()
            ours = philox_randn(seed, SHAPE, offset).double()
            x = torch.tensor([philox4x32_10((offset, 0, i, 0), (seed & M32, seed >> 32))[0]
                              for i in range(math.prod(SHAPE))], dtype=torch.float64).reshape(SHAPE)
            radius = torch.sqrt(-2 * torch.log(x * 2.0**-32 + 2.0**-33))
            assert torch.all((cuda - ours).abs() <= 2 * radius * 2.0**-21.41 + 4 * 2.0**-23 * ours.abs())


# --- batch seeds and infotext -----------------------------------------------------------------------------


def test_image_seeds_follow_a1111():
    assert image_seeds(10, 3) == ([10, 11, 12], None)
    assert image_seeds(10, 3, subseed=50) == ([10, 11, 12], [50, 51, 52])
    assert image_seeds(10, 3, subseed=50, subseed_strength=0.2) == ([10, 10, 10], [50, 51, 52])
    with pytest.raises(SamplingError, match="image count"):
        image_seeds(10, 0)


def test_ensd_is_recorded_only_for_a1111_ensd_samplers():
    assert ENSD_SAMPLERS == ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive")
    assert records_eta_noise_seed_delta("Euler a") and not records_eta_noise_seed_delta("Euler a", eta=0.0)
    for name in ("Euler", "DPM++ 2M SDE", "DPM++ SDE", "DDIM", "Heun"):
        assert not records_eta_noise_seed_delta(name)


def test_infotext_fields_are_a1111s():
    assert infotext_fields(sampler="Euler", source="gpu") == {}
    assert infotext_fields(sampler="Euler") == {"RNG": "CPU"}
    fields = infotext_fields(sampler="Euler a", source="nv", subseed=51, subseed_strength=0.25,
                             seed_resize_from=(512, 768), eta_noise_seed_delta=31337)
    assert list(fields.items()) == [("Variation seed", "51"), ("Variation seed strength", "0.25"),
                                    ("Seed resize from", "512x768"), ("ENSD", "31337"), ("RNG", "NV")]
    assert "ENSD" not in infotext_fields(sampler="DPM++ 2M SDE", eta_noise_seed_delta=31337)
    assert "ENSD" not in infotext_fields(sampler="Euler a", eta=0.0, eta_noise_seed_delta=31337)
    assert "Variation seed" not in infotext_fields(sampler="Euler", subseed=5, subseed_strength=0.0)


def test_settings_from_infotext_round_trip_and_errors():
    fields = infotext_fields(sampler="Euler a", source="nv", subseed=51, subseed_strength=0.25,
                             seed_resize_from=(512, 768), eta_noise_seed_delta=31337)
    assert settings_from_infotext(fields) == {
        "source": "nv", "subseed": 51, "subseed_strength": 0.25, "seed_resize_from": (512, 768),
        "eta_noise_seed_delta": 31337,
    }
    assert settings_from_infotext({"Steps": "20"}) == {
        "source": "gpu", "subseed": None, "subseed_strength": 0.0, "seed_resize_from": None,
        "eta_noise_seed_delta": 0,
    }
    assert settings_from_infotext({"RNG": "CPU"})["source"] == "cpu"
    for key, value, message in [("RNG", "TPU", '"RNG"'), ("Seed resize from", "512 by 768", "WxH"),
                                ("ENSD", "lots", '"ENSD": expected an integer'),
                                ("Variation seed strength", "half", "a number")]:
        with pytest.raises(SamplingError, match=message):
            settings_from_infotext({key: value})
