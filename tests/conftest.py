import pytest
import torch

from ouro_lab.config import load_config


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)


@pytest.fixture
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def tiny_config(tmp_path, tracking_uri):
    """A small, fast config on `state` logging to a throwaway MLflow store."""

    def make(*overrides: str, path: str | None = None):
        base = [
            "model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.loops=2",
            "data.state.length=8", "data.batch_size=32", "data.n_val=128", "data.n_test=128",
            "train.max_steps=40", "train.warmup_steps=5", "train.val_every=20", "train.log_every=5",
            "train.progress_bar=false", f"tracking.uri={tracking_uri}", f"tracking.output_dir={tmp_path / 'outputs'}",
            "tracking.experiment=test",
        ]
        return load_config(path, [*base, *overrides])

    return make
