"""`tiengine batch --ray` on a local Ray instance (2 CPUs) started here: the same rows give the same bytes as
the local executor, with one actor and with two (encode shards, generate PNGs, train embedding files, failed
rows), and the command line drives it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from tiengine.batch import run
from tiengine.batch.manifest import TIMING_FIELDS
from tiengine.cli import main


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


def write_jobs(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{broken\n")
    return path


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != "manifest.jsonl"}


def records(folder: Path) -> list[dict]:
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if key not in TIMING_FIELDS} for line in lines]


def test_ray_and_local_give_the_same_bytes(local_ray, tmp_path):
    images = tmp_path / "shapes"
    images.mkdir()
    rng = np.random.default_rng(1)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{index}.png")
    kinds = {
        "encode": [{"id": f"e{index}", "prompt": f"a red circle {index} AND a [blue:green:3] square",
                    "negative": "blurry" if index % 2 else "", "settings": {"steps": 6}} for index in range(7)]
        + [{"id": "bad", "prompt": "x", "settings": {"clip_skip": "two"}}],
        "generate": [{"id": f"g{index}", "prompt": f"a red circle {index}", "seed": index, "settings": {"steps": 3}}
                     for index in range(4)],
        "train": [{"id": "t", "images": "shapes", "name": "shapey", "settings": {"steps": 2, "init_text": "a", "template": "object",
                                                             "save_every": 0}}],
    }
    for kind, rows in kinds.items():
        jobs = write_jobs(tmp_path / f"{kind}.jsonl", rows)
        # one torch thread, as each actor has (--cpus-per-actor 1): the thread count can change CPU results
        local = run(jobs, tmp_path / kind / "local", kind=kind, shard_rows=3, batch_size=2, threads=1)
        for actors in (1, 2):
            on_ray = run(jobs, tmp_path / kind / f"ray{actors}", kind=kind, executor="ray", actors=actors,
                         shard_rows=3, batch_size=2)
            assert (on_ray.ran, on_ray.failed) == (local.ran, local.failed)
            assert outputs(tmp_path / kind / f"ray{actors}") == outputs(tmp_path / kind / "local"), (kind, actors)
            assert records(tmp_path / kind / f"ray{actors}") == records(tmp_path / kind / "local")
        assert local.failed == (2 if kind == "encode" else 1) and local.ran == len(rows) - (kind == "encode")


def test_the_command_line_runs_on_ray_and_resumes(local_ray, tmp_path, capsys):
    rows = [{"id": f"r{index}", "prompt": f"a yellow star {index}"} for index in range(5)]
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    command = ["batch", "encode", str(jobs), "--out", str(tmp_path / "out"), "--ray", "--actors", "2", "--json",
               "--shard-rows", "2"]
    assert main(command) == 1  # the broken last line
    assert json.loads(capsys.readouterr().out) | {"manifest": None, "warnings": []} == \
        {"ran": 5, "kept": 0, "failed": 1, "manifest": None, "warnings": []}
    (tmp_path / "out" / "encode-00001.safetensors").unlink()
    assert main(command) == 1
    assert json.loads(capsys.readouterr().out)["ran"] == 2
    local = run(jobs, tmp_path / "local", shard_rows=2, threads=1)
    assert outputs(tmp_path / "out") == outputs(tmp_path / "local") and local.failed == 1
