"""Running a job's pending records on a loaded model: plan each, group, batch, write."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Iterator

from genkit import presets as presets_mod
from genkit.batch.plan import Job, strict_error
from genkit.batch.records import format_error, format_result
from genkit.batch.requests import Request
from genkit.errors import GenkitError, shorten


@dataclass
class Item:
    """A request ready for the engine."""

    req: Request
    settings: Any  # DecodeSettings
    text: str  # the prompt as the model reads it (chat template and system prompt applied)
    input_ids: list[int]  # `text` tokenised, once: every engine takes these ids
    seed: int
    max_new: int  # max_new_tokens capped by the model's context
    params: dict  # parameters that differ from the defaults (for the record)


class Runner:
    def __init__(self, job: Job, lm, on_update):
        self.job = job
        self.opts = job.opts
        self.lm = lm
        self.on_update = on_update or (lambda s: None)
        self._settings: dict[str, Any] = {}
        self._continuous: dict[str, bool] = {}  # strategy -> continuous batching possible
        self._token_text = None  # genkit.logprobs.TokenText, made on first use

    # -------------------------------------------------------------- bookkeeping

    def fail(self, req: Request, message: str) -> None:
        if self.opts.strict:
            raise strict_error(self.opts, req, message)
        self.job.sink.write(format_error(req, self.opts.output_format, message))
        self.job.summary.failed += 1
        self.on_update(self.job.summary)

    def succeed(self, item: Item, texts, finish, completion_tokens, timings, seqs=()) -> None:
        s = item.settings
        record = format_result(
            item.req, self.opts.output_format, texts=texts, finish=finish,
            prompt_tokens=len(item.input_ids), completion_tokens=completion_tokens, model=self.lm.name,
            strategy=s.strategy, params=item.params, seed=item.seed, timings=timings,
            complete=[q.complete for q in seqs], logprobs=self.logprob_records(item.req, seqs),
        )
        self.job.sink.write(record)
        summary = self.job.summary
        summary.done += 1
        summary.prompt_tokens += len(item.input_ids)
        summary.completion_tokens += completion_tokens
        self.on_update(summary)

    def wanted_logprobs(self, req: Request) -> int | None:
        """Alternatives per token this record reports (None: no log-probabilities)."""
        return req.logprobs if req.logprobs is not None else self.opts.logprobs

    def group_logprobs(self, items: list[Item]):
        """What the engine computes for a group: the most alternatives any record wants."""
        wanted = [n for n in (self.wanted_logprobs(it.req) for it in items) if n is not None]
        return max(wanted) if wanted else False

    def logprob_records(self, req: Request, seqs) -> list | None:
        n = self.wanted_logprobs(req)
        if n is None:
            return None
        from genkit.logprobs import TokenText, token_records

        if self._token_text is None:
            self._token_text = TokenText(self.lm.tokenizer)
        return [token_records(self._token_text, q.token_ids, q.logprobs or [],
                              [a[:n] for a in q.alternatives or []] if n else None) for q in seqs]

    # -------------------------------------------------------------- the plan

    def run(self) -> None:
        self.on_update(self.job.summary)
        items = []
        for req in self.job.pending:
            if req.error:
                self.fail(req, req.error)
                continue
            try:
                items.append(self.plan(req))
            except Exception as e:  # whatever one record does, it fails alone
                self.fail(req, failure_message(e, "cannot prepare the prompt"))
        for settings, group in self.groups(items):
            self.run_group(settings, group)

    def settings_for(self, generation: dict):
        from genkit.engine.settings import build

        key = json.dumps(generation, sort_keys=True, default=str)
        if key not in self._settings:
            try:
                self._settings[key] = build(self.lm, generation)
            except GenkitError as e:
                self._settings[key] = e
        if isinstance(self._settings[key], GenkitError):
            raise self._settings[key]
        return self._settings[key]

    def plan(self, req: Request) -> Item:
        """Render the prompt on the model, tokenize it, check its length."""
        from genkit import prompts

        lm, resolved = self.lm, req.resolved
        settings = self.settings_for(resolved.generation)
        system = req.system or self.opts.system or resolved.system
        prompt = req.prompt_text
        templated = prompts.uses_chat(lm, self.opts.raw)
        text = prompts.to_text(lm, prompt, system=system, raw=self.opts.raw)
        ids = lm.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if not ids:
            raise GenkitError("the prompt is empty: give some text")
        ctx = lm.context_length
        if ctx and not lm.is_encoder_decoder and len(ids) >= ctx:
            raise GenkitError(f"the prompt is {len(ids)} tokens but the model's context holds {ctx}: shorten it")
        params = presets_mod.diff_from_defaults({k: v for k, v in settings.explicit.items() if k != "seed"})
        params["max_new_tokens"] = settings.max_new_tokens
        return Item(req, settings, text, ids, req.seed,
                     prompts.fit_max_new_tokens(lm, len(ids), settings.max_new_tokens), params)

    def groups(self, items: list[Item]) -> Iterator[tuple[Any, list[Item]]]:
        """Records that can share a batch, each group sorted by prompt length (least padding)."""
        groups: dict[str, list[Item]] = {}
        for it in items:
            groups.setdefault(self.group_key(it), []).append(it)
        for group in groups.values():
            group.sort(key=lambda it: len(it.input_ids))
            yield group[0].settings, group

    def continuous(self, settings) -> bool:
        from genkit.engine import continuous

        if settings.strategy not in self._continuous:
            self._continuous[settings.strategy] = continuous.supported(self.lm, settings)
        return self.opts.continuous and self._continuous[settings.strategy]

    def group_key(self, it: Item) -> str:
        values = it.settings.params()
        values.pop("seed", None)
        if self.continuous(it.settings):
            # Each row of a continuous batch has its own length limit and stop strings.
            values.pop("max_new_tokens", None)
            values.pop("stop_strings", None)
            return "c:" + json.dumps(values, sort_keys=True, default=str)
        values["max_new_tokens"] = it.max_new
        return "s:" + json.dumps(values, sort_keys=True, default=str)

    # -------------------------------------------------------------- the engines

    def run_group(self, settings, group: list[Item]) -> None:
        if self.continuous(settings):
            self.run_continuous(settings, group)
        else:
            for batch in self.static_batches(settings, group):
                self.run_static(settings, batch)

    def run_continuous(self, settings, group: list[Item]) -> None:
        from genkit.engine.continuous import ContinuousBatcher, Job as EngineJob

        batcher = ContinuousBatcher(self.lm, settings, batch_size=self.opts.batch_size,
                                    max_batch_tokens=self.opts.max_batch_tokens, logprobs=self.group_logprobs(group))
        jobs = [EngineJob(it, it.input_ids, it.seed, it.max_new, it.settings.stop_strings) for it in group]
        finished: set[int] = set()
        results = None
        while True:
            try:
                results = results or iter(batcher.run(jobs))
                result = next(results)
            except StopIteration:
                return
            except Exception as e:  # the engine failed on some record: find which, run the rest
                self.isolate([it for it in group if id(it) not in finished], e,
                             lambda one: self.run_continuous(settings, one))
                return
            finished.add(id(result.handle))
            seqs = result.sequences
            ttft = None if result.first_token_at is None else result.first_token_at - result.started_at
            self.succeed(result.handle, [s.text for s in seqs], [s.finish_reason for s in seqs],
                         result.completion_tokens,
                         timing_record(result.finished_at - result.started_at, ttft, result.completion_tokens),
                         seqs)

    def isolate(self, items: list[Item], error: Exception, run_alone) -> None:
        """A batch failed: run each of its records alone, so that only the records that fail
        on their own get an error record (a single record gets it at once)."""
        if len(items) == 1:
            self.fail(items[0].req, failure_message(error, "generation failed"))
            return
        for it in items:
            run_alone([it])

    def static_batches(self, settings, group: list[Item]) -> Iterator[list[Item]]:
        """Consecutive slices of the sorted group within --batch-size rows and the token budget."""
        rows_per = max(settings.num_return_sequences, settings.num_beams)
        batch: list[Item] = []
        for it in group:
            candidate = batch + [it]
            rows = len(candidate) * rows_per
            width = len(it.input_ids) + it.max_new  # sorted: the last is the longest
            budget = self.opts.max_batch_tokens
            if batch and (rows > self.opts.batch_size or (budget and rows * width > budget)):
                yield batch
                candidate = [it]
            batch = candidate
        if batch:
            yield batch

    def run_static(self, settings, batch: list[Item]) -> None:
        from genkit import prompts
        from genkit.engine import Generation

        s = dataclasses.replace(settings, max_new_tokens=batch[0].max_new)
        try:
            gen = Generation(
                self.lm, [it.text for it in batch], s, raw=self.opts.raw, seeds=[it.seed for it in batch],
                logprobs=self.group_logprobs(batch), inputs=prompts.pad(self.lm, [it.input_ids for it in batch]),
            )
            gen.run()
        except Exception as e:  # an engine failure must not lose the other records
            self.isolate(batch, e, lambda one: self.run_static(settings, one))
            return
        per = len(gen.results) // len(batch)
        stats = gen.stats
        for i, it in enumerate(batch):
            seqs = gen.results[i * per:(i + 1) * per]
            tokens = sum(len(r.token_ids) for r in seqs)
            self.succeed(it, [r.text for r in seqs], [r.finish_reason for r in seqs], tokens,
                         timing_record(stats.elapsed_s, stats.time_to_first_token_s, tokens), seqs)



def failure_message(error: Exception, what: str) -> str:
    """A record's error message: genkit's own line, or what failed and why, bounded."""
    if isinstance(error, GenkitError):
        return error.message
    return f"{what}: {type(error).__name__}: {shorten(str(error))}"


def timing_record(elapsed: float, ttft: float | None, tokens: int) -> dict:
    return {
        "elapsed_s": round(elapsed, 4),
        "time_to_first_token_s": None if ttft is None else round(ttft, 4),
        "tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else 0.0,
    }
