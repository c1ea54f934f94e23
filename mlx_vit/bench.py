"""`mlx-vit bench`: the same random input through mlx-vit and, where installed, PyTorch and ONNX Runtime.

Each runtime runs in its own worker process (so PyTorch's threads, ONNX Runtime's and MLX's BLAS never compete
inside one process, and each process's peak memory is its own), and the parent interleaves their runs: for each
batch size, warm-up runs first (not counted), then one run of each runtime in turn, `runs` times. A run is one
forward pass from a host (numpy) batch to host logits. Batch sizes go in ascending order, so a worker's peak
resident memory after a batch size is that batch size's peak.

`random:NAME` models (see mlx_vit.presets) need no download. With PyTorch installed their weights come from a seeded
transformers model that every runtime loads, so the report also gives each runtime's largest logit difference
from mlx-vit; without it mlx-vit uses MLX's own random initialization.

The workers are mlx_vit/bench_worker.py: one Runner class per runtime on a shared base. Nothing imports torch,
transformers, timm or onnxruntime except the worker of that runtime (the reference model it loads is
bench_reference's).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_vit.errors import MlxVitError, line, shown
from mlx_vit.numbers import NumberError, parse_int
from mlx_vit.presets import is_random, preset

RUNTIMES = ("mlx-vit", "torch", "onnxruntime")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_BENCH_MODEL = "random:vit-base-patch16-224"
PAUSE_S = 0.3  # between two runtimes' runs; OpenBLAS's idle threads spin for ~0.1 s
MAX_BATCH_SIZES = 64  # --batch-sizes: more than any table shows


@dataclass
class Measurement:
    runtime: str
    batch_size: int
    images_per_s: float  # batch_size / median latency
    latency_ms_p50: float
    latency_ms_p95: float
    peak_memory_mb: float  # the worker process's peak resident memory up to this batch size
    runs: int


@dataclass
class BenchReport:
    model: str
    dtype: str
    machine: dict[str, Any]
    runtimes: dict[str, dict[str, Any]]  # name -> version, device, BLAS/threads, load seconds
    results: list[Measurement] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # runtime -> why it did not run
    max_abs_logit_diff: dict[str, float | None] = field(default_factory=dict)  # vs mlx-vit; None: other weights

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_batch_sizes(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; raises ValueError on anything else."""
    parts = [part for part in text.split(",") if part.strip()]
    try:
        sizes = [parse_int(part, "", 1) for part in parts] if len(parts) <= MAX_BATCH_SIZES else []
    except NumberError:
        sizes = []
    if not sizes:
        raise ValueError(f"{shown(text, 60, quote=True)}: give positive integers separated by commas, like 1,8,32")
    return sorted(set(sizes))


def _installed(runtime: str) -> str | None:
    """None if `runtime` can run here, else why not."""
    needs = {"mlx-vit": [], "torch": ["torch", "transformers"]}.get(runtime, ["onnxruntime", "onnx", "torch",
                                                                            "transformers"])  # fmt: skip
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (pip install {' '.join(missing)})"
    return None


def run_bench(model: str = DEFAULT_BENCH_MODEL, batch_sizes: Sequence[int] = (1, 8, 32), dtype: str = "float32",
              compare: Sequence[str] | None = None, runs: int = 5, warmup: int = 1) -> BenchReport:  # fmt: skip
    """Benchmark mlx-vit against the runtimes in `compare` (None: every one that is installed).

    A runtime named in `compare` that is not installed is an error; with `compare=None` it is skipped and the
    report says why. Raises MlxVitError for a model that can't be loaded (e.g. a Hub id that isn't cached
    offline), with the message mlx-vit's loader gives.
    """
    if dtype not in DTYPES:
        raise MlxVitError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if runs < 1 or warmup < 0:
        raise MlxVitError("runs must be at least 1 and warmup at least 0")
    batch_sizes = sorted(set(batch_sizes))
    skipped: dict[str, str] = {}
    others = []
    for name in compare if compare is not None else RUNTIMES[1:]:
        if name not in RUNTIMES[1:]:
            raise MlxVitError(f"--compare: unknown runtime {name!r} (choose from {', '.join(RUNTIMES[1:])})")
        reason = _installed(name)
        if name == "onnxruntime" and reason is None and dtype != "float32":
            reason = "float32 only here"
        if reason is None:
            others.append(name)
        elif compare is not None and name in compare:
            raise MlxVitError(f"--compare {name}: {reason}")
        else:
            skipped[name] = reason

    report = BenchReport(model, dtype, _machine(), {}, skipped=skipped)
    with tempfile.TemporaryDirectory(prefix="mlx-vit-bench-") as scratch:
        spec = _resolve(model, scratch, torch_available=_installed("torch") is None)
        workers: dict[str, _Worker] = {}
        try:
            # mlx-vit first, so that a model that cannot be loaded fails before anything slow starts.
            for name in ["mlx-vit", *others]:
                workers[name] = _Worker(name, {**spec, "dtype": dtype, "scratch": scratch})
                report.runtimes[name] = workers[name].info
                if name == "mlx-vit":  # every runtime at the size mlx-vit runs it at (a DINOv2's 224 crop)
                    spec.update(image_size=workers[name].info["image_size"], channels=workers[name].info["channels"])
            reference = np.array(workers["mlx-vit"].call({"op": "check"})["logits"])
            for name in others:
                logits = np.array(workers[name].call({"op": "check"})["logits"])
                same = spec["same_weights"] or workers[name].info.get("same_weights", False)
                report.max_abs_logit_diff[name] = float(np.abs(logits - reference).max()) if same else None
            for batch in batch_sizes:
                for _ in range(warmup):
                    for worker in workers.values():
                        worker.call({"op": "run", "batch": batch})
                seconds: dict[str, list[float]] = {name: [] for name in workers}
                for _ in range(runs):
                    for name, worker in workers.items():
                        # BLAS and OpenMP worker threads spin for a while after a call before they sleep; let
                        # the previous runtime's go quiet so that they don't slow this one.
                        time.sleep(PAUSE_S if len(workers) > 1 else 0)
                        seconds[name].append(worker.call({"op": "run", "batch": batch})["seconds"])
                for name, worker in workers.items():
                    latency = np.array(seconds[name]) * 1000
                    p50 = float(np.percentile(latency, 50))
                    report.results.append(Measurement(name, batch, batch / p50 * 1000, p50,
                                                      float(np.percentile(latency, 95)),
                                                      worker.call({"op": "memory"})["peak_mb"], runs))  # fmt: skip
        finally:
            for worker in workers.values():
                worker.close()
    return report


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def _resolve(model: str, scratch: str, torch_available: bool) -> dict[str, Any]:
    """What the workers load: {"kind": "random" | "name", ...}."""
    if is_random(model):
        name = preset(model)
        if torch_available:  # one seeded transformers checkpoint that every runtime loads
            folder = Path(scratch) / "checkpoint"
            _run_worker_step({"op": "make_checkpoint", "preset": name, "folder": str(folder)})
            return {"kind": "name", "name": str(folder), "same_weights": True}
        return {"kind": "random", "preset": name, "same_weights": True}
    return {"kind": "name", "name": model, "same_weights": False}


