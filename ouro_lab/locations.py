"""Where a run writes, checked before anything is created: folders that must be writable, and
MLflow tracking URIs that can work here."""

from __future__ import annotations

import os
from pathlib import Path

from ouro_lab.errors import ConfigError


def writable_dir(path: Path, key: str) -> Path:
    """Create `path` if needed; ConfigError naming `key` if that fails or it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{key}: cannot create the folder {path}: {err.strerror or err}; "
                          f"point {key} at a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: the folder {path} is not writable; point {key} at a writable folder")
    return path


TRACKING_SCHEMES = ("sqlite:///", "postgresql", "mysql", "mssql", "http://", "https://", "databricks")


def tracking_uri_problem(uri: str) -> str | None:
    """Why an MLflow tracking URI cannot work here, or None. NOTE: MLflow >= 3.13 refuses a
    plain folder (the file store); we say what to write instead before any run starts."""
    if uri.startswith(TRACKING_SCHEMES):
        return None
    if "://" not in uri:
        return (f"{uri!r} is a plain path; MLflow needs a database or a server: sqlite:///{Path(uri).expanduser()}"
                f"{'' if uri.endswith('.db') else '/mlflow.db'} (a file here) or http://host:5000 (an `mlflow server`)")
    return (f"{uri!r}: unknown scheme {uri.split('://', 1)[0]!r}; use sqlite:///path/mlflow.db, "
            "postgresql://user@host/db or http://host:5000")
