"""tiengine.integrations.diffusers: A1111 conditioning as diffusers pipeline keyword arguments.

Tiny SD1 and SDXL models on the same random weights twice: a tiengine engine (tests.model_builders) and its
diffusers twin (transformers text encoders, diffusers UNet / VAE, Euler with linspace spacing; built as
tests/test_pipeline_vs_diffusers.py builds it). The embeddings computed on the pipeline's own encoders equal
the engine's conditioning bit for bit (the A1111 conditioning tests fix that one), equal the pipeline's own
prompt path for plain 77-token prompts within fp32 noise, and the pipeline called with them makes the image
tiengine's generate makes (one 8-bit level: the same latents decoded up to fp32 rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from embedding_builders import vectors
from model_builders import build_modules, tiny_model_config, write_model_folder
from test_tokenizer import BPE_PATH, ReferenceClipTokenizer

from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.engine import Engine
from tiengine.integrations.cache import PROCESS_CACHE
from tiengine.integrations.diffusers import PipelineEncoder
from tiengine.integrations.shared_encoders import IntegrationError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP32_NOISE = 2e-5  # tiengine's encoder against transformers' on these tiny models (tests/test_conditioning.py)
ONE_LEVEL = 1.0 / 255.0 + 1e-4  # images: one 8-bit level
SEED, STEPS, CFG = 42, 4, 6.0


def hf_text_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers twin of a tiengine ClipTextEncoder (with its projection: CLIPTextModelWithProjection)."""
    config = module.config
    hf_config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        hidden_act=config.hidden_act, max_position_embeddings=77, eos_token_id=49407,
        projection_dim=config.projection_dim or 512,
    )
    state = module.state_dict()
    if config.projection_dim is None:
        model = transformers.CLIPTextModel(hf_config)
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    else:
        model = transformers.CLIPTextModelWithProjection(hf_config)
    model.load_state_dict(state)
    return model.eval()


def twin(tmp_path, family: str):
    """(engine, pipeline, model folder) of one tiny model."""
    config = tiny_model_config(family)
    modules = build_modules(config, seed=3)
    folder = write_model_folder(tmp_path / f"{family}-model", config, modules)
    engine = Engine.load(folder, embeddings=False)
    ReferenceClipTokenizer(BPE_PATH).write_hf_files(tmp_path)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=77)
    unet = diffusers.UNet2DConditionModel(**config.unet.to_diffusers()).eval()
    unet.load_state_dict(modules["unet"].state_dict())
    vae = diffusers.AutoencoderKL(**config.vae.to_diffusers()).eval()
    vae.load_state_dict(modules["vae"].state_dict())
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="linspace", steps_offset=1)
    parts = {"vae": vae, "text_encoder": hf_text_model(modules["text_encoder"]), "tokenizer": tokenizer, "unet": unet,
             "scheduler": scheduler}
    if family == "sdxl":  # OpenCLIP-bigG's tokenizer pads with "!" (id 0), as SDXL's tokenizer_2 does
        tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=77, pad_token="!")
        pipeline = diffusers.StableDiffusionXLPipeline(**parts, text_encoder_2=hf_text_model(modules["text_encoder_2"]),
                                                       tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=True,
                                                       add_watermarker=False)
    else:
        pipeline = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return engine, pipeline, folder


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return twin(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return twin(tmp_path_factory.mktemp("sdxl"), "sdxl")


def pipeline_image(pipeline, **kwargs) -> np.ndarray:
    """(H, W, 3) in [0, 1] from the pipeline, started from the seed's noise as tiengine starts."""
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(SEED))
    with torch.no_grad():
        return pipeline(num_inference_steps=STEPS, guidance_scale=CFG, latents=noise, height=32, width=32,
                        output_type="np", **kwargs).images[0]


def engine_image(engine: Engine, prompt: str, negative: str) -> np.ndarray:
    result = engine.generate(prompt, negative, steps=STEPS, sampler="Euler", scheduler="normal", cfg_scale=CFG,
                             seed=SEED, width=32, height=32)
    return np.asarray(result.images[0], dtype=np.float64) / 255.0


