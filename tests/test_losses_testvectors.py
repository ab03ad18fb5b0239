"""nt_xent against the WEINCE authors' own outputs (../shared/testvectors)."""

import json
from pathlib import Path

import pytest
import torch

from batchscale.losses import nt_xent

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testvectors" / "weince_simclr.json"
CASES = json.loads(VECTORS.read_text())["cases"]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['policy']}-seed{c['seed']}")
def test_nt_xent_reproduces_authors_code(case: dict) -> None:
    z_i = torch.tensor(case["z_i"], dtype=torch.float64, requires_grad=True)
    z_j = torch.tensor(case["z_j"], dtype=torch.float64, requires_grad=True)
    method = "infonce" if case["policy"] == "pl" else "weince"
    if method == "weince":
        loss, stats = nt_xent(z_i, z_j, temperature=case["temperature"], method=method,
                              return_stats=True)
        assert stats.mean_lambda == pytest.approx(case["mean_lambda"], rel=1e-8)
        assert stats.mean_lambda_rho == pytest.approx(case["mean_lambda_rho"], rel=1e-8)
        assert stats.mean_lambda_aic == pytest.approx(case["mean_lambda_aic"], rel=1e-8)
    else:
        loss = nt_xent(z_i, z_j, temperature=case["temperature"], method=method)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(case["loss"], rel=1e-8)
    loss.backward()
    assert _rel(z_i.grad, torch.tensor(case["grad_z_i"], dtype=torch.float64)) < 1e-8
    assert _rel(z_j.grad, torch.tensor(case["grad_z_j"], dtype=torch.float64)) < 1e-8
