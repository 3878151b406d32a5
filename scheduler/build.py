"""Assemble an LLMEngine from an EngineConfig: target, runner, batcher and Speculator.

This is the one place the scheduler reaches into drafts/: the drafter registry, at build time.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scheduler.batching import ContinuousBatcher
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine, ServedModel
from scheduler.prefix_cache import PREFIX_BLOCK_SIZE, PrefixIndex
from scheduler.speculator import Speculator

if TYPE_CHECKING:
    from scheduler.draft_gate import DraftGate, LookupGate
    from scheduler.drafter import Proposer
    from scheduler.loader import LoadedModel
    from scheduler.model import StepOptions, TargetModel
    from scheduler.profiler import ThroughputProfile
    from scheduler.runner import TorchModelRunner

log = logging.getLogger(__name__)

# Step times the throughput profile folds into its curve at once (ThroughputProfile.observe):
# a fold costs 0.12-0.15 ms with the caches cold after a forward, 1.3 % of a step at one stream.
PROFILE_FOLD_EVERY = 4


def drafter_names() -> list[str]:
    """Names `--speculative` accepts ("none" and "auto" first; several joined by '+' make a
    composite); reading them loads no drafter code."""
    from drafts.registry import AUTO, available

    names = available()
    return [names[0], AUTO, *names[1:]]


def build_proposers(config: EngineConfig, target: Any) -> list[tuple[str, Proposer]]:
    """The configured drafters around the target's HF model (empty: no drafting)."""
    from drafts.registry import build_proposers as build

    return build(
        config.speculative, target, config.draft_checkpoint, config.num_speculative_tokens
    )


def build_speculator(
    config: EngineConfig, proposers: list[tuple[str, Proposer]]
) -> Speculator | None:
    """Drafters (each with its online acceptance estimator, and a draft gate when the policy
    weighs cost and drafting takes time) + the verify policy + the throughput profile."""
    if not proposers:
        return None
    from scheduler.acceptance import OnlineAcceptanceEstimator
    from scheduler.profiler import ThroughputProfile
    from scheduler.speculator import Drafter
    from scheduler.verify_policy import build_policy

    profile = ThroughputProfile(config.max_num_batched_tokens, fold_every=PROFILE_FOLD_EVERY)
    policy = build_policy(config.verify_policy, config.num_speculative_tokens, profile)
    gated = config.draft_gate and policy.uses_profile
    drafters = [
        Drafter(
            name, proposer, OnlineAcceptanceEstimator(), gate_for(proposer, profile, gated),
            lookup_gate_for(proposer, gated),
        )
        for name, proposer in proposers
    ]
    return Speculator(drafters, policy, profile=profile)


def gate_for(proposer: Proposer, profile: ThroughputProfile, gated: bool) -> DraftGate | None:
    """A draft gate for a drafter whose drafting costs time (a model); none for a lookup.

    The gate's verdict is one running mean over every request: in mixed traffic, one-token
    matches that failed on chat made it skip the lookup for the requests that were copying
    too (docs/scheduling.md). A lookup gets `lookup_gate_for`'s per-request verdict instead."""
    from scheduler.draft_gate import DraftGate

    if not gated or getattr(proposer, "free_to_ask", False):
        return None
    return DraftGate(profile)


def lookup_gate_for(proposer: Proposer, gated: bool) -> LookupGate | None:
    """A per-request gate for a lookup (scheduler/draft_gate.py `LookupGate`): asking costs
    tens of microseconds a request, which under load is what its drafts win back."""
    from scheduler.draft_gate import LookupGate

    if not gated or not getattr(proposer, "free_to_ask", False):
        return None
    return LookupGate()


def build_engine(config: EngineConfig) -> LLMEngine:
    if config.model == "fake":
        return _build_fake(config)
    from scheduler.loader import load_target

    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    loaded = load_target(
        config.model, config.device, config.dtype, cache_dir, config.weights, config.int4_kernel
    )
    return assemble_engine(loaded, config)


def assemble_engine(loaded: LoadedModel, config: EngineConfig) -> LLMEngine:
    """An engine around an already loaded target (benchmarks build several per model)."""
    from scheduler.runner import TorchModelRunner

    speculator = build_speculator(config, build_proposers(config, loaded.hf_model))
    runner = TorchModelRunner(
        loaded.hf_model,
        num_slots=config.max_num_seqs,
        max_model_len=config.max_model_len,
        aux_layer_ids=speculator.aux_layer_ids if speculator is not None else (),
        seed=config.seed,
        step_options=step_options(config, loaded.hf_model),
    )
    if speculator is not None and runner.model.compiled is not None:
        # Prompt chunks run as a pass of their own.
        speculator.own_pass_above = runner.model.compiled.max_query
    model = ServedModel(loaded.name, loaded.tokenizer, _eos_ids(loaded.hf_model, loaded.tokenizer))
    batcher = _batcher(config)
    num_blocks = config.prefix_cache_tokens // PREFIX_BLOCK_SIZE
    if num_blocks:
        store = runner.enable_prefix_cache(num_blocks, PREFIX_BLOCK_SIZE)
        batcher.prefix = PrefixIndex(num_blocks, PREFIX_BLOCK_SIZE)
        mib = store.nbytes / 2**20
        log.info("prefix cache: %d tokens, %.0f MiB", num_blocks * PREFIX_BLOCK_SIZE, mib)
    engine = LLMEngine(runner, batcher, model, speculator)
    if runner.model.compiled is not None:
        warm_up_compiled(runner.model, runner.aux_layer_ids)
    if config.profile_on_start and speculator is not None and speculator.profile is not None:
        _measure_profile(speculator, runner, config)
    # Everything built so far (the model, the tokenizer, compiled graphs, imported modules:
    # over a million objects) lives as long as the process. Out of the collector's sight, a
    # full collection scans only what serving allocates: with them, one took 0.5 s in the
    # middle of a 16-stream run (the suffix drafter's index allocates steadily).
    gc.collect()
    gc.freeze()
    return engine


