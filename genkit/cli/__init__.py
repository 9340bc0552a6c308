"""The `genkit` command: a thin Typer layer that parses flags, calls the library and renders.

Each command lives in its own module under genkit/cli/. Nothing here imports torch or
transformers at import time: `genkit --help` and the preset commands stay instant.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Annotated

import typer

from genkit import threads
from genkit.cli import messages
from genkit.errors import GenkitError

app = typer.Typer(
    name="genkit",
    help="Generate text with language models on Hugging Face transformers.",
    add_completion=True,  # Typer's own: genkit --install-completion / --show-completion
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# What `genkit --version` reports besides genkit: the libraries whose versions change its output.
LIBRARIES = ("torch", "transformers", "tokenizers", "gguf", "llguidance")


@app.callback(invoke_without_command=True)
def top(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option(
        "--version", help="Print the versions of genkit and its main libraries, then exit.")] = False,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show the traceback of an error (also GENKIT_DEBUG=1; any position).")] = False,
) -> None:
    """Generate text with language models on Hugging Face transformers."""
    if version:
        print(versions())
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit(0)


def versions() -> str:
    """genkit's version and its libraries', read from their metadata: nothing is imported."""
    import importlib.metadata as md
    import platform

    def version_of(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {version_of(name)}" for name in LIBRARIES)
    return f"genkit {version_of('genkit')}\n{libraries}, python {platform.python_version()}"


def _register() -> None:
    from genkit.cli import config_cmd, models_cmd, presets_cmd, run_cmd

    run_cmd.register(app)
    presets_cmd.register(app)
    models_cmd.register(app)
    config_cmd.register(app)
    for optional in ("compare_cmd", "detect_cmd", "batch_cmd", "bench_cmd", "chat_cmd", "logs_cmd", "serve_cmd",
                     "score_cmd"):
        try:
            module = __import__(f"genkit.cli.{optional}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"genkit.cli.{optional}":
                raise
            continue
        module.register(app)


_register()


def error(message: str) -> None:
    """One line on stderr: what went wrong and what to do."""
    print(f"genkit: error: {message}", file=sys.stderr)


# What to do about the file-system errors a person can meet (a full disk, a read-only mount).
OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space and run again (genkit batch resumes where it stopped)",
    errno.EDQUOT: "the disk quota is used up: free some space and run again (genkit batch resumes where it stopped)",
    errno.EROFS: "the file system is read-only: write somewhere else (-o, or GENKIT_HOME for genkit's cache)",
    errno.EACCES: "permission denied: write somewhere you may (-o, or GENKIT_HOME for genkit's cache)",
    errno.EPERM: "operation not permitted: write somewhere you may (-o, or GENKIT_HOME for genkit's cache)",
}


def os_error_line(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    advice = OS_ADVICE.get(e.errno)
    if advice:
        return f"{where}{advice}"
    return f"{where}{e.strerror or e} (run with --debug for the traceback)"


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("GENKIT_DEBUG") == "1"
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args.remove("--debug")
        debug = True
    messages.setup(debug)
    threads.prepare_environment()
    try:
        rc = app(args=args, prog_name="genkit", standalone_mode=False)
    except GenkitError as e:
        if debug:
            raise
        error(e.message)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error worth a traceback.
        sys.stderr.close()
        sys.exit(1)
    except OSError as e:
        if debug:
            raise
        error(os_error_line(e))
        sys.exit(1)
    except Exception as e:
        # Usage errors come from click (vendored inside newer Typer releases): they know how
        # to show themselves and carry exit code 2. Abort is click's name for Ctrl-C.
        if type(e).__name__ == "Abort":
            sys.exit(130)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if debug:
            raise
        error(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
