"""Constrained output: what a user asks for, turned into one llguidance grammar.

A request may constrain its output with one of five generation parameters:

    json_schema   a JSON Schema (a mapping, JSON text, or the path of a .json file)
    json_object   true: any JSON object
    regex         a regular expression the whole output matches
    choice        one of fixed strings (a list, or "a,b,c")
    grammar       a Lark or GBNF grammar (its text, or the path of a file)

This module compiles that into llguidance's grammar form and checks it, without a tokenizer
and without torch, so a bad schema, regex or grammar is reported in one line before any model
loads. The decode loop (genkit/engine/constrain.py) runs the compiled grammar.
`from_response_format` maps an OpenAI `response_format` onto the same parameters.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

from genkit.errors import GenkitError

# The generation parameters that constrain output (genkit.params checks them with `check`).
KEYS = ("json_schema", "json_object", "regex", "choice", "grammar")
ANY_OBJECT = {"type": "object"}
# Between JSON tokens: nothing, one space, or a newline and up to 20 spaces or tabs of indent.
# Unbounded whitespace (llguidance's default) lets a model pad forever without breaking the
# grammar; this keeps pretty-printed JSON and ends that loop. A schema's own "x-guidance"
# options override it.
JSON_OPTIONS = {"whitespace_pattern": r"(\n[ \t]{0,20}| )?"}


def requested(values: dict) -> list[str]:
    """The constraint keys set in `values` (json_object counts when true)."""
    return [k for k in KEYS if values.get(k) not in (None, False)]


def describe(values: dict) -> str | None:
    """A short name of the constraint in `values` ("json_schema", ...), None when unconstrained."""
    keys = requested(values)
    return keys[0] if keys else None


# Strategies whose decode loop runs the matchers (any other refuses a constraint before loading).
STRATEGIES = ("greedy", "sampling", "beam", "beam-sampling", "diverse-beam", "contrastive", "dola",
              "assisted", "prompt-lookup")


def check(values: dict, strategy: str, where: str) -> None:
    """Reject a constraint that cannot be compiled, or that this strategy cannot run."""
    grammar_for(values, where)
    if strategy not in STRATEGIES:
        raise GenkitError(f"{where}: {describe(values)} cannot be combined with {strategy} decoding; "
                          f"use one of {', '.join(STRATEGIES)}")


def grammar_for(values: dict, where: str) -> str | None:
    """The llguidance grammar that `values` ask for (None when unconstrained); GenkitError with
    one line naming the source and the place when it cannot be enforced."""
    keys = requested(values)
    if not keys:
        return None
    if len(keys) > 1:
        raise GenkitError(f"{where}: {keys[0]} and {keys[1]} both constrain the output: choose one")
    key = keys[0]
    value = values[key]
    if key == "json_object":
        return _compiled("json_schema", json.dumps(ANY_OBJECT), "json_object")
    if key == "json_schema":
        text, source = _schema_text(value, where)
        return _compiled("json_schema", text, source)
    if key == "regex":
        return _compiled("regex", value, f"{_label(where, key)} {value!r}")
    if key == "choice":
        return _compiled("choice", json.dumps(choices(value)), _label(where, key))
    text, source = _grammar_text(value, where)
    return _compiled("grammar", text, source)


def _label(where: str, key: str) -> str:
    """'--regex' for a flag, 'preset x: regex' for a parameter."""
    return where if where == "--" + key.replace("_", "-") else f"{where}: {key}"


def choices(value) -> list[str]:
    """The strings of a `choice` value: a list, or one comma-separated string."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [c.strip() if isinstance(value, str) else c for c in items]
    return [c for c in items if c]


def is_inline_grammar(value: str) -> bool:
    """Grammar text rather than a path: every Lark rule has ':' and every GBNF rule '::='."""
    return "\n" in value or ":" in value and not os.path.exists(value)


