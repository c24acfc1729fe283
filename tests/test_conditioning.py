"""Conditioning against A1111's algorithm restated on transformers models with the same random weights.

Tiny SD1 (CLIP-L style), SD2 (OpenCLIP-H style, zero padding, penultimate + final norm) and SDXL (CLIP-L +
bigG with projection) encoders; 60 prompts with weights, BREAK, long prompts, embeddings in positive and
negative prompts; every emphasis mode; clip skip 1-3. Tolerance: both sides compute the same fp32
graph with different kernels (fused SDPA vs eager softmax), so differences are a few ulps of the
activations (|z| ~ 1-10): 2e-5 absolute.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from a1111_reference import RefEncoder, ref_forward, ref_tokenize_line

from tiengine.models.text_encoder import ClipTextEncoder, TextEncoderConfig
from tiengine.text.chunking import tokenize_prompt
from tiengine.text.conditioning import EncodeOptions, TextEncoderSlot, encode_texts, encoder_token_ids
from tiengine.text.tokenizer import ClipTokenizer

transformers = pytest.importorskip("transformers")

TOLERANCE = 2e-5
EMBEDDING_SIZES = {"EasyNegative": 8, "bad-artist": 2, "rick": 3, "bad_prompt_version2": 5}

BASE_PROMPTS = [
    "",
    "a photo of a cat",
    "(masterpiece:1.2), best quality, (detailed), [blurry], ((sharp focus))",
    "a girl, rick, smiling",
    "(rick:1.3) in a forest",
    "EasyNegative, (bad-artist:0.8), lowres, bad anatomy",
    "photo BREAK of a BREAK dog",
    "(photo BREAK cat) BREAK",
    "unclosed (bracket with words, and more",
    "escaped \\(literal\\) brackets and \\[more\\]",
    "[rick] [[EasyNegative]]",
    "bad_prompt_version2 bad-artist bad_prompt_version2",
    "a " * 80 + "end",
    ", ".join(f"word{i}" for i in range(60)),
    ", ".join(["a very long tag list"] * 30) + ", rick",
    "x " * 70 + ", EasyNegative, y y y y y y",
    "x " * 72 + ", a b c d e f, rick, tail",
    "(" * 3 + "deep nesting" + ")" * 3 + " [[less]] (w:0.5)",
    "日本語 prompt with ﬁne “quotes” &amp; entities",
    "(a:1.5) (b:0.5) (c) [d] e BREAK f",
]


def all_prompts() -> list[str]:
    prompts = list(BASE_PROMPTS)
    fillers = ["castle", "(sunset:1.4)", "rick", "EasyNegative", "[fog]", "BREAK", "lowres,", "a, b, c,"]
    for i in range(40):
        words = [fillers[(i * 7 + j * 3) % len(fillers)] for j in range(3 + (i * 13) % 70)]
        prompts.append(" ".join(words))
    assert len(prompts) >= 60
    return prompts


def random_vectors(
    widths: dict[str, int], sizes: dict[str, int] = EMBEDDING_SIZES
) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return {
        name: {key: torch.randn(n, width, generator=generator) for key, width in widths.items()}
        for name, n in sizes.items()
    }


def make_pair(config: TextEncoderConfig, with_projection: bool = False, seed: int = 0, reference_layers: int = 0):
    """Our encoder and its transformers twin with the same random weights. `reference_layers` > 0 gives the
    twin that many layers, of which ours keeps the first `config.num_hidden_layers` (diffusers' SD2
    folders drop OpenCLIP-H's unused last layer)."""
    hf_config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=reference_layers or config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        hidden_act=config.hidden_act,
        projection_dim=config.projection_dim or config.hidden_size,
        max_position_embeddings=77,
        eos_token_id=49407,
        pad_token_id=config.pad_token_id,
    )
    torch.manual_seed(seed)
    model_class = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    reference = model_class(hf_config).eval()
    with torch.no_grad():  # trained-looking norms: default LayerNorm init gives token vectors of mean 0
        for module in reference.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    ours = ClipTextEncoder(config)
    dropped = tuple(f"encoder.layers.{i}." for i in range(config.num_hidden_layers, hf_config.num_hidden_layers))
    ours.load_state_dict({
        key: value for key, value in reference.state_dict().items()
        if not key.removeprefix("text_model.").startswith(dropped)
    })
    return ours.eval(), reference


