"""The rejection rule of the offline verifier (scheduler.sampling.verify_draft, the server's own)
reproduces the target distribution exactly."""

from __future__ import annotations

import torch

from scheduler.request import SamplingParams
from scheduler.sampling import sample_rows, verify_draft


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
        d = int(sample_rows(q[None], gen))
        _, tokens = verify_draft(target_logits, params, [], {}, [d], q[None], gen)
        counts[tokens[0]] += 1
    emp = counts / n
    assert float((emp - p).abs().max()) < 0.015, (emp, p)
