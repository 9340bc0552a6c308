"""Decoding strategies. Each is a generator over a `Context` that proposes tokens per row.

A strategy yields `Proposal`s; the driver (genkit/engine/core.py) hands them to the tracker,
which applies the stopping rules and makes events. A strategy reads `ctx.tracker` to see which
rows have finished, and simply returns when all have.
"""

from genkit.engine.strategies.base import Context, Proposal

__all__ = ["Context", "Proposal", "get"]


def get(name: str):
    """The strategy function for a strategy name (see genkit.params.strategy_of)."""
    if name in ("greedy", "sampling"):
        from genkit.engine.strategies.sampling import decode

        return decode
    if name in ("beam", "beam-sampling", "diverse-beam"):
        from genkit.engine.strategies.beam import decode

        return decode
    if name == "contrastive":
        from genkit.engine.strategies.contrastive import decode

        return decode
    if name == "dola":
        from genkit.engine.strategies.dola import decode

        return decode
    if name in ("assisted", "prompt-lookup"):
        from genkit.engine.strategies.assisted import decode

        return decode
    raise KeyError(name)
