"""Generation time beside a busy neighbour: `tiengine generate` and `tiengine demo`, idle and contended.

Each workload runs as its own `tiengine` process (start-up, model load and all, as a user runs it), once
on the otherwise idle machine and once while a neighbour process does large torch matmuls on every core
(torch's default thread count: what any other PyTorch program does); idle and contended runs alternate,
so slow drift in the machine's load hits both. Printed per workload and thread setting: the median wall
seconds idle, contended, and their ratio (the target is at most 2.5x).

Workloads: a 20-step generation on the built-in model (64x64, Euler a) and the demo (`tiengine demo`,
training shortened with --demo-steps; its JSON report gives training seconds and the per-image time of the
generation stages). Thread settings: "default" (the command line's own choice: tiengine.threads) and
"--threads 2" (torch's default on this machine before that policy; skip with --variants default).

    python benchmarks/contention.py [--repeats 3] [--variants default threads2] [--workloads generate demo]
                                    [--demo-steps 200] [--wait-idle 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(REPO / "benchmarks"))
from unet import cpu_name  # benchmarks/unet.py

from tiengine.io.atomic import atomic_write_bytes

# the neighbour: 2048^3 fp32 matmuls on torch's default threads (all cores) until killed
NEIGHBOUR_CODE = """
import sys, torch
a = torch.randn(2048, 2048)
b = torch.randn(2048, 2048)
torch.mm(a, b)
print("ready", flush=True)
while True:
    torch.mm(a, b)
"""
VARIANTS = {"default": [], "threads1": ["--threads", "1"], "threads2": ["--threads", "2"]}


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_until_idle(threshold: float, patience_s: float) -> float:
    """Sleep in 30 s steps until the 1-minute load average is below threshold (at most patience_s)."""
    deadline = time.monotonic() + patience_s
    load = load_average()
    while load >= threshold and time.monotonic() < deadline:
        print(f"# load {load:.2f} >= {threshold}: waiting", file=sys.stderr, flush=True)
        time.sleep(30)
        load = load_average()
    return load


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def clean_environment() -> dict[str, str]:
    """This process's environment without the OpenMP / MKL thread variables (each process makes its own
    choice: the neighbour runs as any PyTorch program does by default)."""
    return {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}


@contextmanager
def neighbour() -> Iterator[None]:
    """A process doing matmuls on every core while the `with` block runs (started and ready on entry)."""
    process = subprocess.Popen([sys.executable, "-c", NEIGHBOUR_CODE], stdout=subprocess.PIPE, text=True,
                               env=clean_environment())
    try:
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("the neighbour process did not start")
        yield
    finally:
        process.kill()
        process.wait()


def tiengine_command(workload: str, variant: str, folder: Path, demo_steps: int) -> list[str]:
    base = [sys.executable, "-m", "tiengine"]
    if workload == "generate":
        return [*base, "generate", "a red cube on a wooden table", "--steps", "20", "--seed", "1",
                "--out", str(folder / "generate.png"), "--overwrite", "--json", *VARIANTS[variant]]
    return [*base, "demo", "--out", str(folder / "demo"), "--steps", str(demo_steps), "--overwrite", "--json",
            *VARIANTS[variant]]


def timed_run(command: list[str]) -> tuple[float, dict]:
    """Wall seconds of the process and its JSON report (the last stdout line)."""
    start = time.perf_counter()
    finished = subprocess.run(command, check=False, capture_output=True, text=True, env=clean_environment())
    seconds = time.perf_counter() - start
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{finished.stderr[-2000:]}")
    return seconds, json.loads(finished.stdout.strip().splitlines()[-1])


def demo_figures(report: dict) -> dict[str, float]:
    """Training seconds and seconds per generated image from the demo's JSON report."""
    images = 3 * report["images_per_arm"] + (2 * report["images_per_arm"] if report.get("lora") else 0)
    return {"train_s": report["train_seconds"],
            "per_image_s": (report["total_seconds"] - report["train_seconds"]) / images}


def measure(workload: str, variant: str, args: argparse.Namespace, folder: Path) -> dict[str, object]:
    """Alternate idle and contended runs (the first of each pair alternates too); medians and the ratio."""
    command = tiengine_command(workload, variant, folder, args.demo_steps)
    runs: dict[str, list[float]] = {"idle": [], "contended": []}
    details: dict[str, list[dict]] = {"idle": [], "contended": []}
    loads = []
    for repeat in range(args.repeats):
        order = ["idle", "contended"] if repeat % 2 == 0 else ["contended", "idle"]
        for condition in order:
            loads.append(load_average())
            if condition == "idle":
                seconds, report = timed_run(command)
            else:
                with neighbour():
                    seconds, report = timed_run(command)
            runs[condition].append(seconds)
            if workload == "demo":
                details[condition].append(demo_figures(report))
            print(f"# {workload} {variant} {condition}: {seconds:.2f} s", file=sys.stderr, flush=True)
    row: dict[str, object] = {
        "workload": workload, "variant": variant,
        "idle_s": statistics.median(runs["idle"]), "contended_s": statistics.median(runs["contended"]),
        "runs": runs, "load_at_starts": loads,
    }
    row["ratio"] = row["contended_s"] / row["idle_s"]
    if workload == "demo":
        for key in ("train_s", "per_image_s"):
            row[f"idle_{key}"] = statistics.median(d[key] for d in details["idle"])
            row[f"contended_{key}"] = statistics.median(d[key] for d in details["contended"])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=("generate", "demo"), default=["generate", "demo"])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["default", "threads2"])
    parser.add_argument("--repeats", type=int, default=3, help="idle and contended runs each (median reported)")
    parser.add_argument("--demo-steps", type=int, default=200, help="the demo's training steps (its default: 1200)")
    parser.add_argument("--wait-idle", type=float, default=0.5, help="wait for a 1-minute load below this first")
    parser.add_argument("--json", type=Path, help="also write header and rows here")
    args = parser.parse_args()

    start_load = wait_until_idle(args.wait_idle, patience_s=15 * 60)
    header = {
        "device": f"cpu: {cpu_name()}, {os.cpu_count()} logical CPUs",
        "torch": __import__("torch").__version__, "python": platform.python_version(),
        "neighbour": "one process, 2048^3 fp32 torch.mm in a loop on torch's default threads",
        "load_before": f"{start_load:.2f} (1-minute average)",
    }
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        for workload in args.workloads:
            for variant in args.variants:
                rows.append(measure(workload, variant, args, Path(temporary)))
    header["load_after"] = f"{load_average():.2f}"
    for key, value in header.items():
        print(f"# {key}: {value}")
    print("workload | threads | idle s | contended s | contended / idle")
    for row in rows:
        extra = ""
        if row["workload"] == "demo":
            extra = (f" (per image {row['idle_per_image_s']:.3f} -> {row['contended_per_image_s']:.3f} s, "
                     f"training {row['idle_train_s']:.1f} -> {row['contended_train_s']:.1f} s)")
        print(f"{row['workload']} | {row['variant']} | {row['idle_s']:.2f} | {row['contended_s']:.2f} | "
              f"{row['ratio']:.2f}x{extra}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps({"header": header, "rows": rows}, indent=2).encode(), overwrite=True)


if __name__ == "__main__":
    main()
