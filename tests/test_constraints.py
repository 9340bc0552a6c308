"""Constrained output: JSON schemas, JSON objects, regexes, choices and grammars.

Tiny random models produce junk, so every allowed token is as likely as any other: that is
what stresses a constraint hardest. Outputs that finish by eos must validate (the `jsonschema`
package checks them); outputs cut by max_new_tokens say `length` and are marked incomplete.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

import genkit
from genkit import constraints
from genkit.errors import GenkitError

from conftest import run_cli

SCHEMAS = [
    {  # nested objects, optional keys, bounded numbers, enums
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "kind": {"enum": ["cat", "dog", "bird"]},
            "owner": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}, "vip": {"type": "boolean"}},
                "required": ["id"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "kind", "owner"],
        "additionalProperties": False,
    },
    {  # arrays with min/max items, patterns
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-c]{1,3}$"},
                     "minItems": 1, "maxItems": 3},
            "code": {"type": "string", "pattern": "^[A-Z][0-9]{2}$"},
        },
        "required": ["tags", "code"],
        "additionalProperties": False,
    },
    {  # a top-level array of small objects
        "type": "array",
        "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}},
                  "required": ["x"], "additionalProperties": False},
        "minItems": 2, "maxItems": 4,
    },
]

COMPACT = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


def check_json(results, schema):
    """Every eos-finished result validates and is complete; others are cut by length."""
    finished = 0
    for r in results:
        if r.finish_reason == "eos":
            jsonschema.validate(json.loads(r.text), schema)
            assert r.complete is True
            finished += 1
        else:
            assert r.finish_reason == "length" and r.complete is False, (r.finish_reason, r.text)
    return finished


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_sampled_json_validates_over_many_seeds(tiny, index):
    # 12 rows, each drawing from its own seeded generator; the first schema also runs through
    # temperature and top-p, which must only ever see the allowed tokens.
    schema = SCHEMAS[index]
    warp = {"temperature": 1.5, "top_p": 0.9} if index == 0 else {"top_k": 0}
    r = genkit.generate(tiny, "Data:", raw=True, json_schema=schema, do_sample=True, seed=index,
                        num_return_sequences=12, max_new_tokens=100, **warp)
    finished = check_json(r.results, schema)
    assert finished >= 6, f"only {finished}/12 finished: the test would check nothing"


class _Reference:
    """A logits processor for transformers' generate() straight on llguidance's matcher (its own
    bitmask bytes, unpacked with numpy): what genkit's vectorised path must reproduce."""

    def __init__(self, lm, grammar, eos):
        import llguidance.hf
        from llguidance import LLMatcher

        tok = llguidance.hf.from_tokenizer(lm.tokenizer, eos_token=eos)
        self.m = LLMatcher(tok, grammar)
        self.start = None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        elif not self.m.is_stopped():
            assert self.m.consume_token(int(input_ids[0, -1])), self.m.get_error()
        bits = np.unpackbits(np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.from_numpy(bits[: scores.shape[-1]].astype(bool))
        return scores.masked_fill(~allowed, -float("inf"))


@pytest.mark.parametrize("spec", [
    {"json_schema": SCHEMAS[1]}, {"regex": r"(ab|c)+-[0-9]{2,4}"}, {"choice": ["alpha", "beta", "gamma"]},
    {"json_object": True},
])
def test_greedy_matches_transformers_with_llguidance_processor(tiny, spec):
    from transformers import LogitsProcessorList

    from helpers import encode, strip_after_eos

    grammar = constraints.grammar_for(spec, "test")
    ids, mask = encode(tiny, ["Hello"])
    ref = _Reference(tiny, grammar, 2)
    with torch.inference_mode():
        out = tiny.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                                  logits_processor=LogitsProcessorList([ref]), pad_token_id=2)
    theirs = strip_after_eos(out[0, ids.shape[1]:].tolist(), [2])
    ours = genkit.generate(tiny, "Hello", raw=True, max_new_tokens=40, **spec).results[0]
    assert ours.token_ids == theirs


