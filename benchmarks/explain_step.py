"""Show how the composite drafter chose in one real engine step (the worked example of
docs/scheduling.md "Several drafters").

    python benchmarks/explain_step.py                      # suffix+dspark, a context-copying prompt
    python benchmarks/explain_step.py --prompts mt_bench --index 3 --threads 2

Runs one greedy request on the embedded model and records, for every step in which more than
one drafter offered a draft: the step's size B and sampling requests R, the profile's step times
T(B) and T(B + 1), the token cost lambda = R (T(B + 1) / T(B) - 1), each candidate's draft,
confidences c_j, prefix survival a_j and value max_l sum_{j<l} (a_j - lambda), the kept
candidate, the verify length the policy gave it and how many of its tokens the target accepted.
Prints the first such step in words and every one as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from speculative import PROMPT_SETS

import scheduler.speculator as speculator_module
from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.request import Request, SamplingParams
from scheduler.verify_policy import candidate_value


class StepRecorder:
    """Wraps the Speculator's choice and the verify policy to keep what they saw this step."""

    def __init__(self, engine: Any) -> None:
        self.spec = engine.speculator
        self.steps: list[dict[str, Any]] = []
        self.current: dict[str, Any] = {}
        choose, token_cost = speculator_module.choose_candidates, self.spec._token_cost
        policy_choose = self.spec.policy.choose

        def recorded_token_cost(
            num_base_tokens: int, num_sampling: int, rate: float | None
        ) -> float:
            cost = token_cost(num_base_tokens, num_sampling, rate)
            t = self.spec.profile.step_time
            self.current.update(B=num_base_tokens, R=num_sampling, lam=cost,
                                T_B_ms=1e3 * t(num_base_tokens),
                                T_B1_ms=1e3 * t(num_base_tokens + 1))
            return cost

        def recorded_choose(survivals: Any, cost: float) -> list[int | None]:
            picks = choose(survivals, cost)
            self.current["picks"] = picks
            return picks

        def recorded_policy(confidences: Any, *args: Any, **kwargs: Any) -> list[int]:
            lengths = policy_choose(confidences, *args, **kwargs)
            self.current["verify_lengths"] = list(lengths)
            return lengths

        speculator_module.choose_candidates = recorded_choose
        self.spec._token_cost = recorded_token_cost
        self.spec.policy.choose = recorded_policy
        candidate = self.spec._candidate

        def recorded_candidate(di: int, d: Any, proposal: Any, n: int, ids: list[int]) -> Any:
            c = candidate(di, d, proposal, n, ids)
            self.current.setdefault("candidates", []).append(
                {"drafter": d.name, "token_ids": ids, "confidences": c.confidences,
                 "survival": c.selection_survival})
            return c

        self.spec._candidate = recorded_candidate

    def step_done(self, stats: Any, emitted: int) -> None:
        cur, self.current = self.current, {}
        if len(cur.get("candidates", [])) < 2:
            return
        for c in cur["candidates"]:
            c["value"] = candidate_value(c["survival"], cur["lam"])
        kept = cur["picks"][0]
        cur["kept"] = cur["candidates"][kept]["drafter"] if kept is not None else None
        cur["accepted"] = emitted - 1
        cur["step_ms"] = 1e3 * stats.step_time_s
        self.steps.append(cur)


def describe(step: dict[str, Any], tok: Any) -> str:
    t_b, t_b1 = step["T_B_ms"], step["T_B1_ms"]
    lines = [
        (f"B = {step['B']} tokens in the step, R = {step['R']} sampling; "
         f"T(B) = {t_b:.2f} ms, T(B+1) = {t_b1:.2f} ms"),
        f"lambda = {step['R']} x ({t_b1:.2f} / {t_b:.2f} - 1) = {step['lam']:.4f}",
    ]
    for c in step["candidates"]:
        lines += [
            f"  {c['drafter']:>7}: {tok.decode(c['token_ids'])!r}",
            f"           c = {[round(x, 3) for x in c['confidences']]}",
            f"           a = {[round(x, 3) for x in c['survival']]}",
            f"           value = {c['value']:.3f}",
        ]
    lines.append(f"kept: {step['kept']}, verify length {step['verify_lengths'][0]}, "
                 f"accepted {step['accepted']}; step {step['step_ms']:.1f} ms")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speculative", default="suffix+dspark")
    ap.add_argument("--prompts", default="copy", choices=sorted(PROMPT_SETS))
    ap.add_argument("--index", type=int, default=0, help="which prompt of the set")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_target(device="cpu")
    tok = loaded.tokenizer
    engine = assemble_engine(loaded, EngineConfig(speculative=args.speculative,
                                                  verify_policy="dspark", max_model_len=2048))
    text = PROMPT_SETS[args.prompts]()[args.index]
    prompt = tok.apply_chat_template([{"role": "user", "content": text}],
                                     add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt, list):
        prompt = list(prompt["input_ids"])
    recorder = StepRecorder(engine)
    engine.add_request(Request("r0", prompt, SamplingParams(max_tokens=args.max_tokens,
                                                            temperature=0.0)))
    while (stepped := engine.step()) is not None:
        outputs, stats = stepped
        recorder.step_done(stats, sum(len(o.new_token_ids) for o in outputs))
    if recorder.steps:
        print(describe(recorder.steps[0], tok))
    print(json.dumps({"speculative": args.speculative, "prompts": args.prompts,
                      "index": args.index, "steps": recorder.steps}))


if __name__ == "__main__":
    main()
