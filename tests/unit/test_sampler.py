from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from collections import Counter

import pytest
import torch

from kernels import cpu_kernels
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc.convert import sampling_from_pb, sampling_to_pb
from shared.sampler import (
    TOP_P_TOLERANCE,
    SamplingParams,
    TokenHistory,
    greedy,
    processed_logits,
    sample,
    token_distribution,
)

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


def test_greedy_takes_the_first_of_tied_maxima() -> None:
    logits = torch.zeros(32, 49152)
    logits[:, 30000] = logits[:, 100] = 1.0
    logits[5, 20] = 1.0
    tokens, _ = sample(logits, [GREEDY] * 32, [0] * 32)
    assert tokens == logits.argmax(-1).tolist() == [100] * 5 + [20] + [100] * 26


@pytest.mark.parametrize("vocab", [1, 15, 49152, 49157])
def test_greedy_kernel_equals_torch(vocab: int) -> None:
    """The CPU kernel greedy() uses: torch's argmax on every row shape, ties, -inf rows
    and a strided view."""
    assert cpu_kernels.available(), "CPU kernels did not build (see the log)"
    wide = torch.randn(16, 2 * vocab, generator=torch.Generator().manual_seed(vocab))
    logits = wide[:, ::2]  # not contiguous
    logits[1] = float("-inf")
    logits[2, vocab // 2] = logits[2, vocab - 1] = 1e9
    logits[3, vocab - 1] = 1e9
    expected = logits.argmax(dim=-1)
    assert torch.equal(cpu_kernels.greedy_rows(logits), expected)
    assert torch.equal(greedy(logits), expected)


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


# --- logit_bias and penalties: the logits, computed by hand -----------------------------

# Every value here and in the expected logits below is exact in float32.
RAW = [2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.5, -0.5]
PROMPT = [0, 1, 1]
ANSWER = [3, 3, 4, 6]


def one_row(values: list[float]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


def test_penalties_and_bias_change_the_logits_as_specified() -> None:
    params = SamplingParams(
        temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
        logit_bias=((2, 1.0), (5, -3.0)), max_new_tokens=8,
    )
    got = processed_logits(one_row(RAW), [params], [4], histories=[TokenHistory(PROMPT, ANSWER)])
    # logit_bias, then repetition (prompt or answer: /2 if > 0, *2 if not), then
    # frequency (0.5 x count in the answer), then presence (0.25 if in the answer).
    expected = [
        2.0 / 2,  # prompt only: repetition only
        -1.0 * 2,  # twice in the prompt: still once
        0.5 + 1.0,  # biased, never seen
        3.0 / 2 - 0.5 * 2 - 0.25,  # twice in the answer
        -2.0 * 2 - 0.5 * 1 - 0.25,
        0.0 - 3.0,
        1.5 / 2 - 0.5 * 1 - 0.25,
        -0.5,
    ]
    assert got[0].tolist() == expected


def test_frequency_and_presence_count_the_answer_only() -> None:
    params = SamplingParams(temperature=0, frequency_penalty=-1.0, presence_penalty=2.0)
    got = processed_logits(one_row(RAW), [params], [4], histories=[TokenHistory(PROMPT, ANSWER)])
    expected = list(RAW)
    expected[3] = 3.0 + 1.0 * 2 - 2.0
    expected[4] = -2.0 + 1.0 - 2.0
    expected[6] = 1.5 + 1.0 - 2.0
    assert got[0].tolist() == expected


def test_greedy_is_the_argmax_after_bias_and_penalties() -> None:
    logits = one_row(RAW)
    history = [TokenHistory(PROMPT, ANSWER)]
    plain, _ = sample(logits, [GREEDY], [4], histories=history)
    assert plain == [3]  # the model's own argmax
    bias = ((2, 1.01),)  # 0.5 -> 1.51: not enough to beat 3.0, enough to beat 3.0 / 2
    assert sample(logits, [SamplingParams(temperature=0, logit_bias=bias)], [4])[0] == [3]
    penalised = SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias=bias)
    tokens, logprobs = sample(logits, [penalised], [4], histories=history)
    assert tokens == [2]
    # The logprob stays the model's own, before any of it.
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[0, 2].item(), abs=1e-6)


def test_penalties_need_histories() -> None:
    with pytest.raises(ValueError, match="histories"):
        sample(one_row(RAW), [SamplingParams(presence_penalty=0.5)], [0])
    with pytest.raises(ValueError, match="one entry per row"):
        sample(one_row(RAW), [GREEDY], [0], histories=[])
    # Bias and min_new_tokens need no history.
    tokens, _ = sample(one_row(RAW), [SamplingParams(temperature=0, logit_bias=((7, 50.0),))], [0])
    assert tokens == [7]


