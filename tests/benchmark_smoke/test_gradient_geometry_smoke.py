"""gradient_geometry.py: the share of a gradient's squared norm that rank-r, top rows, top columns and MLP neurons
hold, against hand-computed matrices, and one run on the tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch
from testing_utils import load_benchmark


@pytest.fixture(scope="module")
def gg():
    return load_benchmark("gradient_geometry")


def test_rank_one_gradient_is_all_rank_and_spread_over_rows(gg):
    # g = u v^T with u = (1, 1, 1, 1) / 2 over 4 rows, v = e_0 of 6 columns: rank 1 holds everything,
    # the top row a quarter, the top column everything
    g = torch.zeros(4, 6)
    g[:, 0] = 0.5
    x = gg.captured_shares(g, share=0.25)  # r = 0.25 * 24 / 10 -> 1 (rounded), 1 row, 2 columns (0.25*6=1.5 -> 2)
    assert (x["r"], x["k_rows"], x["k_cols"]) == (1, 1, 2)
    assert x["rank"] == pytest.approx(1.0)
    assert x["rows"] == pytest.approx(0.25)
    assert x["columns"] == pytest.approx(1.0)
    assert x["random"] == 0.25 and x["energy"] == pytest.approx(1.0)


def test_diagonal_gradient_against_hand_values(gg):
    # diag(3, 2, 1, 1) (4 x 4): energy 15; r = 0.5 * 16 / 8 = 1 -> 9/15; 2 rows / 2 columns -> (9 + 4) / 15
    g = torch.diag(torch.tensor([3.0, 2.0, 1.0, 1.0]))
    x = gg.captured_shares(g, share=0.5)
    assert x["rank"] == pytest.approx(9 / 15)
    assert x["rows"] == pytest.approx(13 / 15) and x["columns"] == pytest.approx(13 / 15)


def test_zero_gradient_is_refused(gg):
    with pytest.raises(ValueError, match="zero"):
        gg.captured_shares(torch.zeros(3, 3), 0.5)


def test_mlp_neuron_share_against_hand_values(gg):
    # 4 neurons: gate/up rows and down columns; neuron energies 1+0+4=5, 0, 1, 0 (total 6); top 1 (share 0.25) = 5/6
    gate = torch.zeros(4, 3)
    up = torch.zeros(4, 3)
    down = torch.zeros(3, 4)
    gate[0, 0] = 1.0
    down[:, 0] = torch.tensor([2.0, 0.0, 0.0])
    up[2, 1] = 1.0
    assert gg.mlp_neuron_share(gate, up, down, 0.25) == pytest.approx(5 / 6)
    assert gg.mlp_neuron_share(gate, up, down, 0.5) == pytest.approx(1.0)


def test_tiny_run_writes_every_unit_and_the_batch_counts(gg, tmp_path):
    out = tmp_path / "g.json"
    res = gg.main(["--preset", "tiny", "--batches", "2", "--threads", "1", "--json", str(out)], log=lambda s: None)
    saved = json.loads(out.read_text())
    assert saved["batches"] == 2 and set(saved["by_batches"]) == {"1", "2"}
    for s in ("0.018", "0.09"):
        summary = res["shares"][s]["summary"]
        assert {"q_proj", "down_proj", "all"} <= set(summary)
        for v in summary.values():
            for u in ("rank", "rows", "columns"):
                assert 0.0 < v[u] <= 1.0 + 1e-9
        assert 0.0 < summary["all"]["mlp_neurons"] <= 1.0
    with pytest.raises(SystemExit, match="exists"):
        gg.main(["--preset", "tiny", "--batches", "1", "--json", str(out)], log=lambda s: None)
    with pytest.raises(SystemExit, match="share"):
        gg.main(["--preset", "tiny", "--shares", "0,0.5"], log=lambda s: None)
