"""How many CPU threads a generation uses, and how they wait.

torch and genkit's kernels (at::parallel_for) split each product over a pool of OpenMP
threads, and a decode step is hundreds of short products. With GNU OpenMP's default wait
policy an idle worker spins between them; when other processes share the cores, a spinning or
descheduled worker stalls every product, and two threads ran 2.5-5x slower than one on this
project's busy 2-core machine (README, "Threads"). So genkit's commands make idle workers sleep
(OMP_WAIT_POLICY=PASSIVE, which has to be set before torch is imported) and use every core
they may run on, unless the user says otherwise with --threads or OMP_NUM_THREADS /
OMP_WAIT_POLICY.
"""

from __future__ import annotations

import os

from genkit.errors import GenkitError


def prepare_environment() -> None:
    """At the start of a command, before torch is imported: sleeping idle workers, unless
    the user chose a wait policy."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose(requested: int | None) -> int:
    """--threads when given, else OMP_NUM_THREADS when set, else every usable core."""
    if requested is not None:
        if requested < 1:
            raise GenkitError(f"--threads {requested}: expected at least 1")
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env:
        try:
            if int(env) >= 1:
                return int(env)
        except ValueError:
            pass
        raise GenkitError(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']!r}: expected a whole number of "
                          "at least 1; fix or unset it, or pass --threads")
    return usable_cores()


def configure(requested: int | None) -> int:
    """Set torch's thread count (genkit's kernels share torch's pool) and return it."""
    import torch

    n = choose(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