def test_penalties_ignore_ids_outside_the_vocabulary() -> None:
    params = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=1.0)
    got = processed_logits(one_row(RAW), [params], [1], histories=[TokenHistory([99], [1234])])
    assert got[0].tolist() == RAW


def reference_penalties(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[TokenHistory]
) -> torch.Tensor:
    """The specification, one row and one token at a time."""
    out = logits.clone()
    for row, (p, h) in enumerate(zip(params, histories, strict=True)):
        for token, bias in p.logit_bias:
            out[row, token] += bias
        for token in set(h.prompt_token_ids) | set(h.output_token_ids):
            if p.repetition_penalty != 1:
                value = out[row, token]
                out[row, token] = (
                    value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
                )
        for token in set(h.output_token_ids):
            count = h.output_token_ids.count(token)
            out[row, token] -= torch.tensor(p.frequency_penalty) * count
            out[row, token] -= torch.tensor(p.presence_penalty)
    return out


def test_vectorised_penalties_equal_the_reference_on_a_batch() -> None:
    gen = torch.Generator().manual_seed(21)
    batch, vocab = 32, 3000
    logits = torch.randn(batch, vocab, generator=gen) * 3
    params, histories = [], []
    for row in range(batch):
        # Every fourth row asks for nothing: its logits must stay as they are.
        active = row % 4 != 0
        params.append(SamplingParams(
            temperature=0,
            repetition_penalty=[1.0, 1.3, 0.7][row % 3] if active else 1.0,
            frequency_penalty=(row % 5 - 2) * 0.4 if active else 0.0,
            presence_penalty=(row % 7 - 3) * 0.5 if active else 0.0,
            logit_bias=((row * 7 % vocab, 5.0), (row * 13 % vocab, -50.0)) if row % 2 else (),
        ))
        # Small id ranges: many repeats, in the prompt, the answer, and both.
        prompt = torch.randint(0, 300, (int(torch.randint(1, 400, (), generator=gen)),),
                               generator=gen).tolist()
        answer = torch.randint(200, 400, (row * 3,), generator=gen).tolist()
        histories.append(TokenHistory(prompt, answer))
    got = processed_logits(logits, params, [len(h.output_token_ids) for h in histories],
                           histories=histories)
    torch.testing.assert_close(got, reference_penalties(logits, params, histories),
                               rtol=0, atol=1e-6)
    assert torch.equal(got[0], logits[0])


# --- truncation: exactly the right tokens -----------------------------------------------

SIX = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]


def support(params: SamplingParams, probs: list[float] = SIX) -> dict[int, float]:
    dist = token_distribution(crafted_logits(probs), [params], [0])[0]
    return {i: round(float(v), 6) for i, v in enumerate(dist.tolist()) if v > 0}


def renormalised(probs: list[float], kept: list[int]) -> dict[int, float]:
    mass = sum(probs[i] for i in kept)
    return {i: round(probs[i] / mass, 6) for i in kept}


@pytest.mark.parametrize(
    ("min_p", "kept"),
    [(0.0, [0, 1, 2, 3, 4, 5]), (0.05, [0, 1, 2, 3, 4, 5]), (0.2, [0, 1, 2, 3]),
     (0.3, [0, 1, 2]), (0.5, [0, 1]), (0.7, [0]), (1.0, [0])],
)
def test_min_p_keeps_tokens_at_least_min_p_times_the_best(min_p: float, kept: list[int]) -> None:
    # Thresholds 0.02, 0.08, 0.12, 0.2, 0.28, 0.4 against 0.4 x min_p.
    assert support(SamplingParams(min_p=min_p)) == renormalised(SIX, kept)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.3, [0]), (0.4, [0]), (0.45, [0, 1]), (0.65, [0, 1]), (0.66, [0, 1, 2]),
     (0.8, [0, 1, 2]), (0.81, [0, 1, 2, 3]), (0.9, [0, 1, 2, 3]), (0.97, [0, 1, 2, 3, 4, 5])],
)
def test_top_p_keeps_the_smallest_prefix_reaching_it(top_p: float, kept: list[int]) -> None:
    assert support(SamplingParams(top_p=top_p)) == renormalised(SIX, kept)


