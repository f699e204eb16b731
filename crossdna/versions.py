"""Installed versions of the packages a run depends on (for `crossdna info`/`doctor`, run tags and benchmarks)."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (e.g. "fla-core"), or None when it is not installed."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return None
