"""`genkit detect`: is a text watermarked? One JSON line per text."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from genkit import utf8
from genkit.cli import options as o
from genkit.errors import GenkitError

W = "Watermark settings (as at generation)"

# Paragraphs without line breaks inside: the help renderer wraps them to the terminal.
HELP = "\n\n".join([
    "Score texts for the watermark that `genkit run --watermark` (or a preset's `watermark:`) puts in, "
    "with transformers' WatermarkDetector.",
    "SOURCE is a text, a file, or '-' for stdin (read when piped). --format auto reads JSONL (records with "
    "\"text\" and an optional \"id\", copied to the output) when the first line starts with '{', and the "
    "whole input as one text otherwise, so `genkit run --watermark ... | genkit detect` works; "
    "--format txt reads one text per line, --format single always one text.",
    "Output: one JSON line per text on stdout with index, id, num_tokens_scored, num_green_tokens, "
    "green_fraction, z_score, p_value and prediction (true: watermarked, the z-score is above --z-threshold); "
    "a text too short to score gets an error field and prediction false.",
    "The settings must be the generation's: --preset takes a preset's watermark settings, the flags "
    "override them, and the defaults are transformers' (greenlist_ratio 0.25, lefthash, context_width 1, "
    "hashing_key 15485863). --model must name the generating model: its tokenizer and vocabulary size "
    "are read, not its weights.",
    "Exit status: 0 on success, 1 on bad input. With --exit-code: 0 when every text is detected as "
    "watermarked, 1 when at least one is not (or is too short to score), 2 on bad input.",
])


def _watermark_flag(*decls: str, help: str, default: str):
    return typer.Option(*decls, rich_help_panel=W, show_default=False, help=o.with_default(help, default))


def register(app: typer.Typer) -> None:
    app.command("detect", help=HELP)(detect)


def detect(
    source: Annotated[Optional[str], typer.Argument(
        help="A text, a file (JSONL or plain text), or '-' for stdin.", show_default=False)] = None,
    preset: Annotated[Optional[str], _watermark_flag(
        "--preset", "-p", help="Take the watermark settings of this preset (name or YAML file).", default="none")] = None,
    bias: Annotated[Optional[float], _watermark_flag(
        "--bias", help="Accepted for symmetry with generation; detection does not use it.", default="unused")] = None,
    greenlist_ratio: Annotated[Optional[float], _watermark_flag(
        "--greenlist-ratio", help="Fraction of the vocabulary on each green list.",
        default="the preset's, else 0.25")] = None,
    seeding_scheme: Annotated[Optional[str], _watermark_flag(
        "--seeding-scheme", help="lefthash or selfhash.", default="the preset's, else lefthash")] = None,
    context_width: Annotated[Optional[int], _watermark_flag(
        "--context-width", help="Previous tokens that seed each green list.", default="the preset's, else 1")] = None,
    hashing_key: Annotated[Optional[int], _watermark_flag(
        "--hashing-key", help="Key of the green-list hash.", default="the preset's, else 15485863")] = None,
    model: o.Model = None,
    device: Annotated[str, typer.Option(
        "--device", help="Where the text was generated: cpu or cuda (their green lists differ).")] = "cpu",
    z_threshold: Annotated[float, typer.Option(
        "--z-threshold", help="z-score above which a text counts as watermarked.")] = 3.0,
    ignore_repeated_ngrams: Annotated[bool, typer.Option(
        "--ignore-repeated-ngrams", help="Score each distinct n-gram once (robust to repetitive text).")] = False,
    fmt: Annotated[str, typer.Option(
        "--format", help="auto, jsonl, txt (one text per line) or single (the whole input).")] = "auto",
    exit_code: Annotated[bool, typer.Option(
        "--exit-code", help="Exit 0 if every text is watermarked, 1 if not, 2 on bad input.")] = False,
) -> None:
    try:
        verdicts = _detect(source, preset, dict(
            bias=bias, greenlist_ratio=greenlist_ratio, seeding_scheme=seeding_scheme,
            context_width=context_width, hashing_key=hashing_key,
        ), model, device, z_threshold, ignore_repeated_ngrams, fmt)
    except GenkitError as e:
        if exit_code:
            e.exit_code = 2  # 1 means "not watermarked" here
        raise
    if exit_code and not all(verdicts):
        raise typer.Exit(1)


def _detect(source, preset, flags, model, device, z_threshold, ignore_repeated, fmt) -> list[bool]:
    from genkit import watermark

    # Everything the user typed is checked before the tokenizer loads.
    _check_flags(flags)
    settings = watermark.settings(preset, where="genkit detect", **flags)
    records = read_records(source, fmt)
    detector = watermark.Detector.for_model(
        model, settings, device=device, z_threshold=z_threshold, ignore_repeated_ngrams=ignore_repeated,
    )
    verdicts = []
    for index, (record_id, text) in enumerate(records):
        verdict = detector.score(text)
        out = {"index": index, **({"id": record_id} if record_id is not None else {}), **verdict.as_dict()}
        print(json.dumps(out, ensure_ascii=False), flush=True)
        verdicts.append(verdict.prediction)
    _summary(verdicts)
    return verdicts


def _check_flags(flags: dict) -> None:
    scheme, ratio = flags["seeding_scheme"], flags["greenlist_ratio"]
    if scheme is not None and scheme not in ("lefthash", "selfhash"):
        raise GenkitError(f"--seeding-scheme {scheme}: expected lefthash or selfhash")
    if ratio is not None and not 0 < ratio < 1:
        raise GenkitError(f"--greenlist-ratio {ratio}: expected a number between 0 and 1 (exclusive)")
    if flags["context_width"] is not None and flags["context_width"] < 1:
        raise GenkitError(f"--context-width {flags['context_width']}: expected an integer of at least 1")


def _summary(verdicts: list[bool]) -> None:
    if sys.stderr.isatty():
        marked = sum(verdicts)
        print(f"{len(verdicts)} texts: {marked} watermarked, {len(verdicts) - marked} not", file=sys.stderr)


# ---------------------------------------------------------------- input


def read_records(source: Optional[str], fmt: str) -> list[tuple[object, str]]:
    """(id or None, text) for every text of the input."""
    if fmt not in ("auto", "jsonl", "txt", "single"):
        raise GenkitError(f"--format {fmt}: expected auto, jsonl, txt or single")
    if source == "-" or (source is None and sys.stdin is not None and not sys.stdin.isatty()):
        return _parse(o.stdin_text(), fmt, "stdin")
    if source is None:
        raise GenkitError("nothing to check: pass a text, a .jsonl/.txt file, or pipe JSONL on stdin")
    path = Path(source).expanduser()
    if _is_file(path):
        if fmt == "auto" and path.suffix in (".jsonl", ".json"):
            fmt = "jsonl"
        try:
            data = utf8.decode(path.read_bytes(), source)
        except OSError as e:
            raise GenkitError(f"cannot read {source}: {e.strerror}") from None
        return _parse(data, fmt, source)
    if _looks_like_file(source):
        raise GenkitError(f"file {source} does not exist; pass an existing file, a text, or '-' for stdin")
    if not source.strip():
        raise GenkitError("the text is empty: pass some text")
    return [(None, o.argument_text(source, "the text argument"))]


def _is_file(path: Path) -> bool:
    # a long text argument is no file name: the system refuses it (ENAMETOOLONG) rather than say no
    try:
        return path.is_file()
    except OSError:
        return False


def _looks_like_file(source: str) -> bool:
    return not any(c.isspace() for c in source) and source.endswith((".jsonl", ".json", ".txt"))


def _parse(data: str, fmt: str, where: str) -> list[tuple[object, str]]:
    lines = [(n, line) for n, line in enumerate(data.splitlines(), start=1) if line.strip()]
    if not lines:
        raise GenkitError(f"{where}: no texts in the input")
    if fmt == "auto":
        fmt = "jsonl" if lines[0][1].lstrip().startswith("{") else "single"
    if fmt == "single":
        # Output of `genkit run` ends with a newline the model did not write.
        return [(None, data[:-1] if data.endswith("\n") else data)]
    if fmt == "txt":
        return [(None, line) for _, line in lines]
    return [_record(line, n, where) for n, line in lines]


def _record(line: str, n: int, where: str) -> tuple[object, str]:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise GenkitError(f"{where}, line {n}: not valid JSON ({e.msg}); use --format txt for plain text") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise GenkitError(f'{where}, line {n}: expected a JSON object with a "text" string')
    return record.get("id"), record["text"]
