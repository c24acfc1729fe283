"""Infotexts: A1111's reader restated here from its algorithm (modules/infotext_utils.py,
`parse_generation_parameters`, and infotext_versions.py) and applied to tiengine's output and to infotexts
written as A1111 and its extensions write them; what each key becomes (mapped, checked, not reproduced);
the A1111 model hash of a converted checkpoint; and a picture made again from its PNG, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil

import pytest
import torch
from lora_builders import write_kohya_lora
from packaging import version as packaging_version
from safetensors.torch import save_file
from tiengine.weights_conv.cli import convert_checkpoint
from tiengine.weights_conv.source import SOURCE_FILE, old_file_hash, read_source

from tiengine.cli import main
from tiengine.diffusion.names import SCHEDULE_TYPES, schedule_label
from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.engine import Engine
from tiengine.errors import CheckpointError, EngineError
from tiengine.infotext import (
    EMPHASIS_LABELS,
    EngineFacts,
    parse_infotext,
    plan_reproduction,
)
from tiengine.io.metadata import (
    MetadataError,
    format_parameters,
    read_image_parameters,
    read_parameters_file,
    save_png,
    version_key,
)
from tiengine.text.chunking import EMPHASIS_MODES

# ------------------------------------------------------------------------ A1111's reader, restated here

A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # re_param
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")  # re_imagesize


def a1111_parse(x: str) -> dict:
    """parse_generation_parameters with styles ignored, auto_backcompat on, nothing skipped."""
    res: dict = {}
    prompt = negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(A1111_PAIR.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for k, v in A1111_PAIR.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = a1111_unquote(v)
            m = A1111_SIZE.match(v)
            if m is not None:
                res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
            else:
                res[k] = v
        except IndexError:  # an empty value: A1111 prints "Error parsing" and goes on
            continue
    if "Clip skip" not in res:
        res["Clip skip"] = "1"
    if res.get("Hypernet") is not None:
        res["Prompt"] += f"""<hypernet:{res["Hypernet"]}:{res.get("Hypernet strength", "1.0")}>"""
    if "Hires resize-1" not in res:
        res["Hires resize-1"], res["Hires resize-2"] = 0, 0
    for key, value in (("Hires sampler", "Use same sampler"), ("Hires checkpoint", "Use same checkpoint"),
                       ("Hires prompt", ""), ("Hires negative prompt", ""), ("Mask mode", "Inpaint masked"),
                       ("Masked content", "original"), ("Inpaint area", "Whole picture"), ("Masked area padding", 32)):
        if key not in res:
            res[key] = value
    first_w, first_h = res.get("First pass size-1"), res.get("First pass size-2")
    if first_w is not None and first_h is not None:
        first_w, first_h = int(first_w), int(first_h)
        width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
        if first_w == 0 or first_h == 0:  # old_hires_fix_first_pass_dimensions
            scale = math.sqrt(512 * 512 / (width * height))
            first_w, first_h = math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64
        res["Size-1"], res["Size-2"], res["Hires resize-1"], res["Hires resize-2"] = first_w, first_h, width, height
    for key, value in (("RNG", "GPU"), ("Schedule type", "Automatic"), ("Schedule max sigma", 0),
                       ("Schedule min sigma", 0), ("Schedule rho", 0), ("VAE Encoder", "Full"),
                       ("VAE Decoder", "Full"), ("FP8 weight", "Disable")):
        if key not in res:
            res[key] = value
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    ver = a1111_version(res.get("Version"))
    if ver is not None:
        if ver < packaging_version.parse("1.6.0") and "[" in res.get("Prompt", ""):
            res["Old prompt editing timelines"] = True
        if ver < packaging_version.parse("1.6.0") and res.get("Sampler", "") in ("DDIM", "PLMS"):
            res["Pad conds v0"] = True
        if ver < packaging_version.parse("v1.7.0-225"):
            res["Downcast alphas_cumprod"] = True
        if ver < packaging_version.parse("1.8.0") and res.get("Refiner"):
            res["Refiner switch by sampling steps"] = True
    return res


def a1111_unquote(text: str) -> str:
    """infotext_utils.unquote."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def a1111_version(text):
    """infotext_versions.parse_version."""
    if text is None:
        return None
    m = re.match(r"([^-]+-[^-]+)-.*", text)
    if m:
        text = m.group(1)
    try:
        return packaging_version.parse(text)
    except packaging_version.InvalidVersion:
        return None


