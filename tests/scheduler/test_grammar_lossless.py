"""Greedy output under a json_schema is the same with every drafter as without drafting.

Real embedded model, float32, prompts submitted together so batches mix prefill, constrained
decode and verification of drafts the grammar has cut.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from drafts.registry import build_proposer
from scheduler.request import SamplingParams, StructuredOutput
from tests.scheduler.test_engine_real import make_engine
from tests.scheduler.test_spec_lossless import run_staggered

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "year", "tags"],
    "additionalProperties": False,
}
QUESTIONS = [
    "Describe the Eiffel Tower as JSON with name, year and tags.",
    "Give me a famous book as JSON: its name, the year it appeared and a few tags.",
    "Describe the Python language as JSON with name, year and tags.",
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def json_prompts(target):
    tok = target.tokenizer
    return [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}],
                                           add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)
        for q in QUESTIONS
    ]


def greedy_json() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                          structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))


@pytest.fixture(scope="module")
def reference(target, json_prompts):
    outs, _ = run_staggered(make_engine(target, num_slots=4, budget=48), json_prompts,
                            lambda i: greedy_json())
    return outs


def test_reference_follows_the_schema(target, reference):
    for out in reference:
        text = target.tokenizer.decode(out, skip_special_tokens=True)
        jsonschema.validate(json.loads(text), SCHEMA)  # every answer finished within the budget


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ngram", "eagle3", "dflash", "dspark"])
def test_greedy_json_identical_with_every_drafter(target, json_prompts, reference, name):
    proposer = build_proposer(name, target.hf_model, None, 7)
    engine = make_engine(target, num_slots=4, budget=48, proposer=proposer)
    outs, spec = run_staggered(engine, json_prompts, lambda i: greedy_json())
    assert outs == reference
    assert spec, f"{name} never drafted"
    stats = engine.batcher.grammars.stats
    assert stats.num_masks > stats.num_steps  # verify positions beyond the anchor were masked
