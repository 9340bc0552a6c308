"""A conversation's KV cache kept from one turn to the next (genkit chat).

Each turn's prompt is the chat template's rendering of the whole conversation. All of it but
the newest message was in the cache when the previous answer ended, so a turn crops the
previous turn's runner to the longest prefix its cache shares with the new prompt and feeds only
the rest: the tenth turn prefills one message, not ten. The prefix is found on token ids, not
assumed: a template may render an earlier answer differently from the tokens that were generated
(re-tokenisation, a stop string cut from the text), and the cache is then cropped to where they
part.

Reuse applies to one-row greedy and sampling turns over transformers' dynamic cache or genkit's
own decoder; every other case (beams, contrastive search, a static GPU cache...) builds a fresh
runner, exactly as a single generation does.
"""

from __future__ import annotations

import torch

REUSABLE_STRATEGIES = ("greedy", "sampling")


class RecordingRunner:
    """A runner that knows which token ids its cache holds (`fed`). Its prefill feeds only the
    prompt ids after the first `cached`, which the inner runner's cache already holds."""

    def __init__(self, inner, prompt: torch.Tensor, cached: int):
        self.inner = inner
        self.prompt = prompt
        self.cached = cached
        self.fed: list[int] = prompt[0, :cached].tolist()

    def prefill(self, hidden: bool = False, all_logits: bool = False, logits: bool = True):
        if self.cached == 0:
            out = self.inner.prefill(hidden=hidden, all_logits=all_logits, logits=logits)
        else:
            fresh = self.prompt[:, self.cached:]
            out = self.inner.step(fresh, hidden=hidden, logits=logits, keep=None if all_logits else 1)
        self.fed = self.prompt[0].tolist()
        return out

    def step(self, tokens: torch.Tensor, hidden: bool = False, logits: bool = True,
             keep: int | None = None):
        out = self.inner.step(tokens, hidden=hidden, logits=logits, keep=keep)
        self.fed.extend(tokens[0].tolist())
        return out

    def crop(self, length: int) -> None:
        if length < self.inner.length:  # a transformers cache reads crop(0) as "keep nothing"
            self.inner.crop(length)
        del self.fed[length:]

    def __getattr__(self, name):
        return getattr(self.inner, name)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class TurnCache:
    """Holds the last turn's runner between the turns of one conversation."""

    def __init__(self):
        self.runner: RecordingRunner | None = None
        self.reused = 0  # prompt tokens the last turn found in the cache

    def runner_for(self, model, input_ids: torch.Tensor, mask: torch.Tensor, make, *, strategy: str, rows: int):
        """A runner for this turn's prompt; `make()` builds a fresh one as the engine would."""
        previous, self.runner, self.reused = self.runner, None, 0
        if strategy not in REUSABLE_STRATEGIES or rows != 1 or input_ids.shape[0] != 1 or not bool(mask.all()):
            return make()
        ids = input_ids[0].tolist()
        if previous is not None:
            # At least the prompt's last token is fed again: its logits start the answer.
            keep = min(common_prefix(previous.fed, ids), len(ids) - 1)
            if keep > 0:
                previous.crop(keep)
                self.reused = keep
                return RecordingRunner(previous.inner, input_ids, keep)
        fresh = make()
        if not _supports_reuse(fresh):
            return fresh
        return RecordingRunner(fresh, input_ids, 0)

    def keep(self, runner) -> None:
        """The turn ended normally: its cache serves the next one."""
        self.runner = runner if isinstance(runner, RecordingRunner) and runner.batch_size == 1 else None

    def drop(self) -> None:
        """A cancelled turn may have stopped inside a forward pass: its cache is not trusted."""
        self.runner = None


def _supports_reuse(runner) -> bool:
    from genkit.engine.runner import EncoderDecoderRunner, Runner
    from genkit.native.runner import NativeRunner

    return isinstance(runner, NativeRunner) or (isinstance(runner, Runner) and not isinstance(runner, EncoderDecoderRunner))