def tiengine_view(text: str) -> dict:
    """parse_infotext's result in the shape of A1111's dict."""
    infotext = parse_infotext(text)
    return {"Prompt": infotext.prompt, "Negative prompt": infotext.negative_prompt, **infotext.fields}


def settings_of(text: str, facts: EngineFacts | None = None, **kwargs):
    settings, notes = parse_infotext(text).to_settings(facts or EngineFacts(), **kwargs)
    return settings, {note.key: note for note in notes}


# ------------------------------------------------------------- infotexts as A1111 and extensions write them

A1111_HIRES = """masterpiece, best quality, 1girl, <lora:add_detail:0.6>, looking at viewer,
city lights at night
Negative prompt: EasyNegative, (worst quality:1.4), bad-hands-5
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, Size: 512x768, \
Model hash: 7f96a1a9ca, Model: anything-v5-PrtRE, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, \
Denoising strength: 0.45, Clip skip: 2, ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, \
ADetailer dilate erode: 4, ADetailer mask blur: 4, ADetailer denoising strength: 0.4, \
ADetailer inpaint only masked: True, ADetailer inpaint padding: 32, ADetailer version: 24.1.2, Hires upscale: 2, \
Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, Lora hashes: "add_detail: 7c6bad76eb54", \
TI hashes: "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c", Emphasis: No norm, Version: v1.10.1"""

A1111_OLD = """a photo of an astronaut riding a horse on mars, highly detailed
Negative prompt: lowres, bad anatomy
Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 7460a6fa, \
Model: sd-v1-4, Clip skip: 2, ENSD: 31337, Hypernet: anime_3, Hypernet strength: 0.7, Version: v1.2.1"""

A1111_CONTROLNET = """(a castle:1.2) on a hill, [sunset:night:0.5]
Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 3000000000, Size: 768x512, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Variation seed: 77, Variation seed strength: 0.35, \
Seed resize from: 512x512, ENSD: 31337, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], \
Weight: 1.0, Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, Threshold A: 100.0, \
Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced", \
RNG: NV, Tiling: True, Version: v1.5.2"""

A1111_OLD_HIRES = """portrait of a knight
Negative prompt: blurry
Steps: 30, Sampler: DDIM, CFG scale: 9, Seed: 7, Face restoration: CodeFormer, Size: 1024x768, \
Model hash: 81761151, Model: model, Denoising strength: 0.7, First pass size: 0x0, Eta DDIM: 0.3"""

NOT_SETTINGS = """a cat
Steps: 20, Sampler: Euler"""  # fewer than 3 pairs: the last line is part of the prompt

A1111_TEXTS = [A1111_HIRES, A1111_OLD, A1111_CONTROLNET, A1111_OLD_HIRES, NOT_SETTINGS]


@pytest.mark.parametrize("text", A1111_TEXTS)
def test_a1111_infotexts_read_as_a1111_reads_them(text):
    assert tiengine_view(text) == a1111_parse(text)


def test_what_a1111_derives_from_its_own_infotexts():
    hires = a1111_parse(A1111_HIRES)
    assert hires["Prompt"].endswith("looking at viewer,\ncity lights at night")
    assert hires["Size-1"] == "512" and "Size" not in hires and hires["RNG"] == "GPU"
    assert hires["TI hashes"] == "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c"
    old = a1111_parse(A1111_OLD)
    assert old["Prompt"].endswith("highly detailed<hypernet:anime_3:0.7>") and old["Downcast alphas_cumprod"]
    assert old["Schedule type"] == "Automatic" and "Old prompt editing timelines" not in old
    controlnet = a1111_parse(A1111_CONTROLNET)
    assert controlnet["ControlNet 0"].startswith("Module: canny, Model: control_v11p_sd15_canny [d14c016b]")
    assert controlnet["Seed resize from-1"] == "512" and controlnet["Old prompt editing timelines"] is True
    knight = a1111_parse(A1111_OLD_HIRES)
    assert (knight["Size-1"], knight["Size-2"], knight["Hires resize-1"], knight["Hires resize-2"]) == (640, 448, 1024,
                                                                                                          768)
    not_settings = a1111_parse(NOT_SETTINGS)
    assert not_settings["Prompt"] == NOT_SETTINGS and "Steps" not in not_settings and "Sampler" not in not_settings


