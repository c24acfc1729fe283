"""The real third-party A1111 client, `webuiapi`, drives `tiengine serve` unchanged over a loopback socket
(uvicorn in a thread), and the pictures it gets are the bytes `tiengine generate --out` writes for the same
settings (the CLI run in-process).

Covered: txt2img and img2img with an embedding in the prompt and a negative embedding, png_info,
get_embeddings, progress and interrupt mid-job (the partial picture comes back and the next request works).
"""

from __future__ import annotations

import base64
import shutil
import threading
import time

import pytest
import uvicorn
import webuiapi
from embedding_builders import safetensors_file, vectors

from tiengine.cli import main
from tiengine.engine import Engine
from tiengine.serve.app import create_app
from tiengine.serve.config import ServeConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64  # the tiny model's native size
WIDTH = 48  # the tiny SD1 text encoder's width
PROMPT, NEGATIVE = "a photo of goodthing, blue sky", "badhands, blurry"


@pytest.fixture(scope="module")
def server(sd1_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("webuiapi")
    model = shutil.copytree(sd1_folder, root / "tiny")
    embeddings = root / "embeddings"
    embeddings.mkdir()
    safetensors_file(embeddings / "goodthing.safetensors", {"emb_params": vectors(2, WIDTH, seed=1)})
    safetensors_file(embeddings / "badhands.safetensors", {"emb_params": vectors(3, WIDTH, seed=2)})
    engine = Engine.load(model, embeddings=embeddings)
    app = create_app(ServeConfig(model=model, embeddings=embeddings), engine)
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = uvicorn_server.servers[0].sockets[0].getsockname()[1]
    yield webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=4), model, embeddings, root
    uvicorn_server.should_exit = True
    thread.join(30)


def cli_bytes(model, embeddings, out, *extra: str) -> bytes:
    status = main(["generate", PROMPT, "--negative", NEGATIVE, "--model", str(model), "--embeddings",
                   str(embeddings), "--sampler", "Euler a", "--steps", "4", "--cfg", "7", "--size", f"{SIZE}x{SIZE}",
                   "--device", "cpu", "--out", str(out), *extra])
    assert status == 0
    return out.read_bytes()


def test_txt2img_and_img2img_equal_the_cli_bytes(server, capsys):
    api, model, embeddings, root = server
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=1234, width=SIZE, height=SIZE, cfg_scale=7)
    sent = base64.b64decode(result.json["images"][0])
    assert sent == cli_bytes(model, embeddings, root / "cli.png", "--seed", "1234")
    assert result.info["all_seeds"] == [1234]
    assert "TI hashes: \"goodthing: " in result.info["infotexts"][0] and "badhands: " in result.info["infotexts"][0]
    assert result.image.size == (SIZE, SIZE)

    init = root / "init.png"
    init.write_bytes(sent)
    again = api.img2img(images=[result.image], prompt=PROMPT, negative_prompt=NEGATIVE, seed=77, width=SIZE,
                        height=SIZE, cfg_scale=7, denoising_strength=0.6)
    assert base64.b64decode(again.json["images"][0]) == cli_bytes(
        model, embeddings, root / "cli-img2img.png", "--seed", "77", "--init-image", str(init), "--strength", "0.6")
    assert again.parameters["denoising_strength"] == 0.6 and again.parameters["init_images"] is None

    info = api.png_info(again.image)
    assert info.info == again.info["infotexts"][0]
    assert info.json["parameters"]["Seed"] == "77" and info.json["parameters"]["Negative prompt"] == NEGATIVE
    capsys.readouterr()


def test_listings_through_the_client(server):
    api = server[0]
    embeddings = api.get_embeddings()
    assert embeddings["loaded"]["badhands"]["vectors"] == 3 and embeddings["skipped"] == {}
    assert "Euler a" in api.util_get_sampler_names()
    assert api.util_get_model_names() == [api.get_sd_models()[0]["title"]] and api.get_sd_models()[0]["model_name"] == "tiny"
    assert api.util_get_current_model() == api.get_options()["sd_model_checkpoint"]


def test_interrupt_mid_job_returns_the_partial_image_and_the_server_goes_on(server):
    api = server[0]
    answers = {}
    thread = threading.Thread(target=lambda: answers.setdefault("result", api.txt2img(
        prompt=PROMPT, seed=5, width=SIZE, height=SIZE, steps=60, n_iter=4)))
    thread.start()
    deadline = time.monotonic() + 30
    while (progress := api.get_progress())["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline, "the job never started sampling"
        time.sleep(0.005)
    assert progress["state"]["job_count"] == 4 and progress["eta_relative"] > 0
    api.interrupt()
    thread.join(60)
    result = answers["result"]
    assert len(result.images) == 1 and result.info["all_seeds"] == [5]
    assert len(api.txt2img(prompt=PROMPT, seed=6, width=SIZE, height=SIZE).images) == 1
