"""The two phases of a job: `prepare` (no model) and `execute` (on the loaded model)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from genkit.batch.plan import Job, JobOptions, Summary, resolve_requests, strict_error
from genkit.batch.reading import read_requests
from genkit.batch.records import OUTPUT_FORMATS
from genkit.batch.requests import Request
from genkit.batch.runner import Runner
from genkit.batch.store import OutputStore, StdoutSink
from genkit.errors import GenkitError


def distributed() -> tuple[int, int, Any]:
    """(rank, world size, PartialState) under `accelerate launch`, else (0, 1, None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    # Without CUDA, accelerate starts its multi-process (gloo) mode only when asked for the CPU.
    # Processes finish their shards at different times: the final barrier must outwait that.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=7))
    if state.num_processes <= 1:
        raise GenkitError("WORLD_SIZE is above 1 but accelerate started no process group: launch with "
                          "`accelerate launch --multi_gpu --num_processes N -m genkit batch ...` or torchrun")
    return state.process_index, state.num_processes, state


def prepare(opts: JobOptions, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> Job:
    """Read and check INPUT, resolve settings, and find what OUTPUT already holds."""
    if opts.output_format not in OUTPUT_FORMATS:
        raise GenkitError(f"--output-format {opts.output_format}: expected genkit or openai")
    if opts.batch_size < 1:
        raise GenkitError("--batch-size must be at least 1")
    if opts.max_batch_tokens is not None and opts.max_batch_tokens < 1:
        raise GenkitError("--max-batch-tokens must be at least 1")
    if opts.output and opts.input != "-" and Path(opts.output).resolve() == Path(opts.input).resolve():
        raise GenkitError(f"-o {opts.output} is the input file: write the records to another file")
    requests = read_requests(opts.input, opts.input_format, stdin)
    resolve_requests(requests, opts)
    rank, world, state = distributed()
    if world > 1 and not opts.output:
        raise GenkitError("accelerate launch needs -o OUTPUT: the processes write parts that are merged into it")
    mine = requests[rank::world]
    summary = Summary(total=len(mine), rank=rank, world=world)
    store, done = None, {}
    if opts.output:
        store, done = open_output(opts, requests, rank, world, state)
    sink = store or StdoutSink(stdout or sys.stdout, None if opts.unordered else [r.key for r in requests])
    pending = [r for r in mine if not done.get(r.key)]
    summary.skipped = len(mine) - len(pending)
    if opts.strict:
        bad = next((r for r in pending if r.error), None)
        if bad is not None:
            raise strict_error(opts, bad, bad.error)
    return Job(opts, requests, pending, store, sink, summary, state)


def open_output(opts: JobOptions, requests: list[Request], rank: int, world: int, state):
    """The OutputStore and what it already holds (key -> ok), checked against the input."""
    store = OutputStore(Path(opts.output), opts.output_format, rank, world)
    if opts.overwrite and rank == 0:
        store.remove_all()
    if state is not None:
        state.wait_for_everyone()  # nobody reads OUTPUT while process 0 removes it
    done = store.load()
    known = {r.key for r in requests}
    foreign = next((k for k in done if k not in known), None)
    if foreign is not None:
        raise GenkitError(f"{opts.output} has a record with id {foreign} that is not in the input; "
                          "is it the output of another job? Pass --overwrite to start over")
    return store, done


def execute(job: Job, lm=None, *, on_update: Callable[[Summary], None] | None = None) -> Summary:
    """Run the pending records, write each as it completes, and finish OUTPUT."""
    runner = Runner(job, lm, on_update)
    job.summary.started = time.perf_counter()  # tokens/s counts generation, not model loading
    if job.store is not None:
        job.store.open()
    try:
        runner.run()
    finally:
        job.sink.close()
    finish_output(job)
    return job.summary


def finish_output(job: Job) -> None:
    """Rewrite OUTPUT in input order (process 0, once every process is done)."""
    if job.store is None:
        return
    if job.state is not None:
        job.state.wait_for_everyone()
    if job.summary.rank == 0:
        job.final_records, job.final_failed = job.store.finalize(
            None if job.opts.unordered else [r.key for r in job.requests])

