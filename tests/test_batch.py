"""`tiengine batch` on the built-in model, local executor: outputs equal the single commands' bytes, rows are
independent of batching, bad rows are recorded without losing others, re-runs keep verified outputs only, and
kill -9 mid-run then a re-run gives the manifest and files of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load

from tiengine.batch import run
from tiengine.batch.manifest import TIMING_FIELDS
from tiengine.batch.outputs import SHARD_METADATA_KEY, safe_stem
from tiengine.cli import main
from tiengine.engine import Engine
from tiengine.io.metadata import png_bytes, read_image_parameters
from tiengine.reports import (
    conditioning_file,
    conditioning_metadata,
    conditioning_tensors,
)
from tiengine.text.conditioning import EncodeOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENCODE_ROWS = [
    {"id": "plain", "prompt": "a red circle", "negative": "blurry"},
    {"id": "weights/and", "prompt": "(a red:1.3) circle AND a blue square:0.5", "negative": "blurry"},
    {"id": "schedule", "prompt": "a [red:blue:5] circle", "settings": {"steps": 10, "clip_skip": 2}},
    {"id": "same as plain", "prompt": "a red circle", "negative": "blurry"},
    {"id": "long", "prompt": ", ".join(["a small red circle on a green field"] * 12), "negative": "blurry"},
    {"id": "../escape", "prompt": "a blue square BREAK a yellow star", "settings": {"sampler": "Heun"}},
]


def write_jobs(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "".join(line + "\n" for line in extra_lines))
    return path


@pytest.fixture(scope="module")
def engine():
    return Engine.load(embeddings=False)


def comparable(records: list[dict]) -> list[dict]:
    return sorted(({key: value for key, value in record.items() if key not in TIMING_FIELDS} for record in records),
                  key=lambda record: record["line"])


def test_encode_shards_hold_what_tiengine_encode_writes(tmp_path, engine):
    manifest = run(write_jobs(tmp_path / "jobs.jsonl", ENCODE_ROWS), tmp_path / "out", shard_rows=4)
    assert manifest.ok and manifest.ran == len(ENCODE_ROWS) and manifest.kept == 0
    assert [record["output"] for record in manifest.records] == ["encode-00000.safetensors"] * 4 + \
        ["encode-00001.safetensors"] * 2
    for row, record in zip(ENCODE_ROWS, manifest.records):
        settings = row.get("settings", {})
        steps, second_order = settings.get("steps", 20), settings.get("sampler") == "Heun"
        options = EncodeOptions(clip_skip=settings.get("clip_skip", 1))
        conditioning = engine.encode(row["prompt"], row.get("negative", ""), steps=steps, second_order=second_order,
                                     options=options)
        metadata = conditioning_metadata(engine, conditioning, row["prompt"], row.get("negative", ""), steps=steps,
                                         second_order=second_order, options=options)
        single = load(conditioning_file(conditioning_tensors(conditioning), metadata))  # `tiengine encode --out`
        shard = tmp_path / "out" / record["output"]
        with safe_open(shard, "pt") as opened:
            reports = json.loads(opened.metadata()[SHARD_METADATA_KEY])
            names = opened.keys()
            mine = {name[len(row["id"]) + 1:]: opened.get_tensor(name) for name in names
                    if name.startswith(row["id"] + "/")}
        assert set(mine) == set(single) and record["tensors"] == sorted(f"{row['id']}/{n}" for n in single)
        for name, tensor in single.items():
            assert torch.equal(mine[name], tensor), (row["id"], name)
        assert reports[row["id"]] == record["report"] == json.loads(json.dumps(metadata))


def test_rows_do_not_depend_on_batch_size_or_neighbours(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", ENCODE_ROWS)
    alone = run(jobs, tmp_path / "one", batch_size=1, shard_rows=1)
    together = run(jobs, tmp_path / "all", batch_size=6, shard_rows=1)
    for record in alone.records:
        assert (tmp_path / "one" / record["output"]).read_bytes() == (tmp_path / "all" / record["output"]).read_bytes()
    assert comparable(alone.records) == comparable(together.records)


def test_bad_rows_are_recorded_and_the_others_run(tmp_path, capsys):
    rows = [ENCODE_ROWS[0], {"id": "plain", "prompt": "a second row with the same id"}, {"id": "no prompt"},
            {"id": "bad setting", "prompt": "x", "settings": {"emphasis": "loud"}},
            {"id": "unknown field", "prompt": "x", "seed": 3}, {"id": 7, "prompt": "x"}, ENCODE_ROWS[2]]
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows, extra_lines=('{"id": "cut", "prompt": "x"', "[1, 2]"))
    status = main(["batch", "encode", str(jobs), "--out", str(tmp_path / "out"), "--json"])
    assert status == 1
    assert json.loads(capsys.readouterr().out)["failed"] == 7
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [record["status"] for record in records] == ["done"] + ["failed"] * 5 + ["done", "failed", "failed"]
    errors = [record["error"] for record in records]
    assert errors[1] == f"{jobs}:2: duplicate id 'plain' (first on line 1); ids must be unique"
    assert errors[2] == f"{jobs}:3: field 'prompt' must be a string, got None"
    assert errors[3].startswith(f"{jobs}:4: emphasis must be one of") and "'loud'" in errors[3]
    assert errors[4].startswith(f"{jobs}:5: unknown field(s) 'seed' for encode rows")
    assert errors[5] == f"{jobs}:6: field 'id' must be a non-empty string, got 7"
    assert errors[7].startswith(f"{jobs}:8: malformed JSON")
    assert errors[8] == f"{jobs}:9: a row must be a JSON object, got list"
    assert [record["id"] for record in records][:2] == ["plain", "plain"] and records[7]["id"] is None


def test_rerun_keeps_verified_outputs_and_redoes_the_rest(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", ENCODE_ROWS)
    first = run(jobs, tmp_path / "out", shard_rows=2)
    again = run(jobs, tmp_path / "out", shard_rows=2)
    assert (again.ran, again.kept) == (0, 6) and comparable(again.records) == comparable(first.records)
    shard = tmp_path / "out" / "encode-00001.safetensors"
    original = shard.read_bytes()
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one flipped bit: the hash no longer matches
    (tmp_path / "out" / "encode-00002.safetensors").unlink()
    redone = run(jobs, tmp_path / "out", shard_rows=2)
    assert (redone.ran, redone.kept) == (4, 2) and shard.read_bytes() == original
    assert comparable(redone.records) == comparable(first.records)
    changed = write_jobs(tmp_path / "jobs.jsonl", [*ENCODE_ROWS[:5], {**ENCODE_ROWS[5], "negative": "ugly"}])
    assert run(changed, tmp_path / "out", shard_rows=2).ran == 2  # a changed row: its shard again


def test_generate_rows_are_the_pngs_of_tiengine_generate(tmp_path, engine):
    rows = [{"id": "cat/../../x", "prompt": "a red circle", "seed": 5, "settings": {"steps": 3}},
            {"id": "derived seed", "prompt": "a blue square", "negative": "blurry",
             "settings": {"steps": 3, "sampler": "DPM++ 2M", "cfg_scale": 2.5}},
            {"id": "bad", "prompt": "x", "settings": {"batch_size": 2}}]
    manifest = run(write_jobs(tmp_path / "jobs.jsonl", rows), tmp_path / "out", kind="generate")
    assert [record["status"] for record in manifest.records] == ["done", "done", "failed"]
    assert "'batch_size' is not a row setting" in manifest.records[2]["error"]
    assert manifest.records[0]["output"] == f"images/cat_.._.._x-{safe_stem('cat/../../x')[-8:]}.png"
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == sorted(
        Path(record["output"]).name for record in manifest.records[:2])
    status = main(["generate", "a red circle", "--seed", "5", "--steps", "3", "--out", str(tmp_path / "cli.png"),
                   "--json"])
    assert status == 0
    assert (tmp_path / "out" / manifest.records[0]["output"]).read_bytes() == (tmp_path / "cli.png").read_bytes()
    derived = manifest.records[1]["report"]["seed"]
    expected = engine.generate("a blue square", "blurry", seed=derived, steps=3, sampler="DPM++ 2M", cfg_scale=2.5)
    image_path = tmp_path / "out" / manifest.records[1]["output"]
    assert image_path.read_bytes() == png_bytes(expected.images[0], expected.parameters[0])
    assert f"Seed: {derived}" in read_image_parameters(image_path)


def test_train_rows_and_a_missing_images_folder(tmp_path, engine):
    folder = tmp_path / "sets" / "shapes"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    settings = {"steps": 2, "vectors": 1, "init_text": "a shape", "template": "object", "save_every": 0}
    rows = [{"id": "shapes", "images": "sets/shapes", "name": "shapey", "settings": settings},
            {"id": "gone", "images": "sets/missing", "settings": settings}]
    manifest = run(write_jobs(tmp_path / "jobs.jsonl", rows), tmp_path / "out", kind="train")
    assert [record["status"] for record in manifest.records] == ["done", "failed"]
    assert manifest.records[1]["error"] == (f"{tmp_path / 'jobs.jsonl'}:2: field 'images': "
                                            f"{tmp_path / 'sets' / 'missing'} must be a folder of training images, "
                                            f"found nothing")
    single = engine.train_embedding(folder, "shapey", out=tmp_path / "single.safetensors", **settings)
    batch_file, single_file = tmp_path / "out" / manifest.records[0]["output"], single.outputs[0]
    with safe_open(batch_file, "pt") as mine, safe_open(single_file, "pt") as theirs:
        assert mine.metadata() == theirs.metadata() and mine.keys() == theirs.keys() == ["emb_params"]
        assert torch.equal(mine.get_tensor("emb_params"), theirs.get_tensor("emb_params"))
    header = json.loads(batch_file.read_bytes()[8 : 8 + int.from_bytes(batch_file.read_bytes()[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])  # the same bytes in every run
    assert manifest.records[0]["report"]["steps"] == 2


def test_parquet_jobs_and_manifest(tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = ENCODE_ROWS[:3]
    table = pyarrow.table({"id": [r["id"] for r in rows], "prompt": [r["prompt"] for r in rows],
                           "negative": [r.get("negative") for r in rows],
                           "settings": [json.dumps(r.get("settings", {})) for r in rows]})
    pyarrow.parquet.write_table(table, tmp_path / "jobs.parquet")
    from_parquet = run(tmp_path / "jobs.parquet", tmp_path / "pq", manifest_format="parquet")
    from_jsonl = run(write_jobs(tmp_path / "jobs.jsonl", rows), tmp_path / "js")
    assert from_parquet.path == tmp_path / "pq" / "manifest.parquet"
    assert (tmp_path / "pq" / "encode-00000.safetensors").read_bytes() == \
        (tmp_path / "js" / "encode-00000.safetensors").read_bytes()
    written = pyarrow.parquet.read_table(from_parquet.path).to_pylist()
    assert [(r["id"], r["status"], r["sha256"], json.loads(r["report"])) for r in written] == \
        [(r["id"], r["status"], r["sha256"], r["report"]) for r in from_jsonl.records]


def slow_rows(count: int) -> list[dict]:
    """Encode rows of about 0.2 s each on one thread: a 100-step alternation gives 100 schedule entries."""
    prompt = "a [cat|dog|fox] in a [red|blue] room, (detailed:1.2), [sunny:rainy:0.5] " * 3
    return [{"id": f"row {index}", "prompt": f"{index} {prompt}", "settings": {"steps": 100}} for index in range(count)]


@pytest.mark.parametrize("kind", ["encode", "generate"])
def test_kill_minus_9_then_rerun_equals_an_uninterrupted_run(tmp_path, kind):
    rows = slow_rows(12) if kind == "encode" else [
        {"id": f"image {index}", "prompt": f"a red circle {index}", "seed": index, "settings": {"steps": 40}}
        for index in range(12)]
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    command = [sys.executable, "-m", "tiengine", "batch", kind, str(jobs), "--shard-rows", "2", "--batch-size", "3",
               "--threads", "1", "--json"]
    killed_out, whole_out = tmp_path / "killed", tmp_path / "whole"
    child = subprocess.Popen([*command, "--out", str(killed_out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = killed_out / "manifest.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read().decode()}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    records_before = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
    assert 2 <= len(records_before) < 12
    for record in records_before:  # every record names a complete final file
        assert hashlib.sha256((killed_out / record["output"]).read_bytes()).hexdigest() == record["sha256"]
    resumed = subprocess.run([*command, "--out", str(killed_out)], capture_output=True, text=True, check=False)
    whole = subprocess.run([*command, "--out", str(whole_out)], capture_output=True, text=True, check=False)
    assert resumed.returncode == whole.returncode == 0, resumed.stderr + whole.stderr
    summary = json.loads(resumed.stdout)
    assert summary["kept"] >= 2 and summary["ran"] + summary["kept"] == 12 and summary["warnings"]  # stale lock

    def files(folder: Path) -> dict[str, bytes]:
        return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*")
                if path.is_file() and path.name != "manifest.jsonl"}

    assert files(killed_out) == files(whole_out)
    manifests = [[json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
                 for folder in (killed_out, whole_out)]
    assert comparable(manifests[0]) == comparable(manifests[1])


def test_importing_tiengine_or_the_batch_package_leaves_ray_out():
    code = ("import sys, tiengine, tiengine.batch, tiengine.cli.batch; "
            "print(sorted(name for name in sys.modules if name.split('.')[0] in ('ray', 'pyarrow')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    code = "import sys, tiengine; tiengine.Engine; print('tiengine.batch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