class Family:
    """Our encoders and their A1111 reference twins for one family: "sd1", "sd2" (OpenCLIP-H with its last
    layer, read at -2), "sd2_23" (diffusers' 23-layer SD2 layout, read at -1: every layer runs) or "sdxl";
    `sizes`: embedding name -> vector count, random vectors bound by name."""

    def __init__(self, name: str, sizes: dict[str, int] = EMBEDDING_SIZES):
        self.name = name
        if name == "sd1":
            config = TextEncoderConfig.tiny(num_hidden_layers=4)
            ours, ref = make_pair(config)
            self.slots = [TextEncoderSlot("text_encoder", "clip_l", ours)]
            self.refs = [RefEncoder(ref, "last", 49407, "clip_l")]
        elif name == "sd2":
            config = TextEncoderConfig.tiny(
                hidden_act="gelu", num_hidden_layers=4, pad_token_id=0, output_layer=-2, clip_skip_enabled=False
            )
            ours, ref = make_pair(config, seed=1)
            self.slots = [TextEncoderSlot("text_encoder", "clip_h", ours)]
            self.refs = [RefEncoder(ref, "penultimate_norm", 0, "clip_h")]
        elif name == "sd2_23":
            config = TextEncoderConfig.tiny(
                hidden_act="gelu", num_hidden_layers=3, pad_token_id=0, output_layer=-1, clip_skip_enabled=False
            )
            ours, ref = make_pair(config, seed=1, reference_layers=4)
            self.slots = [TextEncoderSlot("text_encoder", "clip_h", ours)]
            self.refs = [RefEncoder(ref, "penultimate_norm", 0, "clip_h")]
        else:
            config_l = TextEncoderConfig.tiny(num_hidden_layers=4, output_layer=-2, output_final_norm=False,
                                              clip_skip_enabled=False)
            config_g = TextEncoderConfig(
                hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=3,
                hidden_act="gelu", projection_dim=48, pad_token_id=0, output_layer=-2,
                output_final_norm=False, clip_skip_enabled=False,
            )
            ours_l, ref_l = make_pair(config_l, seed=2)
            ours_g, ref_g = make_pair(config_g, with_projection=True, seed=3)
            self.slots = [
                TextEncoderSlot("text_encoder", "clip_l", ours_l),
                TextEncoderSlot("text_encoder_2", "clip_g", ours_g),
            ]
            self.refs = [
                RefEncoder(ref_l, "hidden", 49407, "clip_l", clip_skip_applies=False),
                RefEncoder(ref_g, "hidden", 0, "clip_g", clip_skip_applies=False),
            ]
        widths = {slot.embedding_key: slot.encoder.config.hidden_size for slot in self.slots}
        self.vectors = random_vectors(widths, sizes)
        self.tokenizer = ClipTokenizer.default()
        self.plain = ClipTokenizer.default()
        for embedding_name, n in sizes.items():
            self.tokenizer.add_embedding(embedding_name, n)
        self.extra_rows = {
            key: torch.cat([self.vectors[n][key] for n in self.tokenizer.embedding_names()]) for key in widths
        }

    def ours(self, texts, **options):
        zero = options.pop("zero_if_empty", False)
        with torch.no_grad():
            result = encode_texts(texts, self.tokenizer, self.slots, self.extra_rows, EncodeOptions(**options),
                                  zero_if_empty=zero)
        return result.context, result.pooled

    def reference(self, texts, clip_skip=1, emphasis="original", comma_backtrack=20, zero_if_empty=False):
        return ref_forward(texts, self.plain.encode, self.refs, self.vectors, clip_skip=clip_skip,
                           emphasis=emphasis, backtrack=comma_backtrack, zero_if_empty=zero_if_empty)


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def family(request) -> Family:
    return Family(request.param)