def step_options(config: EngineConfig, hf_model: Any) -> StepOptions:
    """--compile-step, --kv-dtype and --attention resolved for this model (see their help in
    config.py)."""
    import torch

    from scheduler.compiled import enable_disk_cache
    from scheduler.loader import default_cache_dir
    from scheduler.model import StepOptions

    param = next(hf_model.parameters())
    on_cpu, dtype = param.device.type == "cpu", param.dtype
    if config.compile_step == "auto":
        compile_step = on_cpu and dtype != torch.float32
    else:
        compile_step = config.compile_step == "on"
    if config.kv_dtype == "auto":
        kv_dtype = torch.bfloat16 if compile_step and dtype == torch.bfloat16 else None
    else:
        kv_dtype = getattr(torch, config.kv_dtype)
    native_attention = False
    if compile_step:
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        enable_disk_cache(cache_dir)
        native_attention = _native_attention(config, hf_model.config, cache_dir, on_cpu)
    return StepOptions(compile=compile_step, kv_dtype=kv_dtype, native_attention=native_attention)


def _native_attention(config: EngineConfig, cfg: Any, cache_dir: Path, on_cpu: bool) -> bool:
    """--attention resolved: whether the compiled step attends through scheduler/kernels."""
    if config.attention == "inductor":
        return False
    from scheduler import kernels
    from scheduler.model import attention_shape

    heads, kv_heads, head_dim = attention_shape(cfg)
    if not on_cpu:
        why = "the kernel is built for CPUs only"
    elif not kernels.attention_serves(head_dim, heads, kv_heads):
        why = f"no kernel built for head_dim {head_dim} and {heads}/{kv_heads} heads"
    elif not kernels.load(cache_dir):
        why = f"the kernel did not build: {kernels.build_error()}"
    else:
        return True
    if config.attention == "native":
        raise RuntimeError(f"--attention native: {why}")
    log.info("the compiled step attends through inductor's loops: %s", why)
    return False


def warm_up_compiled(model: TargetModel, aux_layer_ids: tuple[int, ...]) -> None:
    """Compile the step's graph (or load it from the disk cache): one serves every shape. Then
    one prompt chunk, which compiles the prompt graph (or, without one, lays out the dense
    copies the eager chunk's products read, quant.py's `_prompt_product`) before the first
    request waits for it."""
    from scheduler.compiled import SPAN_QUANTUM
    from scheduler.model import build_packed_batch

    t = time.perf_counter()
    context = max(0, min(SPAN_QUANTUM, model.k_cache.shape[3] - 1))
    model.forward(build_packed_batch([(0, context, [0])], [0], model.device), aux_layer_ids)
    assert model.compiled is not None
    chunk = min(model.compiled.max_query + 1, model.k_cache.shape[3])
    model.forward(
        build_packed_batch([(0, 0, [0] * chunk)], [chunk - 1], model.device), aux_layer_ids
    )
    log.info("compiled step ready in %.1f s", time.perf_counter() - t)


def _batcher(config: EngineConfig) -> ContinuousBatcher:
    return ContinuousBatcher(config.max_num_seqs, config.max_model_len, config.max_num_batched_tokens)


def _eos_ids(hf_model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _measure_profile(speculator: Speculator, runner: TorchModelRunner, config: EngineConfig) -> None:
    """Time real target steps of several sizes on unallocated slots (their KV is scratch)."""
    import torch

    from scheduler.model import build_packed_batch
    from scheduler.profiler import default_profile_sizes, measure_profile

    assert speculator.profile is not None
    gamma = speculator.max_draft_tokens
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

    q = model.row_quantum
    sizes = default_profile_sizes(config.max_num_seqs, gamma, config.max_num_batched_tokens, q)
    speculator.profile.seed(measure_profile(run_step, sizes, repeats=3), row_quantum=q)
    log.info("throughput profile (tokens, steps/s): %s", speculator.profile.table())


def _build_fake(config: EngineConfig) -> LLMEngine:
    from scheduler.fake import FAKE_TEXT, FakeRunner, build_fake_tokenizer

    tokenizer = build_fake_tokenizer()
    fake_ids = tokenizer.encode(FAKE_TEXT, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    model = ServedModel("fake", tokenizer, frozenset({eos}))
    speculator = build_speculator(config, build_proposers(config, None))
    return LLMEngine(FakeRunner(fake_ids, eos), _batcher(config), model, speculator)
