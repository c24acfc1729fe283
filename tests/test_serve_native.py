"""`tiengine serve`'s own endpoints against the CLI: /tiengine/v1/parse and tokenize answer the objects
`tiengine parse --json` / `tiengine tokenize --json` print, and /tiengine/v1/encode the bytes
`tiengine encode --out` writes, for the same tiny SD1 model, embeddings and options; bad requests are 4xx
answers that name the field or the cap.
"""

from __future__ import annotations

import base64
import json

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from tiengine.cli import main
from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.engine import Engine
from tiengine.serve.app import create_app
from tiengine.serve.config import ServeConfig, ServeLimits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARSE = "/tiengine/v1/parse"
TOKENIZE = "/tiengine/v1/tokenize"
ENCODE = "/tiengine/v1/encode"
LIMITS = ServeLimits(max_prompt_chars=2000, max_steps=60)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """toy fits the tiny SD1 model (width 48); EasyNegative (SD1's 768) and sd2thing (SD2) are skipped."""
    folder = tmp_path_factory.mktemp("serve-embeddings")
    generator = torch.Generator().manual_seed(3)
    save_embedding(Embedding("toy", {"clip_l": torch.randn(2, 48, generator=generator)}), folder / "toy.safetensors")
    save_embedding(Embedding("EasyNegative", {"clip_l": torch.randn(8, 768, generator=generator)}),
                   folder / "EasyNegative.safetensors")
    save_embedding(Embedding("sd2thing", {"clip_h": torch.randn(1, 1024, generator=generator)}),
                   folder / "sd2thing.safetensors")
    return folder


@pytest.fixture(scope="module")
def client(sd1_folder, embeddings):
    engine = Engine.load(sd1_folder, embeddings=embeddings)
    with TestClient(create_app(ServeConfig(limits=LIMITS), engine)) as test_client:
        yield test_client


def cli_json(capsys, args: list[str]) -> dict:
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


PARSE_CASES = [
    ({"prompt": "a (red:1.3) [cat:dog:0.25] BREAK castle, <lora:style:0.6:0.2> AND tree:0.5"}, []),
    ({"prompt": "[a|b] <hypernet:h:0.5> <foo:1> ((x))", "steps": 7, "second_order": True},
     ["--steps", "7", "--second-order"]),
    ({"prompt": "café \u2603 [from:to:3]", "steps": 5}, ["--steps", "5"]),
]


