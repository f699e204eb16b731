"""External tools and services some tests need (shellcheck, hadolint, a Slurm controller).

On a developer machine a missing one skips the test with the reason. In CI (``CI=true``, set by .ci/run) it is a
failure: CI installs and starts all of them, so a skip there would hide a broken setup.
"""
from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip (locally) or fail (in CI) the calling test."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: .ci/run is expected to provide it)")
    pytest.skip(reason)


def tool(name: str) -> str:
    """Absolute path of an executable on PATH, or skip/fail naming it."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed")
    return path