def context(conditioning, which: str = "positive") -> torch.Tensor:
    scheduled = conditioning.positive[0][0] if which == "positive" else conditioning.negative
    return scheduled.entries[0][1]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_encoders_are_the_pipelines_tensors_and_the_pipeline_is_unchanged(family, sd1, sdxl):
    _, pipeline, _ = sd1 if family == "sd1" else sdxl
    names = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
    before = {name: {key: value.clone() for key, value in getattr(pipeline, name).state_dict().items()}
              for name in names}
    encoder = PipelineEncoder.from_pipeline(pipeline)
    if family == "sd1":  # (tiny SDXL widths are no embedding format's: only SD1 takes a custom width)
        encoder.engine.add_embedding(Embedding("shiny", {"clip_l": vectors(2, 48, seed=1) * 50}))
        embeds = encoder.encode("a shiny cat")
        assert [(applied.name, applied.slot) for applied in embeds.conditioning.applied] == [("shiny", 2)]
        assert not torch.equal(embeds.prompt_embeds, encoder.encode("a cat").prompt_embeds)
    for name, state in before.items():
        ours = encoder.engine.modules[name].state_dict()
        theirs = getattr(pipeline, name).state_dict()
        assert theirs.keys() == state.keys()  # no key added
        for key, tensor in theirs.items():
            assert torch.equal(tensor, state[key])  # no row added, no value changed
            ours_key = key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"
            assert ours[ours_key].data_ptr() == tensor.data_ptr(), key  # shared storage, no copy


def test_an_embeddings_folder_gives_the_engines_conditioning(sd1, tmp_path):
    _, pipeline, folder = sd1
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    save_embedding(Embedding("rick", {"clip_l": vectors(3, 48, seed=1) * 50}), embeddings / "rick.safetensors")
    prompt, negative = "a (rick:1.2) on the left", "rick, blurry"
    embeds = PipelineEncoder.from_pipeline(pipeline, embeddings=embeddings).encode(prompt, negative)
    reference = Engine.load(folder, embeddings=embeddings).encode(prompt, negative)
    assert [(a.prompt, a.slot, a.weight) for a in embeds.conditioning.applied] == [("positive", 2, 1.2),
                                                                                     ("negative", 1, 1.0)]
    assert torch.equal(embeds.prompt_embeds, context(reference))
    assert torch.equal(embeds.negative_prompt_embeds, context(reference, "negative"))


def test_plain_prompts_equal_the_pipelines_own_prompt_path_sd1(sd1):
    _, pipeline, _ = sd1
    encoder = PipelineEncoder.from_pipeline(pipeline)
    prompt, negative = "a red circle on the left", "blurry"
    ours = encoder.kwargs(prompt, negative)
    theirs = pipeline.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                    negative_prompt=negative)
    assert tuple(ours) == ("prompt_embeds", "negative_prompt_embeds")
    for mine, reference in zip(ours.values(), theirs):
        assert mine.shape == reference.shape == (1, 77, 48)
        assert (mine - reference).abs().max() <= FP32_NOISE
    # A1111's clip skip 2 is diffusers' clip_skip=1: hidden_states[-2] through the final layer norm (computed
    # here from the pipeline's tokenizer and encoder: diffusers 0.42's clip_skip path expects transformers 4's
    # `text_model` attribute)
    ids = pipeline.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipeline.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        skipped = pipeline.text_encoder.final_layer_norm(hidden)
    assert (encoder.kwargs(prompt, negative, clip_skip=2)["prompt_embeds"] - skipped).abs().max() <= FP32_NOISE
    ours_image = pipeline_image(pipeline, **ours)
    theirs_image = pipeline_image(pipeline, prompt=prompt, negative_prompt=negative)
    assert np.abs(ours_image - theirs_image).max() <= ONE_LEVEL and theirs_image.std() > 0.01


