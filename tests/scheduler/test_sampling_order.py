"""`process_logits` filters in vLLM v1's order: temperature, min-p, top-k, top-p.

The reference below is written from vLLM's sampler (`Sampler.sample`, `MinPLogitsProcessor`,
`apply_top_k_top_p`) in float64 numpy, independently of the torch code under test. A second
reference applies min-p last (the order process_logits used before) so the tests show that
the two orders really differ where both filters bind.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from scheduler.request import SamplingParams
from scheduler.sampling import process_logits


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _min_p(x: np.ndarray, min_p: float) -> np.ndarray:
    """MinPLogitsProcessor: drop tokens whose probability is below min_p times the largest."""
    if min_p <= 0:
        return x
    p = _softmax(x)
    return np.where(p < min_p * p.max(), -np.inf, x)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= x.size:
        return x
    kth = np.sort(x)[::-1][k - 1]
    return np.where(x < kth, -np.inf, x)


def _top_p(x: np.ndarray, top_p: float) -> np.ndarray:
    """apply_top_k_top_p's rule: sort ascending and drop the tail whose cumulative mass is at
    most 1 - top_p; the most likely token always stays."""
    if top_p >= 1.0:
        return x
    order = np.argsort(x, kind="stable")
    cum = np.cumsum(_softmax(x[order]))
    drop = cum <= 1 - top_p
    drop[-1] = False
    out = x.copy()
    out[order[drop]] = -np.inf
    return out


def vllm_order(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    x = logits.astype(np.float64) / p.temperature
    return _softmax(_top_p(_top_k(_min_p(x, p.min_p), p.top_k), p.top_p))


def min_p_last(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The other order: temperature, top-k, top-p, then min-p on the renormalised result."""
    x = logits.astype(np.float64) / p.temperature
    return _softmax(_min_p(_top_p(_top_k(x, p.top_k), p.top_p), p.min_p))


# Each combination pairs min-p with another filter, or uses all three. (Min-p and top-k alone
# commute, as both keep the largest logits; that pair guards each filter on its own.)
COMBINATIONS = [
    {"min_p": 0.1, "top_p": 0.8},
    {"min_p": 0.3, "top_p": 0.6},
    {"min_p": 0.2, "top_k": 5},
    {"min_p": 0.05, "top_k": 8, "top_p": 0.7},
    {"min_p": 0.4, "top_k": 3, "top_p": 0.5},
]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize(
    "combo", COMBINATIONS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
)
def test_process_logits_follows_vllms_order(combo: dict, temperature: float) -> None:
    gen = torch.Generator().manual_seed(len(combo) * 100 + int(temperature * 10))
    logits = torch.randn(64, 40, generator=gen) * 2.5
    params = SamplingParams(temperature=temperature, **combo)
    got = process_logits(logits, params).numpy()
    for row in range(logits.shape[0]):
        want = vllm_order(logits[row].numpy(), params)
        np.testing.assert_allclose(got[row], want, atol=1e-6, rtol=0)
        assert got[row][want == 0].sum() == 0.0  # a filtered token has exactly no mass


def test_random_rows_tell_the_two_orders_apart() -> None:
    """On random rows min-p and top-p together keep a different set in either order, so the
    test above would catch a return to min-p last."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(200, 40, generator=gen) * 2.5
    params = SamplingParams(temperature=1.0, min_p=0.3, top_p=0.6)
    got = process_logits(logits, params).numpy()
    differ = sum(
        not np.allclose(got[r], min_p_last(logits[r].numpy(), params), atol=1e-6)
        for r in range(logits.shape[0])
    )
    assert differ >= 10, differ


def test_a_constructed_case_where_the_order_decides() -> None:
    """p = (0.5, 0.3, 0.15, 0.05), min_p 0.5, top_p 0.6.

    vLLM: min-p keeps p >= 0.25, i.e. (0.5, 0.3) -> renormalised (0.625, 0.375); top-p keeps
    tokens until 0.6 is covered, so the first token alone.
    min-p last: top-p keeps (0.5, 0.3) -> (0.625, 0.375); min-p's floor 0.3125 keeps both.
    """
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    params = SamplingParams(temperature=1.0, min_p=0.5, top_p=0.6)
    got = process_logits(probs.log(), params)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(
        min_p_last(probs.log()[0].numpy(), params), [0.625, 0.375, 0.0, 0.0], atol=1e-6
    )


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"), list(itertools.product([0, 4], [1.0, 0.7], [0.0, 0.2]))
)
def test_greedy_is_the_one_hot_argmax_whatever_the_filters(
    top_k: int, top_p: float, min_p: float
) -> None:
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(2))
    got = process_logits(
        logits, SamplingParams(temperature=0, top_k=top_k, top_p=top_p, min_p=min_p)
    )
    torch.testing.assert_close(got, torch.nn.functional.one_hot(logits.argmax(-1), 30).float())