def test_regex_choice_and_grammars(tiny, tmp_path):
    r = genkit.generate(tiny, "x", raw=True, regex=r"[0-9]{3}-[a-z]{2,3}", do_sample=True, seed=1,
                        num_return_sequences=8, max_new_tokens=30)
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,3}", x.text) for x in r.results)
    r = genkit.generate(tiny, "x", raw=True, choice="yes,no,maybe so", do_sample=True, seed=2,
                        num_return_sequences=8, max_new_tokens=30)
    assert {x.text for x in r.results} <= {"yes", "no", "maybe so"} and all(x.finish_reason == "eos" for x in r.results)
    lark = tmp_path / "g.lark"
    lark.write_text('start: greeting " " name\ngreeting: "hi" | "hello"\nname: /[A-Z][a-z]{1,5}/\n')
    gbnf = tmp_path / "g.gbnf"
    gbnf.write_text('root ::= ("yes" | "no") "!"\n')
    for path, pattern in [(lark, r"(hi|hello) [A-Z][a-z]{1,5}"), (gbnf, r"(yes|no)!")]:
        r = genkit.generate(tiny, "x", raw=True, grammar=str(path), do_sample=True, seed=3,
                            num_return_sequences=4, max_new_tokens=30)
        assert all(re.fullmatch(pattern, x.text) and x.finish_reason == "eos" for x in r.results), path


def test_length_cut_is_incomplete(tiny):
    r = genkit.generate(tiny, "x", raw=True, json_schema=SCHEMAS[0], max_new_tokens=3)
    assert r.results[0].finish_reason == "length" and r.results[0].complete is False


def test_min_new_tokens_never_breaks_the_grammar(tiny):
    # The grammar completes in a few tokens while min_new_tokens forbids eos: the grammar wins.
    r = genkit.generate(tiny, "x", raw=True, choice=["ok"], min_new_tokens=5, max_new_tokens=8)
    assert r.results[0].text == "ok"


@pytest.mark.parametrize("values, message", [
    ({"json_schema": {"type": "objectx"}}, "here: json_schema: Invalid type: objectx"),
    ({"json_schema": {"type": "object", "dependentSchemas": {}}}, 'Unimplemented keys: ["dependentSchemas"]'),
    ({"json_schema": "{oops"}, "here: json_schema: not valid JSON: Expecting property name"),
    ({"regex": "(a"}, "here: regex '(a': invalid regex"),
    ({"grammar": 'start: a\na: "x" b\n'}, 'here: grammar: line 2 column 4: unknown name: "b"'),
    ({"regex": "a", "choice": ["b"]}, "here: regex and choice both constrain the output"),
])
def test_bad_constraints_one_line(values, message):
    with pytest.raises(GenkitError) as e:
        constraints.grammar_for(values, "here")
    assert message in e.value.message and "\n" not in e.value.message


def test_openai_response_format():
    assert constraints.from_response_format({"type": "text"}, "w") == {}
    assert constraints.from_response_format({"type": "json_object"}, "w") == {"json_object": True}
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}}}
    strict = constraints.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}, "w")
    closed = strict["json_schema"]
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is left alone
    with pytest.raises(GenkitError, match="response_format type 'xml'"):
        constraints.from_response_format({"type": "xml"}, "w")


def test_strict_schema_forbids_extra_keys(tiny):
    params = constraints.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                "schema": {"type": "object", "properties": {"a": {"type": "boolean"}}}}}, "w")
    r = genkit.generate(tiny, "x", raw=True, do_sample=True, seed=4, num_return_sequences=6, max_new_tokens=60, **params)
    done = [json.loads(x.text) for x in r.results if x.finish_reason == "eos"]
    assert done and all(set(d) <= {"a"} for d in done)


