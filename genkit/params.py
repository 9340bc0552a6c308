"""Generation parameters: their names, types, defaults and the rules between them.

This module is pure Python on purpose: presets are listed, shown and validated without
importing torch or transformers, so `genkit presets list` stays instant and a typo in a
preset is reported before any model loads.

The defaults are the ones transformers' `generate()` applies when neither the model nor the
user sets a value (a test checks them against transformers), with one deliberate exception:
genkit never falls back to the 20-token `max_length`; see `DEFAULT_MAX_NEW_TOKENS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from genkit import constraints
from genkit.errors import GenkitError, did_you_mean, shorten, shown

# Used when neither a preset, a flag nor the model says how long to generate: long enough to
# be useful, and the finish reason "length" tells the user when it was the limit that stopped.
DEFAULT_MAX_NEW_TOKENS = 256

WATERMARK_KEYS = {
    "bias": (float, 2.0),
    "greenlist_ratio": (float, 0.25),
    "seeding_scheme": (str, "lefthash"),
    "context_width": (int, 1),
    "hashing_key": (int, 15485863),
}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # one of the checkers below
    default: Any
    help: str


def _p(name, kind, default, help):
    return Param(name, kind, default, help)


PARAMS: dict[str, Param] = {
    p.name: p
    for p in [
        # length and stopping
        _p("max_new_tokens", "pos_int", None, "most tokens to generate"),
        _p("min_new_tokens", "nonneg_int", None, "fewest tokens before an end-of-sequence may be chosen"),
        _p("max_time", "pos_float", None, "seconds after which generation stops"),
        _p("stop_strings", "str_list", None, "strings that end generation (cut from the text)"),
        _p("eos_token_id", "int_or_int_list", None, "end-of-sequence token id(s)"),
        _p("pad_token_id", "nonneg_int", None, "padding token id"),
        _p("bos_token_id", "nonneg_int", None, "beginning-of-sequence token id"),
        _p("decoder_start_token_id", "nonneg_int", None, "first decoder token (encoder-decoder models)"),
        # strategy
        _p("do_sample", "bool", False, "sample instead of choosing the most likely token"),
        _p("num_beams", "pos_int", 1, "beams for beam search"),
        _p("num_beam_groups", "pos_int", 1, "groups for diverse beam search"),
        _p("diversity_penalty", "nonneg_float", 0.0, "Hamming diversity penalty between beam groups"),
        _p("length_penalty", "float", 1.0, "exponent on the length when scoring finished beams"),
        _p("early_stopping", "early_stopping", False, "beam search stop rule: true, false or never"),
        _p("num_return_sequences", "pos_int", 1, "sequences returned per prompt"),
        _p("penalty_alpha", "unit_float", None, "degeneration penalty of contrastive search"),
        _p("dola_layers", "dola_layers", None, "DoLa premature layers: low, high or a list of indices"),
        _p("prompt_lookup_num_tokens", "pos_int", None, "draft tokens taken from n-gram matches in the prompt"),
        _p("max_matching_ngram_size", "pos_int", None, "longest n-gram prompt lookup matches"),
        _p("num_assistant_tokens", "pos_int", 20, "draft tokens per step in assisted decoding"),
        _p("num_assistant_tokens_schedule", "schedule", "constant", "how the draft length adapts: constant, heuristic"),
        _p("assistant_model", "str", None, "draft model for assisted (speculative) decoding"),
        # sampling warpers
        _p("temperature", "pos_float", 1.0, "softens (>1) or sharpens (<1) the distribution"),
        _p("top_k", "nonneg_int", 50, "keep the k most likely tokens (0: all)"),
        _p("top_p", "prob", 1.0, "keep the smallest set of tokens whose probability reaches p"),
        _p("min_p", "unit_float", None, "drop tokens below min_p times the top probability"),
        _p("typical_p", "prob", 1.0, "locally typical sampling mass"),
        _p("epsilon_cutoff", "unit_float", 0.0, "drop tokens with probability below epsilon"),
        _p("eta_cutoff", "unit_float", 0.0, "eta sampling cutoff"),
        # logits processors
        _p("repetition_penalty", "pos_float", 1.0, "penalty on tokens already present (1.0: none)"),
        _p("no_repeat_ngram_size", "nonneg_int", 0, "n-grams of this size never repeat"),
        _p("bad_words_ids", "int_list_list", None, "token sequences that are never generated"),
        _p("sequence_bias", "sequence_bias", None, "bias added to token sequences: [[[ids], bias], ...]"),
        _p("suppress_tokens", "int_list", None, "token ids that are never generated"),
        _p("watermark", "watermark", None, "watermark settings: bias, greenlist_ratio, seeding_scheme, context_width"),
        # constrained output (genkit/constraints.py): at most one of these
        _p("json_schema", "json_schema", None, "output follows this JSON Schema (mapping, JSON text or file path)"),
        _p("json_object", "bool", False, "output is one JSON object"),
        _p("regex", "str", None, "output matches this regular expression"),
        _p("choice", "choice", None, "output is one of these strings (a list, or a,b,c)"),
        _p("grammar", "str", None, "output follows this Lark or GBNF grammar (text or file path)"),
        # genkit's own
        _p("seed", "nonneg_int", None, "random seed: the same seed gives the same sampled text"),
    ]
}

# Names people reach for that mean a parameter genkit has.
ALIASES = {"stop": "stop_strings", "watermarking_config": "watermark", "max_tokens": "max_new_tokens"}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_list(v):
    return isinstance(v, list) and len(v) > 0 and all(_is_int(x) for x in v)


# Each checker returns the normalised value or raises ValueError with what was expected.
def _check(kind: str, v: Any) -> Any:
    if kind == "bool":
        if isinstance(v, bool):
            return v
        raise ValueError("expected true or false")
    if kind in ("pos_int", "nonneg_int"):
        if not _is_int(v):
            raise ValueError("expected an integer")
        if kind == "pos_int" and v < 1:
            raise ValueError("expected an integer of at least 1")
        if v < 0:
            raise ValueError("expected an integer of at least 0")
        return v
    if kind in ("float", "pos_float", "nonneg_float", "unit_float", "prob"):
        if not _is_num(v):
            raise ValueError("expected a number")
        v = float(v)
        if kind == "pos_float" and not v > 0:
            raise ValueError("expected a number above 0")
        if kind == "nonneg_float" and v < 0:
            raise ValueError("expected a number of at least 0")
        if kind == "unit_float" and not 0 <= v <= 1:
            raise ValueError("expected a number between 0 and 1")
        if kind == "prob" and not 0 < v <= 1:
            raise ValueError("expected a number in (0, 1]")
        return v
    if kind == "str":
        if isinstance(v, str) and v:
            return v
        raise ValueError("expected a non-empty string")
    if kind == "str_list":
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list) and v and all(isinstance(s, str) and s for s in v):
            return v
        raise ValueError("expected a string or a list of non-empty strings")
    if kind == "int_list":
        if _int_list(v):
            return v
        raise ValueError("expected a list of token ids")
    if kind == "int_or_int_list":
        if _is_int(v) and v >= 0:
            return v
        if _int_list(v):
            return v
        raise ValueError("expected a token id or a list of token ids")
    if kind == "int_list_list":
        if isinstance(v, list) and v and all(_int_list(x) for x in v):
            return v
        raise ValueError("expected a list of token id lists, e.g. [[12, 7], [99]]")
    if kind == "json_schema":
        if isinstance(v, dict) or isinstance(v, str) and v.strip():
            return v
        raise ValueError("expected a JSON Schema mapping, JSON text or a file path")
    if kind == "choice":
        if isinstance(v, (str, list)) and all(isinstance(c, str) for c in v) and constraints.choices(v):
            return constraints.choices(v)
        raise ValueError("expected a list of strings or a comma-separated string")
    if kind == "early_stopping":
        if isinstance(v, bool) or v == "never":
            return v
        raise ValueError("expected true, false or never")
    if kind == "schedule":
        if v in ("constant", "heuristic", "heuristic_transient"):
            return v
        raise ValueError("expected constant, heuristic or heuristic_transient")
    if kind == "dola_layers":
        if v in ("low", "high"):
            return v
        if _int_list(v) and all(x >= 0 for x in v):
            return v
        raise ValueError("expected low, high or a list of layer indices")
    if kind == "sequence_bias":
        ok = isinstance(v, list) and v and all(
            isinstance(e, list) and len(e) == 2 and _int_list(e[0]) and _is_num(e[1]) for e in v
        )
        if ok:
            return [[list(e[0]), float(e[1])] for e in v]
        raise ValueError("expected a list of [[token ids], bias] pairs")
    if kind == "watermark":
        if v is True:
            return {}
        if not isinstance(v, dict):
            raise ValueError("expected true or a mapping of bias, greenlist_ratio, seeding_scheme, context_width")
        out = {}
        for k, val in v.items():
            if k not in WATERMARK_KEYS:
                raise ValueError(f"unknown watermark key '{k}'{did_you_mean(k, WATERMARK_KEYS)}")
            typ, _ = WATERMARK_KEYS[k]
            if typ is float and _is_num(val):
                val = float(val)
            elif not (isinstance(val, typ) and not isinstance(val, bool)):
                raise ValueError(f"watermark {k} expects {typ.__name__}")
            out[k] = val
        if out.get("seeding_scheme", "lefthash") not in ("lefthash", "selfhash"):
            raise ValueError("watermark seeding_scheme must be lefthash or selfhash")
        if not 0 < out.get("greenlist_ratio", 0.25) < 1:
            raise ValueError("watermark greenlist_ratio must be between 0 and 1")
        return out
    raise AssertionError(f"unknown parameter kind {kind}")


def check_param(name: str, value: Any, where: str) -> tuple[str, Any]:
    """Validate one `name: value` pair; `where` names its source for the error message."""
    name = ALIASES.get(name, name)
    if name not in PARAMS:
        raise GenkitError(
            f"{where}: unknown generation parameter '{name}'{did_you_mean(name, list(PARAMS) + list(ALIASES))}; "
            "`genkit presets params` lists them"
        )
    if value is None:
        return name, None
    try:
        return name, _check(PARAMS[name].kind, value)
    except ValueError as e:
        raise GenkitError(f"{where}: bad value {shown(value)} for '{name}': {shorten(str(e))}") from None


def check_params(values: dict, where: str) -> dict:
    if not isinstance(values, dict):
        raise GenkitError(f"{where}: generation parameters must be a mapping of name: value")
    return dict(check_param(str(k), v, where) for k, v in values.items())


CONSTRAINT_KEYS = constraints.KEYS


def merge(base: dict, top: dict) -> dict:
    """`top`'s parameters over `base`'s (None values in `top` ignored). A layer that constrains
    the output replaces the constraint below it rather than adding a second one."""
    top = {k: v for k, v in top.items() if v is not None}
    if any(top.get(k) not in (None, False) for k in CONSTRAINT_KEYS):
        base = {k: v for k, v in base.items() if k not in CONSTRAINT_KEYS}
    return {**base, **top}


def effective(values: dict) -> dict:
    """The defaults overlaid with `values`: what generation will actually use."""
    out = {name: p.default for name, p in PARAMS.items()}
    out.update({k: v for k, v in values.items() if v is not None})
    return out


def strategy_of(values: dict) -> str:
    """The decoding strategy that a set of parameters selects, in the documents' terms."""
    v = effective(values)
    if v["assistant_model"]:
        return "assisted"
    if v["prompt_lookup_num_tokens"]:
        return "prompt-lookup"
    if v["dola_layers"] is not None:
        return "dola"
    if v["num_beams"] > 1:
        if v["num_beam_groups"] > 1:
            return "diverse-beam"
        return "beam-sampling" if v["do_sample"] else "beam"
    if v["penalty_alpha"] and v["top_k"] > 1 and not v["do_sample"]:
        return "contrastive"
    return "sampling" if v["do_sample"] else "greedy"


