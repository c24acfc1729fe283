"""Textual-inversion training as background jobs of `tiengine serve` (/tiengine/v1/train-embedding and
/tiengine/v1/jobs/...) on the built-in default model with toy-world renders: the downloaded embedding equals
training the same settings in-process bit for bit; progress, cancel (running and queued), a failed job, the
queue's 503, result lifetimes (drop, the kept-results cap, shutdown) and bad requests.
"""

from __future__ import annotations

import base64
import io
import tempfile
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors import safe_open

from tiengine.embeddings.embedding import load_embedding, save_embedding
from tiengine.engine import Engine
from tiengine.serve.app import create_app
from tiengine.serve.config import ServeConfig, ServeLimits
from tiengine.toyworld.demo_recipe import INIT_TEXT, TEMPLATE
from tiengine.toyworld.world import concept_examples
from tiengine.training.textual_inversion import TrainEmbeddingSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = "/tiengine/v1/train-embedding"
JOBS = "/tiengine/v1/jobs"
LIMITS = ServeLimits(queue_size=1, max_training_images=4, max_training_steps=5000, max_training_results=2,
                     max_pixels=128 * 128)
FAST = {"vectors": 2, "init_text": INIT_TEXT, "steps": 6, "batch_size": 2, "learning_rate": "0.05", "seed": 7}
POLL_SECONDS = 60  # a job of a few steps takes well under a second on one core


def png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def renders():
    """Three 64x64 toy-world renders of the unnamed concept, as PNG bytes, and captions with [name]."""
    pixels, captions = concept_examples(0, 3, colour_word="[name]")
    return [png(image) for image in pixels], captions


@pytest.fixture(scope="module")
def engine():
    return Engine.load(None, embeddings=False)