def test_truncations_apply_in_order_top_k_top_p_min_p() -> None:
    # top_p measures the top-k renormalised: 0.4/0.9 + 0.25/0.9 = 0.72 reaches 0.7,
    # where over the whole distribution 0.65 would not.
    assert support(SamplingParams(top_k=4, top_p=0.7)) == renormalised(SIX, [0, 1])
    assert support(SamplingParams(top_p=0.7)) == renormalised(SIX, [0, 1, 2])
    # min_p last, on what top_k and top_p kept.
    assert support(SamplingParams(top_k=5, top_p=0.9, min_p=0.3)) == renormalised(SIX, [0, 1, 2])
    # Temperature before all of them: T=0.5 squares the probabilities (0.16, 0.0625, ...).
    squared = [q * q for q in SIX]
    total = sum(squared)
    expected = renormalised([q / total for q in squared], [0, 1])
    assert support(SamplingParams(temperature=0.5, top_p=0.8)) == expected


def reference_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """A full sort; a prefix reaches top_p within the sampler's relative tolerance."""
    order = torch.sort(probs.double(), descending=True, stable=True)
    before = torch.cumsum(order.values, 0) - order.values
    cutoff = top_p * float(order.values.sum()) * (1 - TOP_P_TOLERANCE)
    return set(order.indices[before < cutoff].tolist())


@pytest.mark.parametrize("scale", [0.3, 2.0, 6.0])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_on_a_large_vocabulary_equals_a_full_sort(scale: float, top_p: float) -> None:
    # Flat (scale 0.3: thousands of tokens in the nucleus) to peaked (scale 6).
    logits = torch.randn(1, 49152, generator=torch.Generator().manual_seed(31)) * scale
    dist = token_distribution(logits, [SamplingParams(top_p=top_p)], [0])[0]
    kept = set(torch.nonzero(dist).squeeze(1).tolist())
    assert kept == reference_nucleus(torch.softmax(logits[0], -1), top_p)
    probs = torch.softmax(logits[0].double(), -1)
    idx = sorted(kept)
    torch.testing.assert_close(dist[idx], probs[idx] / probs[idx].sum(), rtol=1e-5, atol=0)


def test_draws_stay_inside_the_kept_tokens() -> None:
    logits = torch.randn(1, 5000, generator=torch.Generator().manual_seed(8)) * 2
    for params in (SamplingParams(top_p=0.6, seed=1), SamplingParams(min_p=0.2, seed=2),
                   SamplingParams(top_k=7, top_p=0.9, min_p=0.05, seed=3)):
        dist = token_distribution(logits, [params], [0])[0]
        # One batch of 300 copies of the row: each row index gives its own draw.
        drawn = set(sample(logits.repeat(300, 1), [params] * 300, list(range(300)))[0])
        assert all(dist[t] > 0 for t in drawn)
        assert len(drawn) > 1


# --- logit_bias and min_new_tokens ------------------------------------------------------


def test_logit_bias_forces_and_blocks_tokens() -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(9)) * 3
    best = logits.argmax(-1).tolist()
    forced = [SamplingParams(temperature=t, logit_bias=((17, 100.0),), seed=i)
              for i, t in enumerate((0.0, 0.7, 1.0, 1.5))]
    for index in range(20):
        assert sample(logits, forced, [index] * 4)[0] == [17] * 4
    blocked = [SamplingParams(temperature=0, logit_bias=((b, -100.0),)) for b in best]
    runner_up = logits.topk(2, -1).indices[:, 1].tolist()
    assert sample(logits, blocked, [0] * 4)[0] == runner_up
    dist = token_distribution(
        logits[:1], [SamplingParams(logit_bias=((best[0], -100.0),))], [0]
    )
    assert float(dist[0, best[0]]) < 1e-30


def test_logit_bias_outside_the_vocabulary_is_an_error() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        sample(one_row(RAW), [SamplingParams(logit_bias=((8, 1.0),))], [0])


def test_min_new_tokens_masks_the_stop_ids_until_reached() -> None:
    logits = one_row(RAW)  # argmax 3, then 0
    params = SamplingParams(temperature=0, stop_token_ids=(3, 6), min_new_tokens=2)
    assert sample(logits, [params], [0])[0] == [0]
    assert sample(logits, [params], [1])[0] == [0]
    assert sample(logits, [params], [2])[0] == [3]
    hot = SamplingParams(temperature=1.0, stop_token_ids=(3, 6), min_new_tokens=2, seed=0)
    dist = token_distribution(logits, [hot], [1])[0]
    assert dist[3] == dist[6] == 0 and dist.sum() == pytest.approx(1.0)
    assert all(sample(logits, [hot], [1])[0][0] not in (3, 6) for _ in range(200))
    assert token_distribution(logits, [hot], [2])[0][3] > 0


# --- batches ----------------------------------------------------------------------------


