"""MLflow models-from-code entry of a registered pneumo bundle (see `pneumo.bundle.pyfunc`).

MLflow stores this file with every version and runs it on `mlflow.pyfunc.load_model`."""

import mlflow.models

from pneumo.bundle.pyfunc import BundleModel

mlflow.models.set_model(BundleModel())
