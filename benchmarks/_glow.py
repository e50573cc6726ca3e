"""The same multi-scale Glow in flowplugins, nflows and normflows, and its coupling-net floor.

Architecture (data → latent), for ``levels`` L and ``depth`` K::

    for each level:  squeeze (C,H,W) -> (4C,H/2,W/2)
                     K × [ActNorm, LU 1x1 conv, affine coupling (sigmoid(h + 2) scale)]
                     factor out half of the channels (not after the last level)
    standard-normal prior on everything factored out

The coupling net is conv3x3(h)-ReLU-conv1x1(h)-ReLU-zero conv3x3 everywhere; it reads the
first ``ceil(C/2)`` channels and outputs shift and scale of the other ``C//2``. The peers'
factor-out is a plain standard normal and they do not preprocess, so flowplugins is built with
``split_prior=False, top_prior=False, preprocess=None``.

Every library is wrapped in a :class:`GlowUnderTest` with the same three entry points:
``nll(x)`` (mean negative log-likelihood in nats), ``sample(n)`` (temperature 1) and
``module`` (what the optimizer trains).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
from torch import Tensor, nn

from _common import glow_net

LIBRARIES = ("flowplugins", "nflows", "normflows")


@dataclass(frozen=True)
class GlowConfig:
    name: str
    shape: Tuple[int, int, int]
    levels: int
    depth: int
    hidden: int
    batch: int

    def level_shapes(self) -> List[Tuple[int, int, int]]:
        """The ``(C, H, W)`` each level's K steps act on."""
        c, h, w = self.shape
        shapes = []
        for level in range(self.levels):
            c, h, w = 4 * c, h // 2, w // 2
            shapes.append((c, h, w))
            if level < self.levels - 1:
                c = c // 2  # the first ceil(C/2) channels are factored out
        return shapes

    def describe(self) -> str:
        c, h, w = self.shape
        return f"{c}×{h}×{w}, L{self.levels} K{self.depth} h{self.hidden}, batch {self.batch}"


CONFIGS = {
    "small": GlowConfig("small", (1, 8, 8), 2, 4, 64, 64),
    "large": GlowConfig("large", (3, 32, 32), 3, 8, 128, 16),
    "quick": GlowConfig("quick", (1, 8, 8), 2, 1, 8, 4),
}


@dataclass
class GlowUnderTest:
    module: nn.Module
    nll: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]


# ---------------------------------------------------------------- flowplugins
def build_flowplugins(cfg: GlowConfig, memory_saving: bool = False) -> GlowUnderTest:
    from flowplugins.composer import glow

    model = glow(
        cfg.shape,
        levels=cfg.levels,
        depth=cfg.depth,
        hidden=cfg.hidden,
        coupling="affine",
        permutation="inv_conv1x1_lu",
        split_prior=False,
        top_prior=False,
        preprocess=None,
        memory_saving=memory_saving,
        backend="torch",
    )
    return GlowUnderTest(
        model,
        lambda x: -model.log_prob(x).mean(),
        lambda n: model.sample(n, temperature=1.0),
    )


