r"""NT-Xent (SimCLR; Chen et al., ICML 2020) in the 2N layout, plain or with WEINCE.

The two views z_i, z_j (N x d) are stacked into 2N rows of cosine similarities. Row r's
positive is row (r + N) mod 2N; its negatives are every other row except itself (within-view
ones included):

    L = (1 / 2N) sum_r -log softmax_{c != r}(g_rc)[(r + N) mod 2N]

with g = s / tau (``method="infonce"``) or WEINCE's t-lambda select logits
(``method="weince"``). This is the layout of the WEINCE authors' code and of unsupervised
SimCSE (z_i, z_j: two dropout views of the same sentences).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._checks import check_choice, check_embeddings, check_same_layout, check_temperature
from .batch_softmax import direction_loss
from .logits import LogitPolicy, ScaledCosine, WeinceMixture
from .similarity import normalize
from .weince_tail import WeinceConfig, WeinceStats


def nt_xent(z_i: Tensor, z_j: Tensor, temperature: float | Tensor = 0.5, *,
            method: Literal["infonce", "weince"] = "infonce",
            config: WeinceConfig | None = None, return_stats: bool = False,
            **weince_options: object) -> Tensor | tuple[Tensor, WeinceStats]:
    """NT-Xent over two views; returns a 0-dim tensor (and WEINCE's :class:`WeinceStats`
    with ``return_stats=True`` and ``method="weince"``)."""
    caller = "nt_xent"
    check_temperature(caller, temperature)
    check_choice(caller, "method", method, ("infonce", "weince"))
    check_embeddings(caller, "z_i", z_i)
    check_embeddings(caller, "z_j", z_j)
    check_same_layout(caller, "z_i", z_i, "z_j", z_j)
    policy: LogitPolicy
    if method == "weince":
        if config is None:
            config = WeinceConfig.from_kwargs(caller, **weince_options)
        policy = WeinceMixture(config)
    else:
        if weince_options or config is not None:
            raise ValueError(f"{caller}: WEINCE options given with method='infonce'")
        policy = ScaledCosine()

    n = z_i.shape[0]
    z = normalize(torch.cat([z_i, z_j]), "l2")
    sims = z @ z.T
    rows = torch.arange(2 * n, device=z.device)
    positive = (rows + n) % (2 * n)
    not_self = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
    loss, state = direction_loss(sims, positive, not_self, None, policy, temperature, 2 * n)
    if return_stats:
        if state is None:
            raise ValueError(f"{caller}: `return_stats` needs method='weince'")
        return loss, WeinceStats.from_lambdas([state])
    return loss
