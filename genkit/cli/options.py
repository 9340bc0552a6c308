"""Flags shared by the commands that load a model and generate, declared once.

`model_options` gives a command every model-loading flag (and --threads) and hands them to it as
one `LoadOptions` named `load`; the generation flags that several commands share are the
Annotated aliases below, their help and default taken from genkit/params.py. Nothing here
imports torch or transformers.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Annotated, Optional

import typer

from genkit import utf8
from genkit.cli import complete
from genkit.errors import GenkitError
from genkit.params import DEFAULT_MAX_NEW_TOKENS, PARAMS

MODEL_PANEL = "Model"
GEN_PANEL = "Generation"


def gen_option(param: str, *decls: str, help: str | None = None, default: str | None = None):
    """A generation flag: its help line is the parameter's own, its default the one that
    applies when neither the preset, a --generation-config nor the model's generation config
    sets a value."""
    p = PARAMS[param]
    text = help or (p.help[0].upper() + p.help[1:] + ".")
    shown = default if default is not None else ("none" if p.default is None else str(p.default).lower())
    return typer.Option(*(decls or ("--" + param.replace("_", "-"),)), rich_help_panel=GEN_PANEL,
                        help=with_default(text, shown), show_default=False)


def with_default(help: str, default: str | None) -> str:
    """A flag's one help line, its default at the end (click would put a described default in
    parentheses inside brackets)."""
    return help if default is None else f"{help.rstrip('.')} (default: {default})."


# ---------------------------------------------------------------- generation flags shared by commands

Prompt = Annotated[Optional[str], typer.Argument(help="The prompt; '-' or a pipe reads stdin.", show_default=False)]
Preset = Annotated[Optional[str], typer.Option(
    "--preset", "-p", rich_help_panel=GEN_PANEL, show_default=False, autocompletion=complete.preset_names,
    help=with_default("Preset name or YAML file (`genkit presets list`).", "none"))]
GenConfig = Annotated[Optional[str], typer.Option(
    "--generation-config", rich_help_panel=GEN_PANEL, show_default=False,
    help=with_default("A saved GenerationConfig (.json) or YAML file.", "none"))]
Set = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", rich_help_panel=GEN_PANEL, show_default=False,
    help=with_default("Any generation parameter (`genkit presets params`): --set key=value, repeatable.", "none"))]
Var = Annotated[Optional[list[str]], typer.Option(
    "--var", rich_help_panel=GEN_PANEL, show_default=False,
    help=with_default("A variable of the preset's template: --var target=French, repeatable.", "the preset's vars"))]
System = Annotated[Optional[str], typer.Option(
    "--system", rich_help_panel=GEN_PANEL, show_default=False,
    help=with_default("System prompt for chat models.", "the preset's, else none"))]
Raw = Annotated[bool, typer.Option(
    "--raw", rich_help_panel=GEN_PANEL, help="Send the text as it is, without the chat template.")]
MaxNewTokens = Annotated[Optional[int], gen_option(
    "max_new_tokens", "--max-new-tokens", "-n", help="Most new tokens to generate.",
    default=f"the preset's, else {DEFAULT_MAX_NEW_TOKENS}")]
Sample = Annotated[Optional[bool], gen_option(
    "do_sample", "--sample/--greedy", help="Sample, or always take the most likely token.",
    default="the preset's, else greedy")]
Temperature = Annotated[Optional[float], gen_option("temperature", "--temperature", "-t")]
Seed = Annotated[Optional[int], gen_option(
    "seed", "--seed", help="Seed for sampling: the same seed gives the same text.", default="random")]

# ---------------------------------------------------------------- model-loading flags


def _model_flag(*decls: str, help: str, default: str | None = None, **more):
    return typer.Option(*decls, rich_help_panel=MODEL_PANEL, help=with_default(help, default), show_default=False,
                        **more)


Model = Annotated[Optional[str], _model_flag(
    "--model", "-m", help="Model directory, .gguf file or hub id.", default="the embedded SmolLM2-135M-Instruct",
    autocompletion=complete.model_names)]


def _switch(flag: str, help: str) -> tuple:
    """An on/off model-loading flag, off by default: LOAD_FLAGS' (annotation, default)."""
    return Annotated[bool, _model_flag(flag, help=help)], False


