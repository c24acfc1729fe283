"""Bad input to the A1111 routes of `tiengine serve`: each case is a 4xx with a message that says what was
wrong (the field, the value, the limit and the flag that raises it), and the service goes on serving.

Shapes: FastAPI's own validation errors (malformed JSON, wrong types) are its 422 list of {"loc", "msg",
"type"}, as A1111's are; tiengine's refusals are 422 {"detail": message, "error": type}; a body over the
cap is 413, missing or wrong credentials 401 with WWW-Authenticate.
"""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from tiengine.cli import build_parser, main
from tiengine.cli.serve import serve_config
from tiengine.engine import Engine
from tiengine.serve.app import create_app
from tiengine.serve.config import ServeConfig, ServeError, ServeLimits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIMITS = ServeLimits(max_request_bytes=4096, max_pixels=128 * 128, max_steps=30, max_batch_size=2, max_n_iter=2,
                     max_prompt_chars=200)
GOOD = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1}


@pytest.fixture(scope="module")
def engine(sd1_folder):
    return Engine.load(sd1_folder, embeddings=False)


@pytest.fixture(scope="module")
def client(sd1_folder, engine):
    with TestClient(create_app(ServeConfig(model=sd1_folder, limits=LIMITS), engine)) as client:
        yield client


def post(client, fields: dict, path: str = "/sdapi/v1/txt2img"):
    return client.post(path, json={**GOOD, **fields})