def _grammar_text(value: str, where: str) -> tuple[str, str]:
    if is_inline_grammar(value):
        return value, _label(where, "grammar")
    return _read(value, "grammar"), value


def _schema_text(value, where: str) -> tuple[str, str]:
    """(the schema as JSON text, the name to report errors under)."""
    if isinstance(value, dict):
        return json.dumps(value), _label(where, "json_schema")
    if value.lstrip().startswith("{"):
        source = _label(where, "json_schema")
        text = value
    else:
        source = value
        text = _read(value, "JSON schema")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise GenkitError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(schema, dict):
        raise GenkitError(f"{source}: a JSON schema must be an object, e.g. {{\"type\": \"object\"}}")
    return json.dumps(schema), source


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise GenkitError(f"{path}: no such {what} file (pass a file that exists, or the {what} itself)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GenkitError(f"{path}: cannot read the {what} file: {e}") from None


@lru_cache(maxsize=64)
def _compiled(kind: str, text: str, source: str) -> str:
    """Compile and check once per distinct constraint (settings are validated more than once)."""
    import llguidance
    from llguidance import LLMatcher

    try:
        if kind == "json_schema":
            grammar = LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        elif kind == "regex":
            grammar = LLMatcher.grammar_from_regex(text)
        elif kind == "choice":
            grammar = llguidance.grammar_from("choice", text)
        else:
            grammar = llguidance.grammar_from("grammar", text)  # GBNF is converted to Lark
    except ValueError as e:
        raise GenkitError(f"{source}: {_first_lines(str(e))}") from None
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise GenkitError(f"{source}: {_explain(kind, messages[0])}")
    return grammar


def _explain(kind: str, message: str) -> str:
    fix = {
        "json_schema": "genkit cannot enforce this schema: fix or remove that part",
        "regex": "fix the pattern (Rust regex syntax)",
        "choice": "give plain strings",
        "grammar": "fix the grammar (Lark or GBNF syntax)",
    }[kind]
    if kind in ("regex", "choice"):  # positions are in llguidance's wrapper grammar, not the user's text
        message = message.split(": ", 1)[-1] if message.startswith("at ") else message
    return f"{_first_lines(message)} ({fix})"


def _first_lines(message: str) -> str:
    """llguidance's message in one line: its first line plus the regex engine's 'error:' line."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return "invalid"
    head = lines[0].rstrip(":")
    detail = next((ln for ln in lines[1:] if ln.startswith("error:")), None)
    head = _position(head)
    return f"{head}: {detail[len('error:'):].strip()}" if detail else head


def _position(text: str) -> str:
    """llguidance writes 'at 2(6): ...'; say line and column."""
    if text.startswith("at ") and "(" in text.split(":", 1)[0]:
        place, rest = text[3:].split(":", 1)
        line, col = place.rstrip(")").split("(")
        return f"line {line} column {col}:{rest}"
    return text


def from_response_format(response_format, where: str) -> dict:
    """Generation parameters for an OpenAI `response_format`: {"type": "text"} (none),
    {"type": "json_object"}, or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}.

    With `strict` true the schema's objects get `additionalProperties: false` where they say
    nothing, as OpenAI's strict mode requires of them, so no undeclared key can appear."""
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise GenkitError(f"{where}: response_format must be an object with a type (text, json_object or json_schema)")
    kind = response_format["type"]
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind != "json_schema":
        raise GenkitError(f"{where}: response_format type {kind!r} is not supported (text, json_object, json_schema)")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise GenkitError(f"{where}: response_format.json_schema must be an object with a 'schema' object")
    schema = spec.get("schema", ANY_OBJECT)
    if spec.get("strict"):
        schema = _closed(schema)
    grammar_for({"json_schema": schema}, f"{where}: response_format")
    return {"json_schema": schema}


def _closed(schema):
    """A copy of `schema` where every object schema without additionalProperties forbids them."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(sub) for name, sub in out[key].items()}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [_closed(sub) for sub in out[key]]
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out
