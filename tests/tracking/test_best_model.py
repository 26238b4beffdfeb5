"""The best model as an MLflow model of the search run (``search.best_model.log_best_model``):
logged and registered quietly, and a failure only warns (the search's model.pt is the product)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def search_run(tmp_path):
    from autoprune.tracking import store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id, run_id = store.open_search_run(uri, "model", {}, resume=False)
    return uri, experiment_id, run_id


def _model():
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 10))


def test_the_best_model_is_logged_into_the_search_run_and_registered(search_run, capfd, monkeypatch):
    import torch

    from autoprune.search.best_model import log_best_model
    from autoprune.tracking import store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, experiment_id, run_id = search_run
    model_uri = log_best_model(uri, experiment_id, run_id, _model(), torch.randn(2, 1, 8, 8), "autoprune-model")
    assert model_uri and model_uri.startswith("models:/")
    out = capfd.readouterr()
    assert "Successfully registered" not in out.out + out.err and "Created version" not in out.out + out.err
    mlflow = store.client(uri)
    [version] = mlflow.search_model_versions("name='autoprune-model'")
    assert version.run_id == run_id
    [logged] = mlflow.search_logged_models(experiment_ids=[experiment_id])
    assert logged.name == "best_model" and logged.source_run_id == run_id
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # logged into the run, which stays open
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the fluent API's state as it was


def test_a_model_mlflow_cannot_log_only_warns(search_run, capsys, monkeypatch):
    import mlflow.pytorch
    import torch

    from autoprune.search.best_model import log_best_model

    def broken(*args, **kwargs):
        raise RuntimeError("cannot export this model")

    monkeypatch.setattr(mlflow.pytorch, "log_model", broken)
    uri, experiment_id, run_id = search_run
    assert log_best_model(uri, experiment_id, run_id, _model(), torch.randn(2, 1, 8, 8), "autoprune-x") is None
    err = capsys.readouterr().err
    assert "warning: the best model was not logged as an MLflow model (RuntimeError: cannot export this model)" in err
