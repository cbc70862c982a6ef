"""Token sampling with the OpenAI/vLLM parameters and per-token reproducible seeds.

Order of operations, per row of logits (vLLM's order: logit processors and penalties on
the raw logits, then temperature, then the truncations):

1. The logits become float32 on the CPU. The logprob returned for the chosen token is
   its logprob under the raw model's log_softmax (vLLM's "raw_logprobs").
2. `logit_bias` is added (OpenAI: token id -> bias in [-100, 100]).
3. Penalties: repetition (HF/CTRL: the logit of a token seen in the prompt or the answer
   is divided by the penalty when positive, multiplied by it otherwise), then frequency
   (minus penalty x the token's count in the answer), then presence (minus penalty once
   if the token is in the answer). Frequency and presence count the answer only.
4. `min_new_tokens`: the stop ids get -inf while fewer answer tokens than that exist.
5. Temperature 0 is greedy: the argmax of these logits (with none of 2-4 set, exactly the
   model's argmax). Otherwise: divided by the temperature, softmax, then
6. top_k (the k most probable), then top_p (the smallest most-probable prefix whose mass,
   renormalised after top_k, reaches top_p), then min_p (tokens at least min_p times as
   probable as the most probable one; a ratio, so renormalising does not change it).
   vLLM v0 applied min_p last like this; vLLM v1 moved it before top_k/top_p.
7. One draw by inverse CDF from a single uniform number.

With a seed, the uniform for answer token k depends only on (seed, k), so the prefill
worker (token 0) and the decode worker (tokens 1..) continue one reproducible stream, and
a row's token does not depend on the other rows of its batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_OPENAI_PENALTY = 2.0  # OpenAI's range for frequency and presence penalties

# Top-p without a full-vocabulary sort (100 ms for a batch of 32 x 49k on 2 cores): only
# tokens at least this probable are sorted, when their mass already reaches top_p. Every
# other token comes after all of them in any descending order, so none of them can be in
# the nucleus: the result is exactly that of a full sort. 0 is the full sort.
_NUCLEUS_THRESHOLDS = (2.0**-8, 2.0**-13, 0.0)
# A prefix "reaches" top_p when its mass is within this relative distance of it: float32
# probabilities carry ~1e-7 of rounding, which must not decide whether probabilities of
# 0.5 and 0.3 reach top_p 0.8. It also keeps the candidates' test above clear of the
# last-bit differences of float64 sums taken in another order.
_TOP_P_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = -1  # <= 0: off
    seed: int | None = None
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    min_p: float = 0.0  # 0: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    min_new_tokens: int = 0  # stop ids are masked until this many answer tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, "temperature must be >= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p)
        _check(0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(abs(value) <= MAX_OPENAI_PENALTY, f"{name} must be in [-2, 2]", value)
        _check(self.repetition_penalty > 0, "repetition_penalty must be > 0",
               self.repetition_penalty)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        seen: set[int] = set()
        for token_id, bias in self.logit_bias:
            if token_id < 0 or token_id in seen:
                raise ValueError(f"logit_bias: token id {token_id} is negative or repeated")
            seen.add(token_id)
            _check(abs(bias) <= MAX_LOGIT_BIAS, f"logit_bias[{token_id}] must be in "
                   "[-100, 100]", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """Whether sampling needs the request's TokenHistory (the penalties count tokens)."""
        return (
            self.repetition_penalty != 1
            or self.frequency_penalty != 0
            or self.presence_penalty != 0
        )


def _check(ok: bool, message: str, value: float) -> None:
    # NaN passes no comparison, so `ok` is False for it; infinities are refused here.
    if not ok or not math.isfinite(value):
        raise ValueError(f"{message}, got {value}")


@dataclass(frozen=True)
class TokenHistory:
    """The tokens of one request so far: what the penalties count."""

    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # the answer so far

    @classmethod
    def split(cls, token_ids: Sequence[int], num_output: int) -> TokenHistory:
        """From prompt and answer in one list, the answer being its last num_output tokens."""
        if not 0 <= num_output <= len(token_ids):
            raise ValueError(f"num_output {num_output} is not in [0, {len(token_ids)}]")
        cut = len(token_ids) - num_output
        return cls(token_ids[:cut], token_ids[cut:])


