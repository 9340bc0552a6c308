"""`genkit batch`: a file of prompts in, one JSON record per prompt out; resumable.

The command parses flags, loads the model only when something is left to run, shows progress
on stderr and prints the summary; genkit/batch/ decides everything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Annotated, Optional

import typer

from genkit.cli import constraint_opts as c
from genkit.cli import options as o
from genkit.models import LoadOptions

G = o.GEN_PANEL
J = "Batch job"


def register(app: typer.Typer) -> None:
    app.command("batch")(batch)


@o.model_options
@c.constraint_options
def batch(
    input: Annotated[str, typer.Argument(
        help="Prompts: a .txt file (one per line), a .jsonl file (genkit or OpenAI batch records), or - for stdin.",
        show_default=False)],
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", rich_help_panel=J, show_default=False,
        help=o.with_default("JSONL file to write; re-running with the same file resumes the job.", "stdout"))] = None,
    input_format: Annotated[Optional[str], typer.Option(
        "--format", rich_help_panel=J, show_default=False,
        help=o.with_default("Input format: txt or jsonl.", "from the extension"))] = None,
    output_format: Annotated[str, typer.Option(
        "--output-format", rich_help_panel=J, help="genkit, or openai (the OpenAI batch response shape).")] = "genkit",
    unordered: Annotated[bool, typer.Option(
        "--unordered", rich_help_panel=J, help="Write records as they finish instead of in input order.")] = False,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", rich_help_panel=J, help="Most sequences decoded together.")] = 64,
    max_batch_tokens: Annotated[Optional[int], typer.Option(
        "--max-batch-tokens", rich_help_panel=J,
        show_default=False,
        help=o.with_default("Token budget of a batch: rows x (prompt + new tokens) of its longest row.", "no limit"))] = None,
    continuous: Annotated[bool, typer.Option(
        "--continuous/--static", rich_help_panel=J,
        help="Refill a finished sequence's slot at once (greedy, sampling), or run fixed padded batches.")] = True,
    strict: Annotated[bool, typer.Option(
        "--strict", rich_help_panel=J, help="Stop at the first bad record instead of writing an error record.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", rich_help_panel=J, help="Start over instead of resuming from OUTPUT.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=J, help="No progress display.")] = False,
    preset: o.Preset = None,
    model: o.Model = None,
    system: Annotated[Optional[str], typer.Option(
        "--system", rich_help_panel=G, show_default=False,
        help=o.with_default("System prompt for chat models (a record's own wins).", "the preset's, else none"))] = None,
    raw: o.Raw = False,
    max_new_tokens: Annotated[Optional[int], o.gen_option(
        "max_new_tokens", "--max-new-tokens", "-n", help="Most new tokens per record (a record's params win).",
        default="the preset's, else 256")] = None,
    sample: o.Sample = None,
    temperature: o.Temperature = None,
    seed: Annotated[Optional[int], o.gen_option(
        "seed", help="Job seed: a record without its own seed samples from one derived from it and its id.",
        default="random")] = None,
    generation_config: o.GenConfig = None,
    set_: o.Set = None,
    var: o.Var = None,
    logprobs: Annotated[Optional[int], typer.Option(
        "--logprobs", metavar="N", min=0, max=20, rich_help_panel=J,
        help="Each token's log-probability and its N (0-20) most likely alternatives in every record (default: none).")] = None,
    constraints: Optional[dict] = None,  # the "Structured output" flags: constraint_options
    load: LoadOptions = None,
) -> None:
    """Run every prompt of a file and write one JSON record per prompt (resumable)."""
    from genkit import batch as B
    from genkit import params as P
    from genkit import presets

    params = {}
    flags = {"max_new_tokens": max_new_tokens, "do_sample": sample, "temperature": temperature, "seed": seed}
    for key, value in flags.items():
        if value is not None:
            k, v = P.check_param(key, value, "--" + key.replace("_", "-"))
            params[k] = v
    params.update(presets.parse_set(set_ or []))
    params = P.merge(params, constraints)
    opts = B.JobOptions(
        input=input, output=output, input_format=input_format, output_format=output_format,
        preset=preset, generation_config=generation_config, params=params,
        vars=presets.parse_vars(var or []), system=system, raw=raw, batch_size=batch_size,
        max_batch_tokens=max_batch_tokens, unordered=unordered, strict=strict, overwrite=overwrite,
        continuous=continuous, logprobs=logprobs,
        model_key=_model_key(model, load),
    )
    job = B.prepare(opts)
    for note in job.notes:
        print(f"genkit: {note}", file=sys.stderr)
    summary = job.summary
    lead = summary.rank == 0
    lm = None
    if job.needs_model:
        load.device_map = _device_map(load.device_map, job.state)
        lm = o.load_model(model, load, quiet=quiet or not lead)
    view = Progress(summary, enabled=not quiet and lead)
    try:
        with view, _sigterm_interrupts():
            B.execute(job, lm, on_update=view.update)
    except KeyboardInterrupt as e:
        print(summary_line(job, interrupted=True), file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Terminated) else 130)
    print(summary_line(job), file=sys.stderr)
    failed = job.final_failed if job.final_failed is not None else summary.failed
    if failed or summary.failed:
        raise SystemExit(1)


def _model_key(model, load) -> str:
    """The model and the load options that change its text: part of every record's fingerprint,
    so that resuming with another model recomputes nothing silently (device map and threads
    do not change it)."""
    import json

    return json.dumps([model or "embedded", load.dtype, load.load_in_4bit, load.load_in_8bit, load.quant_type,
                       load.compute_dtype, load.native_4bit, load.native_8bit, load.int8_activations])


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop as Ctrl-C does (records written stay, the summary says how to resume)."""


