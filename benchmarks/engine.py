"""Engine benchmark on the embedded model as served, against llama.cpp and transformers, in one run.

Reports (the last line printed is one JSON object):
  - llama.cpp side by side (llama-cpp-python on the same GGUF file, same threads, run from its
    own virtual environment: --llama-cpp-python, else the column is skipped with a note):
    single-request greedy decode tok/s at 128 and 1,024 tokens of context, time to first token
    of a 1,000-token prompt, and how many greedy tokens the two agree on;
  - step time of the served model at batch 1 with 1, 2, 4, 8, 16 new tokens (the verification
    costs the throughput profile sees), and at larger batches next to transformers' forward;
  - the batch-1 step against the bandwidth bound computed from the bytes it reads (every
    product's weights in the served format, the LM head, the KV cache at that context), and the
    step's weight products alone;
  - what the compiled step removes: the batch-1 step eager vs compiled at both contexts, and
    the KV cache in float32 vs bfloat16 at 1,024 (each a graph of its own: minutes the first
    time, then loaded from the disk cache);
  - aggregate tok/s at 8 and 32 concurrent requests vs transformers `generate_batch`, and
    single-request tok/s vs transformers `generate` (transformers on the dense model).

Usage:
    python benchmarks/engine.py --threads 2 --llama-cpp-python <venv with llama-cpp-python>/bin/python
    [--weights auto|gguf|dense] [--dtype auto] [--compile-step auto] [--kv-dtype auto]
    [--attention auto|native|inductor]   (the two attention paths side by side:
    benchmarks/compiled_attention.py)
    [--speculative none] [--new-tokens 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from llama_cpp_side import median_run  # benchmarks/llama_cpp_side.py, beside this script

from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.loader import embedded_gguf_path, load_target
from scheduler.model import StepOptions, TargetModel, build_packed_batch
from scheduler.request import Request, SamplingParams

REPO = Path(__file__).resolve().parent.parent
LLAMA_SIDE = Path(__file__).resolve().parent / "llama_cpp_side.py"


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


def product_bytes(product: Any) -> int:
    """Bytes one call of a served product reads: its weights in the format they are kept."""
    if hasattr(product, "qs"):  # Q8Linear, native: its int8 blocks, scales and offsets
        return sum(t.numel() * t.element_size() for t in (product.qs, product.d, product.c))
    if hasattr(product, "plane"):  # Q8Linear: two int4 planes
        return product_bytes(product.plane)
    names = ("packed", "scales_zeros", "weight", "bias")
    tensors = [getattr(product, n, None) for n in names]
    if hasattr(product, "packed"):  # Int4Linear: its `weight` is not what it multiplies
        tensors = tensors[:2] + tensors[3:]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def step_bytes(model: TargetModel, context: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) a batch-1 decode step at `context` reads."""
    weights = product_bytes(model.head)
    for f in model.fused:
        weights += sum(product_bytes(p) for p in (f.qkv, f.o, f.gate_up, f.down))
    kv = 2 * model.num_layers * model.num_kv_heads * context * model.head_dim
    return weights, kv * model.k_cache.element_size()


def step_time(model: TargetModel, batch: int, new_tokens: int, context: int, repeats: int) -> float:
    queries = [(slot, context, [11] * new_tokens) for slot in range(batch)]
    packed = build_packed_batch(queries, list(range(batch * new_tokens)), model.device)
    return median_time(lambda: model.forward(packed), repeats)


def products_time(model: TargetModel, repeats: int) -> float:
    """The batch-1 step's weight products alone (every projection and the LM head, one token):
    the floor for any engine built on these kernels, whatever it does between them."""
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