def draw_seed(seed: int, output_index: int) -> int:
    """Generator seed for answer token `output_index`; stable across processes and runs."""
    digest = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_index: Sequence[int],
    *,
    histories: Sequence[TokenHistory] | None = None,
) -> tuple[list[int], list[float]]:
    """Pick one token per row of `logits` [batch, vocab].

    `output_index[i]` is the index of the answer token being sampled for row i (0 for the
    first, which prefill samples), i.e. the number of answer tokens so far. `histories`
    is needed when a row asks for a penalty.

    Returns the token ids and each chosen token's logprob under the unmodified
    log_softmax (before logit_bias, penalties, temperature and truncation).
    """
    raw = _as_cpu_float(logits, params, output_index, histories)
    processed = processed_logits(raw, params, output_index, histories=histories)
    tokens: list[int] = processed.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        probs = _softmax_with_temperature(processed, params, rows)
        for row, i in enumerate(rows):
            weights, ids = _kept_tokens(probs[row], params[i])
            choice = _inverse_cdf(weights, _uniform(params[i].seed, output_index[i]))
            tokens[i] = choice if ids is None else int(ids[choice])
    logprobs = torch.log_softmax(raw, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, dtype=torch.long).unsqueeze(1))
    return tokens, chosen.squeeze(1).tolist()


def token_distribution(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_index: Sequence[int],
    *,
    histories: Sequence[TokenHistory] | None = None,
) -> torch.Tensor:
    """The exact distribution `sample` draws each row from: float64 [batch, vocab].

    A greedy row is one-hot on its argmax. For tests and debugging; `sample` does not
    build it.
    """
    raw = _as_cpu_float(logits, params, output_index, histories)
    processed = processed_logits(raw, params, output_index, histories=histories)
    out = torch.zeros(processed.shape, dtype=torch.float64)
    out[torch.arange(len(params)), processed.argmax(dim=-1)] = 1.0
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        probs = _softmax_with_temperature(processed, params, rows)
        for row, i in enumerate(rows):
            weights, ids = _kept_tokens(probs[row], params[i])
            dist = torch.zeros(processed.shape[1], dtype=torch.float64)
            if ids is None:
                dist = weights.clone()
            else:
                dist[ids] = weights
            out[i] = dist / dist.sum()
    return out


def processed_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_index: Sequence[int],
    *,
    histories: Sequence[TokenHistory] | None = None,
) -> torch.Tensor:
    """Steps 2-4 of the module docstring: logit_bias, penalties, min_new_tokens.

    Returns float32 CPU logits [batch, vocab]: `logits` itself (as float32 on the CPU)
    when no row asks for any of them, else a modified copy.
    """
    out = _as_cpu_float(logits, params, output_index, histories)
    masking = [
        i for i, p in enumerate(params) if p.stop_token_ids and output_index[i] < p.min_new_tokens
    ]
    if not (masking or any(p.logit_bias or p.needs_history for p in params)):
        return out
    out = out.clone()
    _add_logit_bias(out, params)
    _apply_penalties(out, params, histories)
    vocab = out.shape[1]
    for i in masking:
        ids = [t for t in params[i].stop_token_ids if t < vocab]
        out[i, ids] = -math.inf
    return out


def _as_cpu_float(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_index: Sequence[int],
    histories: Sequence[TokenHistory] | None,
) -> torch.Tensor:
    if logits.dim() != 2 or not len(params) == len(output_index) == logits.shape[0]:
        raise ValueError("logits [batch, vocab], params and output_index must agree in length")
    if histories is not None and len(histories) != len(params):
        raise ValueError("histories must have one entry per row")
    # Sample on CPU in float32: draws must not depend on the device the model ran on.
    return logits.detach().float().cpu()


def _add_logit_bias(out: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
    if not rows:
        return
    cols = [t for p in params for t, _ in p.logit_bias]
    if max(cols) >= out.shape[1]:
        raise ValueError(f"logit_bias token id {max(cols)} is outside the vocabulary "
                         f"of {out.shape[1]} tokens")
    bias = torch.tensor([b for p in params for _, b in p.logit_bias], dtype=torch.float32)
    out.index_put_((torch.tensor(rows), torch.tensor(cols)), bias, accumulate=True)


def _apply_penalties(
    out: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory] | None,
) -> None:
    """Repetition, then frequency and presence penalties, on the logits of the tokens seen.

    Works on the (row, token) pairs of the histories, not on whole rows: dense
    where/masked_fill over [32, 49k] cost ~10 ms each on this CPU. A pair seen several
    times is read before any write, so every copy of it writes the same new value.
    """
    rows = [i for i, p in enumerate(params) if p.needs_history]
    if not rows:
        return
    if histories is None:
        raise ValueError("repetition, frequency and presence penalties need the histories")
    flat = out.view(-1)
    vocab = out.shape[1]
    answer, answer_rows = _flat_token_index(
        [histories[i].output_token_ids for i in rows], rows, vocab
    )
    repetition = _row_values(params, "repetition_penalty")
    repeat = [i for i in rows if params[i].repetition_penalty != 1]
    if repeat:
        prompt, prompt_rows = _flat_token_index(
            [histories[i].prompt_token_ids for i in repeat], repeat, vocab
        )
        in_repeat = repetition[answer_rows] != 1
        seen = torch.cat([prompt, answer[in_repeat]])
        penalty = repetition[torch.cat([prompt_rows, answer_rows[in_repeat]])]
        logit = flat[seen]
        flat[seen] = torch.where(logit > 0, logit / penalty, logit * penalty)
    if answer.numel():
        counts = torch.zeros(flat.shape[0], dtype=torch.float32)
        counts.scatter_add_(0, answer, torch.ones(answer.shape[0], dtype=torch.float32))
        count = counts[answer]
        logit = flat[answer]
        logit -= _row_values(params, "frequency_penalty")[answer_rows] * count
        logit -= _row_values(params, "presence_penalty")[answer_rows] * (count > 0)
        flat[answer] = logit


