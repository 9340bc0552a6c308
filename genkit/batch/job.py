"""The two phases of a job: `prepare` (no model) and `execute` (on the loaded model)."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from genkit.batch.plan import Job, JobOptions, Summary, resolve_requests, strict_error
from genkit.batch.reading import read_requests
from genkit.batch.records import OUTPUT_FORMATS
from genkit.batch.requests import Request
from genkit.batch.runner import Runner
from genkit.batch.store import OutputStore, StdoutSink
from genkit.errors import GenkitError, shorten


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
    target = output_target(opts)
    requests = read_requests(opts.input, opts.input_format, stdin)
    resolve_requests(requests, opts)
    rank, world, state = distributed()
    if world > 1 and (target is None or target.stream):
        raise GenkitError("accelerate launch needs -o OUTPUT, a regular file: the processes write parts "
                          "that are merged into it")
    mine = requests[rank::world]
    summary = Summary(total=len(mine), rank=rank, world=world)
    order = None if opts.unordered else [r.key for r in requests]
    store, done, notes = None, {}, []
    if target is None:
        sink = StdoutSink(stdout or sys.stdout, order)
    elif target.stream:
        sink = StdoutSink(open(target.path, "w", encoding="utf-8"), order, close=True)
        notes.append(f"-o {opts.output} is not a regular file: records are written to it as a stream "
                     "(nothing to resume from)")
    else:
        store, done = open_output(opts, target.path, requests, rank, world, state)
        sink = store
    pending = [r for r in mine if not done.get(r.key)]
    summary.skipped = len(mine) - len(pending)
    if opts.strict:
        bad = next((r for r in pending if r.error), None)
        if bad is not None:
            _release(store)
            raise strict_error(opts, bad, bad.error)
    return Job(opts, requests, pending, store, sink, summary, state, notes=notes)


@dataclass
class Target:
    path: Path  # symlinks followed: a link is written through, never replaced
    stream: bool  # a device, a pipe, a socket: written to, never rewritten or resumed


def output_target(opts: JobOptions) -> Target | None:
    """Where -o points, checked: None for stdout."""
    if not opts.output:
        return None
    path = Path(os.path.realpath(opts.output))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Target(path, stream=False)
    except OSError as e:
        raise GenkitError(f"cannot use -o {opts.output}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise GenkitError(f"output {opts.output} is a directory; pass a file path with -o")
    if not stat.S_ISREG(st.st_mode):
        return Target(path, stream=True)
    if opts.input != "-":
        with contextlib.suppress(OSError):
            if os.path.samefile(path, opts.input):  # the same file, or a hard link to it
                raise GenkitError(f"-o {opts.output} is the input file: write the records to another file")
    return Target(path, stream=False)


def open_output(opts: JobOptions, path: Path, requests: list[Request], rank: int, world: int, state):
    """The OutputStore (locked by process 0) and what it holds that this job can keep
    (key -> ok), checked against the input."""
    store = OutputStore(path, opts.output_format, rank, world)
    if rank == 0:
        store.lock()
    try:
        if opts.overwrite and rank == 0:
            store.remove_all()
        if state is not None:
            state.wait_for_everyone()  # nobody reads OUTPUT while process 0 removes it
        done = store.load()
        check_output_matches(opts, store, requests, done)
    except BaseException:
        _release(store)
        raise
    return store, done


def check_output_matches(opts: JobOptions, store: OutputStore, requests: list[Request], done: dict) -> None:
    """Every finished record in OUTPUT must come from this input, made the way this job would
    make it (its fingerprint); else OUTPUT belongs to another job, or the job changed."""
    by_key = {r.key: r for r in requests}
    foreign = next((k for k in done if k not in by_key), None)
    if foreign is not None:
        raise GenkitError(f"{opts.output} has a record with id {shorten(foreign)} that is not in the input; "
                          "is it the output of another job? Pass --overwrite to start over")
    fingerprints = store.fingerprints()
    changed = [k for k, ok in done.items() if ok and (by_key[k].error is not None  # valid when it ran
                                                      or fingerprints.get(k) != by_key[k].fingerprint)]
    if changed:
        raise GenkitError(
            f"{opts.output} holds {len(changed)} record(s) made from other prompts or settings than this job's "
            f"(first: id {shorten(changed[0])}; the input, the preset, the parameters, the seed or the model "
            "changed): run the job as it was to resume, pass --overwrite to start over, or write to another -o"
        )


def _release(store: OutputStore | None) -> None:
    if store is not None:
        store.unlock()


def execute(job: Job, lm=None, *, on_update: Callable[[Summary], None] | None = None) -> Summary:
    """Run the pending records, write each as it completes, and finish OUTPUT."""
    runner = Runner(job, lm, on_update)
    job.summary.started = time.perf_counter()  # tokens/s counts generation, not model loading
    if job.store is not None:
        job.store.open()
    try:
        try:
            runner.run()
        finally:
            job.sink.close()
        finish_output(job)
    finally:
        _release(job.store)
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

