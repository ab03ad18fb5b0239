"""How an anchor's similarities become logits: plain s/tau (InfoNCE, BSC) or WEINCE's
per-anchor mixture. One policy object decides it (the logits, their derivative, and any
per-anchor constants), so the dense and tiled paths, and every loss that uses a softmax
over candidates, share the same maths."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .weince_tail import AnchorPool, WeinceConfig, WeinceLambda, weince_lambda

#: A policy's per-anchor constants, computed once per call by its ``row_state`` and handed
#: back to it (WEINCE's lambdas; None for plain logits). Code that only passes the state
#: along (the core cross-entropy) types it with this name, not WEINCE's class.
RowState = WeinceLambda | None


class LogitBlock(NamedTuple):
    """Logits of a block of anchor rows and what their backward needs.

    ``logits`` is a fresh buffer the caller may overwrite; ``slope`` is dg/ds (a buffer of the
    block's shape, or a scalar); dg/dtau = -tau_weight_i * s_ij / tau^2 (``tau_weight`` None
    means 1)."""

    logits: Tensor
    slope: Tensor
    tau_weight: Tensor | None


class Coefficients(NamedTuple):
    """Per-anchor constants of g_ij = scale_i * s_ij + mix_i * log(1 - min(s_ij, 1 - eps)).

    Every policy here is of this form (``mix`` None: no log term); the tiled path combines
    them with a tile's :class:`Shortfall`, computed once and shared by both directions."""

    scale: Tensor              # (anchors,) or 0-dim
    mix: Tensor | None         # (anchors,)
    tau_weight: Tensor | None  # (anchors,): dg/dtau = -tau_weight * s / tau^2; None means 1

    def part(self, anchors: slice, dim: int) -> Coefficients:
        """The coefficients of a block of anchors, shaped to broadcast over a block of
        similarities whose anchors lie along ``dim`` (0: rows, 1: columns)."""

        def cut(x: Tensor | None) -> Tensor | None:
            if x is None or x.ndim == 0:
                return x
            return x[anchors, None] if dim == 0 else x[None, anchors]

        scale = cut(self.scale)
        assert scale is not None
        return Coefficients(scale, cut(self.mix), cut(self.tau_weight))


class Shortfall(NamedTuple):
    """Per-entry terms of the log-shortfall logit, for one block of similarities."""

    log: Tensor              # log(u), u = 1 - min(s, 1 - eps)
    inverse: Tensor | None   # 1 / u, and 0 where s was clamped (no gradient there)


