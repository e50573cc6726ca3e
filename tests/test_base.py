"""The base contract: event-shape validation, batch flattening, input and context checks."""

from __future__ import annotations

from typing import Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

from flowplugins import base
from flowplugins.base import Bijector, as_event_shape, sum_except_batch


class Scale(Bijector):
    """``z = 2x`` with a parameter, recording the flat shapes it is called with."""

    def __init__(self, event_shape) -> None:
        super().__init__(event_shape)
        self.log_two = nn.Parameter(torch.tensor(2.0).log())
        self.seen = []

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        self.seen.append((tuple(x.shape), None if context is None else tuple(context.shape)))
        return x * self.log_two.exp(), self.log_two * self.event_numel * x.new_ones(x.shape[0])

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return z / self.log_two.exp(), -self.log_two * self.event_numel * z.new_ones(z.shape[0])


@pytest.mark.parametrize("shape, expected", [((3, 4, 5), (3, 4, 5)), ([1, 1, 1], (1, 1, 1)),
                                             (torch.Size([2, 2, 2]), (2, 2, 2))])
def test_as_event_shape_accepts(shape, expected):
    assert as_event_shape(shape) == expected


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5, 6), (0, 4, 4), (3, -1, 4), (3, 2.5, 4),
                                   "abc", "345", None, 3])
def test_as_event_shape_rejects_with_owner(shape):
    with pytest.raises(ValueError, match=r"^Owner: event_shape must be"):
        as_event_shape(shape, "Owner")


@pytest.mark.parametrize("batch", [(), (0,), (2,), (2, 3), (0, 3), (3, 0)])
def test_batch_dims_are_flattened_and_restored(batch):
    layer = Scale((2, 3, 4))
    x = torch.randn(*batch, 2, 3, 4)
    z, ld = layer(x)
    assert z.shape == x.shape and ld.shape == batch
    torch.testing.assert_close(z, 2 * x)
    n = 1
    for b in batch:
        n *= b
    assert layer.seen[-1][0] == (n, 2, 3, 4)
    x_back, ld_inv = layer.inverse(z)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(ld_inv, -ld)


def test_context_is_flattened_with_the_batch():
    layer = Scale((1, 2, 2))
    layer(torch.randn(2, 3, 1, 2, 2), torch.randn(2, 3, 5))
    assert layer.seen[-1] == ((6, 1, 2, 2), (6, 5))


@pytest.mark.parametrize("shape", [(4, 3), (0,), (7, 1)])
def test_sum_except_batch(shape):
    x = torch.randn(*shape, 2, 2) if shape != (0,) else torch.randn(0, 3, 2)
    torch.testing.assert_close(sum_except_batch(x), x.reshape(x.shape[0], -1).sum(-1)
                               if x.numel() else torch.zeros(x.shape[0]))
    assert sum_except_batch(torch.randn(5), 1).shape == (5,)


def test_check_input_messages():
    layer = Scale((2, 3, 4))
    with pytest.raises(ValueError, match=r"Scale.forward: expected input of shape \(\.\.\., 2, 3, 4\); "
                       r"got \(5, 2, 3, 5\)"):
        layer(torch.zeros(5, 2, 3, 5))
    with pytest.raises(TypeError, match=r"Scale.inverse: input must be a floating-point tensor; "
                       r"got dtype torch.int64"):
        layer.inverse(torch.zeros(5, 2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"Scale.forward: input dtype torch.float64 does not match "
                       r"the layer's parameters \(torch.float32\)"):
        layer(torch.zeros(5, 2, 3, 4, dtype=torch.float64))
    layer.double()(torch.zeros(5, 2, 3, 4, dtype=torch.float64))


def test_context_checks():
    layer = Scale((1, 2, 2))
    x = torch.randn(3, 1, 2, 2)
    with pytest.raises(TypeError, match=r"Scale.forward: context must be a torch.Tensor; got list"):
        layer(x, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"Scale.forward: context batch shape \(4,\) does not match "
                       r"the input's \(3,\)"):
        layer(x, torch.zeros(4, 2))
    with pytest.raises(TypeError, match=r"Scale.inverse: context dtype torch.float64 does not "
                       r"match the input's torch.float32"):
        layer.inverse(x, torch.zeros(3, 2, dtype=torch.float64))


def test_finite_hook_is_off_by_default():
    # The disabled check_finite mode costs one `is not None` test per call.
    assert base._finite_hook is None
