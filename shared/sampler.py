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
4. A grammar's mask (structured outputs, shared/grammar.py): every token the grammar does
   not allow next gets -inf, so no draw and no argmax can pick one. Then `min_new_tokens`:
   the stop ids get -inf while fewer answer tokens than that exist (unless the grammar
   allows nothing else: its end comes first).
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

`sample_tokens` also gives the `top_logprobs` most probable tokens of each row that asks,
with their raw logprobs (as the chosen token's).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

from kernels import cpu_kernels
from shared.grammar import GrammarSpec, TokenMask

MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_OPENAI_PENALTY = 2.0  # OpenAI's range for frequency and presence penalties
MAX_CHOICES = 128  # parallel sampling: choices (n) of one request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs

# Top-p without a full-vocabulary sort (100 ms for a batch of 32 x 49k on 2 cores): only
# tokens at least this probable are sorted, when their mass already reaches top_p. Every
# other token comes after all of them in any descending order, so none of them can be in
# the nucleus: the result is exactly that of a full sort. 0 is the full sort.
_NUCLEUS_THRESHOLDS = (2.0**-8, 2.0**-12, 2.0**-16, 2.0**-20, 0.0)
# A prefix "reaches" top_p when its mass is within this relative distance of it: float32
# probabilities carry ~1e-7 of rounding, which must not decide whether probabilities of
# 0.5 and 0.3 reach top_p 0.8. It also keeps the candidates' test above clear of the
# last-bit differences of float64 sums taken in another order.
TOP_P_TOLERANCE = 1e-6
_CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF


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
    n: int = 1  # choices sampled from one prompt (parallel sampling)
    top_logprobs: int = 0  # alternatives returned with each sampled token
    grammar: GrammarSpec | None = None  # structured output: what the answer must match
    return_routed_experts: bool = False  # MoE: send back each token's experts (SGLang's)

    def __post_init__(self) -> None:
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        if not 1 <= self.n <= MAX_CHOICES:
            raise ValueError(f"n must be in [1, {MAX_CHOICES}], got {self.n}")
        _check(self.temperature >= 0, "temperature must be >= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p)
        _check(0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(abs(value) <= MAX_OPENAI_PENALTY, f"{name} must be in [-2, 2]", value)
        _check(
            self.repetition_penalty > 0, "repetition_penalty must be > 0", self.repetition_penalty
        )
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
            _check(
                abs(bias) <= MAX_LOGIT_BIAS, f"logit_bias[{token_id}] must be in [-100, 100]", bias
            )

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice `index` of a request with n choices.

        Choice 0 keeps the request's seed, so it answers as the same request with n = 1;
        the others get seeds derived from it, so a seeded request stays reproducible while
        its choices differ.
        """
        seed = self.seed
        if index and seed is not None:
            digest = hashlib.blake2b(f"{seed}/choice{index}".encode(), digest_size=8).digest()
            seed = int.from_bytes(digest, "little") & (2**63 - 1)
        return replace(self, n=1, seed=seed)

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


# The most probable tokens of one row and their logprobs, most probable first.
TopLogprobs = tuple[tuple[int, ...], tuple[float, ...]]


class Sampled(NamedTuple):
    token_ids: list[int]
    logprobs: list[float]  # of each chosen token, raw
    top_logprobs: list[TopLogprobs]  # per row: its top_logprobs best tokens (empty if 0)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_index: Sequence[int],
    *,
    histories: Sequence[TokenHistory] | None = None,
    mask: TokenMask | None = None,
) -> tuple[list[int], list[float]]:
    """Pick one token per row of `logits` [batch, vocab].

    `output_index[i]` is the index of the answer token being sampled for row i (0 for the
    first, which prefill samples), i.e. the number of answer tokens so far. `histories`
    is needed when a row asks for a penalty; `mask` holds the grammar masks of the rows
    that have one.

    Returns the token ids and each chosen token's logprob under the unmodified
    log_softmax (before logit_bias, penalties, masks, temperature and truncation).
    """
    tokens, logprobs, _ = sample_tokens(
        logits, params, output_index, histories=histories, mask=mask
    )
    return tokens, logprobs


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first, on ties). On the CPU a kernel of ours (several times
    faster than torch at a decode batch); else max(), which gives the same index as argmax()
    in under half the time."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and cpu_kernels.available():
        return cpu_kernels.greedy_rows(logits)
    return logits.max(dim=-1).indices


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_index: Sequence[int],
    *,
    histories: Sequence[TokenHistory] | None = None,
    mask: TokenMask | None = None,
) -> Sampled:
    """`sample`, plus each row's `top_logprobs` most probable tokens under the raw
    log_softmax (the distribution its chosen token's logprob is taken from)."""
    raw = _as_cpu_float(logits, params, output_index, histories)
    work = _scratch(raw)  # the processed logits, then the row weights
    processed = _processed_into(raw, work, params, output_index, histories, mask)
    tokens: list[int] = greedy(processed).tolist()
    for i, weights, ids in _truncated_rows(processed, params, work):
        choice = _inverse_cdf(weights, _uniform(params[i].seed, output_index[i]))
        tokens[i] = choice if ids is None else int(ids[choice])
    chosen = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
    log_probs = torch.log_softmax(raw, dim=-1)
    top: list[TopLogprobs] = [((), ())] * len(params)
    for i, p in enumerate(params):
        if p.top_logprobs:
            values, ids = torch.topk(log_probs[i], min(p.top_logprobs, raw.shape[1]))
            top[i] = (tuple(ids.tolist()), tuple(values.tolist()))
    return Sampled(tokens, log_probs.gather(1, chosen).squeeze(1).tolist(), top)


def token_distribution(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_index: Sequence[int],
    *,
    histories: Sequence[TokenHistory] | None = None,
    mask: TokenMask | None = None,
) -> torch.Tensor:
    """The exact distribution `sample` draws each row from: float64 [batch, vocab].

    A greedy row is one-hot on its argmax. For tests and debugging; `sample` does not
    build it.
    """
    raw = _as_cpu_float(logits, params, output_index, histories)
    processed = _processed_into(raw, torch.empty_like(raw), params, output_index, histories, mask)
    out = torch.zeros(processed.shape, dtype=torch.float64)
    out[torch.arange(len(params)), processed.argmax(dim=-1)] = 1.0
    for i, weights, ids in _truncated_rows(processed, params, torch.empty_like(raw)):
        if ids is None:
            out[i] = weights
        else:
            out[i] = 0.0
            out[i, ids] = weights.double()
        out[i] /= out[i].sum()
    return out


def processed_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_index: Sequence[int],
    *,
    histories: Sequence[TokenHistory] | None = None,
    mask: TokenMask | None = None,
) -> torch.Tensor:
    """Steps 2-4 of the module docstring (logit_bias, penalties, masks, min_new_tokens) on
    a copy of the logits, as float32 [batch, vocab] on the CPU."""
    raw = _as_cpu_float(logits, params, output_index, histories)
    empty = torch.empty_like(raw)
    return _processed_into(raw, empty, params, output_index, histories, mask).clone()


_scratch_buffers = threading.local()


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """A float32 tensor shaped like `like`, kept from one call to the next (one per thread).

    A fresh [32, 49k] tensor every decode step costs ~4 ms here in page faults alone (its
    6 MB go back to the OS between steps), as much as all the sampling arithmetic.
    """
    buf: torch.Tensor | None = getattr(_scratch_buffers, "buf", None)
    if buf is None or buf.numel() < like.numel():
        buf = torch.empty(like.numel(), dtype=torch.float32)
        _scratch_buffers.buf = buf
    return buf[: like.numel()].view(like.shape)


def _processed_into(
    raw: torch.Tensor,
    work: torch.Tensor,
    params: Sequence[SamplingParams],
    output_index: Sequence[int],
    histories: Sequence[TokenHistory] | None,
    mask: TokenMask | None = None,
) -> torch.Tensor:
    """`raw` itself when no row asks for steps 2-4, else `work` holding the result."""
    masking = [
        i for i, p in enumerate(params) if p.stop_token_ids and output_index[i] < p.min_new_tokens
    ]
    if not (masking or mask is not None or any(p.logit_bias or p.needs_history for p in params)):
        return raw
    work.copy_(raw)
    _add_logit_bias(work, params)
    _apply_penalties(work, params, histories)
    vocab = work.shape[1]
    if mask is not None:
        _apply_mask(work, mask)
    for i in masking:
        ids = [t for t in params[i].stop_token_ids if t < vocab]
        kept = work[i, ids].clone()
        work[i, ids] = -math.inf
        if mask is not None and i in mask.rows and not bool(work[i].isfinite().any()):
            work[i, ids] = kept  # the grammar allows only its end: min_tokens gives way
    return work


def _apply_mask(work: torch.Tensor, mask: TokenMask) -> None:
    """-inf for every token a masked row may not take."""
    if mask.bits.shape[0] != len(mask.rows) or (mask.rows and max(mask.rows) >= work.shape[0]):
        raise ValueError("the token mask does not fit the batch")
    rows = torch.tensor(mask.rows, dtype=torch.long)
    masked = work.index_select(0, rows)
    masked.masked_fill_(~mask.allowed(work.shape[1]), -math.inf)
    work.index_copy_(0, rows, masked)


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
        raise ValueError(
            f"logit_bias token id {max(cols)} is outside the vocabulary of {out.shape[1]} tokens"
        )
    bias = torch.tensor([b for p in params for _, b in p.logit_bias], dtype=torch.float32)
    out.index_put_((torch.tensor(rows), torch.tensor(cols)), bias, accumulate=True)


def _apply_penalties(
    out: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory] | None,
) -> None:
    """Repetition, then frequency and presence penalties, on the logits of the tokens seen.

    Works on the (row, token) pairs of the histories, not on whole rows: a dense where or
    masked_fill over [32, 49k] measured ~10 ms here. A pair seen several times is read
    before any write, so every copy of it writes the same new value.
    """
    rows = [i for i, p in enumerate(params) if p.needs_history]
    if not rows:
        return
    if histories is None:
        raise ValueError("repetition, frequency and presence penalties need the histories")
    flat = out.view(-1)
    vocab = out.shape[1]
    repeat = [i for i in rows if params[i].repetition_penalty != 1]
    if repeat:
        prompt, prompt_rows = _flat_token_index(
            [histories[i].prompt_token_ids for i in repeat], repeat, vocab
        )
        answer, answer_rows = _flat_token_index(
            [histories[i].output_token_ids for i in repeat], repeat, vocab
        )
        seen = torch.cat([prompt, answer])
        penalty = _row_values(params, "repetition_penalty")[torch.cat([prompt_rows, answer_rows])]
        logit = flat.index_select(0, seen)
        flat.scatter_(0, seen, torch.where(logit > 0, logit / penalty, logit * penalty))
    counted = [i for i in rows if params[i].frequency_penalty or params[i].presence_penalty]
    if counted:
        answer, answer_rows = _flat_token_index(
            [histories[i].output_token_ids for i in counted], counted, vocab
        )
        # Counts of the (row, token) pairs without a [batch * vocab] tensor of zeros.
        _, pair, pair_counts = torch.unique(answer, return_inverse=True, return_counts=True)
        count = pair_counts.index_select(0, pair).float()
        logit = flat.index_select(0, answer)
        logit -= _row_values(params, "frequency_penalty")[answer_rows] * count
        logit -= _row_values(params, "presence_penalty")[answer_rows] * (count > 0)
        flat.scatter_(0, answer, logit)


def _flat_token_index(
    sequences: Sequence[Sequence[int]], rows: Sequence[int], vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the flattened logits [batch * vocab] of the tokens of each sequence,
    sequence k being of row rows[k]; and the row of each index."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    tokens = torch.from_numpy(
        np.fromiter(chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    )
    row_of = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lengths)
    index = row_of * vocab + tokens
    # Ids the model cannot produce have no logit to penalise.
    valid = (tokens >= 0) & (tokens < vocab)
    if bool(valid.all()):
        return index, row_of
    return index[valid], row_of[valid]


def _row_values(params: Sequence[SamplingParams], name: str) -> torch.Tensor:
    """Parameter `name` of every row, as float32 [batch]."""
    return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32)


def _truncated_rows(
    processed: torch.Tensor, params: Sequence[SamplingParams], work: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Steps 5-6 for every non-greedy row i: (i, weights, ids) as _kept_tokens returns.

    Weights are unnormalised probabilities, exp((logit - max) / temperature): top_p
    compares with their total, min_p with their maximum. A top-k row only ever computes
    its k best. May overwrite `work` (also when it holds `processed`).
    """
    vocab = processed.shape[1]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    whole = [i for i in rows if not 0 < params[i].top_k < vocab]
    row_of = {i: row for row, i in enumerate(whole)}  # row of `weights` that is row i
    weights = None
    if whole:
        temperature = _row_values(params, "temperature")[whole].unsqueeze(1)
        if len(whole) == processed.shape[0]:
            scaled = torch.div(processed, temperature, out=work)
        else:
            scaled = processed[whole].div_(temperature)
        weights = scaled.sub_(scaled.amax(dim=-1, keepdim=True)).exp_()
    for i in rows:
        p = params[i]
        if 0 < p.top_k < vocab:
            best, ids = torch.topk(processed[i], p.top_k)  # sorted, most probable first
            top_weights = best.sub_(float(best[0])).div_(p.temperature).exp_()
            yield i, _truncate(top_weights, p, sorted_=True), ids
        else:
            assert weights is not None
            kept, order = _kept_tokens(weights[row_of[i]], p)
            yield i, kept, order


def _kept_tokens(
    weights: torch.Tensor, p: SamplingParams
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 6 without top_k on one row's weights [vocab]: the weights kept (zero for the
    tokens cut) and the token id of each, or None when they are in vocab order."""
    if p.top_p < 1:
        # In float64, row by row: a float64 sum of the whole batch first copies it all.
        total = float(weights.sum(dtype=torch.float64))
        kept, ids = _nucleus_candidates(weights, p.top_p, total)
        return _truncate(kept, p, sorted_=True, total=total), ids
    return _truncate(weights, p, sorted_=False), None


def _truncate(
    weights: torch.Tensor, p: SamplingParams, *, sorted_: bool, total: float | None = None
) -> torch.Tensor:
    """top_p (over weights sorted in descending order, of mass `total`: by default their
    own), then min_p; the weights cut become zero."""
    if p.top_p < 1:
        assert sorted_
        kept = weights.double()
        if total is None:
            total = float(kept.sum())  # after top_k: top_p applies to the k, renormalised
        before = torch.cumsum(kept, dim=0) - kept
        # Masks multiply: where/masked_fill are ~10x slower here (weights are finite).
        # The most probable token always stays (nothing is before it).
        weights = kept * (before < _top_p_cutoff(p.top_p, total))
    if p.min_p > 0:
        best = float(weights[0]) if sorted_ else float(weights.max())
        weights = weights * (weights >= p.min_p * best)
    return weights


def _top_p_cutoff(top_p: float, total: float) -> float:
    """Tokens whose more probable predecessors hold less mass than this are kept."""
    return top_p * total * (1 - TOP_P_TOLERANCE)


def _nucleus_candidates(
    weights: torch.Tensor, top_p: float, total: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights sorted in descending order, with their ids, of a set of the most probable
    tokens that holds every token of the top_p nucleus."""
    for threshold in _NUCLEUS_THRESHOLDS:
        ids = torch.nonzero(weights >= threshold * total).squeeze(1)
        vals = weights.index_select(0, ids)
        if threshold == 0 or float(vals.sum(dtype=torch.float64)) >= top_p * total:
            break
    # Stable: equal probabilities keep id order, so the result is the same in any batch.
    vals, order = torch.sort(vals, descending=True, stable=True)
    return vals, ids.index_select(0, order)


def _uniform(seed: int | None, index: int) -> float:
    gen = torch.Generator()
    if seed is None:
        gen.seed()  # fresh nondeterministic state
    else:
        gen.manual_seed(draw_seed(seed, index))
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def _inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """The token whose interval of the cumulated weights holds u * total.

    One uniform and a search: unlike torch.multinomial, the mapping from the uniform to
    the token is the same on every device and torch version. In two levels (blocks, then
    the one block the draw falls in): a float64 cumsum over a 49k vocabulary costs more.
    """
    n = weights.shape[0]
    if n <= _CDF_BLOCK:  # a top-k or nucleus: one level is enough
        return _first_above(
            torch.cumsum(weights, dim=0, dtype=torch.float64),
            weights,
            u * float(weights.sum(dtype=torch.float64)),
        )
    full = n - n % _CDF_BLOCK
    sums = weights[:full].view(-1, _CDF_BLOCK).sum(dim=1)
    if full < n:
        sums = torch.cat([sums, weights[full:].sum().view(1)])
    block_cdf = torch.cumsum(sums, dim=0, dtype=torch.float64)
    target = u * float(block_cdf[-1])
    b = _first_above(block_cdf, sums, target)
    start = b * _CDF_BLOCK
    block = weights[start : start + _CDF_BLOCK].double()
    below = float(block_cdf[b - 1]) if b else 0.0
    return start + _first_above(torch.cumsum(block, dim=0), block, target - below)


def _first_above(cdf: torch.Tensor, weights: torch.Tensor, x: float) -> int:
    """First index whose cdf exceeds x: always a token of non-zero weight."""
    j = int(torch.searchsorted(cdf, x, right=True))
    if j >= cdf.shape[0]:  # x rounded up to the total: the last token of non-zero weight
        j = int(torch.nonzero(weights).max())
    return j
