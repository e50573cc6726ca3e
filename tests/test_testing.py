"""Tests of the public checker: it passes good layers and catches each kind of broken one."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import pytest
import torch
from hypothesis import given
from torch import Tensor, nn

from flowplugins import Bijector
from flowplugins.bijectors.squeeze import Squeeze
from flowplugins.testing import (
    BijectorCheckError,
    batch_shapes,
    check_bijector,
    check_registered,
    event_shapes,
    perturb_parameters,
)


class ChannelScale(Bijector):
    """z = x · exp(s_c); log-det H·W·Σ s_c. A correct layer the broken ones below derive from."""

    def __init__(self, event_shape) -> None:
        super().__init__(event_shape)
        self.log_scale = nn.Parameter(torch.zeros(self.event_shape[0]))

    def _scale(self) -> Tensor:
        return self.log_scale.view(-1, 1, 1)

    def _logdet(self, n: int, sign: float) -> Tensor:
        h, w = self.event_shape[1:]
        return sign * h * w * self.log_scale.sum().expand(n)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return x * self._scale().exp(), self._logdet(x.shape[0], 1.0)

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return z * (-self._scale()).exp(), self._logdet(z.shape[0], -1.0)


class MissingHW(ChannelScale):
    def _logdet(self, n: int, sign: float) -> Tensor:
        return sign * self.log_scale.sum().expand(n)


class WrongInverse(ChannelScale):
    def _inverse(self, z, context):
        return z * self._scale().exp(), self._logdet(z.shape[0], -1.0)


class InverseLogdetSign(ChannelScale):
    def _inverse(self, z, context):
        x, ld = super()._inverse(z, context)
        return x, -ld


class MixesSamples(ChannelScale):
    """z_i = x_i + x_{i+1}/2 along the batch: invertible for a batch of 2, but not per sample."""

    def _forward(self, x, context):
        return x + 0.5 * x.roll(1, 0), x.new_zeros(x.shape[0])

    def _inverse(self, z, context):
        return (z - 0.5 * z.roll(1, 0)) / 0.75, z.new_zeros(z.shape[0])


class UnusedParameter(ChannelScale):
    def __init__(self, event_shape) -> None:
        super().__init__(event_shape)
        self.unused = nn.Parameter(torch.zeros(3))


class NotPersistent(ChannelScale):
    """The scale lives in a plain attribute, so the state dict does not carry it."""

    def __init__(self, event_shape) -> None:
        super().__init__(event_shape)
        self.offset = torch.randn(self.event_shape[0]).view(-1, 1, 1)

    def _forward(self, x, context):
        z, ld = super()._forward(x, context)
        return z + self.offset.to(z), ld

    def _inverse(self, z, context):
        return super()._inverse(z - self.offset.to(z), context)


class StaleCache(ChannelScale):
    """Caches exp(-s) on the first inverse and never invalidates it."""

    def __init__(self, event_shape) -> None:
        super().__init__(event_shape)
        self._inv_scale: Optional[Tensor] = None

    def _inverse(self, z, context):
        if self._inv_scale is None:
            self._inv_scale = (-self._scale()).exp().detach()
        return z * self._inv_scale, self._logdet(z.shape[0], -1.0)


class WrongShape(Squeeze):
    def output_event_shape(self):
        c, h, w = self.event_shape
        return (c, h, w)


class Crashes(ChannelScale):
    def _inverse(self, z, context):
        raise RuntimeError("boom")


def test_a_crash_is_reported_with_the_layer_and_case():
    with pytest.raises(BijectorCheckError, match=r"Crashes \[event_shape=\(2, 2, 2\).*RuntimeError: boom"):
        check_bijector(Crashes, (2, 2, 2))


def test_checker_passes_a_correct_layer_on_every_backend():
    check_bijector(ChannelScale, (3, 4, 2), backend=("torch", "nflows", "pyro"))
    check_bijector(ChannelScale((2, 2, 2)), batch_shape=(), dtype=torch.float32)


@pytest.mark.parametrize(
    "cls, message",
    [
        (MissingHW, "autograd Jacobian"),
        (WrongInverse, "inverse(forward(x)) != x"),
        (InverseLogdetSign, "inverse log-det != -forward log-det"),
        (MixesSamples, "depends on sample"),
        (UnusedParameter, "'unused' receives no gradient"),
        (NotPersistent, "state_dict round trip"),
        (StaleCache, "inverse(forward(x)) != x"),
        (WrongShape, "output has shape"),
    ],
)
def test_checker_catches_broken_layers(cls, message):
    with pytest.raises(BijectorCheckError, match=cls.__name__) as info:
        check_bijector(cls, (2, 4, 4))
    assert message in str(info.value)


def test_missing_hw_factor_needs_the_jacobian_check():
    # The round trip alone passes: only the autograd Jacobian sees the wrong log-det.
    with pytest.warns(UserWarning, match="Jacobian check skipped"):
        check_bijector(MissingHW, (2, 4, 4), max_jacobian_numel=0)
    with pytest.raises(BijectorCheckError, match="log\\|det J\\|"):
        check_bijector(MissingHW, (2, 4, 4))


def test_perturb_parameters_moves_every_parameter():
    layer = ChannelScale((3, 2, 2))
    before = layer.log_scale.detach().clone()
    perturb_parameters(layer, 0.5, torch.Generator().manual_seed(0))
    assert (layer.log_scale != before).all()


def test_check_accepts_names_factories_and_context():
    check_bijector("squeeze", (1, 2, 4), batch_shape=(2, 3), backend="pyro")
    check_bijector(lambda shape: Squeeze(shape, factor=2), (1, 4, 4))
    with pytest.raises(TypeError, match="event_shape is required"):
        check_bijector(Squeeze)
    with pytest.raises(ValueError, match="unknown backend"):
        check_bijector(Squeeze, (1, 2, 2), backend="jax")


def test_check_registered_runs_every_backend():
    check_registered("squeeze", [(1, 2, 2)], dtypes=(torch.float64,), seeds=(0,))


@given(shape=event_shapes(levels=2, min_channels=2, max_channels=6, channel_multiple=2),
       batch=batch_shapes(max_dims=3))
def test_strategies_draw_compatible_structure(shape, batch):
    c, h, w = shape
    assert c % 2 == 0 and 2 <= c <= 6 and h % 4 == 0 and w % 4 == 0
    assert len(batch) <= 3 and all(b >= 1 for b in batch)


def test_event_shapes_rejects_impossible_bounds():
    with pytest.raises(ValueError, match="no shape"):
        event_shapes(levels=4, max_size=8)


def test_jacobian_check_runs_in_float64_for_float32_layers():
    layer = check_bijector(ChannelScale, (2, 2, 2), dtype=torch.float32)
    assert layer.log_scale.dtype == torch.float32
    assert math.isfinite(float(layer.log_scale.detach().sum()))


def test_checker_leaves_the_global_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_bijector(ChannelScale, (1, 2, 2), seed=7)
    assert torch.equal(torch.rand(3), expected)
