"""Torch-free stand-ins for fast tests and load-test rigs: `--model fake`.

FakeRunner plays a deterministic "model": the token at output position i of a request is byte
i of FAKE_TEXT (then EOS), whatever the prompt. It honours the full runner contract (packed
plan in, greedy verification of drafts, accepted/bonus tokens out), so the batcher, drafting,
the engine thread and the whole HTTP gateway run for real around it.

The tokenizer is a genuine transformers tokenizer (byte-level BPE without merges, ChatML
template), built in memory, so gateway code cannot tell it from a real one.
"""

from __future__ import annotations

import time

from scheduler.plan import RequestResult, StepPlan, StepResult
from scheduler.verification import verify_greedy

FAKE_TEXT = (
    "Speculative decoding drafts several tokens and lets the target verify them in one pass. "
    "Greedy output stays identical, sampling keeps the target distribution. Café, 東京, 🚀."
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_fake_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


class FakeRunner:
    """Deterministic target: output i of every request is token fake_ids[i], then EOS."""

    aux_layer_ids: tuple[int, ...] = ()

    def __init__(self, fake_ids: list[int], eos_id: int, step_time_s: float = 0.0) -> None:
        self.fake_ids = fake_ids
        self.eos_id = eos_id
        self.step_time_s = step_time_s  # simulated forward time, for load-test rigs

    def _target(self, output_index: int) -> int:
        return self.fake_ids[output_index] if output_index < len(self.fake_ids) else self.eos_id

    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        if self.step_time_s:
            time.sleep(self.step_time_s)
        results = []
        for s in plan.scheduled:
            if not s.samples:
                results.append(RequestResult())
                continue
            first = s.req.num_output_tokens  # output index of the token after the anchor
            argmax = [self._target(first + j) for j in range(len(s.draft_ids) + 1)]
            accepted, tokens = verify_greedy(argmax, s.draft_ids)
            results.append(RequestResult(tokens, accepted))
        return StepResult(results, time.perf_counter() - t0)

    def release(self, req_id: str) -> None:
        pass
