"""Flags shared by the commands that load a model and generate."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from genkit.errors import GenkitError

MODEL_PANEL = "Model"
GEN_PANEL = "Generation"

Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", rich_help_panel=MODEL_PANEL,
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
Dequantize = Annotated[bool, typer.Option(
    "--dequantize", rich_help_panel=MODEL_PANEL,
    help="Load a .gguf through transformers as a float copy in genkit's cache (GPU, --device-map, "
         "bitsandbytes) instead of running its blocks natively on the CPU.")]

Preset = Annotated[Optional[str], typer.Option(
    "--preset", "-p", rich_help_panel=GEN_PANEL, help="Preset name or YAML file (`genkit presets list`).")]
GenConfig = Annotated[Optional[str], typer.Option(
    "--generation-config", rich_help_panel=GEN_PANEL, help="A saved GenerationConfig (.json) or YAML file.")]
Set = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", rich_help_panel=GEN_PANEL, help="Any generation parameter: --set key=value (repeatable).")]
Var = Annotated[Optional[list[str]], typer.Option(
    "--var", rich_help_panel=GEN_PANEL, help="Template variable of the preset: --var target=French.")]


def load_options(dtype, device_map, load_in_4bit, load_in_8bit, quant_type, compute_dtype, trust_remote_code,
                 native_4bit=False, native_8bit=False, int8_activations=False, dequantize=False):
    from genkit.models import LoadOptions

    return LoadOptions(
        dtype=dtype, device_map=device_map, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
        quant_type=quant_type, compute_dtype=compute_dtype, trust_remote_code=trust_remote_code,
        native_4bit=native_4bit, native_8bit=native_8bit, int8_activations=int8_activations,
        dequantize=dequantize,
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


def read_stdin() -> str:
    data = sys.stdin.read()
    if not data.strip():
        raise GenkitError("stdin was empty: pipe a prompt in, or pass it as an argument")
    return data.rstrip("\n")


def prompt_from(arg: Optional[str]) -> str:
    """The prompt from the argument, or stdin when the argument is '-' or stdin is a pipe."""
    if arg == "-" or (arg is None and not sys.stdin.isatty()):
        return read_stdin()
    if arg is None:
        raise GenkitError('no prompt: pass one as an argument (genkit run "...") or pipe it on stdin')
    if not arg.strip():
        raise GenkitError("the prompt is empty: pass some text")
    return arg
