"""Engine benchmark on the embedded model, side by side with transformers in the same run.

Reports (the last line printed is one JSON object):
  - step time at batch 1, 4, 16, 32 with 1 and with 8 new tokens per request, ours vs a
    transformers forward with a KV cache of the same context length;
  - single-request decode tokens/s: our engine vs transformers `generate` (batch 1);
  - aggregate tokens/s at 8 and 32 concurrent requests: our engine vs transformers'
    continuous batching (`generate_batch`);
  - the batch-1 step time next to the memory-bandwidth bound (weight bytes / copy bandwidth),
    and the time of that step's weight products alone (the same kernels, nothing between).

Usage: python benchmarks/engine.py [--dtype auto|float32|bfloat16] [--new-tokens 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from scheduler.batching import ContinuousBatcher
from scheduler.engine import LLMEngine, ServedModel
from scheduler.loader import load_target
from scheduler.model import build_packed_batch
from scheduler.request import SamplingParams
from scheduler.runner import TorchModelRunner

CONTEXT = 128  # tokens already in the KV cache when a step is timed


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Bytes moved per second by a large tensor copy (read + write), the best case for GEMV."""
    src = torch.empty(64 * 2**20, dtype=torch.float32).normal_()  # 256 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the destination's pages in before timing
    t = median_time(lambda: dst.copy_(src), 15)  # single copies swing 2x on a shared host
    return 2 * src.numel() * src.element_size() / t / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # tied embedding / LM head counted once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def ours_step_time(runner: TorchModelRunner, batch: int, new_tokens: int, repeats: int) -> float:
    queries = [(slot, CONTEXT, [11] * new_tokens) for slot in range(batch)]
    rows = list(range(batch * new_tokens))  # verification needs logits at every token
    packed = build_packed_batch(queries, rows, runner.device)
    return median_time(lambda: runner.model.forward(packed), repeats)


def products_time(runner: TorchModelRunner, repeats: int) -> float:
    """The batch-1 step's weight products alone (every projection and the LM head, one token):
    the floor for any engine built on these kernels, whatever it does between them."""
    model = runner.model
    x = torch.randn(1, model.hidden_size, dtype=model.dtype)

    def products() -> None:
        for layer in model.fused:
            layer.qkv(x)
            layer.o(x)
            gate_up = layer.gate_up(x)
            layer.down(gate_up[:, : layer.gate_up_sizes[0]])
        model.head(x)

    with torch.inference_mode():
        return median_time(products, repeats)


def hf_step_time(hf, batch: int, new_tokens: int, repeats: int) -> float:
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        ctx = torch.full((batch, CONTEXT), 11)
        hf(input_ids=ctx, past_key_values=cache, use_cache=True)
        ids = torch.full((batch, new_tokens), 11)
        pos = torch.arange(CONTEXT, CONTEXT + new_tokens).expand(batch, -1)

        def step():
            hf(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
            cache.crop(-new_tokens)  # drop the tokens just appended

        return median_time(step, repeats)


def ours_generate(target, prompts, max_tokens: int, num_slots: int) -> float:
    runner = TorchModelRunner(target.hf_model, num_slots, 1024)
    model = ServedModel("bench", target.tokenizer, frozenset())
    engine = LLMEngine(runner, ContinuousBatcher(num_slots, 1024, 512), model)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t
    assert all(len(o) == max_tokens for o in outs)
    return sum(len(o) for o in outs) / elapsed


def hf_generate(target, prompt, max_tokens: int) -> float:
    hf = target.hf_model
    ids = torch.tensor([prompt])
    kwargs = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False,
              "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    with torch.inference_mode():
        hf.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        t = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        elapsed = time.perf_counter() - t
    return (out.shape[1] - ids.shape[1]) / elapsed


def hf_generate_batch(target, prompts, max_tokens: int) -> float:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.inference_mode():
        target.hf_model.generate_batch(inputs=prompts[:1], generation_config=cfg, max_new_tokens=4)
        t = time.perf_counter()
        out = target.hf_model.generate_batch(inputs=prompts, generation_config=cfg)
        elapsed = time.perf_counter() - t
    return sum(len(o.generated_tokens) for o in out.values()) / elapsed


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    topics = ["the sea", "mountains", "a city at night", "autumn", "robots", "coffee", "rain", "music"]
    prompts = []
    for i in range(n):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a short story about {topics[i % len(topics)]}."}],
            add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and tokens (smoke run)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(device="cpu", dtype=args.dtype)
    dtype = str(next(target.hf_model.parameters()).dtype).removeprefix("torch.")
    batches = [1, 4] if args.quick else [1, 4, 16, 32]
    new_tokens = 8 if args.quick else args.new_tokens
    result: dict = {"dtype": dtype, "threads": torch.get_num_threads(), "context": CONTEXT}

    runner = TorchModelRunner(target.hf_model, max(batches), 1024)
    steps = []
    for b in batches:
        for q in (1, 8):
            ours = ours_step_time(runner, b, q, args.repeats)
            hf = hf_step_time(target.hf_model, b, q, args.repeats)
            steps.append({"batch": b, "new_tokens": q, "ours_ms": ours * 1e3, "transformers_ms": hf * 1e3})
            print(f"step batch={b:2d} new_tokens={q}: ours {ours*1e3:7.1f} ms   transformers {hf*1e3:7.1f} ms", flush=True)
    result["step_time"] = steps

    bw = copy_bandwidth_gbs()
    wb = weight_bytes(target.hf_model)
    bound_ms = wb / (bw * 1e9) * 1e3
    b1 = steps[0]["ours_ms"]
    products_ms = products_time(runner, 3 * args.repeats) * 1e3
    result["bandwidth"] = {"copy_gb_s": bw, "weight_mb": wb / 1e6, "bound_ms": bound_ms,
                           "batch1_step_ms": b1, "ratio_to_bound": b1 / bound_ms,
                           "batch1_products_ms": products_ms,
                           "products_ratio_to_bound": products_ms / bound_ms}
    print(f"batch-1 step {b1:.1f} ms vs bound {bound_ms:.1f} ms ({wb/1e6:.0f} MB at {bw:.1f} GB/s); "
          f"its weight products alone {products_ms:.1f} ms ({products_ms / bound_ms:.2f}x the bound)", flush=True)

    prompts = make_prompts(target.tokenizer, 32)
    ours_1 = ours_generate(target, prompts[:1], new_tokens, 1)
    hf_1 = hf_generate(target, prompts[0], new_tokens)
    result["single_request"] = {"ours_tok_s": ours_1, "transformers_generate_tok_s": hf_1, "speedup": ours_1 / hf_1}
    print(f"single request: ours {ours_1:.1f} tok/s   transformers generate {hf_1:.1f} tok/s", flush=True)

    result["aggregate"] = []
    for n in [8] if args.quick else [8, 32]:
        ours_n = ours_generate(target, prompts[:n], new_tokens, n)
        hf_n = hf_generate_batch(target, prompts[:n], new_tokens)
        result["aggregate"].append({"concurrency": n, "ours_tok_s": ours_n,
                                    "transformers_generate_batch_tok_s": hf_n, "speedup": ours_n / hf_n})
        print(f"aggregate @{n}: ours {ours_n:.1f} tok/s   transformers generate_batch {hf_n:.1f} tok/s", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