@contextlib.contextmanager
def _sigterm_interrupts():
    def stop(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (an embedding program): leave its handlers alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _device_map(device_map: Optional[str], state) -> Optional[str]:
    """Under accelerate launch each process puts the model on its own GPU."""
    if device_map is None and state is not None and state.device.type == "cuda":
        return str(state.device)
    return device_map


def summary_line(job, interrupted: bool = False) -> str:
    from genkit.render import count

    s = job.summary
    who = f"process {s.rank + 1}/{s.world}: " if s.world > 1 else ""
    where = job.opts.output or "stdout"
    skipped = f", {s.skipped} skipped (already in {where})" if job.opts.output and s.skipped else ""
    parts = [
        f"{s.done} done, {s.failed} failed{skipped}",
        f"{count(s.completion_tokens, 'token')} in {s.elapsed_s:.1f} s ({s.tokens_per_s:.1f} tokens/s)",
    ]
    if job.final_records is not None and s.world > 1:
        parts.append(f"{where}: {job.final_records} records merged from {s.world} processes")
    if interrupted:
        parts.append("interrupted: run the same command again to resume" if job.opts.output
                     else "interrupted")
    elif job.final_failed:
        parts.append(f"{job.final_failed} records in {where} carry \"error\"")
    elif s.failed:
        parts.append("failed records carry \"error\"")
    return f"genkit batch: {who}" + " · ".join(parts)


class Progress:
    """Progress on stderr: a Rich bar in a terminal, a plain status line every few seconds
    otherwise (GENKIT_PROGRESS_INTERVAL seconds, default 10)."""

    def __init__(self, summary, enabled: bool):
        from rich.console import Console

        self.summary = summary
        self.console = Console(stderr=True, highlight=False)
        self.enabled = enabled
        self.tty = self.console.is_terminal
        self.interval = float(os.environ.get("GENKIT_PROGRESS_INTERVAL", "10"))
        self.last_line = time.monotonic()
        self.bar = None
        self.task = None

    def __enter__(self):
        if self.enabled and self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("records"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"), TextColumn("{task.fields[tps]:.1f} tokens/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self.bar.__enter__()
            s = self.summary
            self.task = self.bar.add_task("batch", total=s.total, completed=s.skipped, failed=0, tps=0.0)
        return self

    def update(self, s) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=s.finished, failed=s.failed, tps=s.tokens_per_s)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            print(self.plain(s), file=sys.stderr, flush=True)

    def plain(self, s) -> str:
        ran = s.done + s.failed
        left = s.total - s.finished
        eta = f"ETA {_clock(left * s.elapsed_s / ran)}" if ran else "ETA -"
        return (f"genkit batch: {s.finished}/{s.total} records ({s.failed} failed, {s.skipped} skipped) · "
                f"{s.tokens_per_s:.1f} tokens/s · {eta}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