def assert_close(ours, reference):
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("emphasis", ["original", "no_norm", "ignore", "none", "lerp"])
def test_every_prompt_matches_reference_per_emphasis(family, emphasis):
    """All 60 prompts with the default emphasis; the other modes differ only after encoding, so the
    hand-written prompts (every syntax feature) and every third generated one suffice for them."""
    prompts = all_prompts() if emphasis == "original" else BASE_PROMPTS + all_prompts()[len(BASE_PROMPTS) :: 3]
    for prompt in prompts:
        ours, ours_pooled = family.ours([prompt], emphasis=emphasis)
        ref, ref_pooled = family.reference([prompt], emphasis=emphasis)
        assert_close(ours, ref)
        if ref_pooled is not None:
            assert_close(ours_pooled, ref_pooled)


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_matches_reference(family, clip_skip):
    for prompt in all_prompts()[:12]:
        ours, _ = family.ours([prompt], clip_skip=clip_skip)
        ref, _ = family.reference([prompt], clip_skip=clip_skip)
        assert_close(ours, ref)


def test_clip_skip_changes_sd1_only(family):
    first, _ = family.ours(["a castle, (sunset:1.2)"], clip_skip=1)
    second, _ = family.ours(["a castle, (sunset:1.2)"], clip_skip=2)
    assert (not torch.equal(first, second)) == (family.name == "sd1")


def test_batches_with_schedule_variants_share_one_mean(family):
    """All texts of one forward pass (schedule variants, padding chunks) share the emphasis mean."""
    texts = ["(a cat:1.3) in a garden", "(a dog:0.7) in a garden, " + "x " * 80, "rick EasyNegative"]
    ours, ours_pooled = family.ours(texts)
    ref, ref_pooled = family.reference(texts)
    assert ours.shape[1] == 2 * 77
    assert_close(ours, ref)
    if ref_pooled is not None:
        assert_close(ours_pooled, ref_pooled)
    alone, _ = family.ours(texts[:1])
    assert not torch.allclose(alone, ours[:1, :77], atol=TOLERANCE)


@pytest.mark.parametrize("backtrack", [0, 5, 20])
def test_comma_backtrack_settings(family, backtrack):
    prompt = "x " * 70 + ", EasyNegative, a b c d e f g h, rick, " + "y " * 60
    ours, _ = family.ours([prompt], comma_backtrack=backtrack)
    ref, _ = family.reference([prompt], comma_backtrack=backtrack)
    assert_close(ours, ref)


def test_empty_negative_is_zero_for_sdxl_rule(family):
    ours, pooled = family.ours([""], zero_if_empty=True)
    assert torch.count_nonzero(ours) == 0
    ref, _ = family.reference([""], zero_if_empty=True)
    assert_close(ours, ref)
    nonempty, _ = family.ours(["a"], zero_if_empty=True)
    assert torch.count_nonzero(nonempty) > 0


# ----------------------------------------------------------------------------------- chunking detail


def test_chunk_layout_and_token_count_match_reference():
    tokenizer = ClipTokenizer.default()
    plain = ClipTokenizer.default()
    vectors = random_vectors({"clip_l": 4})
    for name, n in EMBEDDING_SIZES.items():
        tokenizer.add_embedding(name, n)
    for prompt in all_prompts():
        ours = tokenize_prompt(prompt, tokenizer)
        ref_chunks, ref_count = ref_tokenize_line(prompt, plain.encode, vectors)
        assert ours.token_count == ref_count, prompt
        assert len(ours.chunks) == len(ref_chunks), prompt
        for chunk, ref in zip(ours.chunks, ref_chunks):
            assert len(chunk.tokens) == 77
            assert chunk.weights == ref.multipliers
            assert [0 if t > 49407 else t for t in chunk.tokens] == ref.tokens, prompt
            assert [(e.slot - 1, e.name) for e in chunk.embeddings] == list(ref.fixes), prompt


def test_embedding_never_split_across_chunks():
    tokenizer = ClipTokenizer.default()
    tokenizer.add_embedding("EasyNegative", 8)
    prompt = "a " * 70 + "EasyNegative tail"
    result = tokenize_prompt(prompt, tokenizer)
    first, second = result.chunks
    assert first.tokens[71:76] == [49407] * 5  # closed early: 8 vectors do not fit in 5 slots
    assert second.tokens[1:9] == list(range(49408, 49416))
    assert [(e.slot, e.name, e.n_vectors) for e in second.embeddings] == [(1, "EasyNegative", 8)]


