"""Showing a generation: live text in a terminal, plain text in a pipe, JSON for scripts.

In a terminal the text is written as it arrives, straight to the console (no redraws, so no
flicker); several return sequences are shown in a Rich Live view, one panel each. In a pipe it
is the same text, streamed, without any ANSI codes.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text


def count(n: int, noun: str) -> str:
    """'1 token', '2 tokens'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def stats_line(stats, finish_reasons: list[str]) -> str:
    ttft = stats.time_to_first_token_s
    reasons = ", ".join(sorted(set(finish_reasons))) or "-"
    parts = [
        count(stats.completion_tokens, "token"),
        f"{stats.tokens_per_s:.1f} tokens/s",
        f"first token {ttft:.2f} s" if ttft is not None else "no tokens",
        f"{stats.elapsed_s:.2f} s",
        f"finish: {reasons}",
    ]
    return " · ".join(parts)


class TextView:
    """Streams the events of one generation to stdout."""

    def __init__(self, num_sequences: int, console: Console | None = None):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.n = num_sequences
        self.tty = self.console.is_terminal
        self.texts = [""] * num_sequences
        self.live: Live | None = None
        self.ended_with_newline = True

    def __enter__(self):
        if self.n > 1 and self.tty:
            self.live = Live(self._panels(), console=self.console, refresh_per_second=12, transient=False)
            self.live.__enter__()
        return self

    def _panels(self):
        return Group(*[
            Panel(Text(t or "…"), title=f"sequence {i + 1}/{self.n}", title_align="left", border_style="cyan")
            for i, t in enumerate(self.texts)
        ])

    def event(self, ev) -> None:
        if not ev.text:
            return
        self.texts[ev.index] += ev.text
        if self.n == 1:
            self._write(ev.text)
        elif self.live is not None:
            self.live.update(self._panels())

    def _write(self, text: str) -> None:
        if self.tty:
            self.console.file.write(text)
        else:
            sys.stdout.write(text)
        (self.console.file if self.tty else sys.stdout).flush()
        self.ended_with_newline = text.endswith("\n")

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self._panels())
            self.live.__exit__(*exc)
        elif self.n > 1:
            for i, t in enumerate(self.texts):
                sep = f"--- sequence {i + 1}/{self.n} ---\n"
                self._write(("" if i == 0 else "\n") + sep + t + ("\n" if not t.endswith("\n") else ""))
        if self.n == 1 and not self.ended_with_newline:
            self._write("\n")
        return False


def json_record(gen, *, model_name: str, preset, prompt: str, settings_diff: dict) -> str:
    results = gen.results
    texts = None
    if any(r.logprobs is not None for r in results):
        from genkit.logprobs import TokenText

        texts = TokenText(gen.lm.tokenizer)
    record = {
        "model": model_name,
        "preset": preset.name,
        "strategy": gen.settings.strategy,
        "prompt": prompt,
        "text": results[0].text if results else "",
        "finish_reason": results[0].finish_reason if results else None,
        **({"incomplete": not results[0].complete} if results and results[0].complete is not None else {}),
        "sequences": [
            {"text": r.text, "finish_reason": r.finish_reason, "completion_tokens": len(r.token_ids),
             **({"incomplete": not r.complete} if r.complete is not None else {}),
             **({"logprobs": _token_records(texts, r)} if r.logprobs is not None else {})}
            for r in results
        ],
        "usage": {
            "prompt_tokens": gen.stats.prompt_tokens,
            "completion_tokens": gen.stats.completion_tokens,
        },
        # the seed only where it decides something: a greedy or beam answer has none to reproduce
        "settings": {**settings_diff, **({"seed": gen.seed} if gen.settings.do_sample else {})},
        "timings": gen.stats.as_dict(),
    }
    return json.dumps(record, ensure_ascii=False)


def _token_records(texts, r) -> list[dict]:
    from genkit.logprobs import token_records

    return token_records(texts, r.token_ids, r.logprobs, r.alternatives)