@pytest.fixture(scope="module")
def temp_root(tmp_path_factory):
    """The folder the service's private job folders are made in (tempfile's root, for this module)."""
    root = tmp_path_factory.mktemp("service-tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(root))
        yield root


@pytest.fixture(scope="module")
def client(engine, temp_root):
    with TestClient(create_app(ServeConfig(limits=LIMITS), engine)) as test_client:
        yield test_client


def body(renders, **fields) -> dict:
    images, captions = renders
    return {"name": "zorbly", "images": [base64.b64encode(data).decode() for data in images], "captions": captions,
            "template_lines": [TEMPLATE], **FAST, **fields}


def submit(client, request: dict) -> dict:
    answer = client.post(TRAIN, json=request)
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == answer.json()["status_url"]
    return answer.json()


def wait(client, job: dict, until=lambda status: status["state"] not in ("queued", "running")) -> list[dict]:
    """Poll the job's status until `until(status)`; every status seen, in order."""
    seen = []
    deadline = time.monotonic() + POLL_SECONDS
    while time.monotonic() < deadline:
        status = client.get(job["status_url"]).json()
        seen.append(status)
        if until(status):
            return seen
        time.sleep(0.01)
    raise AssertionError(f"job {job['id']} still {seen[-1]['state']} after {POLL_SECONDS} s")


def file_contents(path) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file: its bytes vary, since safetensors writes the metadata map in
    hash order."""
    with safe_open(str(path), "pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key).numpy().tobytes() for key in handle.keys()}  # noqa: SIM118 - a safe_open handle, not a dict


def job_folders(root) -> list:
    return sorted(root.glob("tiengine-train-*"))


def test_downloaded_embedding_equals_training_in_process(client, engine, renders, temp_root, tmp_path):
    job = submit(client, body(renders, load=True))
    assert job["kind"] == "train-embedding" and job["state"] in ("queued", "running") and job["result_url"] is None
    seen = wait(client, job)
    done = seen[-1]
    assert done["state"] == "done", done
    assert done["step"] == done["steps"] == 6 and done["progress"] == 1.0 and done["error"] is None
    steps = [status["step"] for status in seen]
    assert steps == sorted(steps) and {status["state"] for status in seen} <= {"queued", "running", "done"}
    assert all(0 <= status["progress"] <= 1 for status in seen)
    assert done["text"].startswith("loss ")

    download = client.get(done["result_url"])
    assert download.status_code == 200
    assert 'filename="zorbly.safetensors"' in download.headers["content-disposition"]
    served_file = tmp_path / "zorbly.safetensors"  # an embedding is named by its file's stem
    served_file.write_bytes(download.content)
    served = load_embedding(served_file)

    images, captions = renders  # the same inputs as files, trained here with the same settings
    folder = tmp_path / "images"
    folder.mkdir()
    for index, (data, caption) in enumerate(zip(images, captions), start=1):
        (folder / f"{index:03d}.png").write_bytes(data)
        (folder / f"{index:03d}.txt").write_text(caption, encoding="utf-8")
    (tmp_path / "template.txt").write_text(TEMPLATE + "\n", encoding="utf-8")
    reference_engine = Engine.load(None, embeddings=False)
    settings = TrainEmbeddingSettings(**FAST, template=str(tmp_path / "template.txt"), save_every=0)
    reference = reference_engine.train_embedding(folder, "zorbly", settings)
    assert served.name == "zorbly" and served.step == 6
    assert served.vectors.keys() == reference.embedding.vectors.keys()
    for key, vectors in reference.embedding.vectors.items():
        assert served.vectors[key].shape == (2, vectors.shape[1])
        assert served.vectors[key].equal(vectors), key  # CPU fp32, same seed and order: bit-equal
    assert not served.vectors[key].equal(reference.initial_vectors[key])  # training moved them
    reference_file = save_embedding(reference.embedding, tmp_path / "reference" / "zorbly.safetensors")
    assert file_contents(served_file) == file_contents(reference_file)  # the file `--out` writes, bytes aside

    # the job's folder keeps the result only; `load` bound it in the served engine
    (folder_of_job,) = [f for f in job_folders(temp_root) if (f / "embedding.safetensors").exists()]
    assert sorted(p.name for p in folder_of_job.iterdir()) == ["embedding.safetensors"]
    tokens = client.post("/tiengine/v1/tokenize", json={"prompt": "a zorbly"}).json()
    assert tokens["chunks"][0]["embeddings"] == [[2, "zorbly", 2]]

    assert client.delete(job["status_url"]).status_code == 204
    assert not folder_of_job.exists()
    assert client.get(job["status_url"]).status_code == 404
    assert client.get(done["result_url"]).status_code == 404


def test_cancel_a_running_and_a_queued_job_then_serve_the_next(client, renders, temp_root):
    before = set(job_folders(temp_root))
    running = submit(client, body(renders, name="zorblong", steps=5000))
    wait(client, running, until=lambda status: status["state"] == "running" and status["step"] >= 1)
    queued = submit(client, body(renders, name="zorbwait", steps=2))
    queue_full = client.post(TRAIN, json=body(renders, name="zorbthird", steps=2))  # queue_size 1: full
    assert queue_full.status_code == 503 and int(queue_full.headers["retry-after"]) >= 1
    assert len(set(job_folders(temp_root)) - before) == 2  # the refused job left no folder
    assert client.get(running["result_url"] or f"{running['status_url']}/result").status_code == 409

    cancelled = client.post(f"{queued['status_url']}/cancel").json()
    assert cancelled["state"] == "cancelled" and cancelled["cancel_requested"]
    stopping = client.post(f"{running['status_url']}/cancel").json()
    assert stopping["cancel_requested"]
    stopped = wait(client, running)[-1]
    assert stopped["state"] == "cancelled" and 1 <= stopped["step"] < 5000 and stopped["result_url"] is None
    assert client.get(f"{running['status_url']}/result").status_code == 409
    assert client.post(f"{running['status_url']}/cancel").status_code == 409
    assert client.get(queued["status_url"]).json()["step"] == 0  # never ran
    assert set(job_folders(temp_root)) == before  # both folders removed

    after = wait(client, submit(client, body(renders, name="zorbafter", steps=2)))[-1]
    assert after["state"] == "done" and after["step"] == 2, after["error"]


def test_a_failed_job_reports_its_error_and_the_next_runs(client, renders, temp_root):
    before = set(job_folders(temp_root))
    images, _ = renders
    truncated = base64.b64encode(images[1][: len(images[1]) // 2]).decode()  # a PNG header, half the data
    request = body(renders, name="zorbbroken", steps=2)
    request["images"][1] = truncated
    failed = wait(client, submit(client, request))[-1]
    assert failed["state"] == "failed" and failed["result_url"] is None
    assert failed["error"].startswith("TrainingError: images/002.png: not a readable image")
    assert str(temp_root) not in failed["error"]  # no server path reaches the client
    assert set(job_folders(temp_root)) == before
    assert client.get(f"{failed['status_url']}/result").status_code == 409

    named_a_word = wait(client, submit(client, body(renders, name="cat", steps=2)))[-1]
    assert named_a_word["state"] == "failed" and "vocabulary word 'cat'" in named_a_word["error"]
    after = wait(client, submit(client, body(renders, name="zorbfine", steps=2)))[-1]
    assert after["state"] == "done"


def test_kept_results_are_capped_oldest_first(client, renders, temp_root):
    finished = [wait(client, submit(client, body(renders, name=f"zorbkeep{index}", steps=1)))[-1] for index in range(3)]
    assert [status["state"] for status in finished] == ["done"] * 3
    assert client.get(finished[0]["result_url"]).status_code == 404  # max_training_results 2: dropped
    assert all(client.get(status["result_url"]).status_code == 200 for status in finished[1:])
    assert len([f for f in job_folders(temp_root) if (f / "embedding.safetensors").exists()]) <= 2


def test_shutdown_removes_every_job_folder(engine, renders, temp_root):
    before = set(job_folders(temp_root))  # the module's service keeps its own
    with TestClient(create_app(ServeConfig(limits=LIMITS), engine)) as own:
        done = wait(own, submit(own, body(renders, name="zorbleft", steps=1)))[-1]
        assert own.get(done["result_url"]).status_code == 200
        running = submit(own, body(renders, name="zorbrun", steps=5000))
        wait(own, running, until=lambda status: status["step"] >= 1)
        folders = set(job_folders(temp_root)) - before
    assert len(folders) == 2 and not folders & set(job_folders(temp_root))


def refusal(answer) -> str:
    assert answer.status_code == 422, answer.text
    return answer.json()["detail"]


def test_bad_requests_are_clear_4xx(client, renders, temp_root):
    before = set(job_folders(temp_root))

    def refused(**fields) -> str:
        return refusal(client.post(TRAIN, json=body(renders, **fields)))

    assert "images[1]: not base64" in refused(images=[body(renders)["images"][0], "not base64!"], captions=None)
    assert "images[0]: not a readable image" in refused(images=[base64.b64encode(b"hello").decode()],
                                                        captions=None)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    assert "a GIF image" in refused(images=[base64.b64encode(gif.getvalue()).decode()], captions=None)
    wide = io.BytesIO()
    Image.new("RGB", (129, 128)).save(wide, format="PNG")
    assert "max_pixels" in refused(images=[base64.b64encode(wide.getvalue()).decode()], captions=None)
    data_url = "data:image/png;base64," + base64.b64encode(wide.getvalue()).decode()
    assert "max_pixels" in refused(images=[data_url], captions=None)  # a data URL is read as its image
    assert "max_training_images" in refused(images=body(renders)["images"] * 2, captions=None)
    assert "captions: expected one per image (3), found 1" in refused(captions=["x"])
    assert "max_training_steps" in refused(steps=5001)
    assert "max_batch_size" in refused(batch_size=9)
    assert "max_pixels" in refused(resolution=256)
    assert "reads no template files" in refused(template="/etc/passwd", template_lines=None)
    assert "give one of them" in refused(template="style")
    for name in ("../evil", "a/b", "..", " padded", "tab\there"):
        assert "slashes or control characters" in refused(name=name)
    assert "learning" in refused(learning_rate="fast").lower()
    assert "vectors" in refused(vectors=0)

    errors = client.post(TRAIN, json=body(renders, save_every=10, steps="6")).json()["detail"]
    assert {(error["loc"][-1], error["type"]) for error in errors} == {("save_every", "extra_forbidden"),
                                                                       ("steps", "int_type")}
    assert client.post(TRAIN, json={"name": "x", "images": []}).status_code == 422
    assert set(job_folders(temp_root)) == before  # nothing was written for a refused request

    for job_id in ("0" * 32, "nothere", "..%2F..%2Fetc%2Fpasswd", "%2E%2E"):
        assert client.get(f"{JOBS}/{job_id}").status_code == 404
        assert client.get(f"{JOBS}/{job_id}/result").status_code == 404
        assert client.post(f"{JOBS}/{job_id}/cancel").status_code == 404
    assert client.get(f"{JOBS}/../../etc/passwd").status_code == 404
