"""Lossless speculation on the served quantized path: the GGUF file's int4 weights, bfloat16
activations and KV cache, the compiled step; drafting verified by that same quantized target.
Greedy output with a drafter must equal greedy output without one
(tests/scheduler/test_spec_lossless.py on the float32 model; here a subset, for the suite's
time; the first run compiles the step, later runs load it from the disk cache).

In bfloat16 this holds because a row's numbers do not depend on the step it is in: the weight
kernels compute each row alike whatever the other rows, the compiled step runs decodes and
verifications through one graph with attention reduced over positions in order
(tests/scheduler/test_compiled.py checks the bits), and prompts are prefilled in one chunk
(the step budget here leaves room), so their keys and values are the same in both runs.
"""

from __future__ import annotations

import pytest
import torch

from scheduler import kernels
from scheduler.batching import ContinuousBatcher
from scheduler.compiled import enable_disk_cache
from scheduler.engine import LLMEngine, ServedModel
from scheduler.gguf_blocks import GROUP, quantize_q4_1
from scheduler.loader import default_cache_dir, load_target
from scheduler.model import StepOptions
from scheduler.profiler import ThroughputProfile
from scheduler.quant import Int4Linear, Q8Linear, serves_native_kernels
from scheduler.request import SamplingParams
from scheduler.runner import TorchModelRunner
from scheduler.verify_policy import build_policy
from tests.scheduler.doubles import make_speculator
from tests.scheduler.test_spec_lossless import NEW_TOKENS, drafters, run_staggered

BUDGET = 256  # room for a whole prompt beside every decode and verification


@pytest.fixture(scope="module")
def quantized():
    loaded = load_target(device="cpu", dtype="bfloat16", weights="gguf")
    enable_disk_cache(default_cache_dir())
    assert kernels.load(default_cache_dir()), kernels.build_error()  # the served attention
    return loaded


@pytest.fixture(scope="module")
def dspark(quantized):
    """The shipped DSpark checkpoint (trained on the dense target), as `--speculative dspark`."""
    from drafts.registry import build_proposer

    return build_proposer("dspark", quantized.hf_model, None, 7)


@pytest.fixture(scope="module")
def runner(quantized, dspark):
    """One runner for every engine of the module, so the step is compiled once: with the
    features DSpark reads, which the other drafters ignore."""
    return TorchModelRunner(
        quantized.hf_model,
        4,
        512,
        aux_layer_ids=dspark.aux_layer_ids,
        step_options=StepOptions(compile=True, kv_dtype=torch.bfloat16, native_attention=True),
    )


def engine_for(quantized, runner, proposer=None):
    speculator = make_speculator(proposer, _policy()) if proposer is not None else None
    eos = frozenset({quantized.tokenizer.eos_token_id})
    model = ServedModel("test", quantized.tokenizer, eos)
    return LLMEngine(runner, ContinuousBatcher(4, 512, BUDGET), model, speculator)


@pytest.fixture(scope="module")
def prompts(quantized, chat_prompts):
    tok = quantized.tokenizer
    code = (
        "Rename the variable `total` to `acc` in this function and return the full code:\n"
        "def add_all(xs):\n    total = 0\n    for x in xs:\n        total = total + x\n"
        "    return total\n"
    )
    text = tok.apply_chat_template(
        [{"role": "user", "content": code}], add_generation_prompt=True, tokenize=False
    )
    return [*chat_prompts[:5], tok.encode(text, add_special_tokens=False)]


@pytest.fixture(scope="module")
def reference(quantized, runner, prompts):
    engine = engine_for(quantized, runner)
    assert runner.model.compiled is not None
    outs, _ = run_staggered(
        engine, prompts, lambda i: SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    )
    return outs


def _policy():
    profile = ThroughputProfile(64)
    profile.seed([(1, 0.050), (16, 0.055), (64, 0.090)])  # mildly rising cost: lengths vary
    return build_policy("dspark", 7, profile)


@pytest.mark.parametrize("rows", [[1, 8], [3, 16]], ids=["decode-vs-verify", "padded-vs-not"])
def test_int4_rows_do_not_depend_on_the_rest_of_the_product(rows):
    """What losslessness rests on: a row's product is the same bits alone or among others."""
    gen = torch.Generator().manual_seed(5)
    qt = quantize_q4_1(torch.randn(256, 128, generator=gen))
    lin = Int4Linear(qt.q, qt.scale, qt.zero, GROUP, None, torch.bfloat16)
    x = torch.randn(max(rows), 128, generator=gen).to(torch.bfloat16)
    full = lin(x)
    for n in rows:
        assert torch.equal(lin(x[:n]), full[:n])


@pytest.mark.parametrize("name", ["ngram", "oracle", "random"])
def test_quantized_greedy_identical_with_drafter(quantized, runner, prompts, reference, name):
    engine = engine_for(quantized, runner, drafters(quantized, prompts, reference)[name])
    outs, spec = run_staggered(
        engine, prompts, lambda i: SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    )
    assert outs == reference
    assert sum(s.num_draft_tokens for s in spec.values()) > 0
    if name == "oracle":
        accepted = sum(s.num_accepted_tokens for s in spec.values())
        assert accepted > 0.5 * sum(s.num_draft_tokens for s in spec.values())


def test_quantized_greedy_identical_with_shipped_drafter(
    quantized, runner, dspark, prompts, reference
):
    """DSpark's drafts, from the quantized target's own features, verified by that target.
    Beside a target served through the native kernels the draft multiplies through them too
    (its weights as Q8_0, `q8_product`): this is the draft `make serve` runs."""
    assert serves_native_kernels(quantized.hf_model) == kernels.has_vnni()
    if kernels.has_vnni():
        layer = dspark.backbone.layers[0]
        assert all(isinstance(p, Q8Linear) for p in (layer.qkv, layer.kv, layer.o, layer.down))
        assert isinstance(dspark.head.head, Q8Linear) and isinstance(dspark.model.fc.linear, Q8Linear)
    engine = engine_for(quantized, runner, dspark)
    outs, spec = run_staggered(
        engine, prompts, lambda i: SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    )
    assert outs == reference
    assert sum(s.num_accepted_tokens for s in spec.values()) > 0