# ---------------------------------------------------------------------- nflows
class _ContextFreeNet(nn.Module):
    """nflows calls ``transform_net(x, context)``; the Glow net takes no context."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, context=None) -> Tensor:
        return self.net(x)


def build_nflows(cfg: GlowConfig) -> GlowUnderTest:
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import (
        ActNorm,
        AffineCouplingTransform,
        CompositeTransform,
        MultiscaleCompositeTransform,
        OneByOneConvolution,
        SqueezeTransform,
    )

    def net_fn(in_channels: int, out_channels: int) -> nn.Module:
        return _ContextFreeNet(glow_net(in_channels, out_channels, cfg.hidden))

    multiscale = MultiscaleCompositeTransform(cfg.levels, split_dim=1)
    c, h, w = cfg.shape
    for level in range(cfg.levels):
        c, h, w = 4 * c, h // 2, w // 2
        # nflows transforms the channels where mask > 0: the last C//2, as in flowplugins.
        mask = torch.cat([torch.zeros(c - c // 2), torch.ones(c // 2)])
        steps = [SqueezeTransform()]
        for _ in range(cfg.depth):
            steps += [
                ActNorm(c),
                OneByOneConvolution(c, using_cache=True, identity_init=False),
                AffineCouplingTransform(mask, net_fn),
            ]
        hidden_shape = multiscale.add_transform(CompositeTransform(steps), (c, h, w))
        if hidden_shape is not None:
            c = hidden_shape[0]
    flow = Flow(multiscale, StandardNormal([cfg.shape[0] * cfg.shape[1] * cfg.shape[2]]))
    return GlowUnderTest(flow, lambda x: -flow.log_prob(x).mean(), lambda n: flow.sample(n))


# ------------------------------------------------------------------- normflows
def build_normflows(cfg: GlowConfig) -> GlowUnderTest:
    import normflows as nf

    flows, merges, priors = [], [], []
    shapes = cfg.level_shapes()
    # normflows lists levels from the deepest (index 0) up, in the latent → data direction.
    for i in range(cfg.levels):
        c, h, w = shapes[cfg.levels - 1 - i]
        level = [
            nf.flows.GlowBlock(c, cfg.hidden, split_mode="channel", scale=True, scale_map="sigmoid")
            for _ in range(cfg.depth)
        ]
        flows.append(level + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c // 2, h, w)
        else:
            latent = (c, h, w)
        priors.append(nf.distributions.DiagGaussian(latent, trainable=False))
    model = nf.MultiscaleFlow(priors, flows, merges, class_cond=False)
    return GlowUnderTest(
        model,
        lambda x: -model.log_prob(x, None).mean(),
        lambda n: model.sample(n, temperature=1.0)[0],
    )


BUILDERS = {"flowplugins": build_flowplugins, "nflows": build_nflows, "normflows": build_normflows}


# ------------------------------------------------------------------------ floor
def floor_nets(cfg: GlowConfig) -> Tuple[nn.ModuleList, List[Tuple[int, int, int]]]:
    """Every coupling net of the Glow (K per level) and the input shape each one reads."""
    nets, inputs = nn.ModuleList(), []
    for c, h, w in cfg.level_shapes():
        for _ in range(cfg.depth):
            nets.append(glow_net(c - c // 2, 2 * (c // 2), cfg.hidden))
            inputs.append((c - c // 2, h, w))
    return nets, inputs


# ------------------------------------------------------------- parameter counts
# Layers that store the L and U factors as full C×C matrices and read one strict triangle of
# each: class name -> the attribute holding L.
_FULL_LU_STORAGE = {"LUInvertibleConv1x1": "lower", "Invertible1x1Conv": "L"}


def _lu_masked_entries(module: nn.Module) -> int:
    """Stored LU entries that the parametrisation never reads: C(C+1)/2 in each of L and U."""
    masked = 0
    for m in module.modules():
        lower = getattr(m, _FULL_LU_STORAGE.get(type(m).__name__, "\0"), None)
        if isinstance(lower, nn.Parameter):
            c = lower.shape[0]
            masked += c * (c + 1)
    return masked


def parameter_counts(model: nn.Module, coupling_nets: Callable[[nn.Module], List[nn.Module]]) -> dict:
    stored = sum(p.numel() for p in model.parameters() if p.requires_grad)
    nets = sum(p.numel() for net in coupling_nets(model) for p in net.parameters())
    return {"stored": stored, "effective": stored - _lu_masked_entries(model), "coupling_nets": nets}


def coupling_nets_of(library: str, model: nn.Module) -> List[nn.Module]:
    if library == "flowplugins":
        return [m.net for m in model.modules() if type(m).__name__ == "AffineCoupling"]
    if library == "nflows":
        return [m.transform_net for m in model.modules() if type(m).__name__ == "AffineCouplingTransform"]
    return [m.param_map for m in model.modules() if type(m).__name__ == "AffineCoupling"]
