"""Token alphabet and reverse complement in id space."""
from __future__ import annotations

import numpy as np

from crossdna import tokens


def test_encode_folds_case_and_maps_other_letters_to_n():
    ids = tokens.encode(b"ACGTNacgtnRYKM-")
    assert ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 4, 4, 4, 4, 4]
    assert tokens.decode(ids[:5]) == "ACGTN"
    raw = np.frombuffer(b"ACGTNacgtnRY", dtype=np.uint8)
    assert tokens.is_acgtn(raw).tolist() == [True] * 10 + [False, False]


def test_reverse_complement_is_an_involution_and_correct():
    seq = tokens.encode("AACGTTN")
    rc = tokens.reverse_complement(seq)
    assert tokens.decode(rc) == "NAACGTT"
    assert np.array_equal(tokens.reverse_complement(rc), seq)
    perm = np.array(tokens.COMPLEMENT_PERMUTATION)
    assert np.array_equal(perm, tokens.COMPLEMENT[:5])
    # A<->T and C<->G; upstream's [3,0,2,1,4] (defect 6) maps C->A, which is wrong.
    assert tokens.decode(tokens.COMPLEMENT[tokens.encode("ACGTN")]) == "TGCAN"
