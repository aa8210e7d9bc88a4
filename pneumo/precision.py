"""Engines and numeric precision: the one list of each, and how each engine resolves a precision.

    resolve("auto", device, engine="onnxruntime")   -> "fp32"
    resolve("auto", torch.device("cuda"))           -> "bf16" where the GPU runs it natively
    with autocast(device, "bf16"): model(x)

Engines (`pneumo.bundle.predict.Predictor`): `torch` (eager, CPU or CUDA), `onnxruntime` and
`openvino` (the bundle's ONNX graphs, CPU), and `auto` (`pneumo.bundle.engines.choose`: the fastest
CPU engine and precision that passed its gate on this bundle, torch on CUDA).

- `fp32`: everywhere.
- `bf16`: torch autocast, or OpenVINO's bf16 inference precision on a CPU that runs it natively
  (AVX-512 bf16 / AMX). On an AVX2-only CPU it is emulated and slower than fp32, so `auto` keeps fp32.
- `fp16`: torch autocast on CUDA only (training uses a GradScaler with it).
- `int8`: ONNX Runtime or OpenVINO, from a bundle whose `model.int8.onnx` passed its gate.

Reduced precision on the CPU engines is used only where the bundle's own gate passed
(`pneumo.bundle.gates`); `auto` never picks one whose gate failed or was not run.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from pneumo.config import UserError

if TYPE_CHECKING:  # torch is imported where it runs: read tasks and CLIs import this module without it
    import torch

ENGINES: tuple[str, ...] = ("auto", "torch", "onnxruntime", "openvino")  # the Predictor's engines
CPU_ENGINES: tuple[str, ...] = ("onnxruntime", "openvino")  # the ONNX engines; `auto` chooses among them
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")
TORCH_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
TORCH_PRECISIONS_AUTO: tuple[str, ...] = ("auto", *TORCH_PRECISIONS)  # training's choices
ENGINE_PRECISIONS: dict[str, tuple[str, ...]] = {  # what each ONNX engine runs, fastest last
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
}
REDUCED: tuple[str, ...] = ("bf16", "int8")  # the precisions a bundle's gate must have passed
BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16


class PrecisionError(UserError, ValueError):
    """A precision that does not exist, or that this engine/device cannot run."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux `/proc/cpuinfo`; empty elsewhere). Read without torch."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_native(flags: frozenset[str] | None = None) -> bool:
    """True on a CPU with AVX-512 bf16 or AMX bf16 (`flags`: these flags instead of this CPU's)."""
    return bool(set(BF16_FLAGS) & (cpu_flags() if flags is None else flags))


def bf16_native(device: torch.device) -> bool:
    """True where bf16 matmuls/convs run natively (CUDA with bf16, or a CPU with AVX-512 bf16 / AMX)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def check_engine(engine: str, precision: str) -> None:
    """Refuse a precision the engine cannot run (`auto` runs everything)."""
    check(precision)
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; valid: {', '.join(ENGINES)}")
    if engine in ENGINE_PRECISIONS and precision != "auto" and precision not in ENGINE_PRECISIONS[engine]:
        raise PrecisionError(f"precision={precision!r} is not available on {engine} "
                             f"(valid: {', '.join(ENGINE_PRECISIONS[engine])}); use --engine torch for it")
    if engine == "torch" and precision == "int8":
        raise PrecisionError("precision='int8' needs --engine onnxruntime or openvino and a quantised "
                             "bundle (pneumo quantize)")


def resolve(precision: str, device: torch.device, engine: str = "torch", training: bool = False) -> str:
    """The concrete precision torch runs for a requested one (`auto` included).

    For training, `auto` is bf16 where native (fp16 on other GPUs). For inference on a CPU, `auto`
    is fp32: a reduced precision the bundle has no gate for is never chosen by itself."""
    check_engine(engine, precision)
    if engine in ENGINE_PRECISIONS:
        return "fp32" if precision == "auto" else precision
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if bf16_native(device) else ("fp16" if training else "fp32")
        return "bf16" if training and bf16_native(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        return "fp32"  # no fp16 autocast worth having on CPU
    return precision


def autocast(device: torch.device, precision: str) -> Any:
    """The torch autocast context for a resolved precision (a no-op for fp32)."""
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()
