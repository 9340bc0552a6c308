"""Which runner decodes a loaded model: chosen once, at load, and kept on the LoadedModel.

The choices (the `--backend` flag, `LoadOptions.backend`):

  auto          the fastest that applies: the model's own native runner (a .gguf run natively,
                --native-4bit, --native-8bit), genkit's decoder over an fp32 Llama's weights on
                the CPU (genkit/native/llama.py), the static cache with CUDA graphs on a GPU,
                else transformers' forward over a dynamic cache
  transformers  transformers' forward over a dynamic cache: the reference the others are
                tested against
  static        the static cache (engine/static_runner.py), with CUDA graphs on a GPU
  static-eager  the static cache without graphs (to measure what the graphs bring)

Strategies never look at the backend: they ask `lm.backend.runner(...)` for a Runner.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from genkit.errors import GenkitError
from genkit.loadopts import BACKENDS


@dataclass
class Backend:
    kind: str  # native, genkit, static, transformers
    model: Any
    fast: Any = None  # genkit's decoder over the model's weights (kind "genkit")
    graphs: bool = False  # static cache: capture each step as a CUDA graph
    kept: tuple | None = None  # static cache: the last generation's cache and graphs, for the next

    def runner(self, input_ids, attention_mask, start_id: int | None = None, capacity: int | None = None):
        """A runner for these left-padded prompts. `capacity`: how many positions the
        sequences will likely reach (a static cache grows past it if needed)."""
        from genkit.engine import runner as runners

        if self.kind == "native":
            return self.model.native_runner(input_ids, attention_mask, capacity)
        if self.kind == "genkit":
            return self.fast.native_runner(input_ids, attention_mask, capacity)
        if self.kind == "static":
            from genkit.engine.static_runner import StaticRunner

            return StaticRunner(self, input_ids, attention_mask, capacity)
        if getattr(self.model.config, "is_encoder_decoder", False):
            return runners.EncoderDecoderRunner(self.model, input_ids, attention_mask, _start_id(self.model, start_id))
        return runners.Runner(self.model, input_ids, attention_mask)


def choose(model, requested: str = "auto") -> Backend:
    """The backend for `model` (see the module's docstring); GenkitError when the requested one
    cannot run this model. `requested` is one of genkit.loadopts.BACKENDS: loadopts.check names
    an unknown one to the user before anything loads, here it is a programming error."""
    assert requested in BACKENDS, requested
    if getattr(model, "native_runner", None) is not None:
        if requested != "auto":
            raise GenkitError(f"--backend {requested}: this model runs on genkit's native decoder only; "
                              "leave --backend out (add --dequantize for a .gguf through transformers)")
        return Backend("native", model)
    from genkit.engine import static_runner

    if requested in ("static", "static-eager"):
        if not static_runner.eligible(model):
            raise GenkitError(f"--backend {requested}: this model cannot use the static cache (sliding windows, "
                              "an encoder-decoder, bitsandbytes or weights split across devices); leave it out")
        return Backend("static", model, graphs=requested == "static" and _on_cuda(model))
    if requested == "transformers":
        return Backend("transformers", model)
    fast = _fast_decoder(model)
    if fast is not None:
        return Backend("genkit", model, fast=fast)
    if _on_cuda(model) and static_runner.eligible(model):
        return Backend("static", model, graphs=True)
    return Backend("transformers", model)


# genkit's decoder over a model's weights, built once per model: building it fuses q/k/v and
# gate/up and points the model's Linears at the fused tensors, so a second one would copy the
# weights again and leave the first one's tensors unshared.
_FAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fast_decoder(model):
    if model not in _FAST:
        from genkit.native.llama import fast_llama

        _FAST[model] = fast_llama(model)
    return _FAST[model]


def _on_cuda(model) -> bool:
    first = next(model.parameters(), None)
    return first is not None and first.device.type == "cuda"


def _start_id(model, start_id: int | None) -> int | None:
    """An encoder-decoder's first decoder token: the request's, else the model's."""
    if start_id is None:
        start_id = model.generation_config.decoder_start_token_id
    if start_id is None:
        start_id = model.config.decoder_start_token_id
    return start_id
