"""The defining test: greedy output with any drafter equals greedy output without drafting.

Real embedded model, float32, 8 prompts submitted together with staggered arrival, so every
batch mixes prefill, plain decode and verification with different draft lengths per request.
"""

from __future__ import annotations

import pytest

from drafts.ngram import NgramProposer
from scheduler.profiler import ThroughputProfile
from scheduler.request import Request, SamplingParams
from scheduler.verify_policy import build_policy
from tests.scheduler.doubles import OracleProposer, RandomProposer
from tests.scheduler.test_engine_real import make_engine

NEW_TOKENS = 32


def run_staggered(engine, prompts, params_for):
    outputs: dict[str, list[int]] = {}
    spec_seen = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_work:
        if pending and step % 2 == 0:
            i, prompt = pending.pop(0)
            engine.add_request(Request(f"r{i}", prompt, params_for(i)))
            outputs[f"r{i}"] = []
        stepped = engine.step()
        step += 1
        for out in stepped[0] if stepped else []:
            outputs[out.req_id].extend(out.new_token_ids)
            if out.spec is not None:
                spec_seen[out.req_id] = out.spec
    return [outputs[f"r{i}"] for i in range(len(prompts))], spec_seen


@pytest.fixture(scope="module")
def prompts(target, chat_prompts):
    tok = target.tokenizer
    code = (
        "Rename the variable `total` to `acc` in this function and return the full code:\n"
        "def add_all(xs):\n    total = 0\n    for x in xs:\n        total = total + x\n"
        "    return total\n"
    )
    text = tok.apply_chat_template([{"role": "user", "content": code}], add_generation_prompt=True, tokenize=False)
    return [*chat_prompts[:7], tok.encode(text, add_special_tokens=False)]


@pytest.fixture(scope="module")
def reference(target, prompts):
    engine = make_engine(target, num_slots=4, budget=48)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    outs, _ = run_staggered(engine, prompts, lambda i: greedy)
    return outs


def drafters(target, prompts, reference):
    vocab = target.hf_model.config.vocab_size
    refs = {tuple(p): r for p, r in zip(prompts, reference)}
    return {
        "ngram": NgramProposer(7, min_n=1, max_n=3),
        "random": RandomProposer(vocab, gamma=7),
        "oracle": OracleProposer(refs, gamma=7),
    }


@pytest.mark.parametrize("name", ["ngram", "random", "oracle"])
@pytest.mark.parametrize("policy_name", ["fixed", "dspark"])
def test_greedy_identical_with_drafter(target, prompts, reference, name, policy_name):
    proposer = drafters(target, prompts, reference)[name]
    profile = ThroughputProfile(64)
    profile.seed([(1, 0.050), (16, 0.055), (64, 0.090)])  # mildly rising cost: lengths vary
    policy = build_policy(policy_name, 7, profile)
    engine = make_engine(target, num_slots=4, budget=48, proposer=proposer, policy=policy)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    # Request 3 opts out of speculation: it must still decode correctly, with no drafts.
    outs, spec = run_staggered(
        engine, prompts, lambda i: greedy if i != 3 else SamplingParams(
            max_tokens=NEW_TOKENS, temperature=0.0, speculative=False)
    )
    assert outs == reference
    assert "r3" not in spec
    assert spec, "no request was ever drafted for"
    accepted = sum(s.num_accepted_tokens for s in spec.values())
    if name == "oracle":
        assert accepted > 0.5 * sum(s.num_draft_tokens for s in spec.values())
    if name == "ngram":
        assert accepted > 0  # the code-editing prompt repeats its context


@pytest.mark.parametrize("name", ["random", "oracle"])
def test_draft_gate_keeps_output_identical_and_skips_a_useless_drafter(
    target, prompts, reference, name
):
    from scheduler.draft_gate import DraftGate

    proposer = drafters(target, prompts, reference)[name]
    profile = ThroughputProfile(64)
    profile.seed([(1, 0.050), (16, 0.055), (64, 0.090)])
    gate = DraftGate(profile)
    engine = make_engine(
        target, num_slots=4, budget=48, proposer=proposer,
        policy=build_policy("dspark", 7, profile), gate=gate,
    )
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    outs, spec = run_staggered(engine, prompts, lambda i: greedy)
    assert outs == reference
    if name == "random":  # almost never accepted: most steps do not draft at all
        assert gate.num_skipped > 20
    else:  # accepted most of the time: drafting goes on
        assert sum(s.num_accepted_tokens for s in spec.values()) > 0
        assert gate.num_skipped < 5


def test_stop_inside_accepted_run_is_exact(target, prompts, reference):
    """max_tokens and stop ids that fall inside an accepted draft run cut it exactly."""
    refs = {tuple(p): r for p, r in zip(prompts, reference)}
    engine = make_engine(target, num_slots=4, budget=48, proposer=OracleProposer(refs, gamma=7),
                         policy=build_policy("fixed", 7, None))
    long_i = max(range(len(reference)), key=lambda i: len(reference[i]))
    short_i = (long_i + 1) % len(reference)
    stop_token = reference[long_i][9]
    params = [SamplingParams(max_tokens=5, temperature=0.0),
              SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=(stop_token,))]
    outs, _ = run_staggered(engine, [prompts[short_i], prompts[long_i]], lambda i: params[i])
    assert outs[0] == reference[short_i][:5]
    assert outs[1] == reference[long_i][: reference[long_i].index(stop_token) + 1]


@pytest.mark.parametrize("name", ["eagle3", "dflash", "dspark"])
def test_greedy_identical_with_shipped_drafter(target, prompts, reference, name):
    """Each shipped checkpoint, served through the registry like `--speculative NAME`: the output
    is the target's own, and the trained drafts are accepted, not merely proposed."""
    from drafts.registry import build_proposer, get

    shipped = get(name).shipped_checkpoint
    assert shipped is not None and (shipped / "model.safetensors").exists(), "checkpoint missing"
    proposer = build_proposer(name, target.hf_model, None, 7)
    profile = ThroughputProfile(64)
    profile.seed([(1, 0.050), (16, 0.055), (64, 0.090)])
    engine = make_engine(target, num_slots=4, budget=48, proposer=proposer,
                         policy=build_policy("dspark", 7, profile))
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    outs, spec = run_staggered(engine, prompts, lambda i: greedy)
    assert outs == reference
    assert sum(s.num_accepted_tokens for s in spec.values()) > 0


def test_composite_greedy_identical(target, prompts, reference):
    """`--speculative suffix+dspark` through the registry, dspark policy with its gates, and
    exploring the profile whenever it can (`Speculator._explore`)."""
    from tests.scheduler.test_composite_lossless import composite_engine, run

    engine = composite_engine(target, "dspark", explore_every=1)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    opt_out = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, speculative=False)
    requests = [Request(f"r{i}", p, opt_out if i == 3 else greedy) for i, p in enumerate(prompts)]
    outputs, per_drafter, num_explored = run(engine, requests)
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == reference
    assert num_explored > 0
    # Both drafters had drafts kept and verified; the lookup found the copied code.
    assert per_drafter["suffix"]["accepted"] > 0
    assert per_drafter["dspark"]["verified"] > 0
