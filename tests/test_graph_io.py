"""The input checks graph runners share (`edgert.runtime.graph_io.GraphInterface`): the fast path for
an array that already fits, and the full check for everything else."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.errors import EdgertError
from edgert.runtime.graph_io import GraphInterface


class _Graph(GraphInterface):
    def __init__(self) -> None:
        self.inputs = [
            {"name": "image", "dtype": "float32", "shape": [1, 3, 4]},
            {"name": "ids", "dtype": "int64", "shape": [1, "seq"]},
        ]
        self.outputs = []


def _check_all(g: _Graph, feeds: dict) -> dict[str, np.ndarray]:
    given, sizes = g._given(feeds, {}), {}
    return {s["name"]: g._check(s, given[s["name"]], sizes) for s in g.inputs}


def test_fitting_arrays_pass_as_they_are_and_others_are_converted():
    g = _Graph()
    image = np.ones((1, 3, 4), np.float32)
    ids = np.arange(5, dtype=np.int64)[None]
    got = _check_all(g, {"image": image, "ids": ids})
    assert got["image"] is image  # no copy for a contiguous float32 array of the fixed shape
    wide = np.ones((1, 3, 8), np.float64)[:, :, ::2]  # float64 and strided: converted
    got = _check_all(g, {"image": wide, "ids": ids.tolist()})
    assert got["image"].dtype == np.float32 and got["image"].flags.c_contiguous
    np.testing.assert_array_equal(got["image"], wide)
    assert got["ids"].dtype == np.int64 and got["ids"].shape == (1, 5)


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"image": np.ones((1, 3, 5), np.float32), "ids": np.zeros((1, 2), np.int64)}, "input 'image' has shape"),
        ({"image": np.ones((1, 3, 4), np.float32)}, "missing input"),
        ({"image": np.ones((1, 3, 4), np.float32), "ids": np.zeros((1, 2)), "x": 1}, "unknown input"),
    ],
)
def test_bad_inputs_are_refused_by_name(feeds, message):
    with pytest.raises(EdgertError, match=message):
        _check_all(_Graph(), feeds)