def check_combination(values: dict, where: str) -> None:
    """Reject settings that cannot work together, before any model loads."""
    v = effective(values)

    def bad(msg):
        raise GenkitError(f"{where}: {msg}")

    beams, groups = v["num_beams"], v["num_beam_groups"]
    if groups > 1:
        if beams % groups:
            bad(f"num_beam_groups ({groups}) must divide num_beams ({beams})")
        if v["do_sample"]:
            bad("diverse beam search (num_beam_groups > 1) cannot sample: set do_sample to false")
        if v["diversity_penalty"] == 0:
            bad("diverse beam search needs diversity_penalty above 0")
    elif v["diversity_penalty"] and beams > 1:
        bad("diversity_penalty needs num_beam_groups above 1")
    if beams > 1 and not v["do_sample"] and v["num_return_sequences"] > beams:
        bad(f"num_return_sequences ({v['num_return_sequences']}) cannot exceed num_beams ({beams})")
    if beams == 1 and not v["do_sample"] and v["num_return_sequences"] > 1:
        bad("num_return_sequences above 1 needs sampling (do_sample: true) or beam search (num_beams)")
    if v["min_new_tokens"] is not None and v["max_new_tokens"] is not None:
        if v["min_new_tokens"] > v["max_new_tokens"]:
            bad(f"min_new_tokens ({v['min_new_tokens']}) exceeds max_new_tokens ({v['max_new_tokens']})")
    special = [k for k in ("penalty_alpha", "dola_layers", "prompt_lookup_num_tokens", "assistant_model")
               if values.get(k) not in (None, 0)]
    if beams > 1 and special:
        bad(f"{special[0]} cannot be combined with beam search (num_beams > 1)")
    if len(special) > 1:
        bad(f"{special[0]} and {special[1]} select different strategies: choose one")
    if any(v[k] not in (None, False) for k in CONSTRAINT_KEYS):
        constraints.check(values, strategy_of(values), where)
    if v["penalty_alpha"] and v["do_sample"]:
        bad("contrastive search (penalty_alpha) does not sample: set do_sample to false")
    if v["penalty_alpha"] and v["top_k"] < 2:
        bad("contrastive search (penalty_alpha) needs top_k of at least 2")
