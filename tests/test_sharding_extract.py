"""Extraction internals: the token table and the per-window N/GC counts from running counts over cells."""
from __future__ import annotations

import numpy as np
import pytest

from crossdna import tokens
from sharding.extract import OTHER, TABLE, _running_counts


def test_table_maps_acgt_n_and_flags_other_letters():
    ids = np.frombuffer(b"ACGTacgtNnRY-\n".translate(TABLE), np.uint8)
    assert ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, tokens.N, tokens.N, OTHER, OTHER, OTHER, OTHER]


@pytest.mark.parametrize("length, stride", [(1024, 1024), (1024, 512), (100, 37), (96, 160), (10, 4)])
def test_window_counts_from_running_counts_equal_counting_each_window(length, stride):
    rng = np.random.default_rng(length + stride)
    ids = rng.choice(np.array([0, 1, 2, 3, 4, 5], np.uint8), size=20_000, p=[.25, .2, .2, .25, .07, .03])
    cell = np.gcd(length, stride)
    n_running, gc_running = _running_counts(ids, cell)
    n = (len(ids) - length) // stride + 1
    first = np.arange(n) * (stride // cell)
    windows = np.stack([ids[k * stride:k * stride + length] for k in range(n)])
    assert np.array_equal(n_running[first + length // cell] - n_running[first], (windows >= tokens.N).sum(1))
    assert np.array_equal(gc_running[first + length // cell] - gc_running[first],
                          ((windows == tokens.C) | (windows == tokens.G)).sum(1))
