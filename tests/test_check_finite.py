"""check_finite mode: the first bijector producing NaN/Inf is named, with its step index."""

from __future__ import annotations

import math
import re
from typing import Optional, Tuple

import pytest
import torch
from torch import Tensor

import flowplugins
from flowplugins import base, composer, diagnostics
from flowplugins.base import Bijector
from flowplugins.diagnostics import NonFiniteError, check_finite, label_steps


def small_glow(**kwargs):
    model = composer.glow((3, 8, 8), levels=2, depth=2, hidden=8, seed=0, **kwargs)
    model.log_prob(torch.rand(4, 3, 8, 8))  # ActNorm data init
    return model.eval()


def poison(step) -> None:
    """Make ``step``'s output non-finite through its parameters."""
    with torch.no_grad():
        if hasattr(step, "log_scale") and isinstance(step.log_scale, torch.nn.Parameter):
            step.log_scale.fill_(math.inf)
        else:
            next(step.parameters()).fill_(math.nan)
    if hasattr(step, "clear_cache"):
        step.clear_cache()


class NanLogDet(Bijector):
    """Identity whose log-det is NaN: a finite output does not hide a broken log-det."""

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return x, x.new_full((x.shape[0],), math.nan)

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return z, z.new_zeros(z.shape[0])


def test_is_a_floating_point_error():
    assert issubclass(NonFiniteError, FloatingPointError)


def test_names_step_index_and_level_of_a_composed_model():
    model = small_glow()
    index = next(i for i, s in enumerate(model.steps) if type(s).__name__ == "AffineCoupling"
                 and i > model.level_bounds[1][0])
    poison(model.steps[index])
    with check_finite(model), pytest.raises(NonFiniteError) as info:
        model.log_prob(torch.rand(2, 3, 8, 8))
    err = info.value
    assert err.step_index == index and err.bijector is model.steps[index]
    assert err.direction == "forward" and err.input_finite is True
    assert re.search(rf"AffineCoupling at model\.steps\[{index}\] \(level 1 of 2\) produced a "
                     r"non-finite (output|log-det) in forward \(data -> latent\)", str(err))
    assert "its input was finite" in str(err)


def test_inverse_direction_stops_at_first_layer_in_sampling_order():
    model = small_glow()
    actnorms = [i for i, s in enumerate(model.steps) if type(s).__name__ == "ActNorm"]
    first, last = actnorms[0], actnorms[-1]
    poison(model.steps[first])
    poison(model.steps[last])
    with check_finite(model), pytest.raises(NonFiniteError) as info:
        model.decode(torch.randn(2, 3, 8, 8))
    # Latent -> data visits the steps in reverse, so the later step is hit first.
    assert info.value.step_index == last and info.value.direction == "inverse"
    assert "inverse (latent -> data)" in str(info.value)


def test_label_steps_gives_indices_without_passing_the_model():
    model = small_glow()
    label_steps(model.steps)
    poison(model.steps[4])
    with check_finite(), pytest.raises(NonFiniteError, match=r"at model\.steps\[4\] produced"):
        model.log_prob(torch.rand(2, 3, 8, 8))
    assert diagnostics.step_label(model.steps[4]) == "model.steps[4]"


def test_a_lone_bijector_is_named_by_class():
    layer = flowplugins.build("actnorm", (2, 2, 2)).eval()  # eval: no data init over the poison
    poison(layer)
    with check_finite(), pytest.raises(NonFiniteError) as info:
        layer(torch.randn(3, 2, 2, 2))
    assert info.value.step_index is None and info.value.label is None
    assert str(info.value).startswith("check_finite: ActNorm produced a non-finite output")


def test_non_finite_log_det_alone_is_caught():
    with check_finite(), pytest.raises(NonFiniteError, match=r"NanLogDet produced a non-finite "
                                       r"log-det in forward.*2 of 2 values"):
        NanLogDet((1, 2, 2))(torch.zeros(2, 1, 2, 2))


def test_non_finite_data_is_reported_as_upstream():
    model = small_glow()
    x = torch.rand(2, 3, 8, 8)
    x[1, 0, 0, 0] = math.nan
    with check_finite(model), pytest.raises(NonFiniteError) as info:
        model.log_prob(x)
    assert info.value.step_index == 0 and info.value.input_finite is False
    assert "comes from upstream" in str(info.value)


def test_disabled_mode_lets_nan_through_and_is_restored_after_errors():
    layer = flowplugins.build("actnorm", (2, 2, 2)).eval()
    poison(layer)
    z, _ = layer(torch.randn(3, 2, 2, 2))
    assert not torch.isfinite(z).all()
    with pytest.raises(NonFiniteError):
        with check_finite():
            assert diagnostics.is_check_finite_enabled()
            layer(torch.randn(3, 2, 2, 2))
    assert base._finite_hook is None and not diagnostics.is_check_finite_enabled()


def test_nesting_and_enable_disable():
    with check_finite():
        with check_finite():
            pass
        assert diagnostics.is_check_finite_enabled()
    assert not diagnostics.is_check_finite_enabled()
    diagnostics.enable_check_finite()
    try:
        assert diagnostics.is_check_finite_enabled()
    finally:
        diagnostics.disable_check_finite()
    diagnostics.disable_check_finite()  # unmatched: harmless
    assert not diagnostics.is_check_finite_enabled()


def test_finite_models_run_unchanged():
    model = small_glow()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = model.log_prob(x)
    with check_finite(model):
        # The checked path runs step by step, off the fused fast path: float32 rounding of a
        # log-density near -20 differs in the sixth digit.
        torch.testing.assert_close(model.log_prob(x), expected, rtol=1e-5, atol=1e-4)
        model.sample(2)


def test_rejects_things_that_are_not_models():
    with pytest.raises(TypeError, match=r"check_finite: expected a composed model"):
        with check_finite(42):
            pass
    assert not diagnostics.is_check_finite_enabled()


@pytest.mark.parametrize("backend", ["nflows", "pyro"])
def test_backends_report_the_step_index(backend):
    torch.manual_seed(0)
    torch_model = small_glow()
    index = [type(s).__name__ for s in torch_model.steps].index("AffineCoupling", 5)
    poison(torch_model.steps[index])
    wrapped = composer._for_backend(torch_model, backend)
    with check_finite(wrapped), pytest.raises(NonFiniteError) as info:
        wrapped.log_prob(torch.rand(2, 3, 8, 8))
    assert info.value.step_index == index


def test_memory_saving_training_step():
    model = composer.glow((3, 8, 8), levels=2, depth=2, hidden=8, seed=0, memory_saving=True)
    model.log_prob(torch.rand(4, 3, 8, 8))
    poison(model.steps[6])
    with check_finite(model), pytest.raises(NonFiniteError, match=r"model\.steps\[6\]"):
        model.log_prob(torch.rand(2, 3, 8, 8)).mean().backward()