@pytest.mark.parametrize("text", ["v1.10.1", "v1.7.0-225-g1a2b3c4d", "v1.7.0-224-gabc", "v1.7.0", "1.6.0",
                                  "v1.6.0-RC-28-gdeadbee", "v1.5.2", "1.8", "v1.8.0-139", "2", "v1.10.0-RC",
                                  "f2.0.1v1.10.1-previous-313-g1a2b3c", "tiengine 0.1.0", "v1.9.0-post3"])
def test_versions_order_as_packaging_orders_them(text):
    ours, theirs = version_key(text), a1111_version(text)
    assert (ours is None) == (theirs is None)
    if ours is not None:
        for threshold in ("1.6.0", "v1.7.0-225", "1.8.0", "1.9.0", "1.10.1"):
            assert (ours < version_key(threshold)) == (theirs < packaging_version.parse(threshold)), threshold


# ----------------------------------------------------------------------------------------- quoting

TRICKY_VALUES = ["a, b", "a: b", "line one\nline two", '"quoted"', ' leading', 'trailing ', "", 'say "hi", ok',
                 "back\\slash: x", "ünïcödé, ✓", '"', "a\tb", "x,y:z\n\"w\"", "plain", "C:\\models\\a.ckpt"]


@pytest.mark.parametrize("value", TRICKY_VALUES)
def test_every_value_reads_back_through_a1111s_reader(value):
    text = format_parameters("a prompt", "a negative", {"Steps": 3, "Model": value, "Seed": 1, "Sampler": "Euler"})
    parsed = a1111_parse(text)
    assert parsed["Model"] == value and parsed["Steps"] == "3" and parsed["Sampler"] == "Euler"
    assert parsed["Prompt"] == "a prompt" and parsed["Negative prompt"] == "a negative"


def test_a1111s_own_quoting_loses_the_values_tiengine_quotes():
    """A1111's `quote` writes these plain, and its reader changes them: why quote_value quotes more."""
    for value, read in (('"quoted"', "quoted"), (" leading", "leading"), ("", None)):
        parsed = a1111_parse(f"p\nSteps: 3, Model: {value}, Seed: 1")
        assert parsed.get("Model") == read


# --------------------------------------------------------------------------------- what keys become

def test_hires_and_extension_keys_are_listed_as_not_reproduced():
    settings, notes = settings_of(A1111_HIRES, EngineFacts(device_type="cpu"))
    written = parse_infotext(A1111_HIRES).written
    assert set(notes) == set(written) | {"RNG"}  # every key has its note; RNG: the one A1111 fills in
    assert (settings.steps, settings.sampler, settings.scheduler, settings.cfg_scale) == (28, "DPM++ 2M", "karras", 6.5)
    assert (settings.seed, settings.width, settings.height, settings.encode.clip_skip) == (1234567890, 512, 768, 2)
    assert settings.encode.emphasis == "no_norm" and settings.rng == "nv"
    assert notes["RNG"].kind == "mapped" and "rng = 'nv'" in notes["RNG"].text and "Philox" in notes["RNG"].text
    for key in ("ADetailer model", "ADetailer version"):
        assert notes[key].kind == "not reproduced" and "ADetailer" in notes[key].text
    assert (settings.hires_scale, settings.hires_steps, settings.strength) == (2.0, 15, 0.45)
    assert notes["Hires upscaler"].kind == "not reproduced" and settings.hires_upscaler == "Latent"
    assert notes["Model hash"].kind == "warning" and "not compared" in notes["Model hash"].text
    assert notes["VAE hash"].kind == "warning" and notes["Version"].kind == "info"
    on_cuda, cuda_notes = settings_of(A1111_HIRES, EngineFacts(device_type="cuda"))
    assert on_cuda.rng == "gpu" and "CUDA device" not in cuda_notes["RNG"].text


