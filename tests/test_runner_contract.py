"""Every runner honours genkit.step.Runner (the same methods, parameters and defaults), so any
strategy runs on any backend; and every backend's runner gives transformers' logits."""

import inspect

import pytest
import torch

from genkit import step
from genkit.engine.runner import EncoderDecoderRunner, Runner
from genkit.engine.static_runner import StaticRunner
from genkit.engine.turns import RecordingRunner
from genkit.native.runner import NativeRunner
from helpers import on_backend

METHODS = ("prefill", "step", "select", "repeat_interleave", "crop")


def _parameters(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("cls", [Runner, EncoderDecoderRunner, StaticRunner, NativeRunner, RecordingRunner])
def test_runner_classes_follow_the_protocol(cls):
    for name in METHODS:
        if name not in dir(cls):
            assert "__getattr__" in vars(cls), f"{cls.__name__} lacks {name}"  # a wrapper hands it on
            continue
        assert _parameters(getattr(cls, name)) == _parameters(getattr(step.Runner, name)), f"{cls.__name__}.{name}"
    if "__getattr__" not in vars(cls):
        assert isinstance(inspect.getattr_static(cls, "batch_size"), property)
        assert isinstance(inspect.getattr_static(cls, "length"), property)


@pytest.mark.parametrize("backend", ["auto", "transformers", "static"])
def test_every_backend_gives_transformers_logits(tiny, backend):
    lm = on_backend(tiny, backend)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    runner = lm.backend.runner(ids, mask)
    with torch.inference_mode():
        first = runner.prefill().logits[:, -1]
        second = runner.step(torch.tensor([[3, 4], [21, 22]]), keep=1).logits
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        full_ids = torch.cat([ids, torch.tensor([[3, 4], [21, 22]])], dim=1)
        full_mask = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], dim=1)
        full_pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, 3)], dim=1)
        theirs = tiny.model(input_ids=full_ids, attention_mask=full_mask, position_ids=full_pos).logits
    assert second.shape[1] == 1  # keep=1: the last position only
    torch.testing.assert_close(first, theirs[:, 4], rtol=0, atol=1e-4)
    torch.testing.assert_close(second[:, 0], theirs[:, -1], rtol=0, atol=1e-4)