def test_preset_key_and_flag_override(tmp_path, genkit_home):
    from genkit import presets

    path = tmp_path / "structured.yaml"
    path.write_text("generation:\n  json_schema: {type: object, properties: {a: {type: integer}}}\n  max_new_tokens: 30\n")
    p = presets.resolve(str(path))
    assert p.generation["json_schema"]["properties"]["a"] == {"type": "integer"}
    # A flag's constraint replaces the preset's instead of clashing with it.
    p = presets.resolve(str(path), overrides={"regex": "[ab]+"})
    assert p.generation["regex"] == "[ab]+" and "json_schema" not in p.generation


# ---------------------------------------------------------------------------------- the CLI

def test_cli_flags(tiny_dir, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(COMPACT))
    r = run_cli("run", "--model", str(tiny_dir), "--raw", "--json", "-n", "40", "--json-schema", str(schema), "x")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["finish_reason"] == "eos" and rec["incomplete"] is False
    jsonschema.validate(json.loads(rec["text"]), COMPACT)
    r = run_cli("run", "--model", str(tiny_dir), "--raw", "--choice", "red,green", "x")
    assert r.returncode == 0 and r.stdout.strip() in ("red", "green")
    r = run_cli("run", "--model", str(tiny_dir), "--raw", "--json", "-n", "2", "--json-object", "x")
    rec = json.loads(r.stdout)
    assert rec["finish_reason"] == "length" and rec["incomplete"] is True


def test_cli_flags_on_compare_and_chat(tiny_dir):
    """The constraint flags are declared once (constraint_opts.constraint_options) and reach
    every command that takes them; chat receives run's flags one by one."""
    r = run_cli("compare", "--model", str(tiny_dir), "--raw", "--json", "--presets", "greedy,creative",
                "--choice", "red,green", "x")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["text"] in ("red", "green") for line in r.stdout.splitlines()] == [True, True]
    r = run_cli("chat", "--model", str(tiny_dir), "--raw", "--choice", "red,green", input="x\ny\n")
    assert r.returncode == 0, r.stderr
    assert all(line in ("red", "green") for line in r.stdout.splitlines()) and len(r.stdout.splitlines()) == 2


@pytest.mark.parametrize("command", [["compare", "--presets", "greedy", "x"], ["batch", "-"], ["chat"]])
def test_cli_bad_constraint_before_model_loads_on_every_command(command, genkit_home):
    r = run_cli(command[0], "--model", "/nonexistent/model", "--regex", "a", "--choice", "b", *command[1:],
                input="x\n")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "genkit: error: --regex and --choice both constrain the output: choose one\n"


@pytest.mark.parametrize("args, message", [
    (["--json-schema", "{bad"], "genkit: error: --json-schema: not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2\n"),
    (["--json-schema", "missing.json"], "genkit: error: missing.json: no such JSON schema file"),
    (["--regex", "[a-z"], "genkit: error: --regex '[a-z': invalid regex"),
    (["--grammar", "nope.lark"], "genkit: error: --grammar nope.lark: no such file"),
    (["--regex", "a", "--choice", "b"], "genkit: error: --regex and --choice both constrain the output: choose one\n"),
])
def test_cli_bad_constraint_before_model_loads(args, message, genkit_home):
    # The model does not exist: only an error raised before loading can say what these say.
    r = run_cli("run", "--model", "/nonexistent/model", *args, "x")
    assert r.returncode == 1 and r.stdout == ""
    assert message in r.stderr and r.stderr.startswith("genkit: error: ") and r.stderr.count("\n") == 1, r.stderr


def test_cli_bad_grammar_file_names_file_and_place(tmp_path, genkit_home):
    bad = tmp_path / "bad.lark"
    bad.write_text('start: item\nitem: "a" missing\n')
    r = run_cli("run", "--model", "/nonexistent/model", "--grammar", str(bad), "x")
    assert r.returncode == 1
    assert r.stderr == f'genkit: error: {bad}: line 2 column 7: unknown name: "missing" (fix the grammar (Lark or GBNF syntax))\n'


