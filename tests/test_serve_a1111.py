"""The A1111-compatible routes of `tiengine serve` (tiengine.serve.a1111) on a tiny SD1 model, through
FastAPI's TestClient.

References: the engine itself (a request's images equal `Engine.generate` for A1111's seeds, PNG bytes
included); AUTOMATIC1111 1.10's seeds (image k of n_iter x batch_size uses seed + k, or the seed and
subseed + k with a variation strength), `Processed.js()` keys, `/embeddings` shape and option names; a
file-open audit hook for the claim that names in requests never reach files outside the folders.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
import threading
import time

import pytest
from embedding_builders import safetensors_file, vectors
from fastapi.testclient import TestClient
from lora_builders import write_kohya_lora
from PIL import Image

from tiengine.engine import Engine
from tiengine.io.metadata import png_bytes
from tiengine.serve.app import create_app
from tiengine.serve.config import ServeConfig, ServeLimits
from tiengine.settings import GenerateSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64  # the tiny model's native size
WIDTH = 48  # the tiny SD1 text encoder's width
# AUTOMATIC1111 1.10 modules/processing.py Processed.js()
JS_KEYS = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
           "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
           "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
           "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
           "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
           "is_using_inpainting_conditioning", "version"}


@pytest.fixture(scope="module")
def served(sd1_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    model = shutil.copytree(sd1_folder, root / "models" / "tiny")
    embeddings = root / "embeddings"
    embeddings.mkdir()
    safetensors_file(embeddings / "goodthing.safetensors", {"emb_params": vectors(2, WIDTH, seed=1)})
    safetensors_file(embeddings / "badhands.safetensors", {"emb_params": vectors(3, WIDTH, seed=2)})
    safetensors_file(embeddings / "widething.safetensors", {"emb_params": vectors(1, 64, seed=3)})  # SD2 width
    loras = root / "loras"
    (loras / "styles").mkdir(parents=True)
    (root / "outside.safetensors").write_bytes(b"sentinel: must never be read")
    engine = Engine.load(model, embeddings=embeddings, loras=loras)
    config = ServeConfig(model=model, embeddings=embeddings, loras=loras,
                         limits=ServeLimits(max_pixels=128 * 128, max_steps=60, max_batch_size=4, max_n_iter=4,
                                            max_prompt_chars=500))
    with TestClient(create_app(config, engine)) as client:
        yield client, engine, root


def txt2img(client, **fields):
    body = {"prompt": "a goodthing", "negative_prompt": "badhands", "steps": 3, "width": SIZE, "height": SIZE,
            "seed": 5, "sampler_name": "Euler a", **fields}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def expected_bytes(engine, result_index, **settings):
    result = engine.generate("a goodthing", "badhands", settings=GenerateSettings(
        steps=3, sampler="Euler a", cfg_scale=7.0, width=SIZE, height=SIZE, **settings))
    return png_bytes(result.images[result_index], result.parameters[result_index])


def test_txt2img_runs_n_iter_batches_from_a1111_seeds_and_matches_the_engine(served):
    client, engine, _ = served
    body = txt2img(client, n_iter=2, batch_size=2, unknown_field_from_a_newer_client=1)
    info = json.loads(body["info"])
    assert set(info) == JS_KEYS
    assert info["all_seeds"] == [5, 6, 7, 8] and info["seed"] == 5 and info["sampler_name"] == "Euler a"
    assert len(body["images"]) == 4
    # run 1 (images 2, 3) is its own engine call of batch 2 from seed 7: image 3 is its second
    assert base64.b64decode(body["images"][3]) == expected_bytes(engine, 1, seed=7, batch_size=2)
    assert base64.b64decode(body["images"][0]) == expected_bytes(engine, 0, seed=5, batch_size=2)
    assert "Seed: 8," in info["infotexts"][3] and "TI hashes" in info["infotexts"][0]
    # parameters echo the request with A1111's defaults; unknown fields are ignored, not echoed
    assert body["parameters"]["sampler_index"] == "Euler" and body["parameters"]["n_iter"] == 2
    assert body["parameters"]["enable_hr"] is False and "unknown_field_from_a_newer_client" not in body["parameters"]


def test_variation_seed_keeps_the_seed_and_counts_subseeds(served):
    client, engine, _ = served
    body = txt2img(client, n_iter=2, batch_size=1, subseed=40, subseed_strength=0.5)
    info = json.loads(body["info"])
    assert info["all_seeds"] == [5, 5] and info["all_subseeds"] == [40, 41]
    assert base64.b64decode(body["images"][1]) == expected_bytes(engine, 0, seed=5, subseed=41,
                                                                  subseed_strength=0.5)


def test_random_seed_is_drawn_once_and_counted_up(served):
    client, _, _ = served
    info = json.loads(txt2img(client, seed=-1, n_iter=3)["info"])
    first = info["all_seeds"][0]
    assert 0 <= first < 4294967294 and info["all_seeds"] == [first, first + 1, first + 2]


def test_send_images_false_and_overrides(served):
    client, _, _ = served
    assert txt2img(client, send_images=False)["images"] == []
    body = txt2img(client, override_settings={"CLIP_stop_at_last_layers": 2, "randn_source": "NV",
                                              "eta_noise_seed_delta": 31337, "samples_save": False})
    text = json.loads(body["info"])["infotexts"][0]
    assert "Clip skip: 2" in text and "RNG: NV" in text and "ENSD: 31337" in text
    assert "Clip skip" not in json.loads(txt2img(client)["info"])["infotexts"][0]  # overrides were restored


def test_hires_fix_fields(served):
    client, engine, _ = served
    body = txt2img(client, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.6,
                   hr_upscaler="Latent (nearest)", hr_sampler_name="Euler a", hr_prompt="a goodthing")
    text = json.loads(body["info"])["infotexts"][0]
    assert "Hires upscale: 1.5" in text and "Size: 64x64" in text
    reference = engine.generate("a goodthing", "badhands", settings=GenerateSettings(
        steps=3, sampler="Euler a", cfg_scale=7.0, width=SIZE, height=SIZE, seed=5, hires_scale=1.5, hires_steps=2,
        strength=0.6, hires_upscaler="Latent (nearest)"))
    assert base64.b64decode(body["images"][0]) == png_bytes(reference.images[0], reference.parameters[0])


def test_img2img_and_png_info(served):
    client, engine, _ = served
    init = txt2img(client)["images"][0]
    response = client.post("/sdapi/v1/img2img", json={
        "init_images": ["data:image/png;base64," + init], "prompt": "a goodthing", "negative_prompt": "badhands",
        "steps": 4, "width": SIZE, "height": SIZE, "seed": 9, "denoising_strength": 0.5, "sampler_name": "Euler a"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["parameters"]["init_images"] is None
    reference = engine.img2img(Image.open(io.BytesIO(base64.b64decode(init))), "a goodthing", "badhands",
                               settings=GenerateSettings(steps=4, sampler="Euler a", cfg_scale=7.0, width=SIZE,
                                                         height=SIZE, seed=9, strength=0.5))
    assert base64.b64decode(body["images"][0]) == png_bytes(reference.images[0], reference.parameters[0])
    info = client.post("/sdapi/v1/png-info", json={"image": body["images"][0]}).json()
    assert info["info"] == reference.parameters[0]
    assert info["parameters"]["Seed"] == "9" and info["parameters"]["Denoising strength"] == "0.5"


def test_listings(served):
    client, engine, _ = served
    embeddings = client.get("/sdapi/v1/embeddings").json()
    assert embeddings["loaded"]["goodthing"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                 "shape": WIDTH, "vectors": 2}
    assert set(embeddings["loaded"]) == {"goodthing", "badhands"}
    assert embeddings["skipped"]["widething"]["shape"] == 64
    models = client.get("/sdapi/v1/sd-models").json()
    assert models == [{"title": f"tiny [{engine.model_hash()}]", "model_name": "tiny", "hash": engine.model_hash(),
                       "sha256": None, "filename": "tiny", "config": None}]
    samplers = {item["name"]: item for item in client.get("/sdapi/v1/samplers").json()}
    assert samplers["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    assert samplers["DPM++ SDE"]["options"]["brownian_noise"] is True
    schedulers = {item["label"]: item for item in client.get("/sdapi/v1/schedulers").json()}
    assert schedulers["Karras"] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                                    "need_inner_model": False}
    assert "Automatic" not in schedulers
    assert client.get("/sdapi/v1/hypernetworks").json() == []
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0 and progress["current_image"] is None


def test_options_are_server_wide_and_refuse_what_they_cannot_apply(served):
    client, engine, _ = served
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == f"tiny [{engine.model_hash()}]" and options["CLIP_stop_at_last_layers"] == 1
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    try:
        assert "Clip skip: 2" in json.loads(txt2img(client)["info"])["infotexts"][0]
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    refused = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3, "sd_vae": "other.vae.pt"})
    assert refused.status_code == 422 and "options.sd_vae='other.vae.pt'" in refused.json()["detail"]
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1  # nothing of it applied
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}).status_code == 200


def test_folders_reload_without_a_restart(served):
    client, engine, root = served
    safetensors_file(root / "embeddings" / "newthing.safetensors", {"emb_params": vectors(1, WIDTH, seed=4)})
    assert "newthing" not in client.get("/sdapi/v1/embeddings").json()["loaded"]
    assert client.post("/sdapi/v1/refresh-embeddings").json() is None
    assert "newthing" in client.get("/sdapi/v1/embeddings").json()["loaded"]
    assert "TI hashes: \"newthing" in json.loads(txt2img(client, prompt="newthing", negative_prompt="")["info"])["infotexts"][0]

    write_kohya_lora(root / "loras" / "styles" / "ink.safetensors", engine.modules, family="sd1",
                     metadata={"ss_output_name": "inkstyle"})
    assert client.get("/sdapi/v1/loras").json() == []
    assert client.post("/sdapi/v1/refresh-loras").json() is None
    assert client.get("/sdapi/v1/loras").json() == [{"name": "ink", "alias": "inkstyle", "path": "styles/ink.safetensors",
                                                     "metadata": {"ss_output_name": "inkstyle"}}]
    text = json.loads(txt2img(client, prompt="a goodthing <lora:ink:0.8>")["info"])["infotexts"][0]
    assert "Lora hashes: \"ink:" in text


@pytest.fixture
def file_opens():
    """Paths opened or listed while the test runs (a Python audit hook; the hook stays, inactive, afterwards)."""
    opened: list[str] = []
    active = [True]

    def record(event: str, args: tuple) -> None:
        if active[0] and event in ("open", "os.listdir", "os.scandir") and args and \
                isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(record)
    yield opened
    active[0] = False


def test_names_in_requests_never_reach_files_outside_the_folders(served, file_opens):
    client, _, root = served
    body = txt2img(client, prompt="a <lora:../outside:1> <lora:../../outside:1> embedding:../outside goodthing")
    assert len(body["images"]) == 1
    for field, value in (("sd_model_checkpoint", "../../etc/passwd"), ("sd_model_checkpoint", str(root / "outside"))):
        response = client.post("/sdapi/v1/txt2img", json={"override_settings": {field: value}, "steps": 2})
        assert response.status_code == 422 and "does not load others" in response.json()["detail"]
    response = client.post("/sdapi/v1/txt2img", json={"enable_hr": True, "hr_checkpoint_name": "../outside", "steps": 2})
    assert response.status_code == 422 and "hr_checkpoint_name='../outside'" in response.json()["detail"]
    for image in (str(root / "outside.safetensors"), "file://" + str(root / "outside.safetensors")):
        response = client.post("/sdapi/v1/png-info", json={"image": image})
        assert response.status_code == 422 and "never fetches URLs or reads paths" in response.json()["detail"]
    assert not [path for path in file_opens if "outside" in path], file_opens


def test_interrupt_ends_the_job_with_its_partial_image_and_skip_only_the_current_run(served):
    client, engine, _ = served
    answers: dict[str, object] = {}

    def post(name, **fields):
        answers[name] = client.post("/sdapi/v1/txt2img", json={
            "prompt": "a goodthing", "steps": 60, "width": SIZE, "height": SIZE, "seed": 11,
            "sampler_name": "Euler", **fields})

    def wait_for(run_index):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = client.get("/sdapi/v1/progress").json()
            if state["state"]["job_no"] == run_index and state["state"]["sampling_step"] >= 2:
                return state
            time.sleep(0.005)
        raise AssertionError("the job never reached its step 2")

    worker = threading.Thread(target=post, args=("interrupted",), kwargs={"n_iter": 3})
    worker.start()
    state = wait_for(0)
    assert state["state"]["job_count"] == 3 and state["state"]["sampling_steps"] == 60 and 0 < state["progress"] < 1
    latent_side = SIZE // engine.modules["vae"].downscale_factor  # a live preview: one pixel per latent pixel
    assert Image.open(io.BytesIO(base64.b64decode(state["current_image"]))).size == (latent_side, latent_side)
    assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    assert client.post("/sdapi/v1/options", json={"live_previews_enable": False}).status_code == 200
    assert client.get("/sdapi/v1/progress").json()["current_image"] is None
    assert client.post("/sdapi/v1/options", json={"live_previews_enable": True}).status_code == 200
    assert client.post("/sdapi/v1/interrupt").json() is None
    worker.join(60)
    body = answers["interrupted"].json()
    assert len(body["images"]) == 1 and json.loads(body["info"])["all_seeds"] == [11]

    worker = threading.Thread(target=post, args=("skipped",), kwargs={"n_iter": 2})
    worker.start()
    wait_for(0)
    assert client.post("/sdapi/v1/skip").json() is None
    worker.join(60)
    images = answers["skipped"].json()["images"]
    full = engine.generate("a goodthing", "", settings=GenerateSettings(steps=60, sampler="Euler", cfg_scale=7.0,
                                                                        width=SIZE, height=SIZE, seed=12))
    assert len(images) == 2
    assert base64.b64decode(images[1]) == png_bytes(full.images[0], full.parameters[0])  # run 1 ran in full
    assert txt2img(client)["images"]  # and the service goes on
