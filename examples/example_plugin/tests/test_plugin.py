"""The plugin's own test suite: flowplugins' property checks in one line per bijector.

Run after ``pip install -e .`` (which registers the entry point); the ``flowplugins_check``
fixture comes from flowplugins' pytest plugin.
"""

import pytest
import torch

import flowplugins
from flowplugins_example_plugin import InvertibleLeakyReLU


def test_registered_bijector_passes_the_property_checks(flowplugins_check):
    flowplugins_check("leaky_relu_flow")


def test_options_are_checked_too(flowplugins_check):
    flowplugins_check("leaky_relu_flow", [(3, 2, 2)], options={"negative_slope": 0.1})


def test_is_discovered():
    assert flowplugins.get_class("leaky_relu_flow") is InvertibleLeakyReLU


def test_rejects_a_non_positive_slope():
    with pytest.raises(ValueError, match="negative_slope must be a positive finite number; got 0"):
        InvertibleLeakyReLU((1, 2, 2), negative_slope=0)


def test_log_det_counts_negative_entries():
    layer = InvertibleLeakyReLU((1, 1, 3), negative_slope=0.25)
    _, logabsdet = layer(torch.tensor([[[[-1.0, -2.0, 3.0]]]]))
    torch.testing.assert_close(logabsdet, torch.tensor([2 * torch.log(torch.tensor(0.25)).item()]))
