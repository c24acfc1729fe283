"""Engine.generate against diffusers' StableDiffusionPipeline on the same tiny random weights.

Same prompt (plain text, so A1111 weighting is the identity), same initial noise, Euler with the
"normal" schedule (diffusers: EulerDiscreteScheduler, linspace spacing), same CFG. The images agree to
within one 8-bit level: both decode the same latents up to fp32 rounding, then quantize.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_builders import build_modules, tiny_model_config, write_model_folder
from test_tokenizer import BPE_PATH, ReferenceClipTokenizer

from tiengine.engine import Engine

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_generate_matches_stable_diffusion_pipeline(tmp_path, prediction):
    config = tiny_model_config("sd1", prediction)
    modules = build_modules(config, seed=3)
    engine = Engine.load(write_model_folder(tmp_path / "model", config, modules))

    encoder_config = config.text_encoders["text_encoder"]
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=encoder_config.hidden_size,
            intermediate_size=encoder_config.intermediate_size,
            num_hidden_layers=encoder_config.num_hidden_layers,
            num_attention_heads=encoder_config.num_attention_heads, hidden_act=encoder_config.hidden_act,
            max_position_embeddings=77, eos_token_id=49407,
        )
    ).eval()
    state = {key.removeprefix("text_model."): value for key, value in modules["text_encoder"].state_dict().items()}
    text_encoder.load_state_dict(state)
    unet = diffusers.UNet2DConditionModel(**config.unet.to_diffusers()).eval()
    unet.load_state_dict(modules["unet"].state_dict())
    vae = diffusers.AutoencoderKL(**config.vae.to_diffusers()).eval()
    vae.load_state_dict(modules["vae"].state_dict())
    ReferenceClipTokenizer(BPE_PATH).write_hf_files(tmp_path)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=77)
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="linspace", steps_offset=1,
        prediction_type="v_prediction" if prediction == "v" else "epsilon",
    )
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)

    prompt, negative, seed = "a red circle on the left", "blurry", 42
    ours = engine.generate(prompt, negative, steps=6, sampler="Euler", scheduler="normal", cfg_scale=6.0,
                           seed=seed, width=32, height=32)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        theirs = pipeline(prompt, negative_prompt=negative, num_inference_steps=6, guidance_scale=6.0,
                          latents=noise, height=32, width=32, output_type="np").images[0]  # (H, W, 3) in [0, 1]
    ours_pixels = np.asarray(ours.images[0], dtype=np.float64) / 255.0
    assert np.abs(ours_pixels - theirs).max() <= 1.0 / 255.0 + 1e-4
    assert theirs.std() > 0.01  # a real image, not a constant