def mixed_logits(sims: Tensor, coef: Coefficients, shortfall: Shortfall | None,
                 bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """g = scale * s + mix * log u (+ bias), in ``out`` or a fresh buffer (``coef`` and
    ``bias`` broadcast to ``sims``); the tiled path folds -logsumexp into ``bias`` to save a
    pass."""
    if bias is None:
        g = torch.mul(sims, coef.scale, out=out)
    elif bias.ndim == 2 and bias.shape[-1] != 1 and coef.scale.ndim == 2 and out is None:
        g = torch.addcmul(bias, sims, coef.scale)       # per-column constants: vectorised
    else:
        # A per-row bias sends addcmul to torch's unvectorised CPU loop, whether the scale is
        # per row or a scalar: a mul and an add are faster (benchmarks/README.md).
        g = torch.mul(sims, coef.scale, out=out).add_(bias)
    if coef.mix is None:
        return g
    assert shortfall is not None
    return g.addcmul_(shortfall.log, coef.mix)


def slope_product_(grad_logits: Tensor, coef: Coefficients, shortfall: Shortfall | None,
                   out: Tensor | None = None) -> Tensor:
    """grad_logits * dg/ds = grad * scale - (grad * mix) / u, added to ``out`` when given,
    without a dg/ds buffer (the tiled backward sums both directions; ``grad_logits`` is
    consumed)."""
    if out is None:
        out = grad_logits * coef.scale
    else:
        out.addcmul_(grad_logits, coef.scale)
    if coef.mix is None:
        return out
    assert shortfall is not None and shortfall.inverse is not None
    return out.addcmul_(grad_logits.mul_(coef.mix), shortfall.inverse, value=-1.0)


class LogitPolicy(Protocol):
    @property
    def tail(self) -> WeinceConfig | None:
        """The tail-fit constants when the logits need each anchor's negative tail."""

    def row_state(self, sims: Tensor, positive_index: Tensor, candidate_mask: Tensor | None,
                  anchors: Tensor) -> RowState:
        """Per-anchor constants computed once from the (detached) similarities."""

    def coefficients(self, state: RowState, temperature: Tensor) -> Coefficients:
        """The per-anchor constants of the logits of ``state``'s anchors."""

    def shortfall(self, sims: Tensor, slope: bool, out: Tensor | None = None
                  ) -> Shortfall | None:
        """The per-entry log-shortfall terms (None when the logits have none), log u in
        ``out`` when given; ``slope``: also 1/u, which only the backward needs."""

    def slope(self, sims: Tensor, coef: Coefficients, out: Tensor | None = None) -> Tensor:
        """dg/ds of a block of similarities (``coef`` broadcast to it), in ``out`` when
        given (a scalar when it is one)."""

    def logits(self, sims: Tensor, state: RowState, temperature: Tensor
               ) -> LogitBlock:
        """Logits g of a block of rows, with dg/ds and dg/dtau."""


def _block(policy: LogitPolicy, sims: Tensor, state: RowState,
           temperature: Tensor) -> LogitBlock:
    """A policy's logits of a block of anchor rows, from its coefficients and shortfall."""
    coef = policy.coefficients(state, temperature)
    if coef.mix is not None:
        coef = coef.part(slice(None), 0)
    tau_weight = None if coef.tau_weight is None else coef.tau_weight.squeeze(1)
    return LogitBlock(mixed_logits(sims, coef, policy.shortfall(sims, slope=False)),
                      policy.slope(sims, coef), tau_weight)


@dataclass(frozen=True)
class ScaledCosine:
    """g_ij = s_ij / tau."""

    @property
    def tail(self) -> None:
        return None

    def row_state(self, sims: Tensor, positive_index: Tensor, candidate_mask: Tensor | None,
                  anchors: Tensor) -> None:
        return None

    def coefficients(self, state: RowState, temperature: Tensor) -> Coefficients:
        return Coefficients(1.0 / temperature, None, None)

    def shortfall(self, sims: Tensor, slope: bool, out: Tensor | None = None) -> None:
        return None

    def slope(self, sims: Tensor, coef: Coefficients, out: Tensor | None = None) -> Tensor:
        return coef.scale

    def logits(self, sims: Tensor, state: RowState, temperature: Tensor
               ) -> LogitBlock:
        return _block(self, sims, state, temperature)


@dataclass(frozen=True)
class WeinceMixture:
    """WEINCE's t-lambda select logits, g = (1 - lam) s / tau + lam * (-log(1 - min(s, 1 - eps)))
    (see :mod:`batchscale.losses.weince_tail` for lam): scale = (1 - lam) / tau, mix = -lam."""

    config: WeinceConfig = field(default_factory=WeinceConfig)
    gather_anchors: AnchorPool | None = None  # rho0 over every rank's anchors

    @property
    def tail(self) -> WeinceConfig:
        return self.config

    def row_state(self, sims: Tensor, positive_index: Tensor, candidate_mask: Tensor | None,
                  anchors: Tensor) -> WeinceLambda:
        return weince_lambda(sims, positive_index, candidate_mask, anchors, self.config,
                             self.gather_anchors)

    def coefficients(self, state: RowState, temperature: Tensor) -> Coefficients:
        assert state is not None
        lam = state.lam.to(temperature.dtype)
        plain_weight = 1.0 - lam
        return Coefficients(plain_weight / temperature, lam.neg(), plain_weight)

    def shortfall(self, sims: Tensor, slope: bool, out: Tensor | None = None) -> Shortfall:
        # log(1 - min(s, 1 - eps)) as log1p(-min(...)): in place, with no rounded 1 - s, and
        # fewer passes than rsub, clamp and log (benchmarks/README.md)
        log = torch.neg(sims, out=out).clamp_min_(-(1.0 - self.config.eps)).log1p_()
        return Shortfall(log, self._inverse(sims) if slope else None)

    def _shortfall_u(self, sims: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """u = 1 - min(s, 1 - eps), and where it was clamped (None: nowhere)."""
        floor = _clamp_floor(self.config.eps, sims.dtype)
        # u = max(1 - s, 1 - (1 - eps)) exactly: 1 - s is exact for s >= 1/2 (Sterbenz), and
        # below that both sides round the same 1 - s. So u == floor marks exactly the clamped
        # entries, where the log term has no gradient.
        u = torch.sub(sims.new_ones(()), sims, out=out).clamp_min_(floor)
        if not host_reads_are_free(sims.device):  # no read per tile: the device would idle
            return u, u <= floor
        # Clamped entries are rare (s within eps of 1: duplicates); a min is a single pass
        # where a bool mask and its any() make two and a buffer (benchmarks/README.md).
        return u, (u <= floor) if bool(u.amin() <= floor) else None

    def _inverse(self, sims: Tensor) -> Tensor:
        """1/u, and 0 where u was clamped."""
        u, clamped = self._shortfall_u(sims, None)
        inverse = u.reciprocal_()
        return inverse if clamped is None else inverse.masked_fill_(clamped, 0.0)

    def slope(self, sims: Tensor, coef: Coefficients, out: Tensor | None = None) -> Tensor:
        """scale - mix / u, in place over u (an addcdiv with per-anchor operands would take
        torch's unvectorised loop; benchmarks/README.md)."""
        assert coef.mix is not None
        u, clamped = self._shortfall_u(sims, out)
        slope = torch.div(coef.mix.neg(), u, out=u)
        if clamped is not None:
            slope.masked_fill_(clamped, 0.0)
        return slope.add_(coef.scale)

    def logits(self, sims: Tensor, state: RowState, temperature: Tensor
               ) -> LogitBlock:
        return _block(self, sims, state, temperature)


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs no more than the read: on the CPU
    it waits for nothing; on a GPU it waits for every kernel queued before it."""
    return device.type == "cpu"


@functools.cache
def _clamp_floor(eps: float, dtype: torch.dtype) -> float:
    """1 - (1 - eps) rounded as ``dtype`` rounds it: the smallest shortfall u."""
    return 1.0 - torch.tensor(1.0 - eps, dtype=dtype).item()


def gather_anchors_of(policy: LogitPolicy) -> AnchorPool | None:
    """The policy's all-gather of every rank's anchors for batch statistics (WEINCE's rho0)."""
    return policy.gather_anchors if isinstance(policy, WeinceMixture) else None


def weince_logits(sims: Tensor, lam: Tensor, temperature: float | Tensor, eps: float) -> Tensor:
    """g_ij = (1 - lambda_i) s_ij / tau + lambda_i (-log(1 - min(s_ij, 1 - eps))), given each
    row's lambda (a plain, differentiable reference of :class:`WeinceMixture`'s logits)."""
    lam = lam.to(sims.dtype)[:, None]
    return (1.0 - lam) * sims / temperature - lam * torch.log1p(-torch.clamp(sims, max=1 - eps))


PLAIN_LOGITS = ScaledCosine()