def test_old_combined_sampler_names_hypernet_and_old_hash():
    settings, notes = settings_of(A1111_OLD, EngineFacts(old_model_hash="7460a6fa", model_hash="0123456789"))
    assert (settings.sampler, settings.scheduler, settings.eta_noise_seed_delta) == ("DPM++ 2M", "karras", 31337)
    assert str(notes["Model hash"]) == "checked: Model hash (7460a6fa: this engine's model)"
    assert notes["Hypernet"].kind == "mapped" and notes["Hypernet strength"].kind == "mapped"
    assert parse_infotext(A1111_OLD).prompt.endswith("<hypernet:anime_3:0.7>")
    assert notes["Downcast alphas_cumprod"].kind == "not reproduced" and "v1.2.1" in notes["Downcast alphas_cumprod"].text
    _, wrong = settings_of(A1111_OLD, EngineFacts(old_model_hash="00000000", model_name="other"))
    assert "[7460a6fa]" in wrong["Model hash"].text and "[00000000]" in wrong["Model hash"].text


def test_controlnet_variation_seed_resize_and_tiling():
    settings, notes = settings_of(A1111_CONTROLNET)
    assert (settings.sampler, settings.scheduler, settings.seed) == ("Euler a", None, 3000000000)
    assert (settings.subseed, settings.subseed_strength, settings.seed_resize_from) == (77, 0.35, (512, 512))
    assert (settings.rng, settings.eta_noise_seed_delta) == ("nv", 31337)
    assert str(notes["ControlNet 0"]) == "not reproduced: ControlNet 0 (ControlNet (an A1111 extension) is not part " \
                                         "of tiengine)"
    assert notes["Tiling"].kind == "not reproduced" and notes["Old prompt editing timelines"].kind == "not reproduced"
    assert parse_infotext(A1111_CONTROLNET).negative_prompt == ""


def test_old_hires_fix_ddim_and_face_restoration():
    settings, notes = settings_of(A1111_OLD_HIRES)
    # pre-v1.9 (no Schedule type): the plain name's Uniform schedule, which A1111's timestep DDIM ignores
    assert (settings.width, settings.height, settings.sampler, settings.scheduler) == (640, 448, "DDIM", "uniform")
    assert notes["Sampler"].kind == "mapped"
    assert notes["Face restoration"].kind == "not reproduced" and notes["Eta DDIM"].kind == "mapped"
    assert settings.eta == 0.3
    assert notes["First pass size"].kind == "mapped"


@pytest.mark.parametrize(("sampler", "schedule", "expected"), [
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "karras")),
    ("DPM++ SDE Karras", None, ("DPM++ SDE", "karras")),
    ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "exponential")),
    ("DPM2 Karras", None, ("DPM2", "karras")),
    ("LMS Karras", None, ("LMS", "karras")),
    ("Euler a", None, ("Euler a", "uniform")),  # before v1.9 a plain name ran the model's own schedule
    ("DPM++ 2M", None, ("DPM++ 2M", "uniform")),
    ("DPM++ 2M", "Automatic", ("DPM++ 2M", None)),  # v1.9+: the sampler's usual schedule (Karras)
    ("DPM++ 2M", "Karras", ("DPM++ 2M", "karras")),
    ("Euler", "Uniform", ("Euler", "uniform")),
    ("Euler", "Normal", ("Euler", "normal")),
    ("Euler", "Exponential", ("Euler", "exponential")),
    ("Euler", "DDIM", ("Euler", "ddim")),
    ("Euler", "Align Your Steps", ("Euler", "align_your_steps")),
    ("UniPC", "Automatic", ("UniPC", None)),
    ("k_dpmpp_2m_ka", None, ("DPM++ 2M", "karras")),  # A1111 1.5's alias with a schedule suffix
    ("Nonsense sampler", None, ("DPM++ 2M", "uniform")),  # A1111's fallback, noted as not reproduced
])
def test_sampler_and_schedule_labels(sampler, schedule, expected):
    line = f"Steps: 20, Sampler: {sampler}, " + (f"Schedule type: {schedule}, " if schedule else "") + "Seed: 1"
    settings, notes = settings_of(f"p\n{line}")
    assert (settings.sampler, settings.scheduler) == expected
    unknown = sampler == "Nonsense sampler"
    assert any(note.kind == "not reproduced" for note in notes.values()) == unknown


