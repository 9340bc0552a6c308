"""What every strategy receives and yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation import LogitsProcessorList

from genkit.step import Runner
from genkit.engine.settings import DecodeSettings
from genkit.engine.tracker import Tracker


@dataclass
class Proposal:
    """New tokens per output row (an empty list for a row with nothing new)."""

    tokens: list[list[int]]
    logprobs: list[list[float]] | None = None
    # per row, per token: the top alternatives [(id, logprob)] (with top_logprobs > 0)
    alternatives: list[list[list[tuple[int, float]]]] | None = None


@dataclass
class Context:
    lm: Any  # genkit.models.LoadedModel
    settings: DecodeSettings
    runner: Runner
    input_ids: torch.Tensor  # (rows, prompt_length) left-padded prompts, one row per output sequence
    attention_mask: torch.Tensor
    processors: LogitsProcessorList  # penalties and constraints
    warpers: LogitsProcessorList  # sampling warpers (empty unless do_sample)
    watermark: LogitsProcessorList  # applied last
    tracker: Tracker
    generators: list[torch.Generator] | None  # one per row, for sampling
    num_prompts: int
    want_logprobs: bool = False
    extras: dict = field(default_factory=dict)
    constraint: Any = None  # genkit.engine.constrain.RowMatchers, one matcher per row, or None
    top_logprobs: int = 0  # alternatives reported per token with want_logprobs

    @property
    def model(self):
        return self.lm.model

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def consume(self, tokens: list[int], live: torch.Tensor) -> None:
        """Hand each generating row's accepted token to its matcher (constrained output)."""
        if self.constraint is not None:
            self.constraint.consume_rows(tokens, live.tolist())

    def unfinished(self) -> torch.Tensor:
        """Bool tensor (rows,): True for rows still generating."""
        done = self.tracker.finished_mask()
        return torch.tensor([not d for d in done], device=self.input_ids.device)

    def score(self, input_ids: torch.Tensor, logits: torch.Tensor,
              fallback: torch.Tensor | None = None) -> torch.Tensor:
        """Processors, the constraint's mask, warpers and watermark in generate()'s order.
        A row whose processed scores leave no allowed token takes `fallback` (default: `logits`)."""
        scores = self.processors(input_ids, logits)
        if self.constraint is not None:
            scores = self.constraint.mask(scores, fallback=logits if fallback is None else fallback)
        scores = self.warpers(input_ids, scores)
        return self.watermark(input_ids, scores)


def sample_rows(probs: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One token per row from `probs` (rows, vocab). Each row draws from its own generator, so
    a seeded row gives the same tokens whatever else shares the batch."""
    if generators is None:
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    # The generators live on the CPU (a seed gives the same draws on any device): draw there.
    out = [torch.multinomial(probs[i].to(g.device), 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(out).to(probs.device)


def processed_logprobs(scores: torch.Tensor, tokens: torch.Tensor, top: int):
    """(log-probability of each row's chosen token, its `top` most likely alternatives as
    [(id, logprob)] per row or None) under the processed distribution the token was chosen from:
    after the penalties, the constraint, the warpers and the watermark. Tokens the processing
    removed (-inf) are never listed as alternatives."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
    if not top:
        return chosen, None
    values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
    alternatives = [
        [(i, v) for i, v in zip(row_ids, row_values) if v != float("-inf")]
        for row_ids, row_values in zip(ids.tolist(), values.tolist())
    ]
    return chosen, alternatives
