"""The composite drafter, `--speculative suffix+dspark` built through the registry, on the real
embedded model (float32): sampled output follows the target distribution (chi-square, as in
test_sampling_exact.py). Greedy output identical to no drafting: test_spec_lossless.py.
"""

from __future__ import annotations

import torch

from scheduler.acceptance import OnlineAcceptanceEstimator
from scheduler.batching import ContinuousBatcher
from scheduler.build import gate_for, lookup_gate_for
from scheduler.engine import LLMEngine, ServedModel
from scheduler.profiler import ThroughputProfile
from scheduler.request import Request, SamplingParams
from scheduler.runner import TorchModelRunner
from scheduler.speculator import Drafter, Speculator
from scheduler.verify_policy import build_policy
from tests.scheduler.test_sampling_exact import ALPHA, chi_square_pvalue

COMPOSITE = "suffix+dspark"


def composite_engine(
    target, policy_name: str, num_slots: int = 4, budget: int = 48, gates: bool = True,
    explore_every: int = 64, feed_drafter_every: int = 8,
) -> LLMEngine:
    from drafts.registry import build_proposers

    profile = ThroughputProfile(budget)
    profile.seed([(1, 0.050), (16, 0.055), (64, 0.090)])  # mildly rising cost: lengths vary
    policy = build_policy(policy_name, 7, profile)
    gated = gates and policy.uses_profile
    drafters = [  # as scheduler/build.py builds them: each drafter's gate, if any
        Drafter(name, proposer, OnlineAcceptanceEstimator(), gate_for(proposer, profile, gated),
                lookup_gate_for(proposer, gated))
        for name, proposer in build_proposers(COMPOSITE, target.hf_model, None, 7)
    ]
    assert [d.name for d in drafters] == ["suffix", "dspark"]
    speculator = Speculator(
        drafters, policy, profile=profile, explore_every=explore_every,
        feed_drafter_every=feed_drafter_every,
    )
    runner = TorchModelRunner(target.hf_model, num_slots, 512, aux_layer_ids=speculator.aux_layer_ids)
    model = ServedModel("test", target.tokenizer, frozenset({target.tokenizer.eos_token_id}))
    return LLMEngine(runner, ContinuousBatcher(num_slots, 512, budget), model, speculator)


def run(engine: LLMEngine, requests: list[Request], stagger: int = 2):
    """Submit one request every `stagger` steps; outputs per request, per-drafter totals and
    the number of steps that explored the profile."""
    outputs: dict[str, list[int]] = {r.req_id: [] for r in requests}
    per_drafter: dict[str, dict[str, int]] = {}
    num_explored = 0  # steps that verified past the policy to price the profile
    pending, step = list(requests), 0
    while pending or engine.has_work:
        if pending and step % stagger == 0:
            engine.add_request(pending.pop(0))
        stepped = engine.step()
        step += 1
        if not stepped:
            continue
        for out in stepped[0]:
            outputs[out.req_id].extend(out.new_token_ids)
        num_explored += stepped[1].profile_explored
        for d in stepped[1].drafters:
            totals = per_drafter.setdefault(d.name, {"asked": 0, "chosen": 0, "verified": 0, "accepted": 0})
            totals["asked"] += d.num_asked
            totals["chosen"] += d.num_chosen
            totals["verified"] += d.num_draft_tokens
            totals["accepted"] += d.num_accepted
    return outputs, per_drafter, num_explored


def test_composite_sampling_follows_the_target(target):
    """Sampled requests on a prompt whose continuation the suffix lookup can copy and the DSpark
    draft can guess: token 3 given tokens 1 and 2 must follow the target's law. Token 1 is
    sampled plainly at prefill; tokens 2 and 3 go through the composite's choice between the
    two candidates (a deterministic lookup and a sampled draft), the verify policy and
    rejection sampling. After "red, blue," the lookup copies " yellow" from the prompt, while
    the target spreads its mass (green 0.33, blue 0.14, yellow 0.12, ...): a choice that leaned
    on the drafted tokens would show here."""
    tok = target.tokenizer
    prompt = tok.encode(
        "red, green, blue, yellow, purple.\nred, green, blue, yellow, purple.\nred,",
        add_special_tokens=False,
    )
    blue, comma = (tok.encode(t, add_special_tokens=False)[0] for t in (" blue", ","))
    n = 256  # about 80 reach (blue, comma): enough bins to see a lean, at a few minutes of CPU
    # No draft gates: they judge by measured time, so on a busy host they may skip a drafter for
    # the whole run, and this test is about the choice and the verification, not the gates.
    engine = composite_engine(target, "dspark", num_slots=16, budget=512, gates=False)
    requests = [Request(f"s{i}", prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=i))
                for i in range(n)]
    outputs, per_drafter, _ = run(engine, requests, stagger=1)
    # Both candidates are offered every round. With the shipped DSpark draft the choice goes to
    # the draft on this prompt (it is confident and right), so the lookup is rarely if ever picked.
    assert per_drafter["suffix"]["asked"] > 0 and per_drafter["dspark"]["verified"] > 0
    third = [o[2] for o in outputs.values() if len(o) == 3 and o[:2] == [blue, comma]]
    assert len(third) > 50  # P(blue, comma) is about 0.32
    with torch.inference_mode():
        logits = target.hf_model(torch.tensor([prompt + [blue, comma]])).logits[0, -1].double()
    p = torch.softmax(logits, dim=-1)
    law = {i: float(p[i]) for i in torch.nonzero(p > 1e-6).flatten().tolist()}
    counts = {t: third.count(t) for t in set(third)}
    assert chi_square_pvalue(counts, law, len(third)) > ALPHA
