"""Empty, already-migrated MLflow sqlite stores for tests.

Creating a store runs MLflow's schema migrations (3-15 s on a busy 2-core box); a test that only needs *a* store
gets a copy of one migrated template, made once per pytest session in its base temporary directory (which
pytest removes itself after a few sessions).
"""
from __future__ import annotations

import functools
import shutil
from pathlib import Path


def _session_dir(folder: Path) -> Path:
    """pytest's base temporary directory (``.../pytest-of-USER/pytest-N``) above ``folder``, else its parent."""
    for parent in folder.resolve().parents:
        if parent.parent.name.startswith("pytest-of-"):
            return parent
    return folder.resolve().parent


@functools.cache
def _template(session_dir: Path) -> Path:
    from mlflow import MlflowClient

    db = session_dir / "mlflow-template.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # creates and migrates the schema
    return db


def fresh_sqlite_store(folder: Path) -> str:
    """Copy the migrated template to ``folder/mlflow.db`` (``folder`` under a pytest tmp_path); return its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template(_session_dir(folder)), folder / "mlflow.db")
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"
