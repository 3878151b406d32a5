"""Micro-benchmark of the kernels behind the weight-format and attention choices, on CPU.

Random weights in the embedded model's shapes (hidden 576, intermediate 1536, 9 query / 3 KV
heads of 64, vocabulary 49,152, 30 layers), group size 32 like the GGUF file's blocks:

  - layer products: one layer's four fused products (qkv, o, gate_up, down) x 30 for 1, 2, 4,
    8, 16 rows, through bf16 (oneDNN-blocked), float32, and the int4 kernel with bf16 and with
    float32 activations;
  - LM head: the Q8_0 head as dense bf16 (blocked), dense float32, and as two int4 nibble
    planes (`scheduler.quant.Q8Linear`, exact);
  - attention: one decode query (and an 8-token verification) against 128..2,048 cached
    positions, float32 vs bfloat16 KV, grouped matmuls vs SDPA, x 30 layers.

The last line printed is one JSON object. Usage:
    python benchmarks/step_kernels.py --threads 2 [--quick]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from engine import median_time  # benchmarks/engine.py, beside this script

from scheduler.linear import FrozenLinear
from scheduler.model import grouped_query_attention
from scheduler.quant import Int4Linear, Q8Linear

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS, GROUP = 576, 1536, 9, 3, 64, 49152, 30, 32
LAYER_SHAPES = [
    (HIDDEN + 2 * KV_HEADS * HEAD_DIM, HIDDEN),
    (HIDDEN, HIDDEN),
    (2 * INTER, HIDDEN),
    (HIDDEN, INTER),
]  # (out, in) of qkv, o, gate_up, down


def random_int4(out_f: int, in_f: int, act_dtype: torch.dtype) -> Int4Linear:
    q = torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8)
    scale = torch.rand(out_f, in_f // GROUP) * 0.02
    zero = -8 * scale
    return Int4Linear(q, scale, zero, GROUP, None, act_dtype)


def layer_products(rows: int, variant: str, repeats: int) -> float:
    # Thirty distinct layers, as in the model: one layer's weights alone would stay in cache.
    if variant.startswith("int4"):
        act = torch.float32 if variant.endswith("float32") else torch.bfloat16
        layers = [[random_int4(o, i, act) for o, i in LAYER_SHAPES] for _ in range(LAYERS)]
    else:
        act = torch.float32 if variant == "float32" else torch.bfloat16
        layers = [
            [FrozenLinear(torch.randn(o, i, dtype=act) * 0.02, None) for o, i in LAYER_SHAPES]
            for _ in range(LAYERS)
        ]
    xs = [torch.randn(rows, i, dtype=act) for _, i in LAYER_SHAPES]

    def run() -> None:
        for lins in layers:
            for lin, x in zip(lins, xs):
                lin(x)

    return median_time(run, repeats)


def head_time(rows: int, variant: str, repeats: int) -> float:
    if variant.startswith("q8"):
        act = torch.float32 if variant.endswith("float32") else torch.bfloat16
        q = torch.randint(-127, 128, (VOCAB, HIDDEN), dtype=torch.int8)
        head = Q8Linear(q, torch.rand(VOCAB, HIDDEN // GROUP) * 0.01, GROUP, act)
    else:
        act = torch.float32 if variant == "float32" else torch.bfloat16
        head = FrozenLinear(torch.randn(VOCAB, HIDDEN, dtype=act) * 0.02, None)
    x = torch.randn(rows, HIDDEN, dtype=act)
    return median_time(lambda: head(x), repeats)


def attention_time(
    context: int, queries: int, dtype: torch.dtype, kind: str, repeats: int
) -> float:
    k = torch.randn(1, KV_HEADS, context, HEAD_DIM, dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(1, HEADS, queries, HEAD_DIM, dtype=dtype)
    mask = torch.zeros(1, 1, queries, context, dtype=dtype)

    def run() -> None:
        for _ in range(LAYERS):
            if kind == "matmul":
                grouped_query_attention(q, k, v, mask, HEAD_DIM**-0.5)
            else:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return median_time(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="one size of each (smoke run)")
    ap.add_argument("--parts", default="products,head,attention", help="which tables to time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows_list = [1, 8] if args.quick else [1, 2, 4, 8, 16]
    contexts = [128, 1024] if args.quick else [128, 256, 512, 1024, 2048]
    result: dict = {
        "threads": args.threads,
        "layer_products_ms": [],
        "lm_head_ms": [],
        "attention_ms": [],
    }
    with torch.inference_mode():
        parts = args.parts.split(",")
        for rows in rows_list if "products" in parts else []:
            row = {"rows": rows}
            for variant in ("bfloat16", "float32", "int4 bfloat16", "int4 float32"):
                row[variant] = 1e3 * layer_products(rows, variant, args.repeats)
            result["layer_products_ms"].append(row)
            print("layer products x30", row, flush=True)
        for rows in rows_list if "head" in parts else []:
            row = {"rows": rows}
            for variant in ("bfloat16", "float32", "q8 bfloat16", "q8 float32"):
                row[variant] = 1e3 * head_time(rows, variant, args.repeats)
            result["lm_head_ms"].append(row)
            print("LM head", row, flush=True)
        for context in contexts if "attention" in parts else []:
            for queries in (1, 8):
                row = {"context": context, "queries": queries}
                for dtype in (torch.float32, torch.bfloat16):
                    for kind in ("matmul", "sdpa"):
                        name = f"{kind} {str(dtype).removeprefix('torch.')}"
                        row[name] = 1e3 * attention_time(
                            context, queries, dtype, kind, args.repeats
                        )
                result["attention_ms"].append(row)
                print("attention x30", row, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
