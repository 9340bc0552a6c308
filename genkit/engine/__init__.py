"""genkit's decode engine: settings, runner, strategies, tracker and the driver."""

from genkit.engine.core import Generation, SequenceResult, Stats
from genkit.engine.settings import DecodeSettings, build
from genkit.engine.tracker import Event

__all__ = ["Generation", "SequenceResult", "Stats", "DecodeSettings", "build", "Event"]
