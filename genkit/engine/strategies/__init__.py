"""Decoding strategies. Each is a generator over a `Context` that proposes tokens per row.

A strategy yields `Proposal`s; the driver (genkit/engine/core.py) hands them to the tracker,
which applies the stopping rules and makes events. A strategy reads `ctx.tracker` to see which
rows have finished, and simply returns when all have.

`STRATEGIES` is the one table of what each strategy (named as genkit.params.strategy_of names
it) is: the module whose `decode` runs it, and what the rest of genkit may do with it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from genkit.engine.strategies.base import Context, Proposal

__all__ = ["Context", "Proposal", "Strategy", "STRATEGIES", "get"]


@dataclass(frozen=True)
class Strategy:
    name: str
    module: str  # genkit.engine.strategies.<module>.decode runs it
    beams: bool = False  # a prompt's rows are its beams: the text is known when the search ends
    continuous: bool = False  # rows may join and leave a shared batch (batch, serve)
    keeps_turns: bool = False  # a chat turn may continue the previous turn's cache

    @property
    def decode(self):
        return importlib.import_module(f"genkit.engine.strategies.{self.module}").decode


STRATEGIES = {s.name: s for s in (
    Strategy("greedy", "sampling", continuous=True, keeps_turns=True),
    Strategy("sampling", "sampling", continuous=True, keeps_turns=True),
    Strategy("beam", "beam", beams=True),
    Strategy("beam-sampling", "beam", beams=True),
    Strategy("diverse-beam", "beam", beams=True),
    Strategy("contrastive", "contrastive"),
    Strategy("dola", "dola"),
    Strategy("assisted", "assisted"),
    Strategy("prompt-lookup", "assisted"),
)}


def get(name: str) -> Strategy:
    """The strategy of a name that genkit.params.strategy_of gives."""
    return STRATEGIES[name]