# name -> (annotation, default) of every flag `model_options` adds, in LoadOptions' field order.
LOAD_FLAGS: dict[str, tuple] = {
    "dtype": (Annotated[str, _model_flag("--dtype", help="auto, float32, bfloat16 or float16.", default="auto")], "auto"),
    "device_map": (Annotated[Optional[str], _model_flag(
        "--device-map", help="auto, cpu, cuda, balanced or a JSON map.",
        default="none: the whole model on the CPU")], None),
    "load_in_4bit": _switch("--load-in-4bit", "Quantise the weights to 4 bits (bitsandbytes)."),
    "load_in_8bit": _switch("--load-in-8bit", "Quantise the weights to 8 bits (bitsandbytes)."),
    "quant_type": (Annotated[str, _model_flag("--quant-type", help="4-bit quantisation type: nf4 or fp4.", default="nf4")], "nf4"),
    "compute_dtype": (Annotated[Optional[str], _model_flag(
        "--compute-dtype", help="4-bit compute dtype: float32, bfloat16 or float16.",
        default="bitsandbytes'")], None),
    "trust_remote_code": _switch("--trust-remote-code", "Allow the model's own Python code to run."),
    "native_4bit": _switch("--native-4bit", "Run the embedded model's GGUF file natively on the CPU, as every "
                                            ".gguf --model runs by default (kept for scripts)."),
    "native_8bit": _switch("--native-8bit",
                           "Quantise the weights to Q8_0 blocks for genkit's CPU kernels (fast; Llama models)."),
    "int8_activations": _switch(
        "--int8-activations", "With a .gguf run natively or --native-4bit: activations quantised to bytes, as "
                              "llama.cpp does (faster; greedy output can drift from the fp32 path at near ties)."),
    "threads": (Annotated[Optional[int], _model_flag(
        "--threads", min=1, help="CPU threads for torch and genkit's kernels.",
        default="OMP_NUM_THREADS, else every usable core")], None),
    "dequantize": _switch("--dequantize", "Load a .gguf through transformers as a float copy in genkit's cache, "
                                          "instead of running its blocks natively on the CPU."),
    "backend": (Annotated[str, _model_flag(
        "--backend", default="auto",
        help="The runner: auto (the fastest that applies), transformers (transformers' forward, the "
             "reference; a .gguf is dequantised), static (static cache, CUDA graphs on a GPU) or "
             "static-eager (static cache, no graphs).")], "auto"),
}


def flag_group(flags: dict[str, tuple], name: str, combine):
    """A decorator that gives a command every flag of `flags` (name -> (annotation, default))
    and hands it `combine(the flags' values by name)` as its parameter `name` instead: a group
    of flags is declared once and each command sees one value. The flags take the place of
    `name` in the signature, so the command decides where their help panel comes."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        params = list(signature.parameters.values())
        at = [p.name for p in params].index(name)
        added = [inspect.Parameter(flag, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                 for flag, (annotation, default) in flags.items()]

        @functools.wraps(command)
        def with_group(*args, **kwargs):
            values = {flag: kwargs.pop(flag) for flag in flags}
            return command(*args, **{name: combine(values)}, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params[:at] + params[at + 1:]]
        params[at:at] = added
        with_group.__signature__ = signature.replace(parameters=params)
        with_group.__annotations__ = {p.name: p.annotation for p in params}
        return with_group

    return decorate


def load_options(values: dict):
    """A LoadOptions of the loading flags' values, by flag name (a command built on another's
    signature, as `genkit chat` is on run's, receives them one by one)."""
    from genkit.models import LoadOptions

    return LoadOptions(**{name: values[name] for name in LOAD_FLAGS})


# Every model-loading flag, handed to the command as one LoadOptions `load` (the flag values as
# typed: --threads None means genkit's default).
model_options = flag_group(LOAD_FLAGS, "load", load_options)


def load_model(model, opts, quiet: bool = False):
    """Load with a spinner on stderr in a terminal. The slow first-run steps (converting a GGUF
    file, building the kernels) say themselves through genkit's log, terminal or not."""
    from rich.console import Console

    from genkit import models, threads

    threads.configure(opts.threads)
    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return models.load(model, opts)
    with console.status("loading model…", spinner="dots") as status:
        return models.load(model, opts, progress=lambda msg: status.update(f"{msg}…"))


def stdin_text() -> str:
    """All of stdin as text: a closed stdin or bytes that are not UTF-8 are one clear line, and
    a UTF-8 byte order mark is dropped."""
    stream = sys.stdin
    if stream is None or stream.closed:
        raise GenkitError("stdin is closed: pass the text as an argument, or pipe it in")
    buffer = getattr(stream, "buffer", None)
    data = buffer.read() if buffer is not None else stream.read().encode("utf-8", "surrogateescape")
    return utf8.decode(data, "stdin")


def argument_text(value: str, what: str) -> str:
    """A command-line argument as text: Python hands bytes that are not UTF-8 over as lone
    surrogates, which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise GenkitError(f"{what} is not valid UTF-8: pass UTF-8 text (check the terminal's encoding)") from None
    return value


def unescape(text: str) -> str:
    """\\n, \\t, \\r and \\\\ in a flag's value as the characters they name (a shell passes
    `--stop "\\n"` as a backslash and an n)."""
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def read_stdin() -> str:
    data = stdin_text()
    if not data.strip():
        raise GenkitError("stdin was empty: pipe a prompt in, or pass it as an argument")
    return data.rstrip("\n")


def prompt_from(arg: Optional[str], command: str = "run") -> str:
    """The prompt from the argument, or stdin when the argument is '-' or stdin is a pipe."""
    if arg == "-" or (arg is None and sys.stdin is not None and not sys.stdin.isatty()):
        return read_stdin()
    if arg is None:
        raise GenkitError(f'no prompt: pass one as an argument (genkit {command} "...") or pipe it on stdin')
    if not arg.strip():
        raise GenkitError("the prompt is empty: pass some text")
    return argument_text(arg, "the prompt argument")
