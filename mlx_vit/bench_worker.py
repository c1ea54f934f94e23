"""`mlx-vit bench`'s worker: one runtime (mlx-vit, PyTorch or ONNX Runtime) in its own process, answering the
parent's JSON requests (run, check, memory) a line at a time. See mlx_vit.bench for the protocol's other side.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlx_vit.bench_reference import reference_model
from mlx_vit.errors import MlxVitError
from mlx_vit.files import write_new
from mlx_vit.presets import PREFIX, PRESETS, SEED


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
        return np.random.default_rng(SEED + batch).standard_normal((batch, size, size, channels), dtype=np.float32)

    def run(self, batch: int) -> float:
        if batch not in self.inputs:
            self.inputs[batch] = self.prepare(self.pixels(batch))
        start = time.perf_counter()
        self.forward(self.inputs[batch])
        return time.perf_counter() - start

    def memory(self) -> float:
        return peak_rss_mb()

    def load(self) -> dict[str, Any]:  # each runtime's: its model, and what the report says about it
        raise NotImplementedError

    def prepare(self, pixels: np.ndarray) -> Any:  # host NHWC pixels -> this runtime's input
        raise NotImplementedError

    def forward(self, inputs: Any) -> np.ndarray:  # one forward pass, to host logits
        raise NotImplementedError


class _MlxRunner(_Runner):
    def load(self) -> dict[str, Any]:
        import mlx.core as mx

        import mlx_vit
        from mlx_vit import runtime
        from mlx_vit.blas import blas_info
        from mlx_vit.loading import load_model

        self.mx = mx
        random = self.spec["kind"] == "random"
        self.model = load_model(PREFIX + self.spec["preset"] if random else self.spec["name"]).model
        self.dtype = getattr(mx, self.spec["dtype"])
        if self.dtype != mx.float32:
            self.model.set_dtype(self.dtype)
        plan = runtime.current()  # the plan its load adopted, for the report
        self.image_size, self.channels = self.model.config.image_size, self.model.config.num_channels
        blas = blas_info()
        where = (f" ({blas.path})" if blas.path else "") + (f", core {blas.core}" if blas.core else "")
        device = ", ".join(filter(None, [str(mx.default_device()), plan.describe()]))
        return {"version": f"mlx-vit {mlx_vit.__version__}, mlx {mx.__version__}", "device": device,
                "blas": blas.name + where, "image_size": self.image_size, "channels": self.channels}  # fmt: skip

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        return pixels

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        out = self.model(self.mx.array(pixels).astype(self.dtype))
        return np.array(out.astype(self.mx.float32))


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


def peak_rss_mb() -> float:
    """This process's own peak resident memory. On Linux VmHWM, not ru_maxrss: after fork and exec that starts at
    the parent's peak (the kernel carries it over), so every worker would seem to take the parent's memory."""
    try:
        with open("/proc/self/status") as status:
            return round(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024, 1)
    except (OSError, StopIteration):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS


def _make_checkpoint(preset: str, folder: str) -> None:
    import torch
    import transformers

    torch.manual_seed(SEED)
    config = transformers.ViTConfig(**PRESETS[preset], image_size=224, patch_size=16, num_labels=1000)
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    # mlx-vit reads the preprocessing from here; google/vit-base-patch16-224's values.
    preprocessing = {"do_normalize": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                     "resample": 2, "size": 224, "image_processor_type": "ViTImageProcessor"}  # fmt: skip
    write_new(Path(folder) / "preprocessor_config.json", json.dumps(preprocessing).encode())


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


def _main() -> None:
    request = json.loads(sys.argv[1])
    if request["op"] == "make_checkpoint":
        _make_checkpoint(request["preset"], request["folder"])
    elif request["op"] == "serve":
        _serve(request)


if __name__ == "__main__":
    _main()
