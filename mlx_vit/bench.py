"""`mlx-vit bench`: the same random input through mlx-vit and, where installed, PyTorch and ONNX Runtime.

Each runtime runs in its own worker process (so PyTorch's threads, ONNX Runtime's and MLX's BLAS never compete
inside one process, and each process's peak memory is its own), and the parent interleaves their runs: for each
batch size, warm-up runs first (not counted), then one run of each runtime in turn, `runs` times. A run is one
forward pass from a host (numpy) batch to host logits. Batch sizes go in ascending order, so a worker's peak
resident memory after a batch size is that batch size's peak.

`random:NAME` models (see PRESETS) need no download. With PyTorch installed their weights come from a seeded
transformers model that every runtime loads, so the report also gives each runtime's largest logit difference
from mlx-vit; without it mlx-vit uses MLX's own random initialization.

Nothing here imports torch, transformers, timm or onnxruntime except the worker of that runtime (the reference
model it loads is bench_reference's).
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

from mlx_vit.bench_reference import reference_model
from mlx_vit.errors import MlxVitError, ModelNotFoundError, shown

RUNTIMES = ("mlx-vit", "torch", "onnxruntime")
DTYPES = ("float32", "float16", "bfloat16")
# Architectures of the google/vit-*-patch16-224 family; weights don't change the speed.
PRESETS = {
    "vit-tiny-patch16-224": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "vit-small-patch16-224": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit-base-patch16-224": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vit-large-patch16-224": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
}
DEFAULT_BENCH_MODEL = "random:vit-base-patch16-224"
PAUSE_S = 0.3  # between two runtimes' runs; OpenBLAS's idle threads spin for ~0.1 s
_SEED = 0


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
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"{text!r}: give positive integers separated by commas, like 1,8,32")
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
    if model.startswith("random:"):
        preset = model.removeprefix("random:")
        if preset not in PRESETS:
            raise ModelNotFoundError(f"{model}: unknown preset (choose from random:{', random:'.join(PRESETS)})")
        if torch_available:  # one seeded transformers checkpoint that every runtime loads
            folder = Path(scratch) / "checkpoint"
            _run_worker_step({"op": "make_checkpoint", "preset": preset, "folder": str(folder)})
            return {"kind": "name", "name": str(folder), "same_weights": True}
        return {"kind": "random", "preset": preset, "same_weights": True}
    return {"kind": "name", "name": model, "same_weights": False}


def _run_worker_step(request: dict[str, Any]) -> None:
    """Run one request in a throwaway torch worker (no mlx_vit BLAS in it)."""
    done = subprocess.run([sys.executable, "-m", "mlx_vit.bench", json.dumps(request)], env=_torch_env(),
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
            self.process = subprocess.Popen([sys.executable, "-m", "mlx_vit.bench", request], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)  # fmt: skip
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


# ---- worker side: runs in the child process ----


class _Runner:
    """Loads one runtime's model; run(batch) times one forward pass of that runtime."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.inputs: dict[int, Any] = {}
        start = time.perf_counter()
        self.info = self.load()
        self.info["load_s"] = round(time.perf_counter() - start, 3)

    def pixels(self, batch: int) -> np.ndarray:
        """The same seeded normalized pixels, NHWC float32, in every worker."""
        size, channels = self.image_size, self.channels
        return np.random.default_rng(_SEED + batch).standard_normal((batch, size, size, channels), dtype=np.float32)

    def run(self, batch: int) -> float:
        if batch not in self.inputs:
            self.inputs[batch] = self.prepare(self.pixels(batch))
        start = time.perf_counter()
        self.forward(self.inputs[batch])
        return time.perf_counter() - start


class _MlxRunner(_Runner):
    def load(self) -> dict[str, Any]:
        import mlx.core as mx

        import mlx_vit
        from mlx_vit.blas import blas_info
        from mlx_vit.classify import CPU_CACHE_LIMIT, _raise_cache_limit
        from mlx_vit.loading import load_model
        from mlx_vit.model import ViT, ViTConfig

        self.mx = mx
        if self.spec["kind"] == "random":
            mx.random.seed(_SEED)
            self.model = ViT(ViTConfig(**PRESETS[self.spec["preset"]]))
            mx.eval(self.model.parameters())
        else:
            self.model = load_model(self.spec["name"]).model
        self.dtype = getattr(mx, self.spec["dtype"])
        if self.dtype != mx.float32:
            self.model.set_dtype(self.dtype)
        if mx.default_device() == mx.cpu:
            _raise_cache_limit(CPU_CACHE_LIMIT)  # as Classifier does
        self.image_size, self.channels = self.model.config.image_size, self.model.config.num_channels
        blas = blas_info()
        return {"version": f"mlx-vit {mlx_vit.__version__}, mlx {mx.__version__}", "device": str(mx.default_device()),
                "blas": blas.name + (f" ({blas.path})" if blas.path else ""), "image_size": self.image_size,
                "channels": self.channels}  # fmt: skip

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        return pixels

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        out = self.model(self.mx.array(pixels).astype(self.dtype))
        return np.array(out.astype(self.mx.float32))

    def memory(self) -> float:
        return _peak_rss_mb()


