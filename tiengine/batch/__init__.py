"""Bulk jobs: encode, generate or train many rows from a JOBS file, locally or on Ray (`tiengine batch`).

`run(jobs, out, kind=..., executor="local"|"ray", ...)` (tiengine.batch.api) returns the manifest. The
parts, in data-flow order: jobs (read and check rows), worker (the one row function both executors call),
outputs (file names, shards, atomic writes, hashes), manifest (the journal), writer (what is left to do;
results to files and records), local and ray_executor (the executors), api (the run). Importing this
package does not import ray: only a Ray run does. `import tiengine` does not import this package.
"""

from __future__ import annotations

from tiengine.batch.api import BatchManifest, run

__all__ = ["BatchManifest", "run"]