def _run_worker_step(request: dict[str, Any]) -> None:
    """Run one request in a throwaway torch worker (no mlx_vit BLAS in it)."""
    done = subprocess.run([sys.executable, "-m", "mlx_vit.bench_worker", json.dumps(request)], env=_torch_env(),
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise MlxVitError(f"bench: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'worker failed'}")


def _torch_env() -> dict[str, str]:
    # Importing mlx_vit loads OpenBLAS into the global symbol scope; keep it out of PyTorch's and ONNX Runtime's
    # processes so they use their own BLAS, as they would without mlx-vit.
    return {**os.environ, "MLX_VIT_BLAS": "none"}


class _Worker:
    """One runtime in a child process, driven by one JSON request per line on stdin."""

    def __init__(self, runtime: str, spec: dict[str, Any]):
        env = os.environ.copy() if runtime == "mlx-vit" else _torch_env()
        request = json.dumps({"op": "serve", "runtime": runtime, **spec})
        # The worker's stderr (progress bars, warnings) goes to a file: its last line explains a crash.
        self.log = Path(spec["scratch"]) / f"{runtime}.log"
        with open(self.log, "w") as log:
            command = [sys.executable, "-m", "mlx_vit.bench_worker", request]
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            text=True, env=env)  # fmt: skip
        self.runtime = runtime
        self.info = self._read()

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            last = (self.log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise MlxVitError(f"bench: the {self.runtime} worker stopped (exit code {self.process.returncode}): {last}")
        reply = json.loads(line)
        if "error" in reply:
            raise MlxVitError(reply["error"])
        return reply

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def to_table(report: BenchReport) -> Any:
    """A rich Table for people: a row per batch size and runtime, the runtimes' details in the caption."""
    from rich.table import Table
    from rich.text import Text

    lines = [f"{name}: {info['version']}, {info['device']}, {info['blas']}, loaded in {info['load_s']:.2f} s"
             for name, info in report.runtimes.items()]  # fmt: skip
    lines += [f"{name}: skipped, {why}" for name, why in report.skipped.items()]
    for name, diff in report.max_abs_logit_diff.items():
        value = f"{diff:.1e}" if diff is not None else "n/a (other weights)"
        lines.append(f"{name}: max |logit difference| from mlx-vit {value}")
    machine = report.machine
    title = line(f"mlx-vit bench: {report.model}, {report.dtype}, {machine['cpu']} ({machine['cores']} cores)")
    caption = Text("\n".join(line(text) for text in lines))  # model names, paths: no markup, no controls
    table = Table(title=Text(title), title_justify="left", caption=caption, caption_justify="left")
    for name in ("batch", "runtime", "images/s", "p50 ms", "p95 ms", "peak MiB", "mlx-vit speedup"):
        table.add_column(name, justify="left" if name == "runtime" else "right")
    ours = {m.batch_size: m.images_per_s for m in report.results if m.runtime == "mlx-vit"}
    for m in report.results:
        ratio = "" if m.runtime == "mlx-vit" else f"{ours[m.batch_size] / m.images_per_s:.2f}x"
        table.add_row(str(m.batch_size), m.runtime, f"{m.images_per_s:.1f}", f"{m.latency_ms_p50:.0f}",
                      f"{m.latency_ms_p95:.0f}", f"{m.peak_memory_mb:.0f}", ratio,
                      end_section=m.runtime == list(report.runtimes)[-1])  # fmt: skip
    return table
