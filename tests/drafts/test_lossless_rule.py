"""The rejection rule of the offline verifier reproduces the target distribution exactly."""

from __future__ import annotations

import torch

from drafts.common import sample_from
from drafts.offline import _verify
from scheduler.request import SamplingParams


def test_rejection_sampling_output_follows_target() -> None:
    torch.manual_seed(0)
    v = 6
    target_logits = torch.randn(2, v) * 2
    q = torch.softmax(torch.randn(v) * 2, -1)
    p = torch.softmax(target_logits[0], -1)
    gen = torch.Generator().manual_seed(3)
    params = SamplingParams(max_tokens=4, temperature=1.0)
    counts = torch.zeros(v)
    n = 20000
    for _ in range(n):
        d = int(sample_from(q[None], gen))
        a, nxt = _verify(target_logits, [d], q[None], params, False, gen)
        counts[d if a == 1 else nxt] += 1
    emp = counts / n
    assert float((emp - p).abs().max()) < 0.015, (emp, p)