@pytest.mark.parametrize(("body", "flags"), PARSE_CASES)
def test_parse_answers_the_cli_object(client, capsys, body, flags):
    answer = client.post(PARSE, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == cli_json(capsys, ["parse", body["prompt"], "--json", *flags])


TOKENIZE_CASES = [
    ({"prompt": "a girl, (toy:1.2) BREAK sd2thing, EasyNegative <lora:x:1> <toy:2>"}, []),
    ({"prompt": "embedding:toy, toy, " + "word " * 80, "explicit_only": True, "comma_backtrack": 5,
      "emphasis": "no_norm"}, ["--explicit-only", "--comma-backtrack", "5", "--emphasis", "no_norm"]),
    ({"prompt": "a, b, toy, c " * 20, "keep_embeddings_on_backtrack": True, "explicit_embedding_syntax": True,
      "emphasis": "none"}, ["--keep-embeddings-on-backtrack", "--explicit-embedding-syntax", "--emphasis", "none"]),
]


@pytest.mark.parametrize(("body", "flags"), TOKENIZE_CASES)
def test_tokenize_answers_the_cli_object_with_the_served_embeddings(client, capsys, sd1_folder, embeddings, body,
                                                                     flags):
    answer = client.post(TOKENIZE, json=body)
    assert answer.status_code == 200, answer.text
    expected = cli_json(capsys, ["tokenize", body["prompt"], "--model", str(sd1_folder), "--embeddings",
                                 str(embeddings), "--json", *flags])
    assert answer.json() == expected
    if not flags:  # the served embeddings: toy binds (the model's width), the others are skipped with reasons
        report = answer.json()
        assert report["chunks"][0]["embeddings"] == [[4, "toy", 2]]  # BOS a girl , toy
        assert {name for name, _ in report["skipped"]} == {"sd2thing", "EasyNegative"}


ENCODE_CASES = [
    ({"prompt": "a [cat:dog:0.5], toy AND castle:0.5", "negative_prompt": "EasyNegative, blurry", "steps": 10},
     ["--negative", "EasyNegative, blurry", "--steps", "10"]),
    ({"prompt": "(toy:1.3) BREAK embedding:toy [a|b]", "negative_prompt": "toy", "steps": 6, "sampler": "Heun",
      "clip_skip": 2, "emphasis": "no_norm", "explicit_only": True, "comma_backtrack": 3},
     ["--negative", "toy", "--steps", "6", "--sampler", "Heun", "--clip-skip", "2", "--emphasis", "no_norm",
      "--explicit-only", "--comma-backtrack", "3"]),
]


@pytest.mark.parametrize(("body", "flags"), ENCODE_CASES)
def test_encode_answers_the_bytes_the_cli_writes(client, capsys, tmp_path, sd1_folder, embeddings, body, flags):
    out = tmp_path / "cond.safetensors"
    cli_metadata = cli_json(capsys, ["encode", body["prompt"], "--model", str(sd1_folder), "--embeddings",
                                     str(embeddings), "--device", "cpu", "--out", str(out), "--json", *flags])
    expected = out.read_bytes()

    raw = client.post(ENCODE, json=body, headers={"Accept": "application/octet-stream"})
    assert raw.status_code == 200, raw.text
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.content == expected

    answer = client.post(ENCODE, json=body)  # no Accept header: JSON
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    document = answer.json()
    assert base64.b64decode(document["safetensors"]) == expected
    assert document["metadata"] == cli_metadata
    tensors = load_safetensors(base64.b64decode(document["safetensors"]))
    with safe_open(str(out), "pt") as handle:
        assert json.loads(handle.metadata()["tiengine"]) == document["metadata"]
        assert sorted(handle.keys()) == sorted(tensors)
        for name in tensors:
            assert torch.equal(tensors[name], handle.get_tensor(name))
    assert tensors["positive.0.0.context"].shape[-1] == 48
    applied = {(a["name"], a["prompt"]) for a in document["metadata"]["applied_embeddings"]}
    assert ("toy", "positive") in applied


@pytest.mark.parametrize(("accept", "expected"), [
    ("*/*", "application/json"),
    ("application/json, application/octet-stream;q=0.5", "application/json"),
    ("application/octet-stream, application/json;q=0.9", "application/octet-stream"),
    ("application/*", "application/json"),
])
def test_encode_follows_the_accept_header(client, accept, expected):
    answer = client.post(ENCODE, json={"prompt": "a toy"}, headers={"Accept": accept})
    assert answer.status_code == 200 and answer.headers["content-type"] == expected


def test_encode_refuses_an_accept_it_cannot_answer(client):
    answer = client.post(ENCODE, json={"prompt": "a toy"}, headers={"Accept": "text/html"})
    assert answer.status_code == 406
    assert "application/octet-stream" in answer.json()["detail"]


def field_errors(answer) -> dict:
    assert answer.status_code == 422, answer.text
    return {tuple(error["loc"][1:]): error["type"] for error in answer.json()["detail"]}


def test_wrong_types_and_unknown_fields_name_the_field(client):
    assert field_errors(client.post(PARSE, json={"prompt": 3})) == {("prompt",): "string_type"}
    assert field_errors(client.post(PARSE, json={"prompt": "a", "steps": "20"})) == {("steps",): "int_type"}
    assert field_errors(client.post(PARSE, json={"prompt": "a", "steps": 0})) == {("steps",): "greater_than_equal"}
    assert field_errors(client.post(ENCODE, json={"prompt": "a", "steps": -3})) == {("steps",): "greater_than_equal"}
    assert field_errors(client.post(ENCODE, json={"prompt": "a", "clipskip": 2})) == {("clipskip",): "extra_forbidden"}
    assert field_errors(client.post(TOKENIZE, json={"prompt": "a", "comma_backtrack": -1})) == {
        ("comma_backtrack",): "greater_than_equal"}
    assert field_errors(client.post(TOKENIZE, json={"prompt": "a", "explicit_only": "yes"})) == {
        ("explicit_only",): "bool_type"}
    assert field_errors(client.post(ENCODE, json={})) == {("prompt",): "missing"}


def test_malformed_json_is_422(client):
    answer = client.post(PARSE, content=b'{"prompt": "a', headers={"Content-Type": "application/json"})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["type"] == "json_invalid"


def refusal(answer) -> str:
    assert answer.status_code == 422, answer.text
    return answer.json()["detail"]


def test_caps_and_engine_errors_are_422_with_the_reason(client):
    huge = "cat " * 600
    assert "max_prompt_chars" in refusal(client.post(PARSE, json={"prompt": huge}))
    assert "max_prompt_chars" in refusal(client.post(TOKENIZE, json={"prompt": huge}))
    assert "negative_prompt: 2400 characters" in refusal(client.post(ENCODE, json={"prompt": "a",
                                                                                    "negative_prompt": huge}))
    assert "max_steps" in refusal(client.post(ENCODE, json={"prompt": "a", "steps": 61}))
    assert "max_steps" in refusal(client.post(PARSE, json={"prompt": "a", "steps": 61}))
    assert "'Euler b'" in refusal(client.post(ENCODE, json={"prompt": "a", "sampler": "Euler b"}))
    assert "emphasis" in refusal(client.post(TOKENIZE, json={"prompt": "a", "emphasis": "loud"}))
    assert "emphasis" in refusal(client.post(ENCODE, json={"prompt": "a", "emphasis": "loud"}))
    assert "not finite" in refusal(client.post(PARSE, json={"prompt": "(a:1" + "0" * 60 + ")"}))
    assert "not finite" in refusal(client.post(ENCODE, json={"prompt": "(a:1" + "0" * 60 + ")"}))
    assert "PALETTE" in refusal(client.post(TOKENIZE, json={"prompt": "cat <lora:x:1:PALETTE>"}))
    # the worker survived every refusal
    assert client.post(ENCODE, json={"prompt": "a toy"}).status_code == 200


def test_auth_guards_the_native_endpoints(sd1_folder):
    engine = Engine.load(sd1_folder, embeddings=False)
    with TestClient(create_app(ServeConfig(api_auth="user:secret"), engine)) as guarded:
        assert guarded.post(PARSE, json={"prompt": "a"}).status_code == 401
        assert guarded.post(PARSE, json={"prompt": "a"}, auth=("user", "wrong")).status_code == 401
        assert guarded.post(PARSE, json={"prompt": "a"}, auth=("user", "secret")).status_code == 200


def test_tokenize_cli_reads_the_model_family(capsys, sd1_folder, embeddings):
    """`tiengine tokenize --model` (the reference above): the model decides the family; a contradicting
    --family is refused."""
    report = cli_json(capsys, ["tokenize", "toy", "--model", str(sd1_folder), "--embeddings", str(embeddings),
                               "--family", "sd1", "--json"])
    assert report["chunks"][0]["embeddings"] == [[1, "toy", 2]]
    without_model = cli_json(capsys, ["tokenize", "toy", "--embeddings", str(embeddings), "--json"])
    assert without_model["chunks"][0]["embeddings"] == []  # SD1's standard width is 768, toy's 48
    assert main(["tokenize", "toy", "--model", str(sd1_folder), "--family", "sdxl"]) == 2
    assert "--family sdxl: the model" in capsys.readouterr().err
