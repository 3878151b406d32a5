"""Drafts, offline evaluation and serving filter the same logits into the same distribution.

Serving is the runner's law (`scheduler.sampling.target_probs`; no penalties here). Each other
path is run for real on a tiny random target and spied on where logits come in and a
distribution goes out:
- drafts: the logits each draft position hands to sampling, and the q rows `propose` returns;
- evaluation: the target logits of every forward of `speculative_generate`, and the target rows
  its verification passes to `rejection_sample`.
The tiny models' logits are nearly flat, so a low temperature makes top-k, top-p and min-p all
bind. Each test also checks that on the very same logits a law without one of the filters, or
with min-p applied last (the server's former order), gives another distribution, so a path that
drifts to such a law fails.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

import scheduler.sampling
from drafts.offline import speculative_generate
from drafts.proposer import make_proposer
from scheduler.drafter import DraftRequest
from scheduler.request import SamplingParams
from scheduler.sampling import process_logits, target_probs

PROMPT = [1, 5, 9, 17, 33, 12, 7, 40]
# Per path, settings under which every filter binds on that path's logits (checked below).
DSPARK = SamplingParams(temperature=0.2, top_k=20, top_p=0.7, min_p=0.1, seed=3, max_tokens=12)
EAGLE3 = SamplingParams(temperature=0.1, top_k=20, top_p=0.8, min_p=0.1, seed=3, max_tokens=12)


def serving(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return target_probs(logits, params, PROMPT, {})


def min_p_last(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, then min-p on the renormalised result."""
    probs = process_logits(logits, replace(params, min_p=0.0))
    probs = probs.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def assert_the_check_has_teeth(logits: torch.Tensor, params: SamplingParams) -> None:
    """On these logits, a law that skipped any one filter, or applied min-p last, would give
    another distribution than the one the paths were found to agree on."""
    law = serving(logits, params)
    others = {
        "min-p last": min_p_last(logits, params),
        "no top-k": serving(logits, replace(params, top_k=0)),
        "no top-p": serving(logits, replace(params, top_p=1.0)),
        "no min-p": serving(logits, replace(params, min_p=0.0)),
    }
    for name, other in others.items():
        assert not torch.allclose(other, law, atol=1e-4, rtol=0), name


@pytest.mark.parametrize(
    ("method", "params"), [("dspark", DSPARK), ("eagle3", EAGLE3)], ids=["dspark", "eagle3"]
)
def test_draft_q_rows_are_the_servers_law_of_the_draft_logits(
    tiny_target: Any,
    make_draft: Any,
    method: str,
    params: SamplingParams,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prop = make_proposer(make_draft(tiny_target, method), tiny_target, 7)
    out = tiny_target(input_ids=torch.tensor([PROMPT]), output_hidden_states=True)
    prop.observe("r", 0, torch.cat([out.hidden_states[i + 1][0] for i in (0, 1, 2)], -1)[:-1])
    seen: list[torch.Tensor] = []  # [1, vocab] logits of each draft position, as sampled from
    sample_step = prop._sample_step

    def spy(logits: torch.Tensor, *rest: Any) -> torch.Tensor:
        seen.append(logits.detach().float().clone())
        return sample_step(logits, *rest)

    monkeypatch.setattr(prop, "_sample_step", spy)
    proposal = prop.propose([DraftRequest("r", tuple(PROMPT), params, 7)])
    assert proposal.probs is not None and proposal.probs[0] is not None
    q = proposal.probs[0]
    assert q.shape == (7, 96) and len(seen) == 7
    logits = torch.cat(seen)
    torch.testing.assert_close(q, serving(logits, params), atol=1e-6, rtol=0)
    assert all(bool(q[j, t] > 0) for j, t in enumerate(proposal.token_ids[0]))
    assert_the_check_has_teeth(logits, params)


def test_evaluation_verifies_against_the_servers_law_of_the_target_logits(
    tiny_target: Any, make_draft: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    class RecordingTarget:
        """The tiny target, keeping the logits of every forward."""

        def __init__(self) -> None:
            self.logits: list[torch.Tensor] = []

        def __getattr__(self, name: str) -> Any:
            return getattr(tiny_target, name)

        def __call__(self, **kw: Any) -> Any:
            out = tiny_target(**kw)
            self.logits.append(out.logits[0].detach().float().clone())
            return out

    verified: list[torch.Tensor] = []  # target rows handed to rejection_sample
    rejection_sample = scheduler.sampling.rejection_sample

    def spy(probs: torch.Tensor, *rest: Any) -> tuple[int, list[int]]:
        verified.append(probs.clone())
        return rejection_sample(probs, *rest)

    monkeypatch.setattr(scheduler.sampling, "rejection_sample", spy)
    target = RecordingTarget()
    prop = make_proposer(make_draft(tiny_target, "dspark"), tiny_target, 7)
    res = speculative_generate(
        target, prop, PROMPT, DSPARK, 7, {2}, generator=torch.Generator().manual_seed(0)
    )
    assert len(res.rounds) >= 1
    # One verification per forward: the first token after the prefill, then one per round.
    assert len(verified) == len(target.logits) == 1 + len(res.rounds)
    rows = [target.logits[0][-1:], *target.logits[1:]]
    for logits, probs in zip(rows, verified, strict=True):
        torch.testing.assert_close(probs, serving(logits, DSPARK), atol=1e-6, rtol=0)
    assert_the_check_has_teeth(torch.cat(rows), DSPARK)