def test_every_tiengine_schedule_and_emphasis_has_an_a1111_label():
    assert set(EMPHASIS_LABELS) == set(EMPHASIS_MODES)
    for kind in SCHEDULE_TYPES:  # each label written reads back as its schedule
        settings, _ = settings_of(f"p\nSteps: 20, Sampler: Euler, Schedule type: {schedule_label(kind.name)}, Seed: 1")
        assert settings.scheduler == (None if kind.name == "automatic" else kind.name)


def test_a_schedule_suffix_in_the_sampler_name_wins():
    settings, notes = settings_of("p\nSteps: 20, Sampler: DPM++ 2M SDE Karras, Schedule type: Exponential, Seed: 1")
    assert (settings.sampler, settings.scheduler) == ("DPM++ 2M SDE", "karras")
    assert "the sampler's name suffix wins" in notes["Schedule type"].text


def test_bad_values_name_the_file_and_key():
    with pytest.raises(MetadataError, match=r'pic.png: "Steps": expected an integer >= 1, found \'many\''):
        parse_infotext("p\nSteps: many, Sampler: Euler, Seed: 1", where="pic.png").to_settings()
    with pytest.raises(MetadataError, match='"RNG"'):
        parse_infotext("p\nSteps: 2, Sampler: Euler, RNG: quantum").to_settings()
    with pytest.raises(MetadataError, match="pic.png: .*denoising strength must be between 0 and 1"):
        parse_infotext("p\nSteps: 2, Sampler: Euler, Denoising strength: 3", where="pic.png").to_settings(init_image=True)


def test_overrides_win_and_are_noted():
    plan = plan_reproduction(parse_infotext(A1111_OLD), steps=5, prompt="another", clip_skip=1)
    assert (plan.settings.steps, plan.prompt, plan.settings.encode.clip_skip) == (5, "another", 1)
    assert {note.key for note in plan.notes if note.kind == "overridden"} == {"steps", "prompt", "clip_skip"}
    with pytest.raises(EngineError, match="unknown generation setting"):
        plan_reproduction(parse_infotext(A1111_OLD), stepz=5)


def test_parameters_text_files_and_images(tmp_path):
    (tmp_path / "p.txt").write_text("\ufeff" + A1111_OLD, encoding="utf-8")
    assert read_parameters_file(tmp_path / "p.txt") == A1111_OLD
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(MetadataError, match="bin.dat: neither an image"):
        read_parameters_file(tmp_path / "bin.dat")


# ------------------------------------------------------------------------- a tiny model, end to end

