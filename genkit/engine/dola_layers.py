"""Which layers DoLa contrasts with the final one: the documents' 'low' / 'high' rules or a list.

Apart from the strategy (genkit.engine.strategies.dola) so that the settings can check a
request's layers before generation without importing the strategies.
"""

from __future__ import annotations

from genkit.errors import GenkitError


def _first_layer(num_layers: int, tied_embeddings: bool) -> int:
    """Where 'low' starts. With tied embeddings an early exit at the embeddings (layer 0) only
    maps a token back onto itself, so it is skipped; shallow models keep what they have."""
    if not tied_embeddings:
        return 0
    if num_layers > 2:
        return 2
    return 1 if num_layers == 2 else 0


def dola_layer_indices(num_layers: int, dola_layers, tied_embeddings: bool) -> list[int]:
    """The candidate premature layers (0 is the word embeddings, i the output of block i).

    'low' and 'high' follow the documents' rules: with N <= 40 layers, range(0, N // 2, 2) and
    range(N // 2, N, 2); with more, range(0, 20, 2) and range(N - 20, N, 2); 'low' starts at
    layer 2 (1 for a 2-layer model) when the embeddings are tied. A list is taken as given;
    an index that is not a premature layer (N is the final layer itself) is an error."""
    n = num_layers
    if dola_layers == "high":
        return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
    if dola_layers == "low":
        start = _first_layer(n, tied_embeddings)
        if start == n // 2:
            return [start]
        layers = list(range(start, n // 2 if n <= 40 else 20, 2))
        if not layers:
            raise GenkitError(f"dola_layers 'low' selects no layer in this {n}-layer model: use 'high' or a list")
        return layers
    if isinstance(dola_layers, (list, tuple)) and dola_layers:
        bad = [i for i in dola_layers if not 0 <= i < n]
        if bad:
            raise GenkitError(
                f"dola_layers: layer {bad[0]} does not exist in this {n}-layer model; premature layers are "
                f"0 (the word embeddings) to {n - 1}, and layer {n} is the final layer they are contrasted with"
            )
        return list(dola_layers)
    raise GenkitError(f"dola_layers: expected 'low', 'high' or a list of layer indices, not {dola_layers!r}")


def layers_for(model, dola_layers) -> list[int]:
    """dola_layer_indices for a loaded model."""
    text = model.config.get_text_config()
    tied = getattr(text, "tie_word_embeddings", getattr(model.config, "tie_word_embeddings", False))
    return dola_layer_indices(text.num_hidden_layers, dola_layers, bool(tied))
