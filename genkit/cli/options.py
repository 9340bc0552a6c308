"""Flags shared by the commands that load a model and generate."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from genkit.cli import complete
from genkit.errors import GenkitError

MODEL_PANEL = "Model"
GEN_PANEL = "Generation"

Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", rich_help_panel=MODEL_PANEL, autocompletion=complete.model_names,
    help="Model directory, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct).")]
Dtype = Annotated[str, typer.Option(
    "--dtype", rich_help_panel=MODEL_PANEL, help="auto, float32, bfloat16 or float16.")]
DeviceMap = Annotated[Optional[str], typer.Option(
    "--device-map", rich_help_panel=MODEL_PANEL, help="auto, cpu, cuda, balanced or a JSON map.")]
Load4 = Annotated[bool, typer.Option(
    "--load-in-4bit", rich_help_panel=MODEL_PANEL, help="Quantise the weights to 4 bits (bitsandbytes).")]
Load8 = Annotated[bool, typer.Option(
    "--load-in-8bit", rich_help_panel=MODEL_PANEL, help="Quantise the weights to 8 bits (bitsandbytes).")]
QuantType = Annotated[str, typer.Option(
    "--quant-type", rich_help_panel=MODEL_PANEL, help="4-bit quantisation type: nf4 or fp4.")]
ComputeDtype = Annotated[Optional[str], typer.Option(
    "--compute-dtype", rich_help_panel=MODEL_PANEL, help="4-bit compute dtype: float32, bfloat16, float16.")]
TrustRemote = Annotated[bool, typer.Option(
    "--trust-remote-code", rich_help_panel=MODEL_PANEL, help="Allow the model's own Python code (off by default).")]
Native4 = Annotated[bool, typer.Option(
    "--native-4bit", rich_help_panel=MODEL_PANEL,
    help="Run a GGUF's Q4_0/Q4_1 weights as they are on the CPU (fast; Llama models).")]
Native8 = Annotated[bool, typer.Option(
    "--native-8bit", rich_help_panel=MODEL_PANEL,
    help="Quantise the weights to 8 bits (Q8_0 blocks) and run them with genkit's CPU kernels (Llama models).")]
Int8Activations = Annotated[bool, typer.Option(
    "--int8-activations", rich_help_panel=MODEL_PANEL,
    help="With --native-4bit: quantise activations to 8 bits per block of 32, as llama.cpp does "
         "(faster; greedy output can drift from the fp32 path).")]

Preset = Annotated[Optional[str], typer.Option(
    "--preset", "-p", rich_help_panel=GEN_PANEL, autocompletion=complete.preset_names, help="Preset name or YAML file (`genkit presets list`).")]
GenConfig = Annotated[Optional[str], typer.Option(
    "--generation-config", rich_help_panel=GEN_PANEL, help="A saved GenerationConfig (.json) or YAML file.")]
Set = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", rich_help_panel=GEN_PANEL, help="Any generation parameter: --set key=value (repeatable).")]
Var = Annotated[Optional[list[str]], typer.Option(
    "--var", rich_help_panel=GEN_PANEL, help="Template variable of the preset: --var target=French.")]


def load_options(dtype, device_map, load_in_4bit, load_in_8bit, quant_type, compute_dtype, trust_remote_code,
                 native_4bit=False, native_8bit=False, int8_activations=False):
    from genkit.models import LoadOptions

    return LoadOptions(
        dtype=dtype, device_map=device_map, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
        quant_type=quant_type, compute_dtype=compute_dtype, trust_remote_code=trust_remote_code,
        native_4bit=native_4bit, native_8bit=native_8bit, int8_activations=int8_activations,
    )


def load_model(model, opts, quiet: bool = False):
    """Load with a spinner on stderr when it is a terminal."""
    from rich.console import Console

    from genkit import models

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
    return decode_utf8(data, "stdin")


def decode_utf8(data: bytes, where: str) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise GenkitError(f"{where}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}): "
                          "send UTF-8 text") from None


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


def prompt_from(arg: Optional[str]) -> str:
    """The prompt from the argument, or stdin when the argument is '-' or stdin is a pipe."""
    if arg == "-" or (arg is None and sys.stdin is not None and not sys.stdin.isatty()):
        return read_stdin()
    if arg is None:
        raise GenkitError('no prompt: pass one as an argument (genkit run "...") or pipe it on stdin')
    if not arg.strip():
        raise GenkitError("the prompt is empty: pass some text")
    return argument_text(arg, "the prompt argument")
