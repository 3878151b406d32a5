"""Pure tests of the batcher, KV slots and engine loop, driven by FakeRunner (no torch)."""

from __future__ import annotations

import sys
import threading

import pytest

from drafts.ngram import NgramProposer
from scheduler.batching import ContinuousBatcher
from scheduler.engine import EngineThread, LLMEngine, ServedModel
from scheduler.fake import FakeRunner
from scheduler.kv_slots import KVSlotManager
from scheduler.plan import RequestResult, StepResult
from scheduler.request import FinishReason, Request, SamplingParams
from tests.scheduler.doubles import make_speculator

EOS = 999
FAKE_IDS = list(range(100, 140))  # the fake model's answer: 40 tokens, then EOS


def make_request(req_id: str, prompt_len: int = 5, **params) -> Request:
    return Request(req_id, list(range(1, prompt_len + 1)), SamplingParams(**params), eos_token_ids=frozenset({EOS}))


def make_engine(num_slots=2, budget=8, proposer=None) -> LLMEngine:
    speculator = make_speculator(proposer) if proposer is not None else None
    return LLMEngine(FakeRunner(FAKE_IDS, EOS), ContinuousBatcher(num_slots, 64, budget),
                     ServedModel("fake", None, frozenset({EOS})), speculator)


def test_pure_modules_do_not_import_torch():
    import subprocess

    code = ("import sys, scheduler.config, scheduler.batching, scheduler.kv_slots, scheduler.engine, scheduler.fake, "
            "scheduler.verify_policy, scheduler.profiler, scheduler.acceptance, scheduler.speculator, "
            "scheduler.drafter, scheduler.draft_gate, scheduler.build, drafts.registry, drafts.ngram, drafts.suffix; "
            "assert 'torch' not in sys.modules, 'pure modules imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kv_slots_lowest_first_and_double_free_rejected():
    kv = KVSlotManager(3, 16)
    assert [kv.try_allocate() for _ in range(3)] == [0, 1, 2]
    assert kv.try_allocate() is None
    kv.free(1)
    assert kv.try_allocate() == 1
    with pytest.raises(ValueError):
        kv.free(7)
    kv.free(0)
    with pytest.raises(ValueError):
        kv.free(0)


def test_chunked_prefill_under_budget_then_decode_first():
    b = ContinuousBatcher(max_num_seqs=2, max_model_len=64, max_num_batched_tokens=8)
    b.add(make_request("a", prompt_len=13))
    b.add(make_request("b", prompt_len=3))
    plan = b.schedule()
    assert [(s.req.req_id, s.num_new_tokens, s.samples) for s in plan.scheduled] == [("a", 8, False)]
    b.update(plan, StepResult([RequestResult()]))
    plan = b.schedule()  # a finishes its prompt (5) and b joins with 3: both sample
    assert [(s.req.req_id, s.num_new_tokens, s.samples) for s in plan.scheduled] == [("a", 5, True), ("b", 3, True)]
    outs = b.update(plan, StepResult([RequestResult([7], 0), RequestResult([8], 0)]))
    assert [(o.req_id, o.new_token_ids) for o in outs] == [("a", [7]), ("b", [8])]
    plan = b.schedule()
    assert [(s.req.req_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("b", 1)]


def test_requests_wait_for_a_free_slot():
    b = ContinuousBatcher(max_num_seqs=1, max_model_len=64, max_num_batched_tokens=32)
    b.add(make_request("a", max_tokens=1))
    b.add(make_request("b", max_tokens=1))
    plan = b.schedule()
    assert [s.req.req_id for s in plan.scheduled] == ["a"]
    outs = b.update(plan, StepResult([RequestResult([5], 0)]))
    assert outs[0].finish_reason is FinishReason.LENGTH and b.kv.num_free == 1
    assert [s.req.req_id for s in b.schedule().scheduled] == ["b"]


def test_rollback_advances_only_past_accepted_drafts():
    b = ContinuousBatcher(max_num_seqs=1, max_model_len=64, max_num_batched_tokens=32)
    b.add(make_request("a", prompt_len=4, max_tokens=50))
    b.update(b.schedule(), StepResult([RequestResult([10], 0)]))
    req = b.running[0]
    assert (req.num_tokens, req.num_computed_tokens) == (5, 4)
    plan = b.schedule()
    plan.scheduled[0].draft_ids = [11, 12, 13]
    # Target accepted 11 and 12, rejected 13 and emitted 20 in its place.
    b.update(plan, StepResult([RequestResult([11, 12, 20], 2)]))
    assert req.output_ids == [10, 11, 12, 20]
    assert req.num_computed_tokens == 7  # anchor 10 + accepted 11, 12; 20 is the next anchor
    assert (req.spec.num_drafts, req.spec.num_draft_tokens, req.spec.num_accepted_tokens) == (1, 3, 2)


def test_stop_conditions_cut_an_accepted_run():
    b = ContinuousBatcher(max_num_seqs=2, max_model_len=64, max_num_batched_tokens=32)
    b.add(make_request("len", max_tokens=3))
    b.add(make_request("stop", max_tokens=10, stop_token_ids=(42,)))
    b.add(make_request("eos", max_tokens=10))  # waits: two slots only
    plan = b.schedule()
    outs = b.update(plan, StepResult([RequestResult([1, 2, 3, 4], 3), RequestResult([5, 42, 6], 2)]))
    assert [(o.req_id, o.new_token_ids, o.finish_reason) for o in outs] == [
        ("len", [1, 2, 3], FinishReason.LENGTH), ("stop", [5, 42], FinishReason.STOP)]
    plan = b.schedule()
    outs = b.update(plan, StepResult([RequestResult([7, EOS, 8], 2)]))
    assert outs[0].new_token_ids == [7, EOS] and outs[0].finish_reason is FinishReason.STOP
    ignore = make_request("ignore", max_tokens=3, ignore_eos=True)
    b.add(ignore)
    outs = b.update(b.schedule(), StepResult([RequestResult([EOS, EOS], 1)]))
    assert outs[0].finish_reason is None and outs[0].new_token_ids == [EOS, EOS]


def test_prompt_that_fills_the_context_finishes_without_running():
    b = ContinuousBatcher(max_num_seqs=1, max_model_len=8, max_num_batched_tokens=8)
    out = b.add(make_request("long", prompt_len=8))
    assert out is not None and out.finish_reason is FinishReason.LENGTH and not b.has_work


def test_abort_frees_slot_running_and_waiting():
    b = ContinuousBatcher(max_num_seqs=1, max_model_len=64, max_num_batched_tokens=32)
    b.add(make_request("a"))
    b.add(make_request("b"))
    b.schedule()
    assert b.abort("b").finish_reason is FinishReason.ABORT
    assert b.abort("a").finish_reason is FinishReason.ABORT
    assert b.kv.num_free == 1 and not b.has_work
    assert b.abort("a") is None


def test_fault_hook_fails_only_that_request():
    engine = make_engine()

    def hook(req: Request) -> None:
        if req.req_id == "bad" and req.num_output_tokens >= 2:
            raise RuntimeError("injected")

    engine.fault_hook = hook
    engine.add_request(make_request("bad", max_tokens=5))
    engine.add_request(make_request("good", max_tokens=5))
    outputs: dict[str, list] = {"bad": [], "good": []}
    while engine.has_work:
        for o in engine.step()[0]:
            outputs[o.req_id].append(o)
    bad, good = outputs["bad"][-1], outputs["good"][-1]
    assert bad.finish_reason is FinishReason.ERROR and bad.error and "injected" not in bad.error
    assert sum(len(o.new_token_ids) for o in outputs["bad"]) == 2
    assert good.finish_reason is FinishReason.LENGTH
    assert [t for o in outputs["good"] for t in o.new_token_ids] == FAKE_IDS[:5]
    assert engine.batcher.kv.num_free == 2


def test_engine_with_ngram_drafts_matches_plain_decoding():
    plain = make_engine().generate([[1, 2, 3]], SamplingParams(max_tokens=60))[0]
    drafted = make_engine(proposer=NgramProposer(4, 1, 3)).generate([[1, 2, 3]], SamplingParams(max_tokens=60))[0]
    assert drafted == plain == [*FAKE_IDS, EOS]


def test_engine_thread_delivers_one_final_output_per_request_and_drains():
    engine = make_engine(num_slots=2)
    finished: dict[str, FinishReason] = {}
    tokens: dict[str, list[int]] = {}
    done = threading.Event()

    def on_step(outputs, stats):
        for o in outputs:
            tokens.setdefault(o.req_id, []).extend(o.new_token_ids)
            if o.finished:
                assert o.req_id not in finished, "two final outputs"
                finished[o.req_id] = o.finish_reason
        if len(finished) == 4:
            done.set()

    thread = EngineThread(engine, on_step)
    thread.start()
    for i in range(3):
        thread.add_request(make_request(f"r{i}", max_tokens=20))
    thread.add_request(make_request("gone", max_tokens=20))
    thread.abort("gone")
    assert done.wait(10)
    assert finished == {"r0": FinishReason.LENGTH, "r1": FinishReason.LENGTH,
                        "r2": FinishReason.LENGTH, "gone": FinishReason.ABORT}
    assert tokens["r2"] == FAKE_IDS[:20]
    thread.shutdown(5)
    assert not thread.is_alive and thread.error is None


def test_engine_thread_death_fails_every_request():
    engine = make_engine()
    outputs = []
    thread = EngineThread(engine, lambda outs, stats: outputs.extend(outs))

    def broken_step():
        raise RuntimeError("device lost")

    engine.step = broken_step  # type: ignore[method-assign]
    thread.add_request(make_request("a"))
    thread.start()
    thread._thread.join(5)
    assert isinstance(thread.error, RuntimeError) and not thread.is_alive
    assert [(o.req_id, o.finish_reason) for o in outputs] == [("a", FinishReason.ERROR)]
