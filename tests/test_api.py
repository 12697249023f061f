"""generate_super: one front door routed like transformers' generate (never samples unless asked)."""

from __future__ import annotations

import pytest

import decodekit.api as api
from decodekit import DecodeKitError, generate, generate_super

PROMPT = [[5, 17, 42, 8], [9, 60]]


@pytest.fixture
def routed(monkeypatch):
    """Replace ``generate`` by a recorder: returns the kwargs generate_super routed to."""
    calls = []

    def record(model, input_ids, attention_mask=None, **kwargs):
        calls.append(kwargs)
        return kwargs

    monkeypatch.setattr(api, "generate", record)
    return calls


def test_defaults_are_greedy(routed):
    generate_super(object(), PROMPT, max_new_tokens=5)
    assert routed[-1] == dict(strategy="greedy", max_new_tokens=5)  # no temperature: nothing samples


def test_temperature_zero_means_greedy(routed):
    generate_super(object(), PROMPT, do_sample=True, temperature=0, top_k=5)
    assert routed[-1]["strategy"] == "greedy" and "temperature" not in routed[-1]


def test_sampling_knobs_only_when_sampling(routed):
    generate_super(object(), PROMPT, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    assert routed[-1] == dict(strategy="sample", max_new_tokens=64, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    generate_super(object(), PROMPT, do_sample=False, temperature=0.7, top_k=5)
    assert routed[-1]["strategy"] == "greedy" and "top_k" not in routed[-1]


def test_beams_route_to_beam_search(routed):
    generate_super(object(), PROMPT, num_beams=4, length_penalty=0.5, early_stopping=True)
    assert routed[-1] == dict(strategy="beam", num_beams=4, max_new_tokens=64, length_penalty=0.5,
                              early_stopping=True)


def test_assistant_routes_to_speculative(routed):
    drafter = object()
    generate_super(object(), PROMPT, assistant_model=drafter, do_sample=True, temperature=0.5)
    assert routed[-1]["strategy"] == "speculative" and routed[-1]["drafter"] is drafter
    assert routed[-1]["temperature"] == 0.5


@pytest.mark.parametrize(
    "kwargs,needle",
    [(dict(num_beams=0), "num_beams"), (dict(num_beams=3, do_sample=True), "do_sample")],
)
def test_bad_routing_input(routed, kwargs, needle):
    with pytest.raises(DecodeKitError, match=needle):
        generate_super(object(), PROMPT, **kwargs)
    assert not routed


def test_end_to_end_on_a_tiny_model(llama):
    """Unpatched: generate_super gives exactly what the strategy it routes to gives."""
    assert generate_super(llama, PROMPT, max_new_tokens=6).sequences == generate(
        llama, PROMPT, strategy="greedy", max_new_tokens=6).sequences
    beam = generate_super(llama, PROMPT, num_beams=3, max_new_tokens=6, num_return_sequences=2)
    direct = generate(llama, PROMPT, strategy="beam", num_beams=3, max_new_tokens=6, num_return_sequences=2)
    assert beam.sequences == direct.sequences and beam.scores == direct.scores
    sampled = [generate_super(llama, PROMPT, do_sample=True, temperature=1.0, max_new_tokens=6, seed=7).sequences
               for _ in range(2)]
    assert sampled[0] == sampled[1] == generate(llama, PROMPT, strategy="sample", temperature=1.0,
                                                max_new_tokens=6, seed=7).sequences
