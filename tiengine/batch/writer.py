"""The driver's side of a bulk run: what is left to do, and writing results as they come in.

`plan(job_list, folder, shard_rows, journal)` splits the Jobs into those already done (a journal record
whose output file exists with the recorded sha256) and those to run. For encode the unit is the shard: a
shard with any row not verified is computed again whole, so its bytes are those an uninterrupted run
writes. `RunWriter.accept(result)` takes results in any order (Ray returns them as they finish): a
generate or train row's file is written at once; encode rows wait until their shard is complete. Each
output is written atomically (tiengine.batch.outputs) and only then its records are appended to the
journal (tiengine.batch.manifest), so a kill at any moment leaves only final files and records that name
them.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tiengine.batch.jobs import Job, JobList, RowFailure
from tiengine.batch.manifest import ManifestJournal
from tiengine.batch.outputs import (
    file_sha256,
    row_output_name,
    shard_bytes,
    shard_name,
    write_output,
)
from tiengine.batch.worker import RowResult, WorkerSpec


@dataclass
class Plan:
    """Jobs to run (file order), the records of those already done, and encode's shard of each position."""

    pending: list[Job]
    verified: dict[str, dict]
    shard_rows: int
    shard_members: dict[int, list[Job]] = field(default_factory=dict)  # encode: shard -> its jobs to run


def shard_of(job: Job, shard_rows: int) -> int:
    return job.position // shard_rows


def plan(job_list: JobList, folder: Path, shard_rows: int, journal: dict[str, dict], spec: WorkerSpec) -> Plan:
    hashes: dict[str, str | None] = {}  # output -> sha256 now, each file hashed once

    def verified(job: Job) -> bool:
        record = journal.get(job.id)
        if record is None or record.get("job_sha256") != job_fingerprint(job, spec):
            return False
        output = record.get("output")
        if not isinstance(output, str) or output != expected_output(job, shard_rows):
            return False
        if output not in hashes:
            hashes[output] = file_sha256(folder / output)
        return hashes[output] is not None and hashes[output] == record.get("sha256")

    jobs = job_list.jobs
    if job_list.kind != "encode":
        pending = [job for job in jobs if not verified(job)]
        return Plan(pending, {job.id: journal[job.id] for job in jobs if verified(job)}, shard_rows)
    by_shard: dict[int, list[Job]] = defaultdict(list)
    for job in jobs:
        by_shard[shard_of(job, shard_rows)].append(job)
    members = {index: members for index, members in by_shard.items() if not all(map(verified, members))}
    pending = [job for job in jobs if shard_of(job, shard_rows) in members]
    done = {job.id: journal[job.id] for job in jobs if shard_of(job, shard_rows) not in members}
    return Plan(pending, done, shard_rows, members)


def job_fingerprint(job: Job, spec: WorkerSpec) -> str:
    """sha256 of what a row's output depends on: its kind and fields, and the engine (not the thread count)."""
    engine = {name: value for name, value in json.loads(spec.to_json()).items() if name != "threads"}
    text = json.dumps([job.kind, job.fields, engine], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def expected_output(job: Job, shard_rows: int) -> str:
    if job.kind == "encode":
        return shard_name(shard_of(job, shard_rows))
    return row_output_name(job.kind, job.id)


class RunWriter:
    """Writes each result's output and journal record; encode rows are held until their shard is complete."""

    def __init__(self, folder: Path, plan: Plan, journal: ManifestJournal, spec: WorkerSpec) -> None:
        self.folder = folder
        self.spec = spec
        self.plan = plan
        self.journal = journal
        self.jobs = {job.id: job for job in plan.pending}
        self.waiting: dict[int, dict[str, RowResult]] = defaultdict(dict)  # encode: shard -> results so far
        self.records: dict[str, dict] = dict(plan.verified)

    def accept(self, result: RowResult) -> None:
        job = self.jobs[result.id]
        if job.kind != "encode":
            record = self._record(job, result, self.spec)
            if result.status == "done":
                output = row_output_name(job.kind, job.id)
                record.update(output=output, sha256=write_output(self.folder / output, result.payload))
            self._keep([record])
            return
        index = shard_of(job, self.plan.shard_rows)
        self.waiting[index][job.id] = result
        members = self.plan.shard_members[index]
        if len(self.waiting[index]) == len(members):
            self._write_shard(index, members, self.waiting.pop(index))

    def _write_shard(self, index: int, members: list[Job], results: dict[str, RowResult]) -> None:
        done = {job.id: results[job.id] for job in members if results[job.id].status == "done"}  # file order
        records = [self._record(job, results[job.id], self.spec) for job in members]
        if done:
            output = shard_name(index)
            digest = write_output(self.folder / output,
                                  shard_bytes({row_id: (r.payload, r.report) for row_id, r in done.items()}))
            for record in records:
                if record["status"] == "done":
                    names = sorted(f"{record['id']}/{name}" for name in _tensor_names(done[record["id"]].payload))
                    record.update(output=output, sha256=digest, tensors=names)
        self._keep(records)

    def _keep(self, records: list[dict]) -> None:
        self.journal.append(records)
        for record in records:
            self.records[record["id"]] = record

    @staticmethod
    def _record(job: Job, result: RowResult, spec: WorkerSpec) -> dict:
        return {"id": job.id, "line": job.line, "status": result.status, "output": None, "sha256": None,
                "tensors": None, "job_sha256": job_fingerprint(job, spec), "report": result.report, "error": result.error, "seconds": round(result.seconds, 6)}


def failure_record(failure: RowFailure) -> dict:
    return {"id": failure.id, "line": failure.line, "status": "failed", "output": None, "sha256": None,
            "tensors": None, "job_sha256": None, "report": None, "error": failure.error, "seconds": 0.0}


def _tensor_names(payload: bytes) -> list[str]:
    """Tensor names from a safetensors header (8-byte little-endian length, then JSON)."""
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    return [name for name in header if name != "__metadata__"]