def hf_step_time(hf, batch: int, new_tokens: int, context: int, repeats: int) -> float:
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        hf(input_ids=torch.full((batch, context), 11), past_key_values=cache, use_cache=True)
        ids = torch.full((batch, new_tokens), 11)
        pos = torch.arange(context, context + new_tokens).expand(batch, -1)

        def step():
            hf(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
            cache.crop(-new_tokens)  # drop the tokens just appended

        return median_time(step, repeats)


_request_ids = iter(range(10**9))


def ours_single(engine, ids: list[int], new_tokens: int) -> dict:
    """One request alone: time to its first token, then its decode rate (greedy)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(Request(f"bench-{next(_request_ids)}", list(ids), params))
    tokens: list[int] = []
    first_at = 0.0
    while engine.has_work:
        stepped = engine.step()
        for out in stepped[0] if stepped else []:
            tokens.extend(out.new_token_ids)
        if tokens and not first_at:
            first_at = time.perf_counter()
    end = time.perf_counter()
    return {"prompt_tokens": len(ids), "ttft_s": first_at - t0,
            "decode_tok_s": (len(tokens) - 1) / (end - first_at), "tokens": tokens}


def ours_aggregate(engine, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t
    assert all(len(o) == max_tokens for o in outs)
    return sum(len(o) for o in outs) / elapsed


def hf_generate(hf, prompt: list[int], max_tokens: int) -> float:
    ids = torch.tensor([prompt])
    kwargs = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False,
              "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    with torch.inference_mode():
        hf.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        t = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        elapsed = time.perf_counter() - t
    return (out.shape[1] - ids.shape[1]) / elapsed


def hf_generate_batch(hf, prompts: list[list[int]], max_tokens: int) -> float:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.inference_mode():
        hf.generate_batch(inputs=prompts[:1], generation_config=cfg, max_new_tokens=4)
        t = time.perf_counter()
        out = hf.generate_batch(inputs=prompts, generation_config=cfg)
        elapsed = time.perf_counter() - t
    return sum(len(o.generated_tokens) for o in out.values()) / elapsed


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    topics = ["the sea", "mountains", "a city at night", "autumn", "robots", "coffee", "rain", "music"]
    prompts = []
    for i in range(n):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a short story about {topics[i % len(topics)]}."}],
            add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def long_prompts(tokenizer, lengths: dict[str, int]) -> dict[str, list[int]]:
    """Prompts of exact token counts, cut from this repository's own documentation."""
    text = "\n\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= max(lengths.values()), "not enough text for the longest prompt"
    return {name: ids[:n] for name, n in lengths.items()}


def llama_cpp(python: str | None, prompts: dict[str, list[int]], threads: int, new_tokens: int,
              repeats: int) -> dict:
    if not python or not Path(python).exists():
        note = "skipped: pass --llama-cpp-python (a python with llama-cpp-python installed)"
        print(f"llama.cpp: {note}", flush=True)
        return {"skipped": note}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([{"name": k, "ids": v} for k, v in prompts.items()], f)
    cmd = [python, str(LLAMA_SIDE), "--model", str(embedded_gguf_path()), "--threads", str(threads),
           "--prompts", f.name, "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    result = json.loads(out.strip().splitlines()[-1])
    result["results"] = {r.pop("name"): r for r in result["results"]}
    return result


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def side_by_side(engine, tokenizer, args, threads: int, new_tokens: int) -> list[dict]:
    lengths = {"context 128": 128, "context 1024": 1024, "prompt 1000": 1000}
    if args.quick:
        lengths = {"context 64": 64, "context 256": 256, "prompt 200": 200}
    prompts = long_prompts(tokenizer, lengths)
    ours_single(engine, prompts[next(iter(prompts))][:16], 4)  # warm-up
    # Each side runs each prompt `side_repeats` times and keeps the median: one run of 64 tokens
    # moves by 10 % or more on a shared machine.
    ours = {name: median_run([ours_single(engine, ids, new_tokens) for _ in range(args.side_repeats)])
            for name, ids in prompts.items()}
    llama = llama_cpp(args.llama_cpp_python, prompts, threads, new_tokens, args.side_repeats)
    rows = []
    for name, mine in ours.items():
        row = {"prompt": name, "prompt_tokens": mine["prompt_tokens"],
               "ours_decode_tok_s": mine["decode_tok_s"], "ours_ttft_s": mine["ttft_s"]}
        theirs = llama.get("results", {}).get(name)
        line = f"{name}: ours decode {mine['decode_tok_s']:.1f} tok/s, TTFT {mine['ttft_s']*1e3:.0f} ms"
        if theirs is not None:
            row.update(llama_decode_tok_s=theirs["decode_tok_s"], llama_ttft_s=theirs["ttft_s"],
                       decode_ratio=mine["decode_tok_s"] / theirs["decode_tok_s"],
                       ttft_ratio=theirs["ttft_s"] / mine["ttft_s"],
                       greedy_tokens_agreeing=agreeing_prefix(mine["tokens"], theirs["tokens"]))
            line += (f"   llama.cpp decode {theirs['decode_tok_s']:.1f} tok/s, TTFT "
                     f"{theirs['ttft_s']*1e3:.0f} ms   (decode {row['decode_ratio']:.2f}x, TTFT "
                     f"{row['ttft_ratio']:.2f}x; greedy agrees on {row['greedy_tokens_agreeing']} "
                     f"of {len(mine['tokens'])} tokens)")
        print(line, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch and llama.cpp threads (0: torch's default)")
    ap.add_argument("--llama-cpp-python", default=os.environ.get("DSPARK_LLAMA_CPP_PYTHON"),
                    help="python of a venv with llama-cpp-python (env DSPARK_LLAMA_CPP_PYTHON)")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile-step", default="auto")
    ap.add_argument("--kv-dtype", default="auto")
    ap.add_argument("--attention", default="auto", help="auto | native | inductor")
    ap.add_argument("--int4-kernel", default="auto", help="auto | native | aten")
    ap.add_argument("--speculative", default="none", help="drafter of the served engine")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--side-repeats", type=int, default=3,
                    help="runs per prompt on each side of the llama.cpp comparison (median kept)")
    ap.add_argument("--quick", action="store_true", help="short prompts, few sizes (smoke run)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    new_tokens = 8 if args.quick else args.new_tokens
    slots = 8 if args.quick else 32
    max_len = (256 if args.quick else 1024) + new_tokens + 32
    config = EngineConfig(
        device="cpu", dtype=args.dtype, weights=args.weights, compile_step=args.compile_step,
        kv_dtype=args.kv_dtype, attention=args.attention, int4_kernel=args.int4_kernel,
        max_num_seqs=slots, max_model_len=max_len,
        speculative=args.speculative, profile_on_start=args.speculative != "none",
        cache_dir=args.cache_dir,
    )
    loaded = load_target(config.model, "cpu", config.dtype, Path(args.cache_dir) if args.cache_dir else None,
                         config.weights, config.int4_kernel)
    t = time.perf_counter()
    engine = assemble_engine(loaded, config)
    model: TargetModel = engine.runner.model
    result: dict[str, Any] = {
        "weights": loaded.weights, "dtype": str(model.dtype).removeprefix("torch."),
        "kv_dtype": str(model.kv_dtype).removeprefix("torch."), "compiled": model.compiled is not None,
        "native_attention": model.native_attention, "int4_kernel": config.int4_kernel,
        "threads": threads, "speculative": args.speculative, "new_tokens": new_tokens,
        "engine_build_s": time.perf_counter() - t,
    }
    print(f"served: {result}", flush=True)

    result["side_by_side"] = side_by_side(engine, loaded.tokenizer, args, threads, new_tokens)

    dense = loaded.hf_model if loaded.weights == "dense" else load_target(
        config.model, "cpu", args.dtype, None, "dense").hf_model  # what transformers users run
    context = 64 if args.quick else 128
    verify = [1, 8] if args.quick else [1, 2, 4, 8, 16]
    result["verify_step_ms"] = []
    for q in verify:
        ms = step_time(model, 1, q, context, args.repeats) * 1e3
        result["verify_step_ms"].append({"new_tokens": q, "ms": ms})
        print(f"batch-1 step, {q:2d} new tokens, context {context}: {ms:6.1f} ms", flush=True)
    result["step_time"] = []
    for b in [4] if args.quick else [4, 16, 32]:
        for q in (1, 8):
            ours = step_time(model, b, q, context, args.repeats)
            hf = hf_step_time(dense, b, q, context, args.repeats)
            result["step_time"].append({"batch": b, "new_tokens": q, "ours_ms": ours * 1e3,
                                        "transformers_ms": hf * 1e3})
            print(f"step batch={b:2d} new_tokens={q}: ours {ours*1e3:7.1f} ms   transformers "
                  f"{hf*1e3:7.1f} ms", flush=True)

    bw = copy_bandwidth_gbs()
    products_ms = products_time(model, 3 * args.repeats) * 1e3
    contexts = [64, 256] if args.quick else [128, 1024]
    eager = TargetModel(loaded.hf_model, 1, max_len, StepOptions(kv_dtype=model.kv_dtype))
    result["bound"] = []
    for ctx in contexts:
        weight_b, kv_b = step_bytes(model, ctx)
        bound_ms = (weight_b + kv_b) / (bw * 1e9) * 1e3
        step_ms = step_time(model, 1, 1, ctx, 3 * args.repeats) * 1e3
        eager_ms = step_time(eager, 1, 1, ctx, 3 * args.repeats) * 1e3
        result["bound"].append({
            "context": ctx, "weight_mb": weight_b / 1e6, "kv_mb": kv_b / 1e6, "copy_gb_s": bw,
            "bound_ms": bound_ms, "step_ms": step_ms, "ratio_to_bound": step_ms / bound_ms,
            "products_ms": products_ms, "eager_step_ms": eager_ms})
        print(f"batch-1 step at context {ctx}: {step_ms:.2f} ms vs bound {bound_ms:.2f} ms "
              f"({weight_b/1e6:.0f} MB weights + {kv_b/1e6:.1f} MB KV at {bw:.1f} GB/s: "
              f"{step_ms / bound_ms:.2f}x); products alone {products_ms:.2f} ms; eager step "
              f"{eager_ms:.2f} ms", flush=True)
    if model.compiled is not None and not args.quick:
        other = torch.float32 if model.kv_dtype == torch.bfloat16 else torch.bfloat16
        twin = TargetModel(loaded.hf_model, 1, max_len, StepOptions(
            compile=True, kv_dtype=other, native_attention=model.native_attention))
        ms = {str(d).removeprefix("torch."): step_time(m, 1, 1, contexts[-1], 3 * args.repeats) * 1e3
              for d, m in ((model.kv_dtype, model), (other, twin))}
        result["kv_dtype_step_ms"] = {"context": contexts[-1], **ms}
        print(f"batch-1 compiled step at context {contexts[-1]} by KV dtype: {ms}", flush=True)

    prompts = chat_prompts(loaded.tokenizer, 32)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))
    t = time.perf_counter()
    one = engine.generate(prompts[:1], SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                                      ignore_eos=True))
    ours_1 = len(one[0]) / (time.perf_counter() - t)
    hf_1 = hf_generate(dense, prompts[0], new_tokens)
    result["single_request"] = {"ours_tok_s": ours_1, "transformers_generate_tok_s": hf_1,
                                "speedup": ours_1 / hf_1}
    print(f"single request: ours {ours_1:.1f} tok/s   transformers generate {hf_1:.1f} tok/s", flush=True)
    result["aggregate"] = []
    for n in [8] if args.quick else [8, 32]:
        ours_n = ours_aggregate(engine, prompts[:n], new_tokens)
        hf_n = hf_generate_batch(dense, prompts[:n], new_tokens)
        result["aggregate"].append({"concurrency": n, "ours_tok_s": ours_n,
                                    "transformers_generate_batch_tok_s": hf_n, "speedup": ours_n / hf_n})
        print(f"aggregate @{n}: ours {ours_n:.1f} tok/s   transformers generate_batch {hf_n:.1f} tok/s "
              f"({ours_n / hf_n:.1f}x)", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