@pytest.fixture(scope="module")
def setup(sd1_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("infotext")
    model = root / "anime, v2: final"  # a name A1111 must quote
    shutil.copytree(sd1_folder, model)
    embeddings, loras = root / "embeddings", root / "loras"
    embeddings.mkdir()
    save_embedding(Embedding("rick", {"clip_l": torch.randn(2, 48, generator=torch.Generator().manual_seed(3))}),
                   embeddings / "rick.safetensors")
    loras.mkdir()
    engine = Engine.load(model, embeddings=embeddings, loras=loras)
    write_kohya_lora(loras / "ink.safetensors", engine.modules, family="sd1", rank=2)
    engine.networks.loras.reload()
    return engine, model, embeddings, loras


A1111_STYLE = {"steps": 4, "sampler": "Euler a", "scheduler": "karras", "seed": 123, "subseed": 456,
               "subseed_strength": 0.3, "eta_noise_seed_delta": 31337, "clip_skip": 2, "width": 32, "height": 40}
PROMPT = "a knight, (castle:1.2), rick\nsunset: orange <lora:ink:0.7>"


def test_tiengine_infotext_reads_back_with_every_field(setup):
    engine = setup[0]
    result = engine.generate(PROMPT, "blurry, low: quality\nsecond line", emphasis="no_norm", **A1111_STYLE)
    parsed = a1111_parse(result.parameters[0])
    assert tiengine_view(result.parameters[0]) == parsed
    assert parsed["Prompt"] == PROMPT and parsed["Negative prompt"] == "blurry, low: quality\nsecond line"
    expected = {"Steps": "4", "Sampler": "Euler a", "Schedule type": "Karras", "CFG scale": "7", "Seed": "123",
                "Size-1": "32", "Size-2": "40", "Model hash": engine.model_hash(), "Model": "anime, v2: final",
                "Clip skip": "2", "Variation seed": "456", "Variation seed strength": "0.3", "ENSD": "31337",
                "RNG": "CPU", "Emphasis": "No norm", "TI hashes": f"rick: {engine.vocabulary.embeddings['rick'].short_hash}",
                "Lora hashes": f"ink: {_lora_hash(setup)}"}
    assert {key: parsed[key] for key in expected} == expected


def _lora_hash(setup) -> str:
    path = setup[3] / "ink.safetensors"
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


@pytest.mark.parametrize(("scheduler", "label"), [("normal", "Normal"), ("karras", "Karras"),
                                                  ("exponential", "Exponential"), ("ddim", "DDIM"),
                                                  ("sgm_uniform", "SGM Uniform")])
def test_schedule_labels_are_a1111s_and_read_back(setup, scheduler, label):
    engine = setup[0]
    text = engine.generate("a cat", steps=2, sampler="Euler", scheduler=scheduler, seed=1, width=32,
                           height=32).parameters[0]
    assert a1111_parse(text)["Schedule type"] == label
    assert parse_infotext(text).to_settings()[0].scheduler == scheduler


@pytest.mark.parametrize(("emphasis", "label"), [("no_norm", "No norm"), ("ignore", "Ignore"), ("none", "None")])
def test_emphasis_labels_are_a1111s_and_read_back(setup, emphasis, label):
    engine = setup[0]
    text = engine.generate("a (cat:1.3)", steps=1, sampler="Euler", seed=1, width=32, height=32,
                           emphasis=emphasis).parameters[0]
    assert a1111_parse(text)["Emphasis"] == label
    assert parse_infotext(text).to_settings()[0].encode.emphasis == emphasis


def test_picture_made_again_from_its_png_is_the_same_bytes(setup, tmp_path, capsys):
    engine, model, embeddings, loras = setup
    first = engine.generate(PROMPT, "blurry", **A1111_STYLE)
    png = save_png(first.images[0], tmp_path / "first.png", first.parameters[0])
    again = engine.generate_from_infotext(read_image_parameters(png))
    assert again.images[0].tobytes() == first.images[0].tobytes() and again.parameters == first.parameters
    kinds = {note.key: note.kind for note in again.notes}
    assert kinds["Model hash"] == kinds["TI hashes"] == kinds["Lora hashes"] == "checked"
    assert "not reproduced" not in kinds.values() and "warning" not in kinds.values()
    out = tmp_path / "again.png"
    assert main(["generate", "--from-infotext", str(png), "--model", str(model), "--embeddings", str(embeddings),
                 "--loras", str(loras), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert out.read_bytes() == png.read_bytes()
    assert {note["key"]: note["kind"] for note in summary["infotext_notes"]} == kinds


def test_given_options_win_over_the_infotext_on_the_command_line(setup, tmp_path, capsys):
    engine, model, _, _ = setup
    first = engine.generate("a cat", **A1111_STYLE)
    text_file = tmp_path / "params.txt"
    text_file.write_text(first.parameters[0], encoding="utf-8")
    out = tmp_path / "seed9.png"
    assert main(["generate", "--from-infotext", str(text_file), "--model", str(model), "--seed", "9", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overridden: seed (9, given in place of the infotext's)" in printed
    assert "mapped: ENSD (eta_noise_seed_delta = 31337)" in printed
    expected = engine.generate("a cat", **{**A1111_STYLE, "seed": 9})
    assert read_image_parameters(out) == expected.parameters[0]


def test_mismatched_hashes_are_warnings_naming_both(setup):
    engine = setup[0]
    text = engine.generate("rick <lora:ink:0.5>", steps=1, sampler="Euler", seed=1, width=32, height=32).parameters[0]
    ours = engine.vocabulary.embeddings["rick"].short_hash
    text = text.replace(f"rick: {ours}", "rick: 000000000000").replace(engine.model_hash(), "abcdef0123")
    text = text.replace('Lora hashes: "ink:', 'Lora hashes: "gone:')
    plan = engine.generate_from_infotext(text).reproduction
    notes = {note.key: note for note in plan.notes}
    assert notes["TI hashes"].kind == "warning" and "[000000000000]" in notes["TI hashes"].text and \
        f"[{ours}]" in notes["TI hashes"].text
    assert "[abcdef0123]" in notes["Model hash"].text and f"[{engine.model_hash()}]" in notes["Model hash"].text
    assert notes["Lora hashes"].kind == "warning" and "gone [" in notes["Lora hashes"].text
    _, unreadable = settings_of("p\nSteps: 2, Sampler: Euler, TI hashes: nonsense", EngineFacts(embedding_hashes={}))
    assert unreadable["TI hashes"].kind == "warning" and "'nonsense'" in unreadable["TI hashes"].text


def test_generate_needs_a_prompt_or_an_infotext(capsys):
    assert main(["generate", "--steps", "2"]) == 2
    assert "a prompt is needed (or --from-infotext IMAGE_OR_TEXT_FILE)" in capsys.readouterr().err


def test_info_prints_the_reading(setup, tmp_path, capsys):
    engine, model, _, _ = setup
    result = engine.generate("a cat", **A1111_STYLE)
    png = save_png(result.images[0], tmp_path / "i.png", result.parameters[0])
    assert main(["info", str(png), "--json", "--model", str(model)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["Seed"] == "123" and data["reproduction"]["settings"]["subseed"] == 456
    assert {"kind": "checked", "key": "Model hash", "text": f"{engine.model_hash()}: this engine's model"} in \
        data["reproduction"]["notes"]
    assert main(["info", str(png)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(result.parameters[0]) and "mapped: Variation seed (subseed = 456)" in printed


# ----------------------------------------------------------------------- the converted checkpoint's hash

def test_converted_folder_answers_with_the_source_files_a1111_hash(tmp_path):
    from test_weights_conv import (  # the single-file layout; needs diffusers
        ldm_state_dict,
        states_for,
    )

    ldm, _ = ldm_state_dict(states_for("sd1"), "sd1")
    source = tmp_path / "my-model_v1.safetensors"
    save_file(ldm, str(source))
    data = source.read_bytes()
    folder = convert_checkpoint(source, tmp_path / "converted")
    engine = Engine.load(folder, embeddings=False)
    assert engine.model_hash() == hashlib.sha256(data).hexdigest()[:10]
    assert Engine.load(source, embeddings=False).model_hash() == engine.model_hash()
    record = json.loads((folder / SOURCE_FILE).read_text())
    assert record["file"] == "my-model_v1.safetensors" and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["old_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    text = engine.generate("a cat", steps=1, sampler="Euler", seed=1, width=64, height=64).parameters[0]
    assert a1111_parse(text)["Model"] == "my-model_v1" and a1111_parse(text)["Model hash"] == engine.model_hash()
    again = convert_checkpoint(folder, tmp_path / "again")  # a converted folder's record is carried over
    assert read_source(again) == read_source(folder)


def test_old_hash_reads_the_64k_at_one_mib(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB
    (tmp_path / "big.ckpt").write_bytes(data)
    assert old_file_hash(tmp_path / "big.ckpt") == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    (tmp_path / "small.ckpt").write_bytes(b"x" * 10)
    assert old_file_hash(tmp_path / "small.ckpt") == hashlib.sha256(b"").hexdigest()[:8]


def test_bad_source_record_names_file_and_key(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    (folder / SOURCE_FILE).write_text(json.dumps({"format": "tiengine.model-source", "file": "a.ckpt",
                                                  "sha256": "xyz", "old_hash": "01234567"}))
    with pytest.raises(CheckpointError, match=r"source.json: 'sha256' must be 64 lower-case hex digits, found 'xyz'"):
        Engine.load(folder, embeddings=False).model_hash()
