"""A job before it runs: its options, each record's resolved settings and seed, its tally."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from genkit import params as P
from genkit import presets as presets_mod
from genkit import seeding
from genkit.batch.requests import Request
from genkit.errors import GenkitError

if TYPE_CHECKING:
    from genkit.batch.store import OutputStore


@dataclass
class JobOptions:
    input: str  # a path, or "-" for stdin
    output: str | None = None  # None: stdout
    input_format: str | None = None  # txt or jsonl; None: from the extension
    output_format: str = "genkit"  # genkit or openai
    preset: str | None = None
    generation_config: str | None = None
    params: dict = field(default_factory=dict)  # validated job-level parameters (flags, --set)
    logprobs: int | None = None  # --logprobs N: every record's token log-probabilities
    vars: dict = field(default_factory=dict)
    system: str | None = None
    raw: bool = False
    batch_size: int = 64
    max_batch_tokens: int | None = None
    unordered: bool = False
    strict: bool = False
    overwrite: bool = False
    continuous: bool = True  # continuous batching where the strategy allows it
    model_key: str = ""  # the model and the load options that change its text (for fingerprints)


def resolve_requests(requests: list[Request], opts: JobOptions) -> None:
    """Each record's preset and parameters over the job's (record params win), its prompt
    through the preset's template, its seed and its fingerprint, all without a model; what
    fails becomes the record's error."""
    cache: dict[str, Any] = {}
    for req in requests:
        if req.error:
            continue
        overrides = P.merge(opts.params, req.params)  # a record's constraint replaces the job's
        key = json.dumps([req.preset, overrides, req.vars], sort_keys=True, default=str)
        if key not in cache:
            try:
                cache[key] = presets_mod.resolve(
                    req.preset or opts.preset, opts.generation_config, overrides, {**opts.vars, **req.vars}
                )
            except GenkitError as e:
                cache[key] = e
        if isinstance(cache[key], GenkitError):
            req.error = cache[key].message
            continue
        req.resolved = cache[key]
        try:
            _settle(req, opts)
        except GenkitError as e:
            req.error = e.message


def _settle(req: Request, opts: JobOptions) -> None:
    resolved = req.resolved
    req.prompt_text = presets_mod.render_prompt(resolved, req.prompt) if isinstance(req.prompt, str) else req.prompt
    if "seed" in req.params:  # the record's own seed: its text is `genkit run --seed S`'s
        req.seed = req.params["seed"]
    else:  # genkit/seeding.py's rule, the record's id as the row's identity (0 without --seed, so
        # that a resumed or re-sharded job samples exactly what an uninterrupted one does)
        req.seed = seeding.row_seed(resolved.generation.get("seed") or 0, req.id)
    req.fingerprint = fingerprint_of(req, opts)


def fingerprint_of(req: Request, opts: JobOptions) -> str:
    """A short hash of everything that decides a record's text: the model, the prompt as
    rendered by the preset, the system prompt, raw or chat, every generation setting and the
    seed when it samples. Resuming keeps an output line only when its fingerprint is this."""
    generation = dict(req.resolved.generation)
    generation.pop("seed", None)
    made_from = {
        "model": opts.model_key,
        "prompt": req.prompt_text,
        "system": req.system or opts.system or req.resolved.system,
        "raw": opts.raw,
        "generation": generation,
        "seed": req.seed if generation.get("do_sample") else None,
    }
    text = json.dumps(made_from, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Summary:
    total: int = 0  # records of this process's share
    done: int = 0
    failed: int = 0
    skipped: int = 0  # already done in OUTPUT
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    rank: int = 0
    world: int = 1

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.skipped

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class Job:
    opts: JobOptions
    requests: list[Request]  # the whole input, in order
    pending: list[Request]  # this process's records still to run
    store: OutputStore | None
    sink: Any
    summary: Summary
    state: Any = None  # accelerate's PartialState under `accelerate launch`
    final_records: int | None = None  # records in the finished OUTPUT (process 0)
    final_failed: int | None = None  # how many of them failed
    notes: list[str] = field(default_factory=list)  # lines for the user before the job runs

    @property
    def needs_model(self) -> bool:
        return any(r.error is None for r in self.pending)


def strict_error(opts: JobOptions, req: Request, message: str) -> GenkitError:
    where = "stdin" if opts.input == "-" else opts.input
    return GenkitError(f"{where}: line {req.line} (id {req.id!r}): {message} (--strict stops at the first failed "
                       "record; fix it or drop --strict to write it as an error record and go on)")

