"""eager_random: compiled graphs draw from torch's generator, exactly as eager code does."""

from __future__ import annotations

import doctest

import pytest
import torch

from flowplugins import eager_random
from flowplugins.eager_random import standard_normal


def test_doctests():
    result = doctest.testmod(eager_random)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_device_follow_the_template(dtype):
    z = standard_normal((3, 2, 4), torch.empty(0, dtype=dtype))
    assert z.shape == (3, 2, 4) and z.dtype == dtype and z.device.type == "cpu"


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_draws_equal_eager_draws_and_two_draws_differ(backend):
    if eager_random._STANDARD_NORMAL_OP is None:
        pytest.skip("this torch cannot register the operator's fake version")
    torch._dynamo.reset()

    def two_draws(like):
        return standard_normal((4, 5), like) * 2.0, standard_normal((4, 5), like) + 1.0

    compiled = torch.compile(two_draws, backend=backend)
    like = torch.empty(0)
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = two_draws(like)
        torch.manual_seed(seed)
        actual = compiled(like)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert not torch.equal(actual[0] / 2.0, actual[1] - 1.0)  # never merged into one draw
