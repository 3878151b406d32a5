"""The compiled step (scheduler/compiled.py) against the eager step, on a tiny random Llama with
int4 weights: the same logits, auxiliary features and KV cache contents over a sequence of
steps of every kind the graph serves (one token; several requests with different query
lengths, padded; a short prompt with nothing cached; a decode beside a long prefill chunk,
which is split off and run eager)."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scheduler import kernels
from scheduler.compiled import enable_disk_cache
from scheduler.gguf_blocks import GROUP, quantize_q4_1
from scheduler.loader import default_cache_dir
from scheduler.model import StepOptions, TargetModel, build_packed_batch
from scheduler.quant import Int4Linear, TiledPromptProduct, prompt_chunk_products

AUX = (0, 1)
# The compiled step's two attention paths: inductor's loops and the C++ kernel.
ATTENTION = ["inductor", "native"]


def compiled_options(attention: str, kv_dtype: torch.dtype | None) -> StepOptions:
    native = attention == "native"
    if native:
        assert kernels.load(default_cache_dir()), kernels.build_error()
    return StepOptions(compile=True, kv_dtype=kv_dtype, native_attention=native)


def tiny_llama(
    dtype: torch.dtype, hidden: int = 128, mlp: int = 256, heads: int = 4, kv_heads: int = 2
) -> LlamaForCausalLM:
    """Two random layers, a 256-token vocabulary, seeded."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)


def tiny_int4_llama(
    dtype: torch.dtype = torch.float32, dense_copies: bool = False, native: bool = False
) -> LlamaForCausalLM:
    model = tiny_llama(dtype)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    qt = quantize_q4_1(child.weight)
                    new = Int4Linear(
                        qt.q, qt.scale, qt.zero, GROUP, child.bias, dtype, native=native
                    )
                    if dense_copies:  # as the served model keeps for prompt chunks
                        new.prompt_weight = qt.dequantize().to(dtype)
                    setattr(parent, name, new)
    return model


# (slot, start position, number of new tokens) per request, one list per step.
STEPS = [
    [(0, 0, 40), (1, 0, 20), (2, 0, 30)],  # long prefill chunks: eager in both models
    [(0, 40, 1), (1, 20, 3), (2, 30, 2)],  # mixed query lengths: padded to 3
    [(0, 41, 1)],  # one token
    [(1, 23, 2), (2, 32, 2)],  # no padding
    [(3, 0, 5)],  # a short prompt: nothing cached yet
    [(0, 42, 1), (3, 5, 20)],  # a long chunk (eager) beside a decode (graph)
]


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16])
def test_compiled_step_equals_the_eager_step(kv_dtype, attention):
    enable_disk_cache(default_cache_dir())  # later runs load the graphs instead of compiling
    hf = tiny_int4_llama()
    eager = TargetModel(hf, num_slots=4, max_model_len=128, options=StepOptions(kv_dtype=kv_dtype))
    compiled = TargetModel(
        hf, num_slots=4, max_model_len=128, options=compiled_options(attention, kv_dtype)
    )
    assert compiled.compiled is not None and eager.compiled is None
    # float32 activations: the two differ only in summation order; a bfloat16 cache stores
    # the keys rounded, which the eager step reads back for the step's own tokens too.
    atol = 1e-4 if kv_dtype is None else 2e-2
    gen = torch.Generator().manual_seed(7)
    cpu = torch.device("cpu")
    taken = []
    with torch.inference_mode():
        for step in STEPS:
            queries = [
                (slot, start, torch.randint(0, 256, (n,), generator=gen).tolist())
                for slot, start, n in step
            ]
            rows = list(range(sum(n for _, _, n in step)))
            batch = build_packed_batch(queries, rows[::2], cpu)  # logits at every other row
            taken.append(compiled.compiled.accepts(batch))
            want_logits, want_aux = eager.forward(batch, AUX)
            got_logits, got_aux = compiled.forward(batch, AUX)
            torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=atol)
            torch.testing.assert_close(got_aux, want_aux, rtol=0, atol=atol)
            for slot, start, n in step:
                span = slice(0, start + n)
                for got, want in (
                    (compiled.k_cache, eager.k_cache),
                    (compiled.v_cache, eager.v_cache),
                ):
                    torch.testing.assert_close(
                        got[:, slot, :, span].float(),
                        want[:, slot, :, span].float(),
                        rtol=0,
                        atol=atol,
                    )
    assert taken == [False, True, True, True, True, False]


