"""count_macs, count_params, state_dict_bytes and measure_latency against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.measure import count_macs, count_params, measure_latency, state_dict_bytes


def test_linear_macs_are_in_times_out_plus_bias() -> None:
    assert count_macs(nn.Linear(8, 4), torch.zeros(1, 8)) == 8 * 4 + 4


def test_macs_are_per_example() -> None:
    net = nn.Conv2d(3, 4, 3, bias=False)
    assert count_macs(net, torch.zeros(5, 3, 6, 6)) == count_macs(net, torch.zeros(1, 3, 6, 6))


def test_conv_macs_count_every_output_position() -> None:
    conv = nn.Conv2d(3, 4, 3, bias=False)
    assert count_macs(conv, torch.zeros(2, 3, 6, 6)) == 3 * 4 * 9 * 4 * 4


def test_lstm_macs_are_per_token_gate_products() -> None:
    lstm = nn.LSTM(5, 6, batch_first=True)
    per_token = 4 * 6 * (5 + 6) + 2 * 4 * 6
    assert count_macs(lstm, torch.zeros(3, 7, 5)) == 7 * per_token


def test_count_macs_leaves_the_model_untouched() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout()).train()
    count_macs(net, torch.zeros(1, 4))
    assert net.training and not hasattr(net[0], "__flops__")


def test_params_and_state_dict_bytes() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert count_params(net) == 4 * 3 + 3 + 3 + 3
    floats = count_params(net) + 3 + 3  # running mean and var
    assert state_dict_bytes(net) == floats * 4 + 8  # num_batches_tracked is int64


def test_latency_is_a_positive_median_in_milliseconds() -> None:
    ms = measure_latency(nn.Linear(64, 64), torch.zeros(8, 64), runs=5, warmup=1)
    assert 0 < ms < 1000


def test_latency_restores_threads_and_training_flags() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.Dropout()).train()
    before = torch.get_num_threads()
    measure_latency(net, torch.zeros(2, 8), runs=3, warmup=0, threads=1)
    assert torch.get_num_threads() == before
    assert net.training and net[1].training


def test_latency_runs_without_building_a_graph() -> None:
    seen = []
    net = nn.Linear(4, 4)
    net.register_forward_hook(lambda _m, _i, out: seen.append(out.requires_grad))
    measure_latency(net, torch.zeros(1, 4), runs=2, warmup=1)
    assert seen == [False, False, False]


@pytest.mark.parametrize(("field", "kwargs"), [("runs", {"runs": 0}), ("warmup", {"warmup": -1}), ("threads", {"threads": 0})])
def test_bad_latency_settings_are_refused(field: str, kwargs: dict) -> None:
    with pytest.raises(SecateursError, match=f"{field}: got"):
        measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), **kwargs)


def test_docstring_examples_run() -> None:
    import doctest

    import secateurs.measure

    result = doctest.testmod(secateurs.measure, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("batch", [1, 32])
def test_a_linear_bias_counts_one_add_per_output_of_every_example(batch: int) -> None:
    # 64x256 weight: 256 * 64 multiply-accumulates and 64 bias adds per example, at any batch
    assert count_macs(nn.Linear(256, 64), torch.zeros(batch, 256)) == 256 * 64 + 64
    assert count_macs(nn.Linear(256, 64), torch.zeros(batch, 5, 256)) == 5 * (256 * 64 + 64)