def test_plain_prompts_equal_the_pipelines_own_prompt_path_sdxl(sdxl):
    _, pipeline, _ = sdxl
    encoder = PipelineEncoder.from_pipeline(pipeline)
    # "": A1111's all-zero SDXL negative; diffusers zeros it for negative_prompt=None (force_zeros_for_empty_prompt)
    for negative in ("blurry", ""):
        ours = encoder.kwargs("a red circle on the left", negative)
        theirs = pipeline.encode_prompt("a red circle on the left", device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=True, negative_prompt=negative or None)
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        assert tuple(ours) == names
        for name, reference in zip(names, theirs):
            assert ours[name].shape == reference.shape, name
            assert (ours[name] - reference).abs().max() <= FP32_NOISE, name
    assert not ours["negative_prompt_embeds"].any() and not ours["negative_pooled_prompt_embeds"].any()
    assert ours["prompt_embeds"].shape == (1, 77, 64) and ours["pooled_prompt_embeds"].shape == (1, 32)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_long_weighted_prompts_are_the_engines_conditioning_and_image(family, sd1, sdxl):
    engine, pipeline, _ = sd1 if family == "sd1" else sdxl
    prompt = "a (red:1.3) circle, " * 25 + "BREAK on the [left] side, (blue sky:0.8)"
    negative = "blurry BREAK (ugly:1.2), low quality"
    embeds = PipelineEncoder.from_pipeline(pipeline).encode(prompt, negative)
    reference = engine.encode(prompt, negative)
    assert embeds.prompt_embeds.shape[1] == embeds.negative_prompt_embeds.shape[1] == 3 * 77  # negative padded
    assert torch.equal(embeds.negative_prompt_embeds[:, : 2 * 77], context(reference, "negative"))
    assert torch.equal(embeds.prompt_embeds, context(reference))  # same code on equal tensors: bit-equal
    if family == "sdxl":
        assert torch.equal(embeds.pooled_prompt_embeds, reference.positive[0][0].entries[0][2])
        assert torch.equal(embeds.negative_pooled_prompt_embeds, reference.negative.entries[0][2])
    # same chunk count on both sides: tiengine's generate runs cond and uncond in one batch, as the pipeline
    prompt_two_chunks = "a (red:1.3) circle BREAK on the [left] side, (blue sky:0.8)"
    kwargs = PipelineEncoder.from_pipeline(pipeline).kwargs(prompt_two_chunks, negative)
    ours = pipeline_image(pipeline, **kwargs)
    theirs = engine_image(engine, prompt_two_chunks, negative)
    assert np.abs(ours - theirs).max() <= ONE_LEVEL and theirs.std() > 0.01


def test_shorter_side_is_padded_with_empty_prompt_chunks(sd1):
    engine, pipeline, _ = sd1
    prompt = "a (red:1.3) circle BREAK on the left"
    embeds = PipelineEncoder.from_pipeline(pipeline).encode(prompt, "blurry")
    empty = context(engine.encode(""))  # A1111's pad_cond: the encoding of "" per missing chunk
    assert embeds.prompt_embeds.shape == embeds.negative_prompt_embeds.shape == (1, 154, 48)
    assert torch.equal(embeds.negative_prompt_embeds[:, :77], context(engine.encode("", "blurry"), "negative"))
    assert torch.equal(embeds.negative_prompt_embeds[:, 77:], empty)
    padded = PipelineEncoder.from_pipeline(pipeline).encode("blurry", prompt)  # the positive side padded too
    assert torch.equal(padded.prompt_embeds[:, 77:], empty)


@pytest.mark.parametrize("prompt,negative,expected", [
    ("a cat AND a dog", "", "composes 2 weighted part(s) with AND"),
    ("a cat :1.5", "", "a part weight other than 1"),
    ("a [cat:dog:0.5]", "", "the prompt changes its text during sampling (20 steps: 'a cat' until step 10"),
    ("a [cat|dog]", "", "[a|b] that change the text"),
    ("a cat", "[ugly:blurry:5]", "the negative prompt changes its text"),
])
def test_prompts_that_vary_across_steps_are_refused_by_name(sd1, prompt, negative, expected):
    encoder = PipelineEncoder.from_pipeline(sd1[1])
    with pytest.raises(IntegrationError) as error:
        encoder.kwargs(prompt, negative)
    assert expected in str(error.value) and "diffusers pipeline call" in str(error.value)


def test_a_schedule_with_one_text_for_every_step_is_accepted(sd1):
    engine, pipeline, _ = sd1
    embeds = PipelineEncoder.from_pipeline(pipeline).encode("a [cat:dog:30]", steps=20)  # switches after the run
    assert torch.equal(embeds.prompt_embeds, context(engine.encode("a cat")))


def test_engine_encoders_and_the_process_cache(sd1):
    engine, pipeline, folder = sd1
    from_engine = PipelineEncoder.from_engine(engine).kwargs("a (red:1.3) cat", "blurry")
    from_pipeline = PipelineEncoder.from_pipeline(pipeline).kwargs("a (red:1.3) cat", "blurry")
    assert all(torch.equal(from_engine[name], from_pipeline[name]) for name in from_engine)
    PROCESS_CACHE.clear()
    loads = PROCESS_CACHE.loads
    first = PipelineEncoder.from_model(folder)
    assert PipelineEncoder.from_model(folder).engine is first.engine and PROCESS_CACHE.loads == loads + 1
    assert torch.equal(first.kwargs("a (red:1.3) cat", "blurry")["prompt_embeds"], from_engine["prompt_embeds"])
    PROCESS_CACHE.clear()


def test_a_pipeline_without_text_encoder_is_refused():
    class NoEncoder:
        text_encoder = None

    with pytest.raises(IntegrationError, match="expected a pipeline with a text_encoder"):
        PipelineEncoder.from_pipeline(NoEncoder())