def test_prompt_chunks_run_as_a_graph_over_the_dense_copies():
    """With the C++ attention, prompt chunks (a first one, and one over cached positions) run
    as the prompt graph over the int4 layers' dense copies, never the eager path, and get the
    eager chunk's logits, features and cache."""
    enable_disk_cache(default_cache_dir())
    hf = tiny_int4_llama(dense_copies=True)
    eager = TargetModel(hf, num_slots=2, max_model_len=128)
    compiled = TargetModel(
        hf, num_slots=2, max_model_len=128, options=compiled_options("native", None)
    )

    def no_eager(*args: object) -> None:
        raise AssertionError("a prompt chunk took the eager path")

    compiled.forward_eager = no_eager  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(3)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        for start, n in ((0, 40), (40, 25)):
            ids = torch.randint(0, 256, (n,), generator=gen).tolist()
            batch = build_packed_batch([(1, start, ids)], list(range(0, n, 3)), cpu)
            with prompt_chunk_products():
                want_logits, want_aux = eager.forward(batch, AUX)
            got_logits, got_aux = compiled.forward(batch, AUX)
            torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)
            torch.testing.assert_close(got_aux, want_aux, rtol=0, atol=1e-4)
            for got, want in ((compiled.k_cache, eager.k_cache), (compiled.v_cache, eager.v_cache)):
                torch.testing.assert_close(
                    got[:, 1, :, : start + n], want[:, 1, :, : start + n], rtol=0, atol=1e-4
                )


@pytest.mark.skipif(
    not (kernels.load(default_cache_dir()) and kernels.prompt_tiles()),
    reason="this CPU has no AMX-BF16 tiles: prompt chunks read dense copies here (test above)",
)
def test_prompt_chunks_run_as_a_graph_over_the_bf16_tiles():
    """Where the CPU has bfloat16 tiles, a native int4 model in bfloat16 multiplies prompt
    chunks from its blocks in them (quant.TiledPromptProduct), in the prompt graph as in the
    eager chunk: the same logits and features, and no dense copy anywhere."""
    enable_disk_cache(default_cache_dir())
    hf = tiny_int4_llama(torch.bfloat16, native=True)
    eager = TargetModel(hf, num_slots=2, max_model_len=128)
    compiled = TargetModel(
        hf, num_slots=2, max_model_len=128, options=compiled_options("native", torch.bfloat16)
    )
    assert compiled.compiled is not None and compiled.compiled.prompt_graph is not None
    for layer in compiled.compiled.prompt_layers:
        for name in ("qkv", "o", "gate_up", "down"):
            assert isinstance(getattr(layer, name), TiledPromptProduct)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 256, (40,), generator=gen).tolist()
    batch = build_packed_batch([(1, 0, ids)], list(range(0, 40, 3)), torch.device("cpu"))
    with torch.inference_mode():
        with prompt_chunk_products():
            want_logits, want_aux = eager.forward(batch, AUX)
        got_logits, got_aux = compiled.forward(batch, AUX)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=2e-2)
    torch.testing.assert_close(got_aux, want_aux, rtol=0, atol=2e-2)
    products = [m for m in hf.modules() if isinstance(m, Int4Linear)]
    assert products and all(isinstance(m._prompt_product(), TiledPromptProduct) for m in products)
    assert all(m.prompt_weight is None for m in products)


def tiny_dense_llama() -> LlamaForCausalLM:
    """bfloat16 dense weights (oneDNN's products) in the embedded model's widths: its down
    projection (1,536 inputs) is where oneDNN's one-row kernel rounds differently from its
    2-31-row one."""
    return tiny_llama(torch.bfloat16, hidden=576, mlp=1536, heads=9, kv_heads=3)


