"""One path for everything said on stderr besides results: genkit's own lines.

The library speaks through `logging.getLogger("genkit")` (first-run steps, a cache entry being
rebuilt, kernels that cannot build); the CLI prints those records as `genkit: ...` lines.
What the libraries underneath would say (tqdm bars, transformers' advice, FutureWarnings,
huggingface_hub's retry lines) is switched off here, before any of them is imported: most of
them read their settings from the environment once, at import. `--debug` lets it all through.
"""

from __future__ import annotations

import logging
import os
import sys

# Read at import by tqdm (every bar's `disable` default), transformers and huggingface_hub.
QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "critical",
    "HF_HUB_VERBOSITY": "critical",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


class GenkitLines(logging.Handler):
    """Prints a record as one `genkit: ...` line. sys.stderr is looked up at each line, not kept:
    Rich's spinners replace it while they run, and print the line above themselves."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.name != "genkit" and not record.name.startswith("genkit."):
                message = f"{record.name}: {message}"  # --debug only: a library's own record
            print(f"genkit: {message}", file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def setup(debug: bool = False) -> None:
    """Route genkit's records to stderr and keep the libraries' noise off it."""
    genkit = logging.getLogger("genkit")
    if not any(isinstance(h, GenkitLines) for h in genkit.handlers):
        genkit.addHandler(GenkitLines())
    genkit.setLevel(logging.DEBUG if debug else logging.INFO)
    genkit.propagate = False
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.propagate = False
    warnings_log.handlers[:] = [GenkitLines() if debug else logging.NullHandler()]
    if debug:
        return
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
