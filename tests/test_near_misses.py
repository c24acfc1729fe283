"""Near misses: a typed word that names no embedding but is close to a loaded one gets a "did you mean" note,
through EmbeddingVocabulary.skipped_mentions (so Engine.encode reports it) and `tiengine tokenize`."""

from __future__ import annotations

import json

import pytest
import torch
from model_builders import tiny_model_folder

from tiengine.cli import main
from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.text.tokenizer import ClipTokenizer
from tiengine.text.vocabulary import EmbeddingVocabulary, SkippedMention

NAMES = ("EasyNegative", "badhandv4", "bad-hands-5", "eyeliner2", "ng_deepnegative_v1_75t")


def _vocabulary(width: int = 768, names=NAMES, skipped=None) -> EmbeddingVocabulary:
    embeddings = {name: Embedding(name, {"clip_l": torch.zeros(1, width)}) for name in names}
    return EmbeddingVocabulary.build(ClipTokenizer.default(), embeddings, skipped=skipped)


def test_close_names_get_a_suggestion():
    vocabulary = _vocabulary()
    prompt = ("(EasyNegativeV2:1.2), badhandv5, bad_hands_5, NG_DeepNegative_V1_75, [EasyNegativ:x:3], "
              "embedding:badhand_v4 and EasyNegativeV2 again")
    mentions = vocabulary.skipped_mentions(prompt)
    assert [(m.name, m.suggestion) for m in mentions] == [
        ("EasyNegativeV2", "EasyNegative"),  # a version suffix
        ("badhandv5", "badhandv4"),  # another version
        ("bad_hands_5", "bad-hands-5"),  # separators
        ("NG_DeepNegative_V1_75", "ng_deepnegative_v1_75t"),  # difflib ratio
        ("EasyNegativ", "EasyNegative"),
        ("badhand_v4", "badhandv4"),  # embedding:NAME naming nothing
    ]  # each word once
    assert mentions[0] == SkippedMention(
        "EasyNegativeV2", "not a loaded embedding; did you mean 'EasyNegative'?", "EasyNegative"
    )


def test_ordinary_words_and_bound_names_get_none():
    vocabulary = _vocabulary()
    # English words (even one a digit away from a name), names that bind (the tokenizer lower-cases),
    # short words, and words far from every name
    prompt = ("a woman with eyeliner, easynegative, EASYNEGATIVE, badhandv4, bad-hands-5, negative, hands, "
              "detailed hands, Bad5, masterpiece, best quality, RAW photo, 8k uhd, HDR, ultra-detailed")
    assert vocabulary.skipped_mentions(prompt) == []
    assert _vocabulary(names=()).skipped_mentions("EasyNegativeV2") == []  # nothing loaded: nothing to suggest


def test_skipped_files_come_first_and_are_not_suggested_for():
    vocabulary = _vocabulary(skipped={"EasyNegativeV2": "made for SD2 (1024), this model is SD1 (768)"})
    mentions = vocabulary.skipped_mentions("EasyNegativeV2, badhandv5")
    assert [(m.name, m.suggestion) for m in mentions] == [("EasyNegativeV2", None), ("badhandv5", "badhandv4")]


def test_few_suggestions_and_only_for_name_like_words_on_real_prompts(wild_dir):
    from tiengine.embeddings.library import EmbeddingLibrary

    prompts = (wild_dir / "prompts.txt").read_text(encoding="utf-8").splitlines()
    vocabulary = EmbeddingVocabulary.from_library(
        ClipTokenizer.default(), EmbeddingLibrary(wild_dir / "embeddings", "sd1")
    )
    mentions = [mention for prompt in prompts for mention in vocabulary.near_misses(prompt)]
    assert len(prompts) == 3233 and len(mentions) < 0.06 * len(prompts)
    for mention in mentions:  # no plain lower-case English word: every one was typed as a name
        assert not mention.name.isalpha() or not mention.name.islower(), mention


def test_tokenize_reports_the_suggestion(tmp_path, capsys):
    save_embedding(Embedding("EasyNegative", {"clip_l": torch.zeros(2, 768)}), tmp_path / "EasyNegative.safetensors")
    assert main(["tokenize", "a cat, EasyNegativeV2", "--embeddings", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipped embedding EasyNegativeV2: not a loaded embedding; did you mean 'EasyNegative'?" in out
    assert main(["tokenize", "a cat, EasyNegativeV2", "--embeddings", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == [["EasyNegativeV2", "not a loaded embedding; did you mean 'EasyNegative'?"]]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tiengine.engine import Engine

    folder = tiny_model_folder(tmp_path_factory.mktemp("sd1") / "model", "sd1")
    embeddings = tmp_path_factory.mktemp("embeddings")
    save_embedding(Embedding("EasyNegative", {"clip_l": torch.zeros(2, 48)}), embeddings / "EasyNegative.safetensors")
    return Engine.load(folder, embeddings=embeddings)


def test_engine_encode_reports_the_suggestion(engine):
    result = engine.encode("a cat", "EasyNegativeV2, blurry", steps=4)
    assert [(m.name, m.suggestion) for m in result.skipped] == [("EasyNegativeV2", "EasyNegative")]
    assert engine.encode("a cat", "EasyNegative, blurry", steps=4).skipped == []
