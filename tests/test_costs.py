"""Forward-cost calibration (``decodekit.costs``): measured once, kept on disk per machine,
model, dtype and batch size, read back by a new process instead of measured again."""

from __future__ import annotations

import json

import pytest
import torch

from decodekit import costs

from conftest import tiny_llama

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.measured_costs]


def named_tiny(name: str = "tiny/named", seed: int = 7):
    model = tiny_llama(seed, layers=1)
    model.config._name_or_path = name
    return model


def new_process(monkeypatch):
    """What a new process sees: no curve in memory."""
    monkeypatch.setattr(costs, "CURVES", {})


def no_timing(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(costs.time, "perf_counter", lambda: calls.append(1) or 0.0)
    return calls


def test_a_new_process_reads_the_curve_instead_of_measuring(monkeypatch, tmp_path):
    monkeypatch.setenv("DECODEKIT_COST_CACHE", str(tmp_path))
    new_process(monkeypatch)
    model = named_tiny()
    measured = costs.forward_cost_curve(model, 6, repeats=1).as_dict()
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["batch"] == 1
    new_process(monkeypatch)
    calls = no_timing(monkeypatch)
    assert costs.forward_cost_curve(named_tiny(), 6).as_dict() == measured and not calls


def test_a_larger_width_measures_only_the_missing_points(monkeypatch, tmp_path):
    monkeypatch.setenv("DECODEKIT_COST_CACHE", str(tmp_path))
    new_process(monkeypatch)
    first = costs.forward_cost_curve(named_tiny(), 4, repeats=1).as_dict()
    new_process(monkeypatch)
    wider = costs.forward_cost_curve(named_tiny(), 8, repeats=1).as_dict()
    assert set(wider) >= set(range(1, 9))
    assert wider[4] <= first[4]  # kept (or lowered by monotone), never re-measured upwards


@pytest.mark.parametrize("change", ["threads", "dtype", "batch", "name"])
def test_a_curve_is_never_read_for_another_machine_setting_or_model(monkeypatch, tmp_path, change):
    monkeypatch.setenv("DECODEKIT_COST_CACHE", str(tmp_path))
    model = named_tiny()
    key = costs.calibration_key(model, 1)
    if change == "threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
        other = costs.calibration_key(model, 1)
    elif change == "dtype":
        other = costs.calibration_key(model.to(torch.bfloat16), 1)
    elif change == "batch":
        other = costs.calibration_key(model, 2)
    else:
        other = costs.calibration_key(named_tiny("tiny/other"), 1)
    assert other != key and costs.calibration_file(other) != costs.calibration_file(key)


def test_an_unnamed_model_and_a_disabled_cache_write_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("DECODEKIT_COST_CACHE", str(tmp_path))
    new_process(monkeypatch)
    costs.forward_cost_curve(tiny_llama(7, layers=1), 3, repeats=1)  # no name: in memory only
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("DECODEKIT_COST_CACHE", "0")
    costs.forward_cost_curve(named_tiny(), 3, repeats=1)
    assert not list(tmp_path.iterdir())


def test_a_damaged_or_foreign_file_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("DECODEKIT_COST_CACHE", str(tmp_path))
    model = named_tiny()
    path = costs.calibration_file(costs.calibration_key(model, 1))
    path.write_text("{not json")
    new_process(monkeypatch)
    assert set(costs.forward_cost_curve(model, 3, repeats=1).points) >= {1, 2, 3}
    saved = json.loads(path.read_text())
    saved["key"]["cpu"] = "another CPU"
    path.write_text(json.dumps(saved))
    new_process(monkeypatch)
    calls = []
    real = costs.time.perf_counter
    monkeypatch.setattr(costs.time, "perf_counter", lambda: calls.append(1) or real())
    costs.forward_cost_curve(model, 3, repeats=1)
    assert calls  # a key that does not match is not this machine's curve


class SwitchingState:
    """A backend whose forward costs ``base(n)`` on a clock of its own, plus ``switch`` when
    its width differs from the forward before (llama.cpp rebuilds its compute graph)."""

    def __init__(self, clock: list[float], switch: float):
        self.clock, self.switch, self.last = clock, switch, 1
        self.ids = torch.zeros(1, 0, dtype=torch.long)

    def extend(self, tokens):
        n = tokens.shape[1]
        self.clock[0] += 0.010 + 0.005 * (n - 1) + (self.switch if n != self.last else 0.0)
        self.last = n

    def crop(self, n):
        pass


@pytest.mark.parametrize("switch", [0.0, 0.002])
def test_a_wider_step_is_charged_the_switch_into_and_out_of_its_width(monkeypatch, switch):
    clock = [0.0]
    monkeypatch.setattr(costs.time, "perf_counter", lambda: clock[0])
    inputs = {n: torch.zeros(1, n, dtype=torch.long) for n in (1, 2, 4)}
    t = costs.time_steps(SwitchingState(clock, switch), inputs, repeats=2)
    assert t[1] == pytest.approx(0.010)  # a one-token step after another pays no switch
    for n in (2, 4):
        assert t[n] == pytest.approx(0.010 + 0.005 * (n - 1) + 2 * switch)


def test_the_calibration_key_names_how_the_curve_was_measured():
    assert costs.calibration_key(named_tiny(), 1)["measure"] == costs.MEASURE
