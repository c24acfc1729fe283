"""Textual-inversion training on tiny random models: what changes (only the new vectors), the loss,
the conditioning path, exact resume, the files written, and bad inputs.

The optimisation itself is proven right in test_training_recovery.py (a planted embedding recovered).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from model_builders import build_modules, tiny_model_config
from PIL import Image

from tiengine.diffusion.schedules import NoiseSchedule, eps_denoiser, v_denoiser
from tiengine.embeddings.embedding import Embedding, load_embedding, save_embedding
from tiengine.engine import Engine
from tiengine.text.chunking import tokenize_prompt
from tiengine.text.conditioning import encode_texts, encoder_token_ids
from tiengine.text.tokenizer import ClipTokenizer
from tiengine.training.data import LearningRateSchedule, caption_for, fill_template, load_templates
from tiengine.training.run import train_embedding
from tiengine.training.textual_inversion import (
    TrainEmbeddingSettings,
    TrainingError,
    alpha_loss_weights,
    denoising_loss,
    initial_vectors,
)

FAST = TrainEmbeddingSettings(vectors=2, steps=4, batch_size=2, learning_rate="0.05", init_text="a cat",
                              template="object", save_every=2)


def write_images(folder, count=4, size=(40, 48), seed=0, alpha=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        channels = 4 if alpha else 3
        pixels = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
        Image.fromarray(pixels, mode="RGBA" if alpha else "RGB").save(folder / f"{index:02d}-pattern.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images") / "set")


@pytest.fixture(scope="module")
def engine(sd1_folder, tmp_path_factory):
    library = tmp_path_factory.mktemp("embeddings")
    vectors = torch.randn(3, 48, generator=torch.Generator().manual_seed(5))
    save_embedding(Embedding("rick", {"clip_l": vectors}), library / "rick.safetensors")
    return Engine.load(sd1_folder, embeddings=library)


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer.default()


def snapshot(engine):
    return {f"{name}.{key}": value.clone() for name, module in engine.modules.items()
            for key, value in module.state_dict().items()}


# ------------------------------------------------------------------------------------- inputs


def test_initial_vectors_spread_init_tokens_like_a1111(engine, tokenizer):
    table = engine.slots[0].encoder.text_model.embeddings.token_embedding.weight
    a, cat, dog = (tokenizer.encode(word)[0] for word in ("a", "cat", "dog"))
    spread = initial_vectors(tokenizer, engine.slots, "a cat", 5)["clip_l"]
    assert torch.equal(spread, table[[a, a, a, cat, cat]])  # token i * 2 // 5 for vector i
    cut = initial_vectors(tokenizer, engine.slots, "a cat dog", 2)["clip_l"]
    assert torch.equal(cut, table[[a, cat]])  # the first n tokens (A1111 truncates to max_length=n)
    assert torch.equal(initial_vectors(tokenizer, engine.slots, "", 3)["clip_l"], torch.zeros(3, 48))
    assert torch.equal(initial_vectors(tokenizer, engine.slots, "dog", 2)["clip_l"], table[[dog, dog]])


def test_sdxl_initialisation_uses_each_encoders_table(tokenizer):
    config = tiny_model_config("sdxl")
    engine = Engine(config, build_modules(config))
    vectors = initial_vectors(tokenizer, engine.slots, "a red cat", 3)
    ids = tokenizer.encode("a red cat")
    for slot in engine.slots:
        table = slot.encoder.text_model.embeddings.token_embedding.weight
        assert torch.equal(vectors[slot.embedding_key], table[ids])
    assert set(vectors) == {"clip_l", "clip_g"}


def test_learning_rate_schedule_follows_a1111_syntax():
    schedule = LearningRateSchedule.parse("0.005:100, 1e-3:1000, 1e-5")
    assert [schedule.rate_at(s) for s in (0, 99, 100, 999, 1000, 50_000)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    assert schedule.last_step(5000) == 5000
    bounded = LearningRateSchedule.parse("0.01:50")
    assert (bounded.rate_at(49), bounded.rate_at(50)) == (0.01, None)
    assert (bounded.last_step(100), bounded.last_step(20)) == (50, 20)
    assert LearningRateSchedule.parse("0.1:10, 0.2:-1").last_step(99) == 99
    for bad in ("abc", "0.1:0", "0.1:100, 0.2:50", "-0.1", "0.1, 0.2", "0.1:x"):
        with pytest.raises(TrainingError):
            LearningRateSchedule.parse(bad)


def test_templates_and_captions(tmp_path):
    for name in ("object", "style", "object-filewords", "style-filewords"):
        assert all("[name]" in line for line in load_templates(name))
    assert fill_template("a photo of [name], [filewords]", "zorb", "red fox") == "a photo of zorb, red fox"
    path = tmp_path / "templates.txt"
    path.write_text("a [name] here\n\n[filewords] by [name]\nno placeholder\n", encoding="utf-8")
    with pytest.raises(TrainingError, match=r"templates.txt:4: .*neither \[name\] nor \[filewords\]"):
        load_templates(str(path))
    path.write_text("a [name] here\n\n[filewords] by [name]\n[filewords]\n", encoding="utf-8")
    assert load_templates(str(path)) == ("a [name] here", "[filewords] by [name]", "[filewords]")
    # [filewords] first (A1111's order), so a caption can place the name itself
    assert fill_template("[filewords], photo", "zorb", "two [name] cubes") == "two zorb cubes, photo"
    (tmp_path / "03-red-fox.png").write_bytes(b"")
    assert caption_for(tmp_path / "03-red-fox.png") == ("red-fox", False)
    (tmp_path / "03-red-fox.txt").write_text("  a fox in snow \n", encoding="utf-8")
    assert caption_for(tmp_path / "03-red-fox.png") == ("a fox in snow", True)


def test_alpha_weights_are_shifted_to_minimum_zero_and_mean_one():
    alpha = torch.zeros(8, 8)
    alpha[:, 4:] = 1.0
    weights = alpha_loss_weights(alpha, (4, 4))
    assert torch.equal(weights[:, :2], torch.zeros(4, 2)) and torch.allclose(weights[:, 2:], torch.full((4, 2), 2.0))
    assert torch.equal(alpha_loss_weights(torch.full((8, 8), 0.7), (4, 4)), torch.ones(4, 4))


def test_alpha_weights_and_captions_in_a_run(engine, tmp_path):
    opaque = write_images(tmp_path / "opaque", count=3, alpha=True)
    for path in opaque.iterdir():  # alpha 255 everywhere: weights are ones, training equals plain RGB
        image = Image.open(path)
        image.putalpha(255)
        image.save(path)
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for path in opaque.iterdir():
        Image.open(path).convert("RGB").save(rgb / path.name)
    settings = dataclasses.replace(FAST, steps=2, save_every=0)
    plain = train_embedding(engine, rgb, "zorbly", settings)
    weighted = train_embedding(engine, opaque, "zorbly", dataclasses.replace(settings, alpha_weight=True))
    assert torch.equal(plain.vectors["clip_l"], weighted.vectors["clip_l"])
    holes = write_images(tmp_path / "holes", count=3, alpha=True)  # random alpha: weights differ
    masked = train_embedding(engine, holes, "zorbly", dataclasses.replace(settings, alpha_weight=True))
    unmasked = train_embedding(engine, holes, "zorbly", settings)
    assert not torch.equal(masked.vectors["clip_l"], unmasked.vectors["clip_l"])
    (rgb / "00-pattern.txt").write_text("a striped square", encoding="utf-8")
    captioned = train_embedding(engine, rgb, "zorbly", settings)  # template "object": captions unused
    assert any("caption files found but template 'object'" in warning for warning in captioned.warnings)
    # the name placed by the captions: template "[filewords]", every caption carrying [name]
    slot_template = tmp_path / "slot.txt"
    slot_template.write_text("[filewords]\n", encoding="utf-8")
    slot_settings = dataclasses.replace(settings, template=str(slot_template))
    for image in sorted(rgb.glob("*.png")):
        image.with_suffix(".txt").write_text("a striped [name] square", encoding="utf-8")
    slotted = train_embedding(engine, rgb, "zorbly", slot_settings)
    assert not torch.equal(slotted.vectors["clip_l"], slotted.initial_vectors["clip_l"])
    (rgb / "00-pattern.txt").write_text("a striped square", encoding="utf-8")
    with pytest.raises(TrainingError, match=r"00-pattern.png: template '\[filewords\]' takes \[name\] from the "
                                            r"caption, and the caption 'a striped square' has none"):
        train_embedding(engine, rgb, "zorbly", slot_settings)


# -------------------------------------------------------------------------- conditioning and loss


def test_vector_gradient_passes_the_emphasis_normalisation_as_a1111(engine, tokenizer):
    """encode_texts' gradient equals that of an independent restatement of A1111's emphasis step."""
    tokenizer = ClipTokenizer.default()
    tokenizer.add_embedding("zorb", 2)
    slot = engine.slots[0]
    texts = ["a photo of (zorb:1.3), [cat]", "zorb"]
    rows = torch.randn(2, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
    probe = torch.randn(2, 77, 48, generator=torch.Generator().manual_seed(2))
    (encode_texts(texts, tokenizer, [slot], {"clip_l": rows}).context * probe).sum().backward()
    ours = rows.grad.clone()
    rows.grad = None
    chunks = [tokenize_prompt(text, tokenizer).chunks[0] for text in texts]
    ids = encoder_token_ids(chunks, 49407, torch.device("cpu"))
    z, _ = slot.encoder.encode(ids, rows)  # (2, 77, 48)
    weights = torch.tensor([chunk.weights for chunk in chunks])[..., None]
    weighted = z * weights
    ((weighted * (z.mean() / weighted.mean())) * probe).sum().backward()
    assert weights.max() == pytest.approx(1.3) and weights.min() == pytest.approx(1 / 1.1)
    torch.testing.assert_close(ours, rows.grad, rtol=1e-5, atol=1e-6)
    assert ours.abs().sum() > 0


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_denoising_loss_matches_the_inference_denoiser(prediction):
    """Per sample, the training loss is ||x0 - D(x, sigma)||^2 scaled by 1/sigma^2 (eps) or
    (sigma^2 + 1)/sigma^2 (v), D being the inference wrapper (k-diffusion's CompVis(V)Denoiser)."""
    config = tiny_model_config("sd1", prediction)
    unet = build_modules(config)["unet"].eval().requires_grad_(False)
    schedule = NoiseSchedule.from_betas()
    generator = torch.Generator().manual_seed(0)
    wrap = eps_denoiser if prediction == "epsilon" else v_denoiser
    denoiser = wrap(unet, schedule)
    for t in (3, 250, 999):
        x0 = torch.randn(1, 4, 16, 16, generator=generator)
        noise = torch.randn(1, 4, 16, 16, generator=generator)
        context = torch.randn(1, 77, 48, generator=generator)
        loss = denoising_loss(unet, prediction, schedule.alphas_cumprod, x0, torch.tensor([t]), noise, context)
        sigma = schedule.sigmas[t].float()
        denoised = denoiser(x0 + sigma * noise, sigma.reshape(1), context)
        scale = 1 / sigma**2 if prediction == "epsilon" else (sigma**2 + 1) / sigma**2
        expected = (x0 - denoised).square().mean() * scale
        torch.testing.assert_close(loss, expected, rtol=2e-4, atol=0)


# -------------------------------------------------------------------------------------- training


def test_only_the_new_vectors_change_and_the_loss_falls(engine, images):
    before = snapshot(engine)
    rick = engine.vocabulary.embeddings["rick"].vectors["clip_l"].clone()
    settings = dataclasses.replace(FAST, steps=40, batch_size=4, learning_rate="0.05", template="object")
    result = train_embedding(engine, images, "zorbly", settings)
    after = snapshot(engine)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)  # every weight, every token row
    assert torch.equal(engine.vocabulary.embeddings["rick"].vectors["clip_l"], rick)
    assert "zorbly" not in engine.vocabulary.embeddings  # the engine is not modified
    assert not torch.equal(result.vectors["clip_l"], result.initial_vectors["clip_l"])
    assert result.embedding.vectors["clip_l"].shape == (2, 48) and result.embedding.step == 40
    # The diffusion loss on fixed draws (independent of the trainer's) falls from the initial vectors.
    tokenizer = ClipTokenizer.default()
    tokenizer.add_embedding("zorbly", 2)
    vae, unet = engine.modules["vae"], engine.modules["unet"]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((64, 64)),
                                                      dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for p in sorted(images.iterdir())])
    with torch.no_grad():
        x0 = vae.latents_from_images(pixels, generator=None).repeat(8, 1, 1, 1)  # (32, 4, 16, 16)
    generator = torch.Generator().manual_seed(123)
    timesteps = torch.randint(1000, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    alphas = NoiseSchedule.from_betas().alphas_cumprod

    def loss_of(vectors):
        with torch.no_grad():
            context = encode_texts(["a photo of a zorbly"], tokenizer, engine.slots, {"clip_l": vectors}).context
            return float(denoising_loss(unet, "epsilon", alphas, x0, timesteps, noise,
                                        context.expand(x0.shape[0], -1, -1)))

    initial, learned = loss_of(result.initial_vectors["clip_l"]), loss_of(result.vectors["clip_l"])
    assert learned < initial - 1e-3, (initial, learned)


def test_sdxl_trains_both_encoders_and_sd2_v_trains(tmp_path, tokenizer):
    for family, prediction in (("sdxl", "epsilon"), ("sd2", "v")):
        config = tiny_model_config(family, prediction)
        engine = Engine(config, build_modules(config))
        before = snapshot(engine)
        result = train_embedding(engine, write_images(tmp_path / family), "zorbly",
                                 dataclasses.replace(FAST, steps=3, save_every=0))
        assert all(torch.equal(value, snapshot(engine)[key]) for key, value in before.items())
        keys = {"sdxl": {"clip_l", "clip_g"}, "sd2": {"clip_h"}}[family]
        assert set(result.vectors) == keys
        for key in keys:
            assert not torch.equal(result.vectors[key], result.initial_vectors[key]), (family, key)
        assert result.embedding is None  # tiny widths fit no embedding file; out= is refused for them
        with pytest.raises(TrainingError, match="fit no embedding file"):
            train_embedding(engine, tmp_path / family, "zorbly", FAST, out=tmp_path / f"{family}.safetensors")


def test_sdxl_writes_clip_l_and_clip_g(tmp_path):
    """Full-width SDXL text encoders (768 + 1280) on a tiny stack: the file holds clip_l + clip_g."""
    config = tiny_model_config("sdxl")
    first = dataclasses.replace(config.text_encoders["text_encoder"], hidden_size=768, intermediate_size=64,
                                num_hidden_layers=2)
    second = dataclasses.replace(config.text_encoders["text_encoder_2"], hidden_size=1280, intermediate_size=64,
                                 num_hidden_layers=2)
    unet = dataclasses.replace(config.unet, cross_attention_dim=2048)
    config = dataclasses.replace(config, text_encoders={"text_encoder": first, "text_encoder_2": second}, unet=unet)
    engine = Engine(config, build_modules(config))
    out = tmp_path / "xl.safetensors"
    result = train_embedding(engine, write_images(tmp_path / "images", count=3), "zorbly",
                             dataclasses.replace(FAST, steps=2, save_every=1), out=out)
    loaded = load_embedding(out)
    assert loaded.family == "sdxl" and loaded.widths == {"clip_l": 768, "clip_g": 1280}
    for key in ("clip_l", "clip_g"):
        assert torch.equal(loaded.vectors[key], result.vectors[key])
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        assert sorted(handle.keys()) == ["clip_g", "clip_l"]
    assert load_embedding(result.work_dir / "checkpoints" / "zorbly-1.safetensors").family == "sdxl"


def test_outputs_and_checkpoints_load_back(engine, images, tmp_path):
    out = tmp_path / "emb" / "zorbly.safetensors"
    settings = dataclasses.replace(FAST, steps=4, save_every=2, preview_every=4, preview_steps=3)
    steps_seen = []
    result = train_embedding(engine, images, "zorbly", settings, out=out, also_save=("pt", "png"),
                             callback=lambda progress: steps_seen.append(progress.step))
    assert steps_seen == [1, 2, 3, 4]
    assert [path.name for path in result.outputs] == ["zorbly.safetensors", "zorbly.pt", "zorbly.png"]
    for path in result.outputs:
        loaded = load_embedding(path)
        assert loaded.name == "zorbly" and loaded.step == 4
        assert torch.equal(loaded.vectors["clip_l"], result.vectors["clip_l"])
        assert loaded.sd_checkpoint == engine.model_hash() and loaded.sd_checkpoint_name == "model"
    work = result.work_dir
    assert work == out.parent / ".zorbly.training"
    checkpoint = load_embedding(work / "checkpoints" / "zorbly-2.safetensors")
    assert checkpoint.name == "zorbly-2" and checkpoint.step == 2
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["zorbly-2.safetensors", "zorbly-4.safetensors"]
    assert torch.equal(load_embedding(work / "checkpoints" / "zorbly-4.safetensors").vectors["clip_l"],
                       result.vectors["clip_l"])
    lines = (work / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,learning_rate,samples,seconds" and len(lines) == 5
    assert [line.split(",")[3] for line in lines[1:]] == ["2", "4", "6", "8"]
    preview = Image.open(work / "previews" / "zorbly-4.png")
    assert preview.size == (64, 64) and "a photo of a zorbly" in preview.info["parameters"]
    # An embeddings folder holding the output loads the embedding once, not the hidden checkpoints.
    from tiengine.embeddings.library import EmbeddingLibrary

    assert sorted(EmbeddingLibrary(out.parent).loaded) == ["zorbly"]


def test_resume_equals_an_uninterrupted_run(engine, images, tmp_path):
    settings = dataclasses.replace(FAST, steps=6, batch_size=2, grad_accum=2, flip=True, save_every=2,
                                   learning_rate="0.05:3, 0.02", grad_clip=0.5)
    whole = train_embedding(engine, images, "zorbly", settings, out=tmp_path / "whole" / "z.safetensors")

    def crash_after_five(progress):  # a crash, not Ctrl-C: the last checkpoint (step 4) is what remains
        if progress.step == 5:
            raise RuntimeError("simulated crash")

    out = tmp_path / "parts" / "z.safetensors"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_embedding(engine, images, "zorbly", settings, out=out, callback=crash_after_five)
    assert not out.exists()
    resumed = train_embedding(engine, images, "zorbly", settings, out=out, resume=True)
    assert resumed.resumed_from == 4 and resumed.steps_done == 6
    assert torch.equal(resumed.vectors["clip_l"], whole.vectors["clip_l"])  # bit-identical
    assert [(r.step, r.loss, r.learning_rate, r.samples) for r in resumed.losses] == \
        [(r.step, r.loss, r.learning_rate, r.samples) for r in whole.losses]
    from tiengine.training.state import load_state

    a, b = load_state(whole.work_dir / "state.safetensors"), load_state(resumed.work_dir / "state.safetensors")
    for index, entries in a.optimizer_state.items():
        for key, value in entries.items():
            assert torch.equal(value, b.optimizer_state[index][key]), key
    # A callback stop checkpoints too; resuming a finished run with more steps may replace its own output.
    stopped = train_embedding(engine, images, "zorbly", dataclasses.replace(settings, steps=3),
                              out=tmp_path / "s" / "z.safetensors", callback=lambda progress: progress.step < 2)
    assert stopped.stopped_early and stopped.steps_done == 2
    longer = train_embedding(engine, images, "zorbly", settings, out=tmp_path / "s" / "z.safetensors", resume=True)
    assert longer.resumed_from == 2 and torch.equal(longer.vectors["clip_l"], whole.vectors["clip_l"])
    with pytest.raises(TrainingError, match=r"would change it: batch_size 4 \(the run's is 2\)"):
        train_embedding(engine, images, "zorbly", dataclasses.replace(settings, batch_size=4),
                        out=tmp_path / "s" / "z.safetensors", resume=True)


def test_engine_method_and_schedule_end(engine, images):
    result = engine.train_embedding(images, "zorbly", vectors=2, steps=10, learning_rate="0.05:3", init_text="a cat")
    assert result.steps_done == 3 and any("ends at step 3" in warning for warning in result.warnings)
    assert [row.learning_rate for row in result.losses] == [0.05, 0.05, 0.05]
    with pytest.raises(TrainingError, match=r"unknown training option\(s\) \['lr'\]"):
        engine.train_embedding(images, "zorbly", lr=0.1)


# ------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_get_clear_errors_and_write_nothing(engine, images, tmp_path):
    out = tmp_path / "out" / "zorbly.safetensors"

    def refused(match, images_arg=images, name="zorbly", settings=FAST, **kwargs):
        with pytest.raises(TrainingError, match=match):
            train_embedding(engine, images_arg, name, settings, out=out, **kwargs)
        assert not (tmp_path / "out").exists() or sorted((tmp_path / "out").iterdir()) == [out]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("captions only")
    refused("no training images .*notes.txt", empty)
    broken = write_images(tmp_path / "broken", count=2)
    (broken / "02-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    refused("02-broken.png: not a readable image", broken)
    refused("'cat' is the vocabulary word 'cat'", name="cat")
    refused("'Cat' is the vocabulary word 'cat'", name="Cat")
    refused("slashes", name="a/b")
    with pytest.raises(TrainingError, match=r"vectors per token must be an integer in 1\.\.75"):
        TrainEmbeddingSettings(vectors=76)
    with pytest.raises(TrainingError, match=r"1\.\.75"):
        TrainEmbeddingSettings(vectors=0)
    with pytest.raises(TrainingError, match="fp16 mixed precision needs a CUDA device"):
        train_embedding(engine, images, "zorbly", dataclasses.replace(FAST, mixed_precision="fp16"))
    out.parent.mkdir()
    out.write_bytes(b"user data")
    refused("zorbly.safetensors: already exists")
    assert out.read_bytes() == b"user data"
    word = train_embedding(engine, images, "cat", dataclasses.replace(FAST, steps=1, allow_word_name=True))
    assert word.steps_done == 1


def test_an_earlier_run_is_neither_replaced_nor_resumed_by_accident(engine, images, tmp_path):
    out = tmp_path / "z.safetensors"
    train_embedding(engine, images, "zorbly", dataclasses.replace(FAST, steps=2), out=out)
    out.unlink()
    with pytest.raises(TrainingError, match="holds an earlier training run; pass resume=True"):
        train_embedding(engine, images, "zorbly", FAST, out=out)
    again = train_embedding(engine, images, "zorbly", dataclasses.replace(FAST, steps=2), out=out, overwrite=True)
    assert again.resumed_from is None and out.is_file()


# ------------------------------------------------------------------------------------------ CLI


def test_cli_trains_resumes_and_refuses(sd1_folder, images, tmp_path, capsys):
    from tiengine.cli import main

    out = tmp_path / "cli.safetensors"
    common = ["train-embedding", str(images), "--name", "zorbly", "--model", str(sd1_folder), "--vectors", "2",
              "--batch-size", "2", "--lr", "0.05", "--save-every", "1", "--out", str(out), "--json"]
    assert main(common + ["--steps", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["steps"] == 2 and first["outputs"] == [str(out)] and first["resumed_from"] is None
    assert main(common + ["--steps", "3", "--resume"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["steps"] == 3 and second["resumed_from"] == 2 and load_embedding(out).step == 3
    assert main(common + ["--steps", "3"]) == 2
    assert "pass resume=True (--resume)" in capsys.readouterr().err


def test_cli_prints_a_header_before_each_stage(sd1_folder, images, tmp_path, capsys):
    from tiengine.cli import main

    out = tmp_path / "staged.safetensors"
    args = ["train-embedding", str(images), "--name", "zorbly", "--model", str(sd1_folder), "--vectors", "1",
            "--steps", "1", "--out", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    # the headers, then the training bar's last update ("1/1" steps)
    assert err.index("[1/2] loading model") < err.index("[2/2] training zorbly") < err.rindex("1/1")
    assert main([*args[:-1], str(tmp_path / "quiet.safetensors"), "--json"]) == 0
    assert "[1/2]" not in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_mixed_precision_trains_only_the_vectors(sd1_folder, images):
    engine = Engine.load(sd1_folder, device="cuda")
    before = snapshot(engine)
    for precision in ("bf16", "fp16"):
        result = train_embedding(engine, images, "zorbly", dataclasses.replace(FAST, mixed_precision=precision))
        assert not torch.equal(result.vectors["clip_l"], result.initial_vectors["clip_l"])
        assert all(np.isfinite(row.loss) for row in result.losses)
    assert all(torch.equal(value, snapshot(engine)[key]) for key, value in before.items())
