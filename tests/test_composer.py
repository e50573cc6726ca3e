"""Tests of the multi-scale composer: shapes, validation, step specs, presets and configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import flowplugins
from flowplugins import Bijector, registry
from flowplugins.composer import (
    CONFIG_DIR,
    config_names,
    from_config,
    glow,
    multiscale,
    parse_step,
    realnvp,
)
from flowplugins.models import Center, MultiscaleFlow

ROOT = Path(__file__).resolve().parents[1]
TINY_STEP = ["actnorm", "inv_conv1x1_lu", {"name": "affine_coupling", "hidden": 8}]


def _names(model):
    return [type(s).__name__ for s in model.steps]


def _same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("split_prior", [True, False])
def test_shapes_are_inferred_for_every_level(levels, split_prior):
    model = multiscale((3, 8, 8), levels, TINY_STEP, depth=2, split_prior=split_prior)
    c, s = 3, 8
    expected = []
    for level in range(levels):
        c, s = 4 * c, s // 2
        if level < levels - 1:
            expected.append((c - c // 2, s, s))
            c = c // 2
    expected.append((c, s, s))
    assert model.latent_shapes == expected
    assert sum(torch.Size(t).numel() for t in expected) == 3 * 8 * 8
    # Each bijector was built at its predecessor's output shape (after a split: C//2 channels).
    shapes = [tuple(s.event_shape) for s in model.steps]
    assert shapes[0] == (3, 8, 8)
    assert _names(model).count("Squeeze") == levels
    assert _names(model).count("Split2dPrior") == (levels - 1 if split_prior else 0)
    assert _names(model)[-1] == "LearnedGaussianPrior"
    assert _names(model).count("AffineCoupling") == 2 * levels
    x = torch.rand(2, 3, 8, 8)
    assert model.encode(x).shape == x.shape
    assert model.log_prob(x).shape == (2,)


def test_steps_is_the_flat_data_to_latent_list():
    model = multiscale((1, 4, 4), 2, TINY_STEP, depth=1)
    assert isinstance(model.steps, torch.nn.ModuleList)
    assert _names(model) == [
        "Center", "Squeeze", "ActNorm", "LUInvertibleConv1x1", "AffineCoupling", "Split2dPrior",
        "Squeeze", "ActNorm", "LUInvertibleConv1x1", "AffineCoupling", "LearnedGaussianPrior",
    ]
    assert model.level_bounds == ((0, 6), (6, 11))
    assert all(isinstance(s, Bijector) for s in model.steps)


@pytest.mark.parametrize(
    "shape, levels, value",
    [((3, 12, 12), 3, "(3, 12, 12)"), ((1, 8, 6), 2, "(1, 8, 6)"), ((1, 5, 4), 1, "(1, 5, 4)")],
)
def test_sizes_that_do_not_survive_the_squeezes_are_a_clear_error(shape, levels, value):
    with pytest.raises(ValueError) as info:
        multiscale(shape, levels, TINY_STEP)
    message = str(info.value)
    assert "multiscale" in message and f"2**levels = {2 ** levels}" in message
    assert value in message and f"levels={levels}" in message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"levels": 0}, "levels must be a positive integer; got 0"),
        ({"depth": 0}, "depth must be a positive integer; got 0"),
        ({"backend": "jax"}, "unknown backend 'jax'"),
        ({"step": [3]}, r"step\[0\].*got 3"),
        ({"step": [{"hidden": 3}]}, "needs a 'name' key"),
        ({"context_features": 0}, "context_features must be a positive integer"),
        ({"context_features": 3, "split_prior": False, "top_prior": False}, "no step was built"),
        ({"memory_saving": True, "backend": "nflows"}, "memory_saving=True needs backend"),
    ],
)
def test_invalid_arguments_name_the_rule_and_the_value(kwargs, match):
    args = {"event_shape": (1, 8, 8), "levels": 2, "step": TINY_STEP, **kwargs}
    with pytest.raises(ValueError, match=match):
        multiscale(**args)


def test_unknown_step_name_suggests_close_matches():
    with pytest.raises(registry.UnknownBijectorError, match="actnorm"):
        multiscale((1, 4, 4), 1, ["actnrom"])


def test_unknown_step_option_is_a_type_error():
    with pytest.raises(TypeError, match="widht"):
        multiscale((1, 4, 4), 1, [{"name": "affine_coupling", "widht": 3}])


def test_step_spec_forms_are_equivalent():
    forms = [
        [{"name": "actnorm"}, {"name": "affine_coupling", "hidden": 8}],
        ["actnorm", ("affine_coupling", {"hidden": 8})],
        [("actnorm", {}), ["affine_coupling", {"hidden": 8}]],
    ]
    models = [multiscale((1, 8, 8), 2, f, depth=2, seed=3) for f in forms]
    for other in models[1:]:
        _same_parameters(models[0], other)
    assert parse_step("squeeze") == ("squeeze", {})
    single = multiscale((1, 4, 4), 1, "actnorm", depth=3)
    assert _names(single).count("ActNorm") == 3


def test_preprocess_options():
    assert isinstance(multiscale((1, 4, 4), 1, "actnorm").steps[0], Center)
    assert _names(multiscale((1, 4, 4), 1, "actnorm", preprocess="logit"))[0] == "LogitTransform"
    assert _names(multiscale((1, 4, 4), 1, "actnorm", preprocess=None))[0] == "Squeeze"
    alpha = multiscale((1, 4, 4), 1, "actnorm", preprocess={"name": "logit", "alpha": 0.01}).steps[0]
    assert alpha.alpha == 0.01


# ----------------------------------------------------------------- any registered name
def _step_options(name: str) -> dict:
    options = registry.info(name).options
    return {"hidden": 8} if "hidden" in options else {}


@pytest.mark.parametrize("name", flowplugins.names())
def test_every_registered_name_is_usable_as_a_step(name):
    torch.manual_seed(0)
    model = multiscale(
        (2, 4, 4), 1, [(name, _step_options(name))], depth=1, preprocess=None
    ).double()
    # One step, first after the squeeze, so a unit-interval layer (logit) sees data in (0, 1).
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 0.8 + 0.1
    lp = model.log_prob(x)  # training-mode pass (ActNorm init, batch-norm statistics)
    model.eval()
    z, ld = model.encode_with_log_det(x)
    assert torch.isfinite(lp).all() and torch.isfinite(ld).all()
    torch.testing.assert_close(model.decode(z), x, rtol=0, atol=1e-10)


class _ThirdPartyShift(Bijector):
    """A plugin bijector that no built-in knows: z = x + b, b learned per channel."""

    def __init__(self, event_shape, offset: float = 0.0):
        super().__init__(event_shape)
        self.bias = torch.nn.Parameter(torch.full((self.event_shape[0], 1, 1), float(offset)))

    def _forward(self, x, context):
        return x + self.bias, x.new_zeros(x.shape[0])

    def _inverse(self, z, context):
        return z - self.bias, z.new_zeros(z.shape[0])


class _FakeEntryPoint:
    def load(self):
        return _ThirdPartyShift


def test_third_party_plugin_name_is_usable_as_a_step(monkeypatch):
    plugins = registry._discover()
    monkeypatch.setitem(
        plugins,
        "third_party_shift",
        registry.PluginInfo(
            name="third_party_shift", target="plugin:_ThirdPartyShift",
            distribution="some-plugin", entry_point=_FakeEntryPoint(),
        ),
    )
    monkeypatch.delitem(registry._loaded, "third_party_shift", raising=False)
    model = multiscale((1, 8, 8), 2, ["actnorm", {"name": "third_party_shift", "offset": 0.25}])
    shifts = [s for s in model.steps if isinstance(s, _ThirdPartyShift)]
    assert [s.event_shape for s in shifts] == [(4, 4, 4), (8, 2, 2)]
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(model.decode(model.encode(x)), x, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("permutation", ["reverse_permutation", "shuffle_permutation", "inv_conv1x1_lu", "inv_conv1x1"])
@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_glow_ablations_build(permutation, coupling):
    model = glow((1, 8, 8), levels=2, depth=2, hidden=8, coupling=coupling, permutation=permutation)
    names = _names(model)
    expected_perm = type(flowplugins.build(permutation, (4, 4, 4))).__name__
    assert names[2:5] == ["ActNorm", expected_perm, coupling.capitalize() + "Coupling"]
    x = torch.rand(2, 1, 8, 8)
    assert torch.isfinite(model.log_prob(x)).all()


def test_glow_dropout_goes_to_every_coupling_net_and_only_there():
    model = glow((1, 8, 8), levels=2, depth=2, hidden=8, dropout=0.2)
    drops = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    couplings = [m for m in model.modules() if type(m).__name__ == "AffineCoupling"]
    assert len(couplings) == 4 and all(c.net.drop.p == 0.2 for c in couplings)
    assert len(drops) == 4  # none in the split or top priors
    assert all(m.drop is None for m in glow((1, 8, 8), levels=2, depth=2, hidden=8).modules()
               if type(m).__name__ == "CouplingNet")
    model.eval()
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(model.log_prob(x), model.log_prob(x), rtol=0, atol=0)


def test_glow_defaults_are_the_papers():
    import inspect

    params = inspect.signature(glow).parameters
    assert (params["levels"].default, params["depth"].default, params["hidden"].default) == (3, 32, 512)
    assert params["coupling"].default == "affine"
    assert params["permutation"].default == "inv_conv1x1_lu"
    assert params["split_prior"].default is True


@pytest.mark.parametrize(
    "kwargs, match",
    [({"permutation": "lu"}, "permutation must be one of"), ({"coupling": "spline"}, "coupling must be one of")],
)
def test_glow_rejects_unknown_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        glow((1, 8, 8), levels=1, depth=1, hidden=8, **kwargs)


def test_realnvp_structure():
    model = realnvp((1, 8, 8), levels=2, hidden=8)
    names = _names(model)
    assert names[0] == "LogitTransform"
    squeeze = [i for i, n in enumerate(names) if n == "Squeeze"]
    assert len(squeeze) == 2
    before = names[1:squeeze[0]]
    assert before == ["CheckerboardCoupling", "BatchNormFlow"] * 3
    parities = [s.parity for s in model.steps if type(s).__name__ == "CheckerboardCoupling"]
    assert parities == [0, 1, 0] * 2 + [0, 1, 0, 1]
    after = names[squeeze[0] + 1 : squeeze[0] + 10]
    assert after == ["AffineCoupling", "BatchNormFlow", "ReversePermutation"] * 3
    assert names[-8:] == ["CheckerboardCoupling", "BatchNormFlow"] * 4
    assert "Split2dPrior" not in names and "LearnedGaussianPrior" not in names
    # levels = 2 squeezes, every level splits, the last scale runs on the rest.
    assert model.latent_shapes == [(2, 4, 4), (4, 2, 2), (4, 2, 2)]
    assert torch.isfinite(model.log_prob(torch.rand(4, 1, 8, 8))).all()


def test_seed_makes_builds_reproducible_without_touching_the_global_rng():
    state = torch.random.get_rng_state()
    a = glow((1, 8, 8), levels=2, depth=2, hidden=8, permutation="shuffle_permutation", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = glow((1, 8, 8), levels=2, depth=2, hidden=8, permutation="shuffle_permutation", seed=7)
    _same_parameters(a, b)


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["glow", "realnvp"])
def test_packaged_configs_equal_the_top_level_ones(name):
    top = ROOT / "configs" / f"{name}.yaml"
    assert top.read_bytes() == (CONFIG_DIR / f"{name}.yaml").read_bytes()
    assert name in config_names()


@pytest.mark.parametrize("source", ["path", "name", "packaged path"])
def test_glow_config_builds_the_same_as_the_preset(source):
    config = {
        "path": ROOT / "configs" / "glow.yaml",
        "name": "glow",
        "packaged path": str(CONFIG_DIR / "glow.yaml"),
    }[source]
    from_yaml = from_config(config, event_shape=(1, 8, 8), levels=2, depth=2, seed=0)
    preset = glow((1, 8, 8), levels=2, depth=2, seed=0)
    _same_parameters(from_yaml, preset)
    assert _names(from_yaml) == _names(preset)


def test_realnvp_config_builds_the_same_as_the_preset():
    from_yaml = from_config("realnvp", event_shape=(1, 8, 8), seed=0)
    preset = realnvp((1, 8, 8), seed=0)
    _same_parameters(from_yaml, preset)
    assert _names(from_yaml) == _names(preset)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(from_yaml.log_prob(x), preset.log_prob(x))


def test_config_mapping_with_preset_and_backend():
    flow = from_config(
        {"preset": "glow", "levels": 1, "depth": 1, "hidden": 8, "event_shape": [1, 4, 4]},
        backend="nflows",
    )
    assert type(flow).__name__ == "Flow"


@pytest.mark.parametrize(
    "config, kwargs, error, match",
    [
        ({"levels": 1, "step": ["actnorm"], "widht": 3}, {"event_shape": (1, 4, 4)}, ValueError, r"unknown key\(s\) \['widht'\]"),
        ({"levels": 1, "step": ["actnorm"]}, {}, ValueError, "no event_shape"),
        ({"preset": "nice", "levels": 1}, {"event_shape": (1, 4, 4)}, ValueError, "unknown preset 'nice'"),
        ("no_such_config", {}, FileNotFoundError, "packaged: glow, realnvp"),
    ],
)
def test_config_errors(config, kwargs, error, match):
    with pytest.raises(error, match=match):
        from_config(config, **kwargs)


def test_torch_model_type():
    assert isinstance(glow((1, 4, 4), levels=1, depth=1, hidden=8), MultiscaleFlow)