class _TorchRunner(_Runner):
    def load(self) -> dict[str, Any]:
        import torch

        self.torch = torch
        self.model, same = reference_model(self.spec["name"], self.spec["image_size"])
        self.dtype = getattr(torch, self.spec["dtype"])
        self.model.to(self.dtype)
        self.image_size, self.channels = self.spec["image_size"], self.spec["channels"]
        blas = "MKL" if torch.backends.mkl.is_available() else "its own BLAS"
        blas += f", oneDNN {torch.backends.mkldnn.is_available()}, {torch.get_num_threads()} threads"
        return {"version": f"torch {torch.__version__}", "device": "cpu", "same_weights": same, "blas": blas}

    def prepare(self, pixels: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).to(self.dtype)

    def forward(self, pixels: Any) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(pixels).float().numpy()

    def memory(self) -> float:
        return _peak_rss_mb()


class _OrtRunner(_Runner):
    def load(self) -> dict[str, Any]:
        import onnxruntime
        import torch

        model, same = reference_model(self.spec["name"], self.spec["image_size"])
        self.image_size, self.channels = self.spec["image_size"], self.spec["channels"]
        path = Path(self.spec["scratch"]) / "model.onnx"
        example = torch.from_numpy(self.pixels(1).transpose(0, 3, 1, 2).copy())
        # The TorchScript exporter, opset 17: what the transformers docs use, no extra exporter packages.
        torch.onnx.export(model, (example,), str(path), input_names=["pixel_values"],
                          output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)  # fmt: skip
        del model
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return {"version": f"onnxruntime {onnxruntime.__version__}", "device": "cpu", "same_weights": same,
                "blas": "MLAS (its own)"}  # fmt: skip

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixel_values": pixels})[0]

    def memory(self) -> float:
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS, KiB else


def _make_checkpoint(preset: str, folder: str) -> None:
    import torch
    import transformers

    torch.manual_seed(_SEED)
    config = transformers.ViTConfig(**PRESETS[preset], image_size=224, patch_size=16, num_labels=1000)
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    # mlx-vit reads the preprocessing from here; google/vit-base-patch16-224's values.
    preprocessing = {"do_normalize": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                     "resample": 2, "size": 224, "image_processor_type": "ViTImageProcessor"}  # fmt: skip
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(preprocessing))


def _serve(spec: dict[str, Any]) -> None:
    """Worker loop: a JSON line out for every JSON line in; errors become {"error": one line}."""
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not corrupt the protocol
    runner_class = {"mlx-vit": _MlxRunner, "torch": _TorchRunner, "onnxruntime": _OrtRunner}[spec["runtime"]]

    def reply(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    try:
        runner = runner_class(spec)
    except MlxVitError as error:
        reply({"error": str(error)})
        return
    except Exception as error:  # a worker's crash is reported, not hidden
        reply({"error": f"bench: {spec['runtime']} could not load the model: {type(error).__name__}: {error}"})
        return
    reply(runner.info)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            reply({"seconds": runner.run(request["batch"])})
        elif request["op"] == "check":
            reply({"logits": runner.forward(runner.prepare(runner.pixels(1)))[0].astype(float).tolist()})
        elif request["op"] == "memory":
            reply({"peak_mb": runner.memory()})


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
    title = shown(f"mlx-vit bench: {report.model}, {report.dtype}, {machine['cpu']} ({machine['cores']} cores)", None)
    caption = Text("\n".join(shown(line, None) for line in lines))  # model names, paths: no markup, no controls
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


def _main() -> None:
    request = json.loads(sys.argv[1])
    if request["op"] == "make_checkpoint":
        _make_checkpoint(request["preset"], request["folder"])
    elif request["op"] == "serve":
        _serve(request)


if __name__ == "__main__":
    _main()
