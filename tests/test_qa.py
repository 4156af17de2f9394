"""qa: product cloud / shadow mask decoding (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.qa import bits_set, invalid_mask, qa60_invalid, qa_pixel_invalid, scl_invalid


def test_scl_classes() -> None:
    scl = np.arange(12, dtype="uint8")
    bad = scl_invalid(scl)
    assert np.flatnonzero(bad).tolist() == [0, 1, 3, 8, 9, 10]  # 2 terrain shadow, 11 snow kept
    assert scl_invalid(scl, classes=[11]).tolist() == [False] * 11 + [True]


def test_qa60_bits() -> None:
    qa = np.array([0, 1 << 10, 1 << 11, (1 << 10) | (1 << 11), 1 << 9], "uint16")
    assert qa60_invalid(qa).tolist() == [False, True, True, True, False]


def test_landsat_qa_pixel_bits() -> None:
    # real Collection-2 values: 21824 clear land, 21952 water, 22280 cloud (+dilated),
    # 23888 cloud shadow, 1 fill, 55052 high-confidence cloud
    qa = np.array([21824, 21952, 22280, 23888, 1, 55052, 1 << 1], "uint16")
    assert qa_pixel_invalid(qa).tolist() == [False, False, True, True, True, True, True]
    assert bits_set(qa, [6]).tolist() == [True, True, False, True, False, False, False]


def test_dispatch_and_unknown_kind() -> None:
    assert invalid_mask("scl", np.array([9]))[0]
    assert invalid_mask("qa_pixel", np.array([1 << 4]))[0]
    assert not invalid_mask("qa60", np.array([0]))[0]
    with pytest.raises(ValueError, match="unknown quality mask kind 'fmask'"):
        invalid_mask("fmask", np.zeros(1))  # type: ignore[arg-type]
