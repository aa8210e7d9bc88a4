"""Engines and numeric precision: the one list of each, and how each engine resolves a precision.

    resolve("auto", device, engine="onnxruntime")   -> "fp32"
    resolve("auto", torch.device("cuda"))           -> "bf16" where the GPU runs it natively
    with autocast(device, "bf16"): model(x)

- `fp32`: everywhere.
- `bf16`: torch autocast; `auto` picks it only where it is native (CUDA with bf16, or a CPU with
  AVX-512 bf16 / AMX). On an AVX2-only CPU it is emulated and slower than fp32, so `auto` keeps fp32.
- `fp16`: torch autocast on CUDA only (training uses a GradScaler with it).
- `int8`: ONNX Runtime only, from a bundle whose `model.int8.onnx` passed its gate.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from pneumo.config import UserError

if TYPE_CHECKING:  # torch is imported where it runs: read tasks and CLIs import this module without it
    import torch

ENGINES: tuple[str, ...] = ("auto", "torch", "onnxruntime")  # `pneumo.bundle.predict.Predictor`'s engines
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")
TORCH_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
TORCH_PRECISIONS_AUTO: tuple[str, ...] = ("auto", *TORCH_PRECISIONS)  # training's choices
ORT_PRECISIONS: tuple[str, ...] = ("fp32", "int8")


class PrecisionError(UserError, ValueError):
    """A precision that does not exist, or that this engine/device cannot run."""


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


def resolve(precision: str, device: torch.device, engine: str = "torch", training: bool = False) -> str:
    """The concrete precision an engine runs for a requested one (`auto` included)."""
    check(precision)
    if engine == "onnxruntime":
        if precision == "auto":
            return "fp32"
        if precision not in ORT_PRECISIONS:
            raise PrecisionError(f"precision={precision!r} is not available on onnxruntime "
                                 f"(valid: {', '.join(ORT_PRECISIONS)}); use --engine torch for it")
        return precision
    if precision == "int8":
        raise PrecisionError("precision='int8' needs --engine onnxruntime and a quantised bundle (pneumo quantize)")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if bf16_native(device) else ("fp16" if training else "fp32")
        return "bf16" if bf16_native(device) else "fp32"
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