@pytest.mark.parametrize("attention", ATTENTION)
def test_a_row_gets_the_same_bits_decoded_alone_verified_or_beside_others(attention):
    """bfloat16, the served format: four tokens decoded one step at a time, verified in one
    step, and verified beside another request's step give bit-identical logits, which is what
    makes greedy speculation lossless on this path."""
    enable_disk_cache(default_cache_dir())
    hf = tiny_int4_llama(torch.bfloat16)
    model = TargetModel(
        hf, num_slots=2, max_model_len=128, options=compiled_options(attention, torch.bfloat16)
    )
    gen = torch.Generator().manual_seed(9)
    prompt, other = (torch.randint(0, 256, (n,), generator=gen).tolist() for n in (30, 45))
    tokens = torch.randint(0, 256, (4,), generator=gen).tolist()
    cpu = torch.device("cpu")
    with torch.inference_mode():
        model.forward(build_packed_batch([(0, 0, prompt), (1, 0, other)], [], cpu))
        cache = model.k_cache.clone(), model.v_cache.clone()
        first = model.forward(build_packed_batch([(0, 30, tokens[:1])], [0], cpu))[0]
        # One graph for every step shape: a one-token step that got a graph of its own (its
        # sizes specialised to 1) ran other kernels, and on the real model lost the last bits.
        with torch._dynamo.config.patch(error_on_recompile=True):
            alone = torch.cat(
                [first]
                + [
                    model.forward(build_packed_batch([(0, 30 + j, [t])], [0], cpu))[0]
                    for j, t in enumerate(tokens)
                    if j > 0
                ]
            )
            model.k_cache.copy_(cache[0]), model.v_cache.copy_(cache[1])
            verified = model.forward(build_packed_batch([(0, 30, tokens)], [0, 1, 2, 3], cpu))[0]
            model.k_cache.copy_(cache[0]), model.v_cache.copy_(cache[1])
            beside = model.forward(
                build_packed_batch([(1, 45, [7, 8]), (0, 30, tokens)], [2, 3, 4, 5], cpu)
            )[0]
    assert torch.equal(verified, alone)
    assert torch.equal(beside, alone)


def test_a_lone_row_of_dense_products_gets_the_bits_it_gets_beside_a_draft():
    """Dense bfloat16 weights: a token decoded alone and the same token verified with a draft
    after it get the same logits and features, over 40 positions. Without the inert second
    row (CompiledStep.pad_lone_row) oneDNN's one-row kernel parted them at ~1 in 16 of these
    steps, and on the embedded model greedy output with drafting left the output without it
    on 4 of 12 prompts."""
    enable_disk_cache(default_cache_dir())
    model = TargetModel(
        tiny_dense_llama(),
        num_slots=1,
        max_model_len=128,
        options=compiled_options("native", torch.bfloat16),
    )
    assert model.compiled is not None and model.compiled.pad_lone_row
    gen = torch.Generator().manual_seed(1)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        model.forward(
            build_packed_batch(
                [(0, 0, torch.randint(0, 256, (30,), generator=gen).tolist())], [], cpu
            )
        )
        for j in range(40):
            tokens = torch.randint(0, 256, (2,), generator=gen).tolist()
            alone = model.forward(build_packed_batch([(0, 30 + j, tokens[:1])], [0], cpu), AUX)
            drafted = model.forward(build_packed_batch([(0, 30 + j, tokens)], [0, 1], cpu), AUX)
            assert torch.equal(alone[0][0], drafted[0][0]), f"logits at position {30 + j}"
            assert torch.equal(alone[1][0], drafted[1][0]), f"features at position {30 + j}"


def test_a_prompt_chunk_between_decodes_does_not_recompile_the_step():
    """The graph multiplies int4 whatever `prompt_chunk_products` says, so it must not read
    (and guard on) that flag: a guard the first prompt chunk after warm-up broke recompiled
    the step in the middle of serving (11 s on the embedded model). Run in a fresh thread,
    where the flag was never set, as in a server's engine process."""
    enable_disk_cache(default_cache_dir())
    hf = tiny_int4_llama(torch.bfloat16, dense_copies=True)
    cpu = torch.device("cpu")
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            model = TargetModel(
                hf,
                num_slots=2,
                max_model_len=128,
                options=compiled_options("native", torch.bfloat16),
            )
            with torch.inference_mode():
                model.forward(build_packed_batch([(0, 16, [5])], [0], cpu))  # compiles
                model.forward(build_packed_batch([(1, 0, list(range(40)))], [39], cpu))
                with torch._dynamo.config.patch(error_on_recompile=True):
                    model.forward(build_packed_batch([(0, 17, [6]), (1, 40, [7])], [0, 1], cpu))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    worker = threading.Thread(target=serve)
    worker.start()
    worker.join()
    assert not errors, errors[0]
