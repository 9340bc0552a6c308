"""Flags that constrain the output (run, compare, batch, chat) and turn into generation parameters.

`constraint_options` gives a command the five flags and hands them to it as one `constraints`
mapping of generation parameters, checked here, naming the flag, before any model loads;
genkit/constraints.py does the compiling. Every flag has a parameter of the same name for
presets, --set and batch records.
"""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from genkit.cli.options import flag_group
from genkit.errors import GenkitError

PANEL = "Structured output"

JsonSchema = Annotated[Optional[str], typer.Option(
    "--json-schema", rich_help_panel=PANEL, metavar="FILE|JSON",
    help="The output is JSON that follows this JSON Schema, a .json file or the schema itself (default: none).")]
JsonObject = Annotated[bool, typer.Option(
    "--json-object", rich_help_panel=PANEL, help="The output is one JSON object (any keys).")]
Regex = Annotated[Optional[str], typer.Option(
    "--regex", rich_help_panel=PANEL, metavar="PATTERN", help="The whole output matches this regular expression (default: none).")]
Choice = Annotated[Optional[str], typer.Option(
    "--choice", rich_help_panel=PANEL, metavar="A,B,C", help="The output is exactly one of these strings (default: none).")]
Grammar = Annotated[Optional[str], typer.Option(
    "--grammar", rich_help_panel=PANEL, metavar="FILE", help="The output follows this grammar file, Lark or GBNF (default: none).")]


def params(json_schema: Optional[str] = None, json_object: bool = False, regex: Optional[str] = None,
           choice: Optional[str] = None, grammar: Optional[str] = None) -> dict:
    """The generation parameters these flags ask for, checked (GenkitError names the flag)."""
    from genkit import constraints

    out: dict = {}
    if json_schema is not None:
        out["json_schema"] = json_schema
    if json_object:
        out["json_object"] = True
    if regex is not None:
        out["regex"] = regex
    if choice is not None:
        if not constraints.choices(choice):
            raise GenkitError("--choice: give the strings separated by commas, e.g. --choice yes,no")
        out["choice"] = constraints.choices(choice)
    if grammar is not None:
        if not os.path.isfile(grammar):
            raise GenkitError(f"--grammar {grammar}: no such file (pass a Lark or GBNF grammar file)")
        out["grammar"] = grammar
    if len(out) > 1:
        first, second = ("--" + k.replace("_", "-") for k in list(out)[:2])
        raise GenkitError(f"{first} and {second} both constrain the output: choose one")
    for key in out:
        constraints.grammar_for(out, "--" + key.replace("_", "-"))
    return out


# name -> (annotation, default) of the flags `constraint_options` adds, in the help's order.
FLAGS: dict[str, tuple] = {
    "json_schema": (JsonSchema, None),
    "json_object": (JsonObject, False),
    "regex": (Regex, None),
    "choice": (Choice, None),
    "grammar": (Grammar, None),
}


def from_flags(values: dict) -> dict:
    """The generation parameters of the constraint flags' values, by flag name (`genkit chat`,
    built on run's signature, receives them one by one)."""
    return params(**{name: values[name] for name in FLAGS})


# The constraint flags, handed to the command as one checked `constraints` mapping.
constraint_options = flag_group(FLAGS, "constraints", from_flags)
