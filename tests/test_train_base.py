"""train_base: caption ids equal the conditioning path's ids, the written folder loads through
load_models, and a tiny run is reproducible from its seed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiengine.weights_conv.convert import load_models

from tiengine.toyworld import train_base as tb
from tiengine.io.atomic import FileExistsRefusal
from tiengine.text.chunking import tokenize_prompt
from tiengine.text.conditioning import encoder_token_ids
from tiengine.text.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, ClipTokenizer
from tiengine.toyworld.world import caption, sample_scenes

MICRO = dataclasses.replace(
    tb.TrainSettings(), dataset_size=16, vae_steps=2, vae_batch=4, unet_steps=3, unet_batch=4, warmup_steps=1
)


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer.default()


def test_caption_ids_match_conditioning(tokenizer):
    rng = np.random.default_rng(0)
    captions = [caption(scene, rng, omit_probability=0.3) for scene in sample_scenes(1, 30)] + [""]
    config = tb.toyworld_model_config().text_encoders["text_encoder"]
    ids = tb.caption_token_ids(tokenizer, captions, config.pad_token_id)
    assert ids.shape == (len(captions), 77)
    for row, text in zip(ids, captions):
        chunks = tokenize_prompt(text, tokenizer).chunks
        assert len(chunks) == 1
        expected = encoder_token_ids(chunks, config.pad_token_id, torch.device("cpu"))[0]
        assert row.tolist() == expected.tolist(), text
    assert ids[-1].tolist() == [BOS_TOKEN_ID] + [EOS_TOKEN_ID] * 76


def test_colour_blend_weights():
    from tiengine.toyworld.world import COLOUR_HUES, colour_blend

    for name, hue in COLOUR_HUES.items():
        assert colour_blend(hue)[0] == (name, 1.0)
    (first, first_weight), (second, second_weight) = colour_blend(290.0)  # between blue 225 and red 360
    assert (first, second) == ("blue", "red")
    assert first_weight == pytest.approx(70 / 135) and second_weight == pytest.approx(65 / 135)
    assert colour_blend(27.5) == (("red", 0.5), ("yellow", 0.5))
    assert colour_blend(-10.0) == colour_blend(350.0)
    for hue in np.linspace(0.0, 359.9, 50):
        (_, a), (_, b) = colour_blend(hue)
        assert a + b == pytest.approx(1.0) and 0.0 <= b < 1.0


def test_blended_colour_slot_sits_before_the_shape_word(tokenizer):
    """Unnamed-colour captions get one extra row, before the shape word, equal to the blend of the two
    colour words' rows; named-colour and dropped captions are untouched."""
    from tiengine.models.text_encoder import ClipTextEncoder
    from tiengine.toyworld.world import UNNAMED_COLOUR, colour_blend

    config = tb.toyworld_model_config().text_encoders["text_encoder"]
    encoder = ClipTextEncoder(config)
    scenes = sample_scenes(0, 40)
    rng = np.random.default_rng(0)
    captions = [caption(scene, rng) for scene in scenes]
    captions[0] = ""
    ids = tb.caption_token_ids(tokenizer, captions, config.pad_token_id)
    tokens = tb.ColourSlotTokens.of(tokenizer)
    blended, rows = tb.blend_colour_slots(ids, scenes, captions, encoder, tokens, 1.0, np.random.default_rng(1))
    table = encoder.text_model.embeddings.token_embedding.weight
    expected_rows = []
    for row, (scene, text) in enumerate(zip(scenes, captions)):
        if scene.colour != UNNAMED_COLOUR or not text:
            assert blended[row].tolist() == ids[row].tolist(), text
            continue
        original = ids[row].tolist()
        shape_position = next(i for i, token in enumerate(original) if token in tokens.shapes)
        assert blended[row].tolist() == [*original[:shape_position], config.vocab_size + len(expected_rows),
                                         *original[shape_position:-1]]
        (first, a), (second, b) = colour_blend(scene.hue)
        expected_rows.append(a * table[tokens.colours[first]] + b * table[tokens.colours[second]])
    assert len(expected_rows) >= 3
    torch.testing.assert_close(rows, torch.stack(expected_rows), rtol=0, atol=0)
    # gradients reach the colour words' rows through the blend
    context, _ = encoder.encode(blended, rows)
    context.sum().backward()
    assert table.grad[tokens.colours["blue"]].abs().sum() > 0
    # probability 0: nothing changes
    unchanged, none = tb.blend_colour_slots(ids, scenes, captions, encoder, tokens, 0.0, np.random.default_rng(1))
    assert none is None and unchanged.tolist() == ids.tolist()


def test_model_config_is_tiny_sd1():
    config = tb.toyworld_model_config(0.5)
    text = config.text_encoders["text_encoder"]
    assert (config.family, config.prediction) == ("sd1", "epsilon")
    assert text.vocab_size == 49408 and text.max_position_embeddings == 77
    assert config.unet.cross_attention_dim == text.hidden_size
    assert config.vae.scaling_factor == 0.5
    assert config.schedule.beta_schedule == "scaled_linear" and config.schedule.num_train_timesteps == 1000


def test_lr_factor_warmup_and_decay():
    assert tb._lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert tb._lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert tb._lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert tb._lr_factor(100, 100, 10) == pytest.approx(0.1)


def test_micro_run_writes_loadable_reproducible_folder(tmp_path):
    torch.set_num_threads(1)
    first, second = tmp_path / "a", tmp_path / "b"
    config, log = tb.train(first, seed=3, settings=MICRO)
    tb.train(second, seed=3, settings=MICRO)
    assert {p.name for p in first.iterdir()} == {
        "config.json", "unet.safetensors", "vae.safetensors", "text_encoder.safetensors", "train_log.csv"
    }
    for name in ("unet", "vae", "text_encoder"):
        a, b = (first / f"{name}.safetensors").read_bytes(), (second / f"{name}.safetensors").read_bytes()
        assert a == b, name
        with safe_open(str(first / f"{name}.safetensors"), framework="pt") as file:
            assert {file.get_slice(key).get_dtype() for key in file.keys()} == {"F16"}
    loaded_config, modules = load_models(first, dtype=torch.float32)
    assert loaded_config == config
    assert set(modules) == {"unet", "vae", "text_encoder"}
    assert [row[0] for row in log.rows].count("unet+text") >= 2
    assert log.stopped_early == []
    # another seed gives other weights
    third = tmp_path / "c"
    tb.train(third, seed=4, settings=MICRO)
    assert (third / "unet.safetensors").read_bytes() != (first / "unet.safetensors").read_bytes()
    with pytest.raises(FileExistsRefusal):
        tb.train(first, seed=3, settings=MICRO)