@pytest.mark.slow
def test_embedded_model_follows_schemas(embedded):
    for schema in SCHEMAS[:2]:
        r = genkit.generate(embedded, "Give me an example record as JSON.", json_schema=schema, max_new_tokens=120)
        assert check_json(r.results, schema) == 1
    r = genkit.generate(embedded, "Is the sky blue? Answer yes or no.", choice=["yes", "no"], max_new_tokens=5)
    assert r.results[0].text in ("yes", "no") and r.results[0].finish_reason == "eos"


def test_continuous_batching_rows_hold_their_own_matchers(tiny):
    """Rows join and leave the running batch at different steps; each keeps its own matcher, and
    a seeded job gives the same constrained text alone as in the batch."""
    from genkit.engine.continuous import ContinuousBatcher, Job
    from genkit.engine.settings import build

    schema = SCHEMAS[1]
    s = build(tiny, {"json_schema": schema, "do_sample": True, "top_k": 0, "num_return_sequences": 2,
                     "max_new_tokens": 100})
    texts = ["a", "a longer prompt here", "b", "yet another prompt of some length"] * 2
    jobs = [Job(i, tiny.tokenizer(t)["input_ids"], 10 + i, 40 + 20 * (i % 4)) for i, t in enumerate(texts)]
    batched = {r.handle: r.sequences for r in ContinuousBatcher(tiny, s, batch_size=5).run(jobs)}
    assert len(batched) == len(jobs)
    finished = 0
    for seqs in batched.values():
        for seq in seqs:
            if seq.finish_reason == "eos":
                jsonschema.validate(json.loads(seq.text), schema)
                finished += seq.complete is True
            else:
                assert seq.finish_reason == "length" and seq.complete is False
    assert finished >= 4
    alone = next(ContinuousBatcher(tiny, s, batch_size=5).run([jobs[3]])).sequences
    assert [q.token_ids for q in alone] == [q.token_ids for q in batched[3]]


def test_batch_per_record_constraints_and_openai_response_format(tiny_dir, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    genkit_in = tmp_path / "in.jsonl"
    genkit_in.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "x", "params": {"json_schema": schema, "max_new_tokens": 40}},
        {"id": "b", "prompt": "y", "params": {"choice": ["up", "down"]}},
        {"id": "c", "prompt": "z"},  # the job's --regex
        {"id": "bad", "prompt": "z", "params": {"regex": "(unclosed"}},
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    r = run_cli("batch", str(genkit_in), "-o", str(out), "--model", str(tiny_dir), "--raw", "-n", "20",
                "--regex", "[a-c]{2}", "--quiet")
    assert r.returncode == 1, r.stderr  # the bad record fails alone
    recs = {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert recs["a"]["finish_reason"] == "eos" and recs["a"]["incomplete"] is False
    jsonschema.validate(json.loads(recs["a"]["text"]), schema)
    assert recs["b"]["text"] in ("up", "down") and recs["c"]["text"] in {x + y for x in "abc" for y in "abc"}
    assert "regex '(unclosed': " in recs["bad"]["error"]["message"]

    openai_in = tmp_path / "openai.jsonl"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 1, "n": 3, "seed": 3,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "n", "strict": True, "schema": schema}}}
    openai_in.write_text(json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                                     "body": body}) + "\n")
    out2 = tmp_path / "out2.jsonl"
    r = run_cli("batch", str(openai_in), "-o", str(out2), "--model", str(tiny_dir), "--output-format", "openai", "--quiet")
    assert r.returncode == 0, r.stderr
    choices = json.loads(out2.read_text())["response"]["body"]["choices"]
    assert len(choices) == 3
    for ch in choices:
        if ch["finish_reason"] == "stop":
            jsonschema.validate(json.loads(ch["message"]["content"]), schema)
