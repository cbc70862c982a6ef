from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import pytest
import torch

from shared.sampler import SamplingParams, sample

GREEDY = SamplingParams(temperature=0.0)


def crafted_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log().unsqueeze(0)


def draw_many(logits: torch.Tensor, params: SamplingParams, n: int) -> Counter[int]:
    # Distinct output indices give distinct, fixed draws: a deterministic "random" sample.
    return Counter(sample(logits, [params], [i])[0][0] for i in range(n))


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    tokens, _ = sample(logits, [GREEDY] * 5, [0] * 5)
    assert tokens == logits.argmax(-1).tolist()


def test_logprobs_are_unmodified_log_softmax() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3
    params = [
        GREEDY,
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(top_k=5, seed=2),
        SamplingParams(temperature=1.5, top_p=0.5, seed=3),
    ]
    tokens, lps = sample(logits, params, [0, 1, 2, 3])
    ref = torch.log_softmax(logits, -1)
    for row, (tok, lp) in enumerate(zip(tokens, lps, strict=True)):
        assert lp == pytest.approx(ref[row, tok].item(), abs=1e-6)


def test_seeded_draws_are_reproducible() -> None:
    logits = torch.randn(1, 5000, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=1.0, seed=1234)
    first = [sample(logits, [p], [i])[0][0] for i in range(20)]
    second = [sample(logits, [p], [i])[0][0] for i in range(20)]
    assert first == second
    assert len(set(first)) > 10  # flat-ish distribution: indices give different draws
    other = [sample(logits, [SamplingParams(seed=99)], [i])[0][0] for i in range(20)]
    assert other != first


def test_seeded_draw_is_reproducible_across_processes() -> None:
    code = (
        "import torch; from shared.sampler import SamplingParams, sample;"
        "g = torch.Generator().manual_seed(3); logits = torch.randn(1, 5000, generator=g);"
        "print(sample(logits, [SamplingParams(seed=7, top_p=0.9)], [5])[0][0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    logits = torch.randn(1, 5000, generator=torch.Generator().manual_seed(3))
    assert int(out) == sample(logits, [SamplingParams(seed=7, top_p=0.9)], [5])[0][0]


def test_batch_rows_are_independent() -> None:
    logits = torch.randn(3, 800, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(seed=s) for s in (1, 2, 3)]
    batched, _ = sample(logits, params, [4, 5, 6])
    alone = [sample(logits[i : i + 1], [params[i]], [4 + i])[0][0] for i in range(3)]
    assert batched == alone


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(6, 2000, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(6)]
    tokens, _ = sample(logits, params, list(range(6)))
    assert tokens == logits.argmax(-1).tolist()


def test_top_k_restricts_to_k_best() -> None:
    logits = crafted_logits([0.05, 0.4, 0.1, 0.3, 0.15])
    seen = draw_many(logits, SamplingParams(top_k=2, seed=0), 400)
    assert set(seen) == {1, 3}


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p: float, kept: set[int]) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    seen = draw_many(crafted_logits(probs), SamplingParams(top_p=top_p, seed=11), 2000)
    assert set(seen) == kept
    # Within the kept set, frequencies follow the renormalised probabilities.
    mass = sum(probs[i] for i in kept)
    for tok in kept:
        expected = probs[tok] / mass
        assert seen[tok] / 2000 == pytest.approx(expected, abs=4 * math.sqrt(expected / 2000))


def test_temperature_sharpens_and_flattens() -> None:
    logits = crafted_logits([0.6, 0.3, 0.1])
    cold = draw_many(logits, SamplingParams(temperature=0.25, seed=3), 1000)
    hot = draw_many(logits, SamplingParams(temperature=4.0, seed=3), 1000)
    # p^(1/T) renormalised: T=0.25 gives ~[0.94, 0.06, 0.001]; T=4 ~[0.40, 0.34, 0.26].
    assert 900 < cold[0] < 975 and cold[2] < 10
    assert 300 < hot[0] < 520 and hot[2] > 180


def test_invalid_params() -> None:
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 4), [GREEDY], [0])