def test_backtrack_quirk_and_its_fix():
    tokenizer = ClipTokenizer.default()
    tokenizer.add_embedding("rick", 3)
    prompt = "x " * 70 + ", rick a b c d e"
    quirk = tokenize_prompt(prompt, tokenizer)
    fixed = tokenize_prompt(prompt, tokenizer, keep_embeddings_on_backtrack=True)
    assert quirk.warnings and fixed.warnings
    # A1111: the moved slots become '!' (id 0) and the vectors stay in the first chunk's padding.
    assert quirk.chunks[1].tokens[1:4] == [0, 0, 0]
    assert quirk.chunks[0].tokens[72:77] == [49407] * 5
    assert [(e.slot, e.name) for e in quirk.chunks[0].embeddings] == [(72, "rick")]
    sd1_ids = encoder_token_ids(quirk.chunks[:1], 49407, torch.device("cpu"))[0].tolist()
    assert sd1_ids[72:77] == [49408, 49409, 49410, 49407, 49407]
    assert fixed.chunks[1].tokens[1:4] == [49408, 49409, 49410]
    assert fixed.chunks[0].tokens[72:76] == [49407] * 4
    assert [(e.slot, e.name) for e in fixed.chunks[1].embeddings] == [(1, "rick")]


def test_explicit_and_bare_binding_encode_identically():
    fam = Family("sd1")
    bare, _ = fam.ours(["a girl, (rick:1.2), EasyNegative"])
    explicit, _ = fam.ours(["a girl, (embedding:rick:1.2), embedding:EasyNegative"], bare_names=False)
    assert_close(bare, explicit)


def test_sd2_ids_zeroed_after_first_eos_except_embedding_slots():
    tokenizer = ClipTokenizer.default()
    tokenizer.add_embedding("rick", 3)
    prompt = "x " * 70 + ", rick a b c d e"
    chunks = tokenize_prompt(prompt, tokenizer).chunks
    ids = encoder_token_ids(chunks[:1], 0, torch.device("cpu"))[0].tolist()
    # A1111 zeroes after the first EOS (slot 72, where the displaced embedding starts), then writes the
    # embedding's vectors over slots 72-74.
    assert ids[71] == 267 and ids[72:75] == [49408, 49409, 49410] and ids[75:] == [0, 0]
    plain = encoder_token_ids(chunks[1:], 0, torch.device("cpu"))[0].tolist()
    # chunk 2: BOS, the moved slots as "!" (0), then "a b c d e", EOS, zero padding
    assert plain[:6] == [49406, 0, 0, 0, 320, 321] and plain.index(49407) == 9 and set(plain[10:]) == {0}


@pytest.mark.parametrize("option,value", [("emphasis", "bogus"), ("clip_skip", 0), ("comma_backtrack", -1)])
def test_bad_options_are_refused(option, value):
    from tiengine.text.conditioning import ConditioningError

    with pytest.raises(ConditioningError):
        EncodeOptions(**{option: value})


def test_clip_skip_beyond_layers_is_refused():
    from tiengine.text.conditioning import ConditioningError

    fam = Family("sd1")
    with pytest.raises(ConditioningError, match="clip skip 9 is more than the 4 layers"):
        fam.ours(["a"], clip_skip=9)


def test_prompt_matrix_size():
    combos = list(itertools.product(all_prompts(), ["original", "no_norm", "ignore", "none", "lerp"]))
    assert len(combos) >= 250


@pytest.mark.parametrize("emphasis", ["original", "no_norm"])
def test_conditioning_that_is_not_finite_is_refused(emphasis):
    from tiengine.text.conditioning import ConditioningError

    fam = Family("sd1")
    # finite in float32 as a weight, but it overflows the encoder output
    with pytest.raises(ConditioningError, match=r"not finite \(inf or NaN\).*largest prompt weight is 3e\+38"):
        fam.ours(["a (cat:" + "3" + "0" * 38 + ")"], emphasis=emphasis)
    context, _ = fam.ours(["a (cat:1.5)"], emphasis=emphasis)
    assert torch.isfinite(context).all()
