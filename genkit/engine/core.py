"""The decode loop's driver: one request from prompts to events and results.

    gen = Generation(lm, ["Hello"], settings)
    for event in gen:          # token events as they are accepted, then finish events
        print(event.text, end="")
    gen.results, gen.stats     # final texts, token ids, finish reasons, timings

The driver prepares inputs, processors and per-row random generators, picks the strategy,
feeds the strategy's proposals to the tracker (which applies every stopping rule), and
forwards tokens to a `put()`/`end()` streamer when one is given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from genkit import prompts as prompts_mod
from genkit import seeding
from genkit.engine import processors as procs
from genkit.engine import strategies
from genkit.engine.settings import DecodeSettings
from genkit.engine.strategies.base import Context
from genkit.engine.tracker import Event, Tracker



@dataclass
class SequenceResult:
    index: int
    prompt_index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None
    complete: bool | None = None  # constrained output: whether the grammar accepts the text
    alternatives: list[list[tuple[int, float]]] | None = None  # per token, with top_logprobs


@dataclass
class Stats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    time_to_first_token_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "elapsed_s": round(self.elapsed_s, 4),
            "time_to_first_token_s": None if self.time_to_first_token_s is None else round(self.time_to_first_token_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            **self.extra,
        }


def row_generator(seed: int, k: int) -> torch.Generator:
    """The random generator of return sequence k of a prompt seeded with `seed`."""
    g = torch.Generator()
    g.manual_seed((seed * 0x9E3779B1 + k) % (2**63 - 1))
    return g


class Generation:
    def __init__(
        self,
        lm,
        prompts: list,
        settings: DecodeSettings,
        *,
        system: str | None = None,
        raw: bool = False,
        streamer=None,
        logprobs: bool = False,
        assistant=None,
        seeds: list[int | None] | None = None,
        inputs: tuple | None = None,
        turn_cache=None,
    ):
        self.lm = lm
        # Pre-tokenized (input_ids, attention_mask), padded as prompts.encode pads: used as they
        # are, so a caller that tokenised already (a batch job) or a test that feeds the exact ids
        # another library saw does not tokenise again. `prompts` then only counts the rows.
        self.inputs = inputs
        # A conversation's KV cache kept between turns (genkit.engine.turns.TurnCache), or None.
        self.turn_cache = turn_cache
        self.settings = settings
        self.streamer = streamer
        self.system = system  # the system prompt the chat template is given (None: none)
        # logprobs: False / None, True (each token's), or N >= 0: each token's and its N best alternatives
        self.want_logprobs = logprobs is not None and logprobs is not False
        self.top_logprobs = 0 if isinstance(logprobs, bool) or not logprobs else int(logprobs)
        self.alternatives: dict[int, list] = {}
        # The draft model of assisted decoding: the caller's, else the one the settings name,
        # loaded once per target model (genkit.models.draft_model).
        if assistant is None and settings.assistant_model:
            from genkit.models import draft_model

            assistant = draft_model(lm, settings.assistant_model)
        self.assistant = assistant
        self.templated = prompts_mod.uses_chat(lm, raw)
        # With `inputs` the prompts are the texts those ids came from: nothing to render again.
        self.texts = (list(prompts) if inputs is not None else
                      [prompts_mod.to_text(lm, p, system=system, raw=raw) for p in prompts])
        # One rule (genkit/seeding.py): row i samples with row_seed(base, i) unless the caller
        # seeded it (batch jobs seed each row from their record's id).
        base_seed = settings.seed if settings.seed is not None else seeding.fresh_seed()
        self.seeds = [s if s is not None else seeding.row_seed(base_seed, i)
                      for i, s in enumerate(seeds or [None] * len(prompts))]
        self.seed = base_seed
        self.results: list[SequenceResult] = []
        self.stats = Stats()
        self.tracker: Tracker | None = None
        self.prompt_lengths: list[int] = []
        self.constraint = None

    @property
    def num_return_sequences(self) -> int:
        return self.settings.num_return_sequences

    def __iter__(self):
        s, lm = self.settings, self.lm
        input_ids, mask, lengths = self._encode()
        self.prompt_lengths = lengths
        n = self.num_return_sequences
        max_new = min(prompts_mod.fit_max_new_tokens(lm, ln, s.max_new_tokens) for ln in lengths)
        tracker = Tracker(lm.tokenizer, len(self.texts) * n, s.eos_ids, max_new, s.stop_strings, s.max_time)
        self.tracker = tracker
        if not strategies.get(s.strategy).beams and n > 1:
            input_ids = input_ids.repeat_interleave(n, dim=0)
            mask = mask.repeat_interleave(n, dim=0)
        def fresh_runner():
            return lm.backend.runner(input_ids, mask, s.decoder_start_token_id,
                                     capacity=input_ids.shape[1] + max_new)

        if self.turn_cache is None:
            runner = fresh_runner()
        else:
            runner = self.turn_cache.runner_for(lm.model, input_ids, mask, fresh_runner, strategy=s.strategy, rows=n)
        vocab = lm.model.config.get_text_config().vocab_size
        kw = dict(
            prompt_length=runner.prompt.shape[1], attention_mask=mask if not lm.is_encoder_decoder else None,
            vocab_size=vocab, device=input_ids.device, is_encoder_decoder=lm.is_encoder_decoder,
        )
        generators = None
        if s.do_sample:
            per_prompt = input_ids.shape[0] // len(self.texts)
            generators = [row_generator(self.seeds[r // per_prompt], r % per_prompt) for r in range(input_ids.shape[0])]
        ctx = Context(
            lm=lm, settings=s, runner=runner, input_ids=runner.prompt, attention_mask=mask,
            processors=procs.build_processors(s, **kw),
            warpers=procs.build_warpers(s, device=input_ids.device, beams=s.num_beams > 1),
            watermark=procs.build_watermark(s, vocab_size=vocab, device=input_ids.device),
            tracker=tracker, generators=generators, num_prompts=len(self.texts),
            want_logprobs=bool(self.want_logprobs), extras={"assistant": self.assistant},
            top_logprobs=self.top_logprobs,
        )
        ctx.constraint = self._constraint(input_ids.shape[0], vocab)
        self.constraint = ctx.constraint
        if self.streamer is not None:
            self.streamer.put(input_ids[:1].cpu())
        decode = strategies.get(s.strategy).decode
        try:
            with torch.inference_mode():
                for proposal in decode(ctx):
                    for ev in tracker.add(proposal.tokens, proposal.logprobs):
                        if proposal.alternatives is not None and ev.token_ids:
                            kept = proposal.alternatives[ev.index][:len(ev.token_ids)]
                            self.alternatives.setdefault(ev.index, []).extend(kept)
                        self._stream(ev)
                        yield ev
                    if tracker.all_done:
                        break
                else:
                    # The strategy ended on its own (e.g. beam search hit max length).
                    for ev in tracker.finish_all("length"):
                        yield ev
        except (KeyboardInterrupt, GeneratorExit):
            for ev in tracker.finish_all("cancelled"):
                pass
            if self.turn_cache is not None:
                self.turn_cache.drop()
            self._finish()
            raise
        finally:
            if hasattr(runner, "close"):  # a static cache passes its graphs on to the next request
                runner.close()
        if self.turn_cache is not None:
            self.turn_cache.keep(runner)
        self._finish()

    def _constraint(self, rows: int, vocab: int):
        """One matcher per output row when the settings constrain the output."""
        from genkit import constraints

        grammar = constraints.grammar_for(self.settings.params(), "settings")
        if grammar is None:
            return None
        from genkit.engine.constrain import RowMatchers

        return RowMatchers.start(self.lm, grammar, rows, self.settings.eos_ids, vocab)

    def _encode(self):
        if self.inputs is None:
            return prompts_mod.encode(
                self.lm, self.texts, templated=self.templated, max_new_tokens=self.settings.max_new_tokens
            )
        ids, mask = (t.to(self.lm.device) for t in self.inputs)
        return ids, mask, mask.sum(dim=1).tolist()

    def _stream(self, ev: Event) -> None:
        if self.streamer is not None and ev.index == 0 and ev.token_ids:
            self.streamer.put(torch.tensor(ev.token_ids))

    def _finish(self) -> None:
        tr = self.tracker
        n = self.num_return_sequences
        self.results = [
            SequenceResult(
                index=i, prompt_index=i // n, text=seq.text, token_ids=list(seq.ids),
                finish_reason=seq.finish_reason or "cancelled", prompt_tokens=self.prompt_lengths[i // n],
                logprobs=list(seq.logprobs) if self.want_logprobs else None,
                complete=self._complete(i, seq.finish_reason),
                alternatives=self.alternatives.get(i, []) if self.top_logprobs else None,
            )
            for i, seq in enumerate(tr.seqs)
        ]
        now = time.perf_counter()
        self.stats = Stats(
            prompt_tokens=sum(self.prompt_lengths),
            completion_tokens=sum(len(r.token_ids) for r in self.results),
            elapsed_s=now - tr.started,
            time_to_first_token_s=None if tr.first_token_at is None else tr.first_token_at - tr.started,
        )
        if self.streamer is not None:
            self.streamer.end()

    def _complete(self, row: int, reason: str | None) -> bool | None:
        """Constrained rows: complete when the grammar accepts and no stop string cut the text."""
        c = self.constraint
        if c is None:
            return None
        return reason != "stop" and row < len(c) and c.accepting(row)

    def run(self) -> list[SequenceResult]:
        """Generate to the end without looking at the events."""
        for _ in self:
            pass
        return self.results
