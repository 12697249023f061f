"""Quality metrics used by the benchmark."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from decodekit import continuation_loglik, distinct_n, exact_match, normalize_answer
from decodekit.cache import ModelState


def test_continuation_loglik_matches_token_by_token(llama):
    prompt, cont = [5, 6, 7, 8], [9, 40, 41, 3]
    total, mean = continuation_loglik(llama, prompt, torch.tensor(cont))
    state, logits = ModelState.prefill(llama, torch.tensor([prompt]))
    expected = 0.0
    with torch.inference_mode():
        for tok in cont:
            expected += float(torch.log_softmax(logits[0, -1].float(), -1)[tok])
            logits = state.extend(torch.tensor([[tok]]))
    assert total == pytest.approx(expected, abs=1e-4)
    assert mean == pytest.approx(expected / 4, abs=1e-5)
    assert total < 0


def test_continuation_loglik_edge_cases(llama):
    assert continuation_loglik(llama, [5, 6], []) == (0.0, 0.0)
    with pytest.raises(ValueError, match="prompt_ids"):
        continuation_loglik(llama, [], [5])


def test_distinct_n():
    assert distinct_n([1, 2, 3, 4], 1) == 1.0
    assert distinct_n([1, 1, 1, 1], 1) == 0.25
    assert distinct_n([1, 2, 1, 2, 1], 2) == 0.5  # (1,2),(2,1),(1,2),(2,1)
    assert distinct_n([1, 2], 3) == 0.0
    # corpus level: n-grams never span two sequences
    assert distinct_n([[1, 2], [2, 1]], 2) == 1.0
    assert distinct_n([[1, 2], [1, 2]], 2) == 0.5
    assert distinct_n(torch.tensor([7, 7, 8]), 1) == pytest.approx(2 / 3)
    assert distinct_n("the cat the cat".split(), 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        distinct_n([1, 2], 0)


def test_normalize_answer():
    assert normalize_answer("  The Answer is 1,000.0! ") == "answer is 1000"
    assert normalize_answer("3.5 apples.") == "3.5 apples"


@pytest.mark.parametrize("answer,gold,expected", [
    ("12 times 7 is 84.", "84", True),
    ("The answer is 184.", "84", False),
    ("It is 84.5", "84", False),
    ("The capital of France is Paris!", ["paris"], True),
    ("Eighty-four", ["84", "eighty four"], True),
    ("Paris, I think", "Paris", True),
    ("Rome", ["Paris", "Lutetia"], False),
    ("", "84", False),
])
def test_exact_match(answer, gold, expected):
    assert exact_match(answer, gold) is expected


def test_exact_match_strict():
    assert exact_match("Paris.", "paris", strict=True)
    assert not exact_match("It is Paris.", "paris", strict=True)


def test_shipped_qa_set_answers_match_themselves():
    lines = resources.files("decodekit").joinpath("data/qa.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    assert len(items) >= 15
    for item in items:
        assert item["prompt"].strip() and item["answer"]
        for alias in item["answer"]:
            assert exact_match(f"The answer is {alias}.", item["answer"]), alias
