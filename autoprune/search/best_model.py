"""The best model as an MLflow model of the search run: logged (MLflow's pt2 format) and
registered, so it is in the Models tab and the registry."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys


def with_prediction(model, predict):
    """``model`` with its task's prediction of its outputs (one tensor) as its output, for
    MLflow's signature."""
    from torch import nn

    class Prediction(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return predict(self.model(x))

    return Prediction()


def log_best_model(
    uri: str,
    experiment_id: str,
    run_id: str,
    model,
    example,
    registered_name: str,
    predict=None,
    description: str = "",
    tags: dict[str, str] | None = None,
) -> str | None:
    """Log ``model`` as the MLflow model ``best_model`` of the search run (traced on
    ``example``: MLflow's pt2 format) and register it as ``registered_name``, so it is in the
    Models tab and the registry. A model whose output is not a tensor (a dict, an output
    object) is logged with ``predict`` (the task's prediction of its outputs) as its output.
    The registered version gets ``description`` and ``tags`` (what it is, in the Models tab).
    Returns its ``models:/`` URI, or None (with a warning on stderr) when MLflow cannot log
    it: the search's own model.pt is what it produced."""
    import mlflow
    import mlflow.pytorch
    import torch
    import torchvision
    from mlflow.tracking import fluent

    def pin(module) -> str:
        return f"{module.__name__}=={module.__version__.split('+')[0]}"

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    saved_uri, saved_experiment = mlflow.get_tracking_uri(), getattr(fluent, "_active_experiment_id", None)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(experiment_id=experiment_id)  # else the logged model lands in experiment 0
            model = copy.deepcopy(model).cpu().eval()  # traced on the CPU, as the example is
            with torch.no_grad():
                if predict is not None and not isinstance(model(example.cpu()), torch.Tensor):
                    model = with_prediction(model, predict)
            info = mlflow.pytorch.log_model(
                model,
                name="best_model",
                input_example=example.cpu().numpy(),
                registered_model_name=registered_name,
                pip_requirements=[pin(torch), pin(torchvision)],  # inferring them takes seconds
                run_id=run_id,
            )
            version = getattr(info, "registered_model_version", None)
            if version is not None:
                registry = mlflow.MlflowClient(uri)
                registry.update_model_version(registered_name, str(version), description=description)
                for key, value in (tags or {}).items():
                    registry.set_model_version_tag(registered_name, str(version), key, value)
        return info.model_uri
    except Exception as exc:  # noqa: BLE001 - the model is saved as model.pt whatever MLflow makes of it
        print(
            f"warning: the best model was not logged as an MLflow model ({type(exc).__name__}: {exc})", file=sys.stderr
        )
        return None
    finally:  # the fluent API's state as it was (a Python API caller may use it)
        with contextlib.suppress(Exception):
            mlflow.set_tracking_uri(saved_uri)
            fluent._active_experiment_id = saved_experiment
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