def _flat_token_index(
    sequences: Sequence[Sequence[int]], rows: Sequence[int], vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the flattened logits [batch * vocab] of the tokens of each sequence,
    sequence k being of row rows[k]; and the row of each index."""
    lengths = torch.tensor([len(s) for s in sequences])
    tokens = torch.from_numpy(
        np.fromiter(chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    )
    row_of = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lengths)
    # Ids the model cannot produce have no logit to penalise.
    valid = (tokens >= 0) & (tokens < vocab)
    return (row_of * vocab + tokens)[valid], row_of[valid]


def _row_values(params: Sequence[SamplingParams], name: str) -> torch.Tensor:
    """Parameter `name` of every row, as float32 [batch]."""
    return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32)


def _softmax_with_temperature(
    logits: torch.Tensor, params: Sequence[SamplingParams], rows: list[int]
) -> torch.Tensor:
    temperature = torch.tensor([params[i].temperature for i in rows], dtype=torch.float32)
    selected = logits if len(rows) == logits.shape[0] else logits[rows]
    return torch.softmax(selected / temperature.unsqueeze(1), dim=-1)


def _kept_tokens(
    probs: torch.Tensor, p: SamplingParams
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 6 on one row's probabilities [vocab]: float64 weights (not normalised, zero for
    the tokens cut) and the token id of each weight, or None when they are in vocab order.
    """
    vocab = probs.shape[0]
    ids: torch.Tensor | None
    if 0 < p.top_k < vocab:
        vals, ids = torch.topk(probs, p.top_k)  # already sorted, most probable first
    elif p.top_p < 1:
        vals, ids = _nucleus_candidates(probs, p.top_p)
    else:
        vals, ids = probs, None
    weights = vals.double()
    if p.top_p < 1:
        # Mass of the distribution top_p applies to: the top-k's, or all of it.
        total = weights.sum() if 0 < p.top_k < vocab else probs.double().sum()
        before = torch.cumsum(weights, dim=0) - weights
        # The most probable token always stays (nothing is before it).
        # Masks multiply: where/masked_fill are ~10x slower here (weights are finite).
        weights = weights * (before < _top_p_cutoff(p.top_p, total))
    if p.min_p > 0:
        weights = weights * (weights >= p.min_p * weights.max())
    return weights, ids


def _top_p_cutoff(top_p: float, total: float | torch.Tensor) -> float | torch.Tensor:
    """Tokens whose more probable predecessors hold less mass than this are kept."""
    return top_p * total * (1 - _TOP_P_TOLERANCE)


def _nucleus_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted in descending order, with their ids, of a set of the most
    probable tokens that holds every token of the top_p nucleus."""
    total = float(probs.double().sum())
    for threshold in _NUCLEUS_THRESHOLDS:
        ids = torch.nonzero(probs >= threshold).squeeze(1)
        vals = probs[ids]
        if threshold == 0 or float(vals.double().sum()) >= top_p * total:
            break
    # Stable: equal probabilities keep id order, so the result is the same in any batch.
    vals, order = torch.sort(vals, descending=True, stable=True)
    return vals, ids[order]


def _uniform(seed: int | None, index: int) -> float:
    gen = torch.Generator()
    if seed is None:
        gen.seed()  # fresh nondeterministic state
    else:
        gen.manual_seed(draw_seed(seed, index))
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def _inverse_cdf(weights: torch.Tensor, u: float) -> int:
    # One uniform and a searchsorted: unlike torch.multinomial, the mapping from the
    # uniform to the token is the same on every device and torch version.
    cdf = torch.cumsum(weights, dim=0)
    j = int(torch.searchsorted(cdf, u * float(cdf[-1]), right=True))
    if j >= weights.shape[0]:  # u * total rounded up to total: take the last non-zero token
        j = int(torch.nonzero(weights).max())
    return j
