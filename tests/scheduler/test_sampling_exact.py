"""Speculative sampling keeps the target distribution: chi-square tests.

Each test draws N emissions through the real verification code and compares the histogram of
the emitted tokens with the exact target probabilities (Pearson chi-square, bins with expected
count >= 5, the rest pooled). ALPHA = 1e-3 is the false-alarm rate of one test; with the
generators seeded the suite is deterministic, so a failure means a real bias (or a reseeded
1-in-1000 draw). A deliberately biased verifier (accept every draft) is shown to fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from scheduler.model import build_packed_batch
from scheduler.request import SamplingParams
from scheduler.runner import TorchModelRunner
from scheduler.sampling import process_logits, rejection_sample, target_probs

ALPHA = 1e-3


def chi_square_pvalue(counts: dict, expected_probs: dict, n: int) -> float:
    """counts/expected_probs keyed by outcome; small-expectation outcomes pooled into one bin."""
    big = [k for k, p in expected_probs.items() if p * n >= 5]
    obs = [counts.get(k, 0) for k in big]
    exp = [expected_probs[k] * n for k in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp >= 5:
        obs.append(rest_obs)
        exp.append(rest_exp)
    else:
        assert rest_obs <= 5 + 5 * rest_exp, "mass where the target has almost none"
        scale = sum(obs) / sum(exp)
        exp = [e * scale for e in exp]
    if len(obs) < 2:  # a (near-)deterministic law: the pooled-mass check above is the test
        return 1.0
    return chisquare(obs, exp).pvalue


def emit_first_tokens(p, q, n, gen, biased=False):
    """First emitted token of n speculative rounds with k=2 drafts sampled from q."""
    counts: dict[int, int] = {}
    for _ in range(n):
        d = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(2)]
        if biased:
            token = d[0]
        else:
            _, tokens = rejection_sample(p, d, q, gen)
            token = tokens[0]
        counts[token] = counts.get(token, 0) + 1
    return counts


def test_synthetic_distribution_preserved_and_bias_detected():
    gen = torch.Generator().manual_seed(0)
    vocab, n = 6, 20000
    p = torch.softmax(torch.randn(3, vocab, generator=gen), -1)  # target p_0..p_2
    q = torch.softmax(torch.randn(2, vocab, generator=gen) * 2, -1)  # a poor draft
    expected = {t: float(p[0, t]) for t in range(vocab)}
    assert chi_square_pvalue(emit_first_tokens(p, q, n, gen), expected, n) > ALPHA
    # The same test catches a verifier that skips the acceptance test.
    assert chi_square_pvalue(emit_first_tokens(p, q, n, gen, biased=True), expected, n) < ALPHA


@pytest.mark.parametrize("deterministic", [False, True])
def test_synthetic_two_token_joint(deterministic):
    """Joint law of the first two emitted tokens, with sampled and with one-hot drafts."""
    gen = torch.Generator().manual_seed(1)
    vocab, n = 4, 20000
    p0 = torch.softmax(torch.randn(vocab, generator=gen), -1)
    p1 = torch.softmax(torch.randn(vocab, vocab, generator=gen), -1)  # p1[a] = p(. | a)
    q = torch.softmax(torch.randn(2, vocab, generator=gen), -1)
    counts: dict[tuple[int, int], int] = {}
    for _ in range(n):
        d = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(2)]
        p = torch.stack([p0, p1[d[0]], p1[d[1]]])  # p_2 is unused in this two-token law
        _, tokens = rejection_sample(p, d, None if deterministic else q, gen)
        if len(tokens) < 2:  # rejected at the first draft: draw the next token from p1
            tokens.append(int(torch.multinomial(p1[tokens[0]], 1, generator=gen)))
        key = (tokens[0], tokens[1])
        counts[key] = counts.get(key, 0) + 1
    expected = {(a, b): float(p0[a] * p1[a, b]) for a, b in itertools.product(range(vocab), repeat=2)}
    assert chi_square_pvalue(counts, expected, n) > ALPHA


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, max_tokens=8),
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8),
        SamplingParams(temperature=1.3, top_k=20, min_p=0.02, max_tokens=8),
    ],
    ids=["t0.7", "t1.0-top_p0.9", "t1.3-top_k20-min_p"],
)
def test_real_model_first_two_tokens_follow_target(target, chat_prompts, params):
    """Real logits at a real context; drafts from a hotter copy of the model (a realistic q).

    Every draft sequence is drawn from a 3-token support, so the target rows for all 9
    sequences are computed once with the runner's own packed forward; each trial then runs
    the runner's verification path (`target_probs` + `rejection_sample`).
    """
    runner = TorchModelRunner(target.hf_model, num_slots=1, max_model_len=256)
    prompt = chat_prompts[2]
    n_ctx = len(prompt)
    cpu = torch.device("cpu")
    logits, _ = runner.model.forward(build_packed_batch([(0, 0, prompt)], [n_ctx - 1], cpu))
    draft_params = SamplingParams(temperature=params.temperature * 1.5, top_k=3, max_tokens=8)
    q0 = process_logits(logits, draft_params)[0]
    support = torch.nonzero(q0).flatten().tolist()
    rows = {}  # (d1, d2) -> target probs [3, vocab] at anchor, d1, d2
    for d1, d2 in itertools.product(support, repeat=2):
        batch = build_packed_batch([(0, n_ctx - 1, [prompt[-1], d1, d2])], [0, 1, 2], cpu)
        lg, _ = runner.model.forward(batch)
        rows[(d1, d2)] = target_probs(lg, params, prompt, {}, [d1, d2])
    # The draft's second-position q is taken as q0 restricted to the support as well.
    q = torch.stack([q0, q0])
    gen = torch.Generator().manual_seed(7)
    n = 4000
    # Every trial's two drafts, drawn from q in one call: one call per draft, each over the
    # whole vocabulary, took most of this test's time.
    drafts = torch.multinomial(q0, 2 * n, replacement=True, generator=gen).view(n, 2).tolist()
    counts: dict[tuple[int, int], int] = {}
    for d in drafts:
        accepted, tokens = rejection_sample(rows[tuple(d)], d, q, gen)
        # Second token: known exactly only after an accepted first draft.
        key = (tokens[0], tokens[1] if accepted >= 1 else -1)
        counts[key] = counts.get(key, 0) + 1
    p0 = rows[(support[0], support[0])][0]
    # First token: its marginal must be p0, whether it came from an accepted draft or was
    # recovered after a rejection.
    first = {}
    for (a, _), c in counts.items():
        first[a] = first.get(a, 0) + c
    assert chi_square_pvalue(first, {a: float(p0[a]) for a in range(p0.shape[0]) if float(p0[a]) > 0}, n) > ALPHA
    joint = {k: c for k, c in counts.items() if k[1] != -1}
    n_joint = sum(joint.values())
    # Conditional law of the second token given an accepted first draft a: p1(. | a).
    for a in support:
        sub = {b: c for (x, b), c in joint.items() if x == a}
        m = sum(sub.values())
        if m < 200:
            continue
        p1 = rows[(a, support[0])][1]
        cond = {b: float(p1[b]) for b in torch.nonzero(p1 > 1e-4).flatten().tolist()}
        assert chi_square_pvalue(sub, cond, m) > ALPHA
    assert n_joint > 0