# (case, fields, the message's expected text)
REFUSALS = [
    ("negative width", {"width": -64}, "width=-64: expected a positive number of pixels"),
    ("zero steps", {"steps": 0}, "steps=0: expected an integer >= 1"),
    ("unknown sampler", {"sampler_name": "Euler z"}, "sampler_name: unknown sampler 'Euler z'"),
    ("old sampler_index", {"sampler_index": "k_nope"}, "sampler_index: unknown sampler 'k_nope'"),
    ("unknown scheduler", {"scheduler": "zigzag"}, "scheduler: unknown schedule type 'zigzag'"),
    ("huge prompt", {"prompt": "cat " * 60}, ("prompt: 240 characters, over the service's limit of 200 "
                                             "(tiengine serve --max-prompt-chars)")),
    ("too many pixels", {"width": 256, "height": 128}, ("32768 pixels (hires target included), over the service's "
                                                       "limit of 16384 (tiengine serve --max-pixels)")),
    ("hires target over the pixel cap", {"enable_hr": True, "hr_scale": 4}, "over the service's limit of 16384"),
    ("steps with hires steps", {"steps": 20, "enable_hr": True}, ("steps: 20 + hires steps 20 is over the service's "
                                                                "limit of 30 sampling steps (tiengine serve --max-steps)")),
    ("batch size", {"batch_size": 3}, "batch_size: 3, over the service's limit of 2 (tiengine serve --max-batch-size)"),
    ("n_iter", {"n_iter": 5}, "n_iter: 5, over the service's limit of 2 (tiengine serve --max-n-iter)"),
    ("face restoration", {"restore_faces": True}, "restore_faces=True: face restoration"),
    ("tiling", {"tiling": True}, "tiling=True: seamless tiling is not supported"),
    ("styles", {"styles": ["cinematic"]}, "styles=['cinematic']: prompt styles need A1111's styles file"),
    ("s_churn", {"s_churn": 0.5}, "s_churn=0.5: only A1111's default (0) is done"),
    ("refiner", {"refiner_checkpoint": "sdxl_refiner"}, "refiner_checkpoint='sdxl_refiner': a refiner model"),
    ("hires sampler", {"enable_hr": True, "sampler_name": "Euler", "hr_sampler_name": "DDIM"},
     "hr_sampler_name='DDIM': the second pass uses the first's sampler ('Euler')"),
    ("hires prompt", {"enable_hr": True, "hr_prompt": "a dog"}, "hr_prompt='a dog': the second pass uses the first"),
    ("pixel upscaler", {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler: hires upscaler 'R-ESRGAN 4x+'"),
    ("script", {"script_name": "x/y/z plot"}, "script_name='x/y/z plot': A1111 scripts are not supported"),
    ("extension", {"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts=['ControlNet']"),
    ("option that changes the picture", {"override_settings": {"sd_vae": "kl-f8.vae.pt"}},
     "override_settings.sd_vae='kl-f8.vae.pt': only A1111's default 'Automatic'"),
    ("unknown option", {"override_settings": {"some_extension_strength": 2}},
     "override_settings.some_extension_strength=2: not an option tiengine applies"),
    ("traversal checkpoint", {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}},
     "override_settings.sd_model_checkpoint='../../etc/passwd': the service has one model"),
    ("bad randn_source", {"override_settings": {"randn_source": "TPU"}}, "expected one of CPU, GPU, NV"),
]


@pytest.mark.parametrize(("fields", "message"), [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS])
def test_refused_with_a_message(client, fields, message):
    response = post(client, fields)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


IMG2IMG_REFUSALS = [
    ("no init image", {}, "init_images=None: img2img needs one base64 image"),
    ("not base64", {"init_images": ["%%%"]}, "init_images[0]='%%%': not a base64-encoded image"),
    ("a path", {"init_images": ["/etc/passwd"]}, "the service never fetches URLs or reads paths"),
    ("a URL", {"init_images": ["https://example.com/a.png"]}, "the service never fetches URLs or reads paths"),
    ("mask", {"init_images": ["AAAA"], "mask": "AAAA"}, "mask='<image>': inpainting (masks) is not supported"),
    ("resize mode", {"init_images": ["AAAA"], "resize_mode": 1}, "resize_mode=1: only 0 (just resize) is done"),
]


@pytest.mark.parametrize(("fields", "message"), [case[1:] for case in IMG2IMG_REFUSALS],
                         ids=[case[0] for case in IMG2IMG_REFUSALS])
def test_img2img_refused_with_a_message(client, fields, message):
    response = post(client, fields, "/sdapi/v1/img2img")
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def test_malformed_json_and_wrong_types_keep_fastapis_shape(client):
    response = client.post("/sdapi/v1/txt2img", content=b'{"prompt": "a cat", ', headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "json_invalid"
    response = post(client, {"steps": "many", "cfg_scale": [7]})
    details = {tuple(item["loc"]): item["msg"] for item in response.json()["detail"]}
    assert response.status_code == 422
    assert details[("body", "steps")].startswith("Input should be a valid integer")
    assert details[("body", "cfg_scale")].startswith("Input should be a valid number")
    assert client.post("/sdapi/v1/options", json=["not", "a", "dict"]).status_code == 422


def test_a_body_over_the_cap_is_413_and_the_service_goes_on(client):
    response = post(client, {"prompt": "x" * 5000})
    assert response.status_code == 413 and "tiengine serve --max-request-mb" in response.json()["detail"]
    response = post(client, {"init_images": [base64.b64encode(b"\0" * 4000).decode()]}, "/sdapi/v1/img2img")
    assert response.status_code == 413
    assert post(client, {}).status_code == 200


def test_auth_is_required_on_every_route(sd1_folder, engine):
    config = ServeConfig(model=sd1_folder, host="0.0.0.0", api_auth="alice:s3cret", limits=LIMITS)
    with TestClient(create_app(config, engine)) as client:
        for auth in (None, ("alice", "wrong"), ("bob", "s3cret")):
            response = client.get("/sdapi/v1/samplers", auth=auth)
            assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")
            assert response.json()["detail"] == "missing or wrong credentials (HTTP basic auth, user:pass)"
        assert client.post("/sdapi/v1/txt2img", json=GOOD).status_code == 401
        assert client.get("/docs").status_code == 401
        assert client.get("/sdapi/v1/samplers", auth=("alice", "s3cret")).status_code == 200
    with pytest.raises(ServeError, match="give --api-auth user:pass"):
        ServeConfig(host="0.0.0.0")


def test_the_command_refuses_a_public_host_without_auth_in_one_line(capsys):
    assert main(["serve", "--host", "0.0.0.0", "--port", "7861"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("tiengine serve: host '0.0.0.0' is reachable from other "
                                                       "machines: give --api-auth user:pass")
    assert main(["serve", "--max-steps", "0"]) == 2
    assert "serve limit max_steps: expected an integer >= 1, found 0" in capsys.readouterr().err


def test_the_command_turns_its_flags_into_the_config():
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--api-auth", "a:b", "--max-request-mb", "0.5",
                                      "--max-pixels", "4096", "--max-batch-size", "3", "--queue-size", "2",
                                      "--device", "cpu"])
    config = serve_config(args)
    assert config.credentials() == {"a": "b"} and config.device == "cpu" and config.port == 7860
    assert config.limits == ServeLimits(max_request_bytes=2**19, max_pixels=4096, max_batch_size=3, queue_size=2)
