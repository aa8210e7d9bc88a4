"""The bundle as an MLflow pyfunc: `mlflow.pyfunc.load_model("models:/pneumo-cxr@champion").predict(x)`.

`x` is a batch of images: a list (or pandas Series, or a DataFrame's `image` column) of encoded
bytes (JPEG, PNG, DICOM: decoded by `pneumo.io.preprocess.load_image` with the bundle's input
spec) or of model-ready `uint8[S, S]` planes, or one `uint8[N, S, S]` array. The answer is a
DataFrame, one row per image: `label`, `probability` (1 - P(NORMAL)), `p_<class>` per class and
`error` (why an image could not be scored; its other columns are then empty). The probabilities
are the bundle's `Predictor`'s: the same engine choice as batch scoring and serving.

Logged as code (`pyfunc_model.py` beside this file, MLflow's models-from-code), so loading a
version unpickles nothing.
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow.pyfunc
import numpy as np

from pneumo.io.preprocess import DecodeError, load_image
from pneumo.io.storage import Location

warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")  # inputs vary by design


def _items(model_input: Any) -> list[Any]:
    """One entry per image, whatever container the batch came in."""
    if isinstance(model_input, np.ndarray) and model_input.ndim == 3 and model_input.dtype != object:
        return list(model_input)
    if hasattr(model_input, "columns"):  # a DataFrame: the `image` column, else its first one
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, bytes | bytearray) or (isinstance(model_input, np.ndarray) and model_input.ndim == 2):
        return [model_input]  # one image
    return list(model_input)


def _plane(item: Any, spec: Any) -> np.ndarray:
    """An item -> `uint8[S, S]`: bytes are decoded, arrays must already be at the model's size."""
    if isinstance(item, bytes | bytearray | memoryview):
        return load_image(bytes(item), "", spec)
    arr = np.asarray(item)
    if arr.dtype != np.uint8 or arr.shape != (spec.size, spec.size):
        raise DecodeError("", "unsupported", f"an array must be uint8[{spec.size}, {spec.size}], got "
                          f"{arr.dtype}{list(arr.shape)}")
    return arr


def predict_frame(predictor: Any, model_input: Any) -> Any:
    """The pyfunc's answer for a batch (see the module docstring)."""
    import pandas as pd

    items = _items(model_input)
    planes: list[np.ndarray] = []
    errors: list[str | None] = []
    for item in items:
        try:
            planes.append(_plane(item, predictor.spec))
            errors.append(None)
        except DecodeError as exc:
            errors.append(f"{exc.kind}: {exc.reason}")
    probs = predictor.predict(np.stack(planes)) if planes else np.zeros((0, len(predictor.classes)), np.float32)
    labels, positive = predictor.labels(probs), predictor.positive_probability(probs)
    rows, k = [], 0
    for err in errors:
        row: dict[str, Any] = {"label": None, "probability": None, "error": err}
        row.update({f"p_{c}": None for c in predictor.classes})
        if err is None:
            row.update(label=labels[k], probability=float(positive[k]),
                       **{f"p_{c}": float(p) for c, p in zip(predictor.classes, probs[k])})
            k += 1
        rows.append(row)
    return pd.DataFrame(rows, columns=["label", "probability", *[f"p_{c}" for c in predictor.classes], "error"])


class BundleModel(mlflow.pyfunc.PythonModel):
    """Loads the version's bundle (hash-checked) into a `Predictor` once; scores batches."""

    def load_context(self, context):  # noqa: ANN001, ANN201 - no type hints: MLflow would enforce them
        from pneumo.bundle.predict import Predictor

        self.predictor = Predictor(Location.resolve(context.artifacts["bundle"]))

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - images come in many forms
        return predict_frame(self.predictor, model_input)