def mixed_batch() -> tuple[list[SamplingParams], list[TokenHistory]]:
    gen = torch.Generator().manual_seed(12)
    params = [
        GREEDY,
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=1.2, top_k=40, seed=2),
        SamplingParams(temperature=0.9, top_p=0.8, seed=3, repetition_penalty=1.3),
        SamplingParams(min_p=0.1, frequency_penalty=1.0, presence_penalty=0.5, seed=4),
        SamplingParams(temperature=0, repetition_penalty=1.5, logit_bias=((3, 4.0),)),
        SamplingParams(top_k=100, top_p=0.95, min_p=0.02, seed=5, stop_token_ids=(2,),
                       min_new_tokens=16, logit_bias=((2, 30.0), (9, -5.0))),
        SamplingParams(temperature=0.6, top_p=0.5, seed=None),
    ]
    histories = [
        TokenHistory(torch.randint(0, 2000, (50,), generator=gen).tolist(),
                     torch.randint(0, 2000, (i * 4,), generator=gen).tolist())
        for i in range(len(params))
    ]
    return params, histories


def test_a_mixed_batch_equals_each_row_sampled_alone() -> None:
    params, histories = mixed_batch()
    logits = torch.randn(len(params), 2000, generator=torch.Generator().manual_seed(13)) * 4
    untouched = logits.clone()
    seeded = [i for i, p in enumerate(params) if p.seed is not None or p.greedy]
    for step in range(5):
        index = [step + i for i in range(len(params))]
        tokens, logprobs = sample(logits, params, index, histories=histories)
        for i in seeded:
            alone = sample(logits[i : i + 1], [params[i]], [index[i]], histories=[histories[i]])
            assert (tokens[i], logprobs[i]) == (alone[0][0], alone[1][0]), i
        dist = token_distribution(logits, params, index, histories=histories)
        for i in range(len(params)):
            alone_dist = token_distribution(
                logits[i : i + 1], [params[i]], [index[i]], histories=[histories[i]]
            )
            assert torch.equal(dist[i], alone_dist[0])
            assert dist[i, tokens[i]] > 0  # every draw is a token it may draw
    assert torch.equal(logits, untouched)  # the caller's logits are never written


def test_top_k_one_is_greedy_with_penalties() -> None:
    params, histories = mixed_batch()
    logits = torch.randn(len(params), 2000, generator=torch.Generator().manual_seed(14))
    top1 = [
        dataclasses.replace(p, temperature=1.0, top_k=1, seed=5)
        for p in params
    ]
    greedy = [dataclasses.replace(p, temperature=0.0) for p in params]
    index = [3] * len(params)
    assert (sample(logits, top1, index, histories=histories)[0]
            == sample(logits, greedy, index, histories=histories)[0])


# --- parameters and their wire form -----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": math.nan}, {"temperature": math.inf}, {"top_p": 1.5},
        {"top_p": math.nan}, {"min_p": -0.1}, {"min_p": 1.1},
        {"frequency_penalty": 2.5}, {"presence_penalty": -2.01},
        {"presence_penalty": math.nan}, {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0}, {"repetition_penalty": math.inf},
        {"max_new_tokens": 0}, {"min_new_tokens": -1},
        {"min_new_tokens": 17, "max_new_tokens": 16}, {"stop_token_ids": (-1,)},
        {"logit_bias": ((1, 101.0),)}, {"logit_bias": ((1, -100.5),)},
        {"logit_bias": ((-1, 1.0),)}, {"logit_bias": ((3, 1.0), (3, 2.0))},
        {"logit_bias": ((3, math.nan),)},
    ],
)
def test_out_of_range_params_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_token_history_split() -> None:
    history = TokenHistory.split([5, 6, 7, 8, 9], 2)
    assert (list(history.prompt_token_ids), list(history.output_token_ids)) == ([5, 6, 7], [8, 9])
    assert list(TokenHistory.split([5, 6], 0).output_token_ids) == []
    with pytest.raises(ValueError):
        TokenHistory.split([5, 6], 3)


def test_params_survive_the_wire() -> None:
    params = SamplingParams(
        temperature=0.5, top_p=0.75, top_k=40, seed=2**63 + 5, max_new_tokens=30,
        stop_token_ids=(2, 7), min_p=0.125, frequency_penalty=-1.5, presence_penalty=0.25,
        repetition_penalty=1.25, min_new_tokens=4, logit_bias=((9, -100.0), (12, 2.5)),
    )
    wire = pb.SamplingParams.FromString(sampling_to_pb(params).SerializeToString())
    assert sampling_from_pb(wire) == params
    # Zeros on the wire are the defaults ("off").
    assert sampling_from_pb(pb.SamplingParams(max_new_tokens=3)) == SamplingParams(
        temperature=0.0, max_new_tokens=3
    )
