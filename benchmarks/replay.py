"""Lookup drafting replayed against saved answers: the real Speculator (drafter, estimator, gate,
policy), a target that emits the saved greedy answer, and a clock that advances by a measured
step-time table. No model runs, so a configuration of the lookup or the policy is judged in
seconds, and the host's speed, which moves by up to 25 % within a run on this shared CPU
(docs/benchmarks.md), does not move the figures.

Greedy output does not depend on drafting, so one plain run's answers are the answers of every
configuration; what the replay leaves out is drafting's own time and the engine's overhead.
Only drafters that read no target features can be replayed (suffix, ngram).

    python benchmarks/replay.py save --prompts copy --requests 48 --out copy.json --threads 2
    python benchmarks/replay.py run copy.json --configs suffix:fixed,suffix:dspark

`save` serves the prompts with the real model and stores their token ids, the answers and the
engine's start-up profile (step time by tokens); `run` prints, per configuration, the decode
speedup over plain decoding on that profile, the tokens per decode step and the share of steps
that verified no draft. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json

from scheduler.batching import ContinuousBatcher
from scheduler.build import build_proposers, build_speculator
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine, ServedModel
from scheduler.plan import RequestResult, StepPlan, StepResult
from scheduler.request import Request, SamplingParams
from scheduler.verification import verify_greedy

EOS = -2  # never a saved token: an answer ends where its list does


class ReplayRunner:
    """A target whose greedy answer to request `i` is answers[i], and whose steps take the
    profile's time on a virtual clock."""

    aux_layer_ids: tuple[int, ...] = ()

    def __init__(self, answers: list[list[int]], step_time, clock: list[float]) -> None:
        self.answers, self.step_time, self.clock = answers, step_time, clock

    def execute(self, plan: StepPlan) -> StepResult:
        results = []
        for s in plan.scheduled:
            if not s.samples:
                results.append(RequestResult())
                continue
            answer, first = self.answers[int(s.req.req_id)], s.req.num_output_tokens
            argmax = [answer[i] if i < len(answer) else EOS
                      for i in range(first, first + len(s.draft_ids) + 1)]
            accepted, tokens = verify_greedy(argmax, s.draft_ids)
            results.append(RequestResult(tokens, accepted))
        t = self.step_time(plan.num_tokens)
        self.clock[0] += t
        return StepResult(results, t)

    def release(self, req_id: str) -> None:
        pass


def save(args: argparse.Namespace) -> None:
    import torch
    from paired import serve_one  # benchmarks/paired.py and speculative.py, beside this
    from speculative import PROMPT_SETS, chat_token_ids

    from scheduler.build import assemble_engine
    from scheduler.loader import load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_target(device="cpu", dtype="auto", weights="auto")
    # A drafting engine, for its start-up profile; greedy answers do not depend on drafting.
    engine = assemble_engine(loaded, EngineConfig(speculative="suffix", verify_policy="dspark",
                                                  max_model_len=2048, dtype="auto"))
    texts = PROMPT_SETS[args.prompts]()[args.first : args.first + args.requests]
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    records = [
        {"prompt": prompt, "answer": serve_one(engine, f"save-{i}", prompt, greedy)["tokens"]}
        for i, prompt in enumerate(chat_token_ids(loaded.tokenizer, texts))
    ]
    profile = [(n, 1.0 / sps) for n, sps in engine.speculator.profile_table()]
    with open(args.out, "w") as f:
        json.dump({"prompts": args.prompts, "profile": profile, "requests": records}, f)
    print(f"{len(records)} answers and the profile written to {args.out}")


def replay(saved: dict, spec: str, k: int) -> dict:
    drafter, _, policy = spec.partition(":")
    config = EngineConfig(speculative=drafter, verify_policy=policy or "fixed",
                          num_speculative_tokens=k, max_model_len=4096)
    speculator = build_speculator(config, build_proposers(config, None))
    speculator.profile.seed([tuple(p) for p in saved["profile"]])
    clock = [0.0]
    answers = [r["answer"] for r in saved["requests"]]
    runner = ReplayRunner(answers, speculator.profile.step_time, clock)
    engine = LLMEngine(runner, ContinuousBatcher(1, 4096, 512),
                       ServedModel("replay", None, frozenset({EOS})), speculator,
                       clock=lambda: clock[0])
    speculator.clock = lambda: clock[0]  # drafting takes no time here
    steps = tokens = plain_steps = 0
    seconds = 0.0
    for i, r in enumerate(saved["requests"]):
        params = SamplingParams(max_tokens=max(1, len(r["answer"])), temperature=0.0,
                                ignore_eos=True)
        engine.add_request(Request(str(i), r["prompt"], params))
        emitted: list[int] = []
        while engine.has_work:
            stepped = engine.step()
            if not stepped:
                continue
            outputs, stats = stepped
            emitted += [t for out in outputs for t in out.new_token_ids]
            if stats.num_prefill_tokens:
                continue
            steps += 1
            tokens += sum(len(o.new_token_ids) for o in outputs)
            seconds += stats.step_time_s
            plain_steps += stats.num_draft_tokens == 0
        if emitted != r["answer"]:  # drafting never changes greedy output
            raise AssertionError(f"{spec}: request {i} replayed other tokens than its answer")
    plain = tokens * speculator.profile.step_time(1)
    return {"config": spec, "decode_speedup": plain / seconds, "tokens_per_step": tokens / steps,
            "steps_without_draft": plain_steps / steps}


def run(args: argparse.Namespace) -> None:
    with open(args.answers) as f:
        saved = json.load(f)
    report = []
    for spec in args.configs.split(","):
        point = replay(saved, spec, args.k)
        report.append(point)
        print(f"{spec:>16}: decode {point['decode_speedup']:.3f}x plain, "
              f"{point['tokens_per_step']:.2f} tokens a step, "
              f"{100 * point['steps_without_draft']:.0f} % of steps without a draft", flush=True)
    print(json.dumps({"answers": args.answers, "prompts": saved["prompts"], "results": report}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save", help="serve the prompts once and store the answers and profile")
    s.add_argument("--prompts", default="copy")
    s.add_argument("--first", type=int, default=0)
    s.add_argument("--requests", type=int, default=48)
    s.add_argument("--max-tokens", type=int, default=96)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--out", required=True)
    r = sub.add_parser("run", help="replay configurations against saved answers")
    r.add_argument("answers")
    r.add_argument("--configs", default="suffix:fixed,suffix:dspark")
    r.add_argument("--k", type=int, default=7)
    args = ap.parse_args()
    if args.command == "save":
        save(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
