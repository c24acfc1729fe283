"""The hires fix with latent upscalers against A1111's latent path, restated here from its source.

A1111 (modules/processing.py, StableDiffusionProcessingTxt2Img.sample / sample_hr_pass; modules/
sd_samplers_common.py setup_img2img_steps; modules/sd_samplers_kdiffusion.py sample_img2img; modules/
shared.py latent_upscale_modes): the first pass's latents are resized with torch.nn.functional.interpolate to
the target size // 8 in the upscaler's mode, cropped by truncate_x / truncate_y, noised with the first draw of
a new ImageRNG of the new shape from the same seeds, and sampled over sigmas[steps - t_enc - 1:] of a schedule
of steps = int(requested / min(strength, 0.999)) with t_enc = requested - 1. The test pipeline below is built
from the tested stages (encode, eps denoiser, guidance, sampler, ImageNoise, VAE) on a tiny SD1 model whose
latent factor is 4 (A1111's 8 is the factor of every SD VAE); the engine must match it bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from model_builders import tiny_model_folder

from tiengine.cli import main
from tiengine.diffusion.guidance import unet_schedule
from tiengine.diffusion.hires import (
    LATENT_UPSCALE_MODES,
    crop_latents,
    hires_size,
    img2img_sigmas,
    img2img_steps,
    upscale_latents,
)
from tiengine.diffusion.names import LATENT_UPSCALERS
from tiengine.diffusion.rng import ImageNoise
from tiengine.diffusion.samplers import get_sampler, scheduled_guided_denoiser
from tiengine.diffusion.schedules import (
    NoiseSchedule,
    eps_denoiser,
    get_sigmas,
    img2img_start,
)
from tiengine.engine import Engine
from tiengine.errors import EngineError
from tiengine.io.images import tensor_to_pil
from tiengine.io.metadata import parse_parameters, read_image_parameters
from tiengine.models.config import size_time_ids
from tiengine.settings import GenerateSettings

# A1111's shared.latent_upscale_modes, as written there
A1111_LATENT_UPSCALE_MODES = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
NEGATIVE = "blurry"
CFG = 7.0


@pytest.fixture(scope="module")
def engine(sd1_folder):
    return Engine.load(sd1_folder, embeddings=False)


@pytest.fixture(scope="module")
def sdxl_engine(tmp_path_factory):
    return Engine.load(tiny_model_folder(tmp_path_factory.mktemp("sdxl") / "model", "sdxl"), embeddings=False)


def test_latent_upscalers_are_a1111s_and_resize_as_its_interpolate():
    assert list(LATENT_UPSCALERS) == list(A1111_LATENT_UPSCALE_MODES) == list(LATENT_UPSCALE_MODES)
    latents = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    results = {}
    for name, mode in A1111_LATENT_UPSCALE_MODES.items():
        expected = F.interpolate(latents, size=(9, 13), mode=mode["mode"], antialias=mode["antialias"])
        results[name] = upscale_latents(latents, (9, 13), name)
        assert torch.equal(results[name], expected), name
    assert len({tuple(result.flatten().tolist()) for result in results.values()}) == len(results)  # all differ


def test_other_upscalers_are_refused_by_name():
    with pytest.raises(EngineError, match=r"'R-ESRGAN 4x\+' is not available.*Latent \(nearest-exact\)"):
        GenerateSettings(hires_scale=2.0, hires_upscaler="R-ESRGAN 4x+")
    with pytest.raises(Exception, match=r"'ESRGAN_4x' is not available.*Latent, Latent \(antialiased\)"):
        upscale_latents(torch.zeros(1, 4, 2, 2), (4, 4), "ESRGAN_4x")


@pytest.mark.parametrize(("first", "scale", "resize", "upscale_to", "truncate", "image"), [
    ((512, 768), 2.0, None, (1024, 1536), (0, 0), (1024, 1536)),
    ((520, 520), 1.5, None, (780, 780), (0, 0), (776, 776)),  # 780 // 8 = 97 latent pixels
    ((512, 768), None, (1024, 0), (1024, 1536), (0, 0), (1024, 1536)),
    ((512, 768), None, (0, 1024), (682, 1024), (0, 0), (680, 1024)),  # 1024 * 512 // 768 = 682
    ((512, 768), None, (1024, 1024), (1024, 1536), (0, 64), (1024, 1024)),
    ((512, 512), None, (1000, 600), (1000, 1000), (0, 50), (1000, 600)),
    ((768, 512), None, (600, 1000), (1500, 1000), (112, 0), (600, 1000)),  # (1500 - 600) // 8 = 112
])
def test_hires_size_is_a1111s_calculate_target_resolution(first, scale, resize, upscale_to, truncate, image):
    size = hires_size(*first, scale=scale, resize=resize)
    assert (size.upscale_to, size.truncate, size.image) == (upscale_to, truncate, image)


def test_crop_cuts_the_odd_row_at_the_end():
    latents = torch.arange(7 * 6, dtype=torch.float32).reshape(1, 1, 7, 6)
    cropped = crop_latents(latents, (1, 3))  # A1111: rows [3 // 2, 7 - 4 // 2), columns [0, 6 - 1)
    assert torch.equal(cropped, latents[:, :, 1:5, 0:5])


@pytest.mark.parametrize(("steps", "strength", "given", "expected"), [
    (20, 0.5, True, (40, 19)),
    (20, 1.0, True, (20, 19)),  # int(20 / 0.999) = 20
    (20, 0.0, True, (0, 19)),
    (7, 0.7, True, (10, 6)),  # 7 / 0.7 = 10.000000000000002
    (10, 0.3, True, (33, 9)),
    (20, 0.5, False, (20, 10)),
    (20, 1.0, False, (20, 19)),
    (100, 0.29, False, (100, 28)),  # 0.29 * 100 = 28.999999999999996
    (10, 0.0, False, (10, 0)),
])
def test_img2img_steps_are_a1111s_setup_img2img_steps(steps, strength, given, expected):
    assert img2img_steps(steps, strength, steps_given=given) == expected


def test_img2img_sub_schedule_agrees_with_img2img_start():
    sigmas = get_sigmas(NoiseSchedule.from_betas(), 10, "karras")
    for strength in (0.0, 0.3, 0.55, 1.0):
        _, t_enc = img2img_steps(10, strength, steps_given=False)
        expected, _ = img2img_start(torch.zeros(1), torch.zeros(1), sigmas, strength)
        assert torch.equal(img2img_sigmas(sigmas, t_enc), expected)
    assert torch.equal(img2img_sigmas(sigmas, 3), sigmas[6:])


@dataclass(frozen=True)
class Case:
    """One txt2img + hires run; `upscale_to` / `truncate` are A1111's hr_upscale_to_x/y, truncate_x/y for it,
    worked out by hand (latent factor 4)."""

    prompt: str
    sampler: str
    scheduler: str  # the sampler's "Automatic" schedule in A1111
    seeds: tuple[int, ...]
    width: int
    height: int
    steps: int
    strength: float
    hires: dict
    upscale_to: tuple[int, int]
    truncate: tuple[int, int]
    noise: dict  # subseeds, subseed_strength, seed_resize_from, eta_noise_seed_delta
    family: str = "sd1"


CASES = {
    "euler-a-batch-ensd": Case("a [cat:dog:5] house", "Euler a", "normal", (5, 6), 32, 24, 4, 0.6,
                               {"hires_scale": 1.5, "hires_steps": 3}, (48, 36), (0, 0),
                               {"eta_noise_seed_delta": 1234}),
    "dpmpp-2m-resize-crop-variation": Case("a castle", "DPM++ 2M", "karras", (9,), 32, 24, 4, 0.45,
                                           {"hires_resize": (40, 40), "hires_upscaler": "Latent (bicubic antialiased)"},
                                           (53, 40), (3, 0), {"subseeds": (77,), "subseed_strength": 0.3}),
    "dpm2-seed-resize": Case("a [red|blue] ball", "DPM2", "karras", (3,), 24, 24, 3, 0.7,
                             {"hires_scale": 2.0, "hires_steps": 2, "hires_upscaler": "Latent (nearest-exact)"},
                             (48, 48), (0, 0), {"seed_resize_from": (16, 32)}),
    "sdxl-resize-crop": Case("a [cat:dog:0.5] on a hill", "Euler a", "normal", (8,), 24, 32, 3, 0.5,
                             {"hires_resize": (40, 40), "hires_steps": 2}, (40, 53), (0, 3), {}, "sdxl"),
    "strength-zero": Case("a tree", "Euler", "normal", (2,), 24, 32, 3, 0.0,
                          {"hires_scale": 2.0, "hires_upscaler": "Latent (nearest)"}, (48, 64), (0, 0), {}),
}


def a1111_txt2img_hires(engine: Engine, case: Case) -> list:
    """A1111's txt2img with the hires fix and a latent upscaler, step by step (module docstring)."""
    unet, vae = engine.modules["unet"], engine.modules["vae"]
    factor = vae.downscale_factor  # A1111's opt_f
    schedule = NoiseSchedule.from_betas()
    info = get_sampler(case.sampler)
    batch = len(case.seeds)
    mode = A1111_LATENT_UPSCALE_MODES[case.hires.get("hires_upscaler", "Latent")]

    def guided(conditioning, width, height):
        def rows(scheduled, negative=False):  # the same prompt for every image; SDXL's sizes: A1111's SdConditioning
            sizes = size_time_ids(engine.config, width, height, negative=negative) if case.family == "sdxl" else None
            return [(last, {key: value.expand(batch, *value.shape[1:]) for key, value in cond.items()})
                    for last, cond in unet_schedule(scheduled.entries, unet, sizes, dtype=torch.float32)]

        return scheduled_guided_denoiser(eps_denoiser(unet, schedule), rows(conditioning.negative, negative=True),
                                         [(rows(conditioning.positive[0][0]), 1.0)], CFG)

    def image_rng(shape):
        subseeds = case.noise.get("subseeds")
        return ImageNoise(shape, case.seeds, subseeds=None if subseeds is None else list(subseeds),
                          subseed_strength=case.noise.get("subseed_strength", 0.0),
                          seed_resize_from=case.noise.get("seed_resize_from"),
                          eta_noise_seed_delta=case.noise.get("eta_noise_seed_delta", 0))

    with torch.no_grad():
        # process_images_inner: p.rng = ImageRNG((4, height // f, width // f), seeds, ...); sample(): rng.next()
        rng = image_rng((4, case.height // factor, case.width // factor))
        sigmas = get_sigmas(schedule, case.steps, case.scheduler, discard_penultimate=info.discard_penultimate_sigma)
        first = engine.encode(case.prompt, NEGATIVE, steps=case.steps, second_order=info.second_order)
        samples = info.sample(guided(first, case.width, case.height), rng.next() * sigmas[0], sigmas, generator=rng)
        # sample_hr_pass: resize to the target // f, crop, and a new ImageRNG at the new shape
        target_width, target_height = case.upscale_to
        samples = F.interpolate(samples, size=(target_height // factor, target_width // factor), mode=mode["mode"],
                                antialias=mode["antialias"])
        truncate_x, truncate_y = case.truncate
        samples = samples[:, :, truncate_y // 2 : samples.shape[2] - (truncate_y + 1) // 2,
                          truncate_x // 2 : samples.shape[3] - (truncate_x + 1) // 2]
        rng = image_rng(samples.shape[1:])
        noise = rng.next()
        # sampler.sample_img2img(p, samples, noise, hr_c, hr_uc, steps=hr_second_pass_steps or steps)
        requested = case.hires.get("hires_steps", 0) or case.steps
        steps = int(requested / min(case.strength, 0.999)) if case.strength > 0 else 0  # setup_img2img_steps
        t_enc = requested - 1
        if steps:
            sigmas = get_sigmas(schedule, steps, case.scheduler, discard_penultimate=info.discard_penultimate_sigma)
        else:
            sigmas = torch.zeros(1)  # k-diffusion's schedule of 0 steps: the final 0 alone
        sigma_sched = sigmas[steps - t_enc - 1 :]
        xi = samples + noise * sigma_sched[0]
        hires_conditioning = engine.encode(case.prompt, NEGATIVE, steps=case.steps, second_order=info.second_order,
                                           hires_steps=requested)
        # hr_c / hr_uc: SdConditioning(width=hr_upscale_to_x, height=hr_upscale_to_y), the size before the crop
        hires_denoiser = guided(hires_conditioning, target_width, target_height)
        # k-diffusion's loops run len(sigma_sched) - 1 steps
        samples = info.sample(hires_denoiser, xi, sigma_sched, generator=rng) if steps else xi
        return tensor_to_pil(vae.images_from_latents(samples))


@pytest.mark.parametrize("name", sorted(CASES))
def test_hires_fix_is_a1111s_latent_path_bit_for_bit(engine, sdxl_engine, name):
    case = CASES[name]
    engine = sdxl_engine if case.family == "sdxl" else engine
    noise = {key: value for key, value in case.noise.items() if key != "subseeds"}
    if "subseeds" in case.noise:
        noise["subseed"] = case.noise["subseeds"][0]
    calls = []
    result = engine.generate(case.prompt, NEGATIVE, steps=case.steps, sampler=case.sampler, seed=case.seeds[0],
                             width=case.width, height=case.height, batch_size=len(case.seeds), cfg_scale=CFG,
                             strength=case.strength, **case.hires, **noise,
                             callback=lambda step, total, x, _: calls.append((step, total, tuple(x.shape[-2:]))))
    expected = a1111_txt2img_hires(engine, case)
    assert result.seeds == list(case.seeds)
    for image, reference in zip(result.images, expected, strict=True):
        assert image.size == reference.size
        assert image.tobytes() == reference.tobytes()
    first = (case.height // 4, case.width // 4)
    hires_steps = (case.hires.get("hires_steps", 0) or case.steps) if case.strength else 0
    total = case.steps + hires_steps
    assert [step for step, _, _ in calls] == list(range(total)) and {t for _, t, _ in calls} == {total}
    assert {shape for step, _, shape in calls if step < case.steps} == {first}
    assert len({shape for step, _, shape in calls if step >= case.steps} - {first}) == (1 if hires_steps else 0)


def test_hires_conditioning_counts_schedules_from_the_end_of_the_first_pass(engine):
    first = engine.encode("a [cat:dog:5] house", NEGATIVE, steps=4)
    hires = engine.encode("a [cat:dog:5] house", NEGATIVE, steps=4, hires_steps=3)
    fraction = engine.encode("a [cat:dog:0.5] house", NEGATIVE, steps=4, hires_steps=3)
    # A1111: an integer N is step N - (first-pass steps) of the second pass; a fraction counts from 1.0
    assert [(last, text) for (last, _, _), text in zip(first.positive[0][0].entries, first.positive[0][0].texts)] \
        == [(4, "a cat house")]
    assert [(last, text) for (last, _, _), text in zip(hires.positive[0][0].entries, hires.positive[0][0].texts)] \
        == [(1, "a cat house"), (3, "a dog house")]
    assert fraction.positive[0][0].texts == ["a dog house"]


def test_infotext_has_a1111s_hires_keys_in_order(engine):
    resized = engine.generate("a cat", steps=2, sampler="Euler", seed=1, width=32, height=24, strength=0.5,
                              hires_resize=(0, 40), hires_upscaler="Latent (antialiased)")
    fields = parse_parameters(resized.parameters[0])
    keys = list(fields)
    assert fields["Size"] == "32x24" and fields["Denoising strength"] == "0.5"
    assert fields["Hires resize"] == "0x40" and fields["Hires upscaler"] == "Latent (antialiased)"
    assert "Hires upscale" not in fields and "Hires steps" not in fields
    assert keys.index("Denoising strength") < keys.index("Hires resize") < keys.index("Hires upscaler")
    assert resized.images[0].size == (52, 40)  # 40 * 32 // 24 = 53 pixels: 13 latent columns
    scaled = parse_parameters(engine.generate("a cat", steps=2, sampler="Euler", seed=1, width=32, height=24,
                                              hires_scale=2.0, hires_steps=1).parameters[0])
    assert [key for key in scaled if key.startswith("Hires")] == ["Hires upscale", "Hires steps", "Hires upscaler"]
    assert (scaled["Hires upscale"], scaled["Hires steps"], scaled["Hires upscaler"]) == ("2", "1", "Latent")
    assert scaled["Denoising strength"] == "0.75"


def test_without_hires_results_are_the_first_pass(engine):
    """hires_scale None: the image is the first pass's, and the text has no hires or denoising key."""
    case = CASES["euler-a-batch-ensd"]
    calls = []
    result = engine.generate(case.prompt, NEGATIVE, steps=case.steps, sampler=case.sampler, seed=5, width=32,
                             height=24, batch_size=2, cfg_scale=CFG, eta_noise_seed_delta=1234,
                             callback=lambda step, total, x, _: calls.append((step, total)))
    assert GenerateSettings().hires_scale is None and not GenerateSettings().hires
    schedule = NoiseSchedule.from_betas()
    info = get_sampler(case.sampler)
    conditioning = engine.encode(case.prompt, NEGATIVE, steps=case.steps)

    def rows(scheduled):
        return [(last, {"context": context.expand(2, -1, -1)}) for last, context, _ in scheduled.entries]

    denoiser = scheduled_guided_denoiser(eps_denoiser(engine.modules["unet"], schedule), rows(conditioning.negative),
                                         [(rows(conditioning.positive[0][0]), 1.0)], CFG)
    with torch.no_grad():
        rng = ImageNoise((4, 6, 8), [5, 6], eta_noise_seed_delta=1234)
        sigmas = get_sigmas(schedule, case.steps, "normal")
        latents = info.sample(denoiser, rng.next() * sigmas[0], sigmas, generator=rng)
        expected = tensor_to_pil(engine.modules["vae"].images_from_latents(latents))
    assert [image.tobytes() for image in result.images] == [image.tobytes() for image in expected]
    assert calls == [(step, case.steps) for step in range(case.steps)]
    assert "Hires" not in result.parameters[0] and "Denoising strength" not in result.parameters[0]


def test_bad_hires_settings_are_refused(engine):
    refused = [
        ({"hires_scale": 2.0, "hires_resize": (64, 64)}, "not both"),
        ({"hires_scale": 0.0}, "hires_scale must be a number > 0"),
        ({"hires_scale": float("nan")}, "hires_scale must be a number > 0"),
        ({"hires_resize": (0, 0)}, "not both 0"),
        ({"hires_resize": (64, -1)}, "integers >= 0"),
        ({"hires_scale": 2.0, "hires_steps": -1}, "hires_steps must be an integer >= 0"),
        ({"hires_steps": 5}, "need the hires fix on"),
        ({"hires_upscaler": "Latent (bicubic)"}, "need the hires fix on"),
    ]
    for fields, message in refused:
        with pytest.raises(EngineError, match=message):
            GenerateSettings(**fields)
    with pytest.raises(EngineError, match="img2img takes no hires_scale"):
        from PIL import Image

        engine.img2img(Image.new("RGB", (32, 32)), "a cat", steps=2, hires_scale=2.0)
    with pytest.raises(EngineError, match="less than one latent pixel"):
        engine.generate("a cat", steps=2, width=32, height=32, hires_scale=0.1)


def test_cli_hires_options(capsys, tmp_path, sd1_folder):
    out = tmp_path / "hires.png"
    assert main(["generate", "a castle", "--model", str(sd1_folder), "--steps", "2", "--seed", "4", "--size", "32x24",
                 "--sampler", "Euler", "--hires-scale", "1.5", "--hires-steps", "1", "--denoising", "0.4",
                 "--hires-upscaler", "Latent (bicubic)", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    fields = parse_parameters(read_image_parameters(out))
    assert (fields["Denoising strength"], fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"]) \
        == ("0.4", "1.5", "1", "Latent (bicubic)")
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (48, 36)
    resized = tmp_path / "resized.png"
    assert main(["generate", "a castle", "--model", str(sd1_folder), "--steps", "2", "--size", "32x24",
                 "--hires-resize", "0x40", "--out", str(resized), "--json"]) == 0
    capsys.readouterr()
    assert parse_parameters(read_image_parameters(resized))["Hires resize"] == "0x40"
    assert main(["generate", "x", "--model", str(sd1_folder), "--hires-scale", "2", "--hires-upscaler", "4x-UltraSharp",
                 "--out", str(tmp_path / "no.png")]) == 2
    assert "'4x-UltraSharp' is not available" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(sd1_folder), "--hires-resize", "1024", "--out",
                 str(tmp_path / "no.png")]) == 2
    assert "--hires-resize must be WIDTHxHEIGHT" in capsys.readouterr().err
