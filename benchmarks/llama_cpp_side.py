"""llama-cpp-python's side of benchmarks/engine.py, on the same GGUF file and the same prompts.

Run by the python of a virtual environment that has llama-cpp-python (built outside this
project: it compiles llama.cpp), never by the project's own: it imports nothing of ours.
benchmarks/engine.py writes the prompts (token ids from the file's own vocabulary) to a JSON
file and reads back the one JSON object this prints.

For each prompt: time to the first generated token (prefill + one token) and the decode rate
of the following tokens, greedy, one request at a time, as llama.cpp serves them.
"""

from __future__ import annotations

import argparse
import json
import time


def median_run(runs: list[dict]) -> dict:
    """The run of median decode rate, with the median TTFT of all runs."""
    ranked = sorted(runs, key=lambda r: r["decode_tok_s"])
    ttfts = sorted(r["ttft_s"] for r in runs)
    return {**ranked[len(ranked) // 2], "ttft_s": ttfts[len(ttfts) // 2], "runs": len(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the .gguf file")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompts", required=True, help="JSON file: [{'name': str, 'ids': [int]}]")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=1, help="runs per prompt (the median is kept)")
    args = ap.parse_args()

    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    with open(args.prompts) as f:
        prompts = json.load(f)

    def run(ids: list[int], new_tokens: int) -> dict:
        llm.reset()  # no reuse of an earlier prompt's KV: each prompt is prefilled in full
        t0 = time.perf_counter()
        tokens, first_at = [], 0.0
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            tokens.append(token)
            if len(tokens) == 1:
                first_at = time.perf_counter()
            if len(tokens) == new_tokens:
                break
        end = time.perf_counter()
        return {
            "prompt_tokens": len(ids),
            "ttft_s": first_at - t0,
            "decode_tok_s": (len(tokens) - 1) / (end - first_at),
            "tokens": tokens,
        }

    run(prompts[0]["ids"][:16], 4)  # warm-up: allocations, first-use costs
    results = [{"name": p["name"], **median_run([run(p["ids"], args.new_tokens)
                                                  for _ in range(args.repeats)])}
               for p in prompts]
    print(
        json.dumps(
            {"llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "results": results}
        )
    )


if __name__ == "__main__":
    main()
