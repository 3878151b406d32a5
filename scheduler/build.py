"""Assemble an LLMEngine from an EngineConfig: model, runner, drafter, verify policy, profile."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from scheduler.batching import ContinuousBatcher
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine

if TYPE_CHECKING:
    from scheduler.loader import LoadedModel

log = logging.getLogger(__name__)


def build_engine(config: EngineConfig) -> LLMEngine:
    if config.model == "fake":
        return _build_fake(config)
    from pathlib import Path

    from scheduler.loader import load_target

    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    return assemble_engine(load_target(config.model, config.device, config.dtype, cache_dir), config)


def assemble_engine(loaded: LoadedModel, config: EngineConfig) -> LLMEngine:
    """An engine around an already loaded target (benchmarks build several per model)."""
    from drafts.registry import build_proposer
    from scheduler.runner import TorchModelRunner

    proposer = build_proposer(
        config.speculative, loaded.hf_model, config.draft_checkpoint, config.num_speculative_tokens
    )
    runner = TorchModelRunner(
        loaded.hf_model,
        num_slots=config.max_num_seqs,
        max_model_len=config.max_model_len,
        aux_layer_ids=tuple(proposer.aux_layer_ids) if proposer is not None else (),
        seed=config.seed,
    )
    engine = LLMEngine(
        runner=runner,
        batcher=_batcher(config),
        tokenizer=loaded.tokenizer,
        model_name=loaded.name,
        eos_token_ids=_eos_ids(loaded.hf_model, loaded.tokenizer),
        proposer=proposer,
    )
    _attach_scheduling(engine, config)
    if config.profile_on_start and engine.profile is not None:
        _measure_profile(engine, runner, config)
    return engine


def _batcher(config: EngineConfig) -> ContinuousBatcher:
    return ContinuousBatcher(config.max_num_seqs, config.max_model_len, config.max_num_batched_tokens)


def _attach_scheduling(engine: LLMEngine, config: EngineConfig) -> None:
    """Verify policy, throughput profile and online acceptance estimator (when drafting)."""
    if engine.proposer is None:
        return
    from scheduler.acceptance import OnlineAcceptanceEstimator
    from scheduler.draft_gate import DraftGate
    from scheduler.profiler import ThroughputProfile
    from scheduler.verify_policy import build_policy

    engine.profile = ThroughputProfile(config.max_num_batched_tokens)
    engine.policy = build_policy(config.verify_policy, config.num_speculative_tokens, engine.profile)
    engine.estimator = OnlineAcceptanceEstimator()
    if engine.policy.name in ("dspark", "dspark-production"):  # throughput-aware policies
        engine.gate = DraftGate(engine.profile)


def _eos_ids(hf_model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _measure_profile(engine: LLMEngine, runner, config: EngineConfig) -> None:
    """Time real target steps of several sizes on unallocated slots (their KV is scratch)."""
    import torch

    from scheduler.model import build_packed_batch
    from scheduler.profiler import default_profile_sizes, measure_profile

    assert engine.proposer is not None and engine.profile is not None
    profile, gamma = engine.profile, engine.proposer.max_draft_tokens
    model = runner.model
    context = min(256, config.max_model_len // 2)
    max_query = 1 + gamma

    def run_step(num_tokens: int) -> float:
        # Decode-shaped: requests of up to 1 + gamma tokens each over a realistic context.
        queries, left, slot = [], num_tokens, 0
        while left > 0:
            n = min(left, max_query)
            queries.append((slot % config.max_num_seqs, context, [0] * n))
            left, slot = left - n, slot + 1
        batch = build_packed_batch(queries, list(range(len(queries))), model.device)
        t = time.perf_counter()
        model.forward(batch)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    sizes = default_profile_sizes(config.max_num_seqs, gamma, config.max_num_batched_tokens)
    profile.seed(measure_profile(run_step, sizes, repeats=3))
    log.info("throughput profile (tokens, steps/s): %s", profile.table())


def _build_fake(config: EngineConfig) -> LLMEngine:
    from drafts.registry import build_proposer
    from scheduler.fake import FAKE_TEXT, FakeRunner, build_fake_tokenizer

    tokenizer = build_fake_tokenizer()
    fake_ids = tokenizer.encode(FAKE_TEXT, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    runner = FakeRunner(fake_ids, eos)
    proposer = build_proposer(config.speculative, None, config.draft_checkpoint, config.num_speculative_tokens)
    engine = LLMEngine(
        runner=runner,
        batcher=_batcher(config),
        tokenizer=tokenizer,
        model_name="fake",
        eos_token_ids=frozenset({eos}),
        proposer=proposer,
    )
    _attach_scheduling(engine, config)
    return engine
