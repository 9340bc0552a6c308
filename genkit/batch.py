"""genkit batch: a file of prompts in, one JSON record per prompt out, resumable.

    job = batch.prepare(batch.JobOptions(input="prompts.jsonl", output="out.jsonl"))
    lm = genkit.load() if job.needs_model else None
    summary = batch.execute(job, lm)

Phases, in order:
1. `prepare` reads and checks the input and resolves each record's preset and parameters (no
   model yet: a typo fails fast), then looks at what OUTPUT already holds: records done there
   are skipped, so re-running a killed job completes it.
2. `execute` renders the prompts on the loaded model, groups the records that share settings,
   sorts each group by prompt length and runs it: continuous batching for greedy and sampling
   (genkit.engine.continuous), padded batches through `Generation` for the other strategies.
3. Every record is appended to OUTPUT and flushed as it completes (one write per line, so a kill
   leaves at most a half line, which the next run cuts off). At the end OUTPUT is rewritten in
   input order through a temporary file and `os.replace`, so a kill at any moment leaves either
   the log of finished records or the final file, and both resume.

Under `accelerate launch` each process takes every N-th record, writes OUTPUT.part-R-of-N, and
process 0 merges the parts into OUTPUT once all are done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from genkit import __version__
from genkit import params as P
from genkit import presets as presets_mod
from genkit.errors import GenkitError, did_you_mean

RECORD_KEYS = {"id", "prompt", "messages", "preset", "vars", "system", "params", "metadata"}
FORMATS = ("txt", "jsonl")
OUTPUT_FORMATS = ("genkit", "openai")

# OpenAI batch request bodies: keys genkit maps onto its parameters, and keys that change
# nothing about the text (accepted so that existing files run unchanged).
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
OPENAI_IGNORED = {"model", "user", "metadata", "stream", "store", "service_tier", "logprobs", "top_logprobs"}
OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "time": "length", "cancelled": "length"}


# ====================================================================== input


@dataclass
class Request:
    """One record of the input, checked; `error` is set when it cannot run."""

    line: int  # 1-based line number in INPUT
    id: Any
    prompt: Any = None  # a string, or a list of chat messages
    preset: str | None = None
    vars: dict = field(default_factory=dict)
    system: str | None = None
    params: dict = field(default_factory=dict)  # genkit parameter names, validated
    metadata: Any = None
    error: str | None = None
    resolved: Any = None  # presets.Preset once resolved

    @property
    def key(self) -> str:
        return record_key(self.id)


def record_key(id_: Any) -> str:
    """The identity of a record in INPUT and OUTPUT (ids 1 and "1" are different records)."""
    return json.dumps(id_, sort_keys=True, ensure_ascii=False)


def input_format(path: str, fmt: str | None, first_line: str = "") -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise GenkitError(f"--format {fmt}: expected txt or jsonl")
        return fmt
    if path == "-":
        return "jsonl" if first_line.lstrip().startswith("{") else "txt"
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        return "txt"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise GenkitError(f"cannot tell the format of {path} from its extension: pass --format txt or --format jsonl")


def read_requests(path: str, fmt: str | None = None, stdin: TextIO | None = None) -> list[Request]:
    """Every record of INPUT (a file, or '-' for stdin), blank lines skipped."""
    if path == "-":
        lines = (stdin or sys.stdin).read().splitlines()
    else:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise GenkitError(f"input file {path} does not exist; pass a .txt or .jsonl file, or - for stdin") from None
        except (OSError, UnicodeDecodeError) as e:
            raise GenkitError(f"cannot read input file {path}: {e}") from None
    first = next((ln for ln in lines if ln.strip()), "")
    fmt = input_format(path, fmt, first)
    requests = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        requests.append(Request(number, number, prompt=text) if fmt == "txt" else parse_jsonl(number, text))
    if not requests:
        where = "stdin" if path == "-" else path
        raise GenkitError(f"{where} holds no prompts: one prompt per line (.txt) or one JSON record per line (.jsonl)")
    _check_unique_ids(requests, path)
    return requests


def _check_unique_ids(requests: list[Request], path: str) -> None:
    # Ids key resuming and the output: two records with one id would overwrite each other.
    seen: dict[str, int] = {}
    for r in requests:
        if r.key in seen:
            raise GenkitError(
                f"{path}: line {r.line}: id {r.id!r} is already used on line {seen[r.key]}; ids must be unique"
            )
        seen[r.key] = r.line


def parse_jsonl(line: int, text: str) -> Request:
    """A JSONL record (genkit's keys or the OpenAI batch request shape) as a Request."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Request(line, line, error=f"invalid JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return Request(line, line, error="a record must be a JSON object, e.g. {\"prompt\": \"...\"}")
    if "custom_id" in obj and "body" in obj:
        return _from_openai(line, obj)
    req = Request(line, obj.get("id", line))
    try:
        _check_id(req.id)
        unknown = [k for k in obj if k not in RECORD_KEYS]
        if unknown:
            raise ValueError(f"unknown key '{unknown[0]}'{did_you_mean(unknown[0], RECORD_KEYS)}")
        req.prompt = _prompt_of(obj.get("prompt"), obj.get("messages"))
        req.preset = _opt_str(obj, "preset")
        req.system = _opt_str(obj, "system")
        req.vars = _vars_of(obj.get("vars"))
        req.params = P.check_params(obj.get("params") or {}, "params")
        req.metadata = obj.get("metadata")
    except (ValueError, GenkitError) as e:
        req.error = str(e)
        if not isinstance(req.id, (str, int)) or isinstance(req.id, bool):
            req.id = line
    return req


def _check_id(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, not {json.dumps(value)}")


def _opt_str(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"'{key}' must be a non-empty string")
    return value


def _vars_of(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or any(isinstance(v, (dict, list)) for v in value.values()):
        raise ValueError("'vars' must be an object of name: value, e.g. {\"target\": \"French\"}")
    return {str(k): str(v) for k, v in value.items()}


def _prompt_of(prompt: Any, messages: Any) -> Any:
    if prompt is not None and messages is not None:
        raise ValueError("a record has 'prompt' or 'messages', not both")
    if messages is not None:
        return _messages_of(messages)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("no prompt: give 'prompt' (a non-empty string) or 'messages' (a chat)")
    return prompt


def _messages_of(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a 'role' and a 'content'")
        out.append({"role": m["role"], "content": _content_text(m.get("content"), i)})
    return out


def _content_text(content: Any, i: int) -> str:
    # OpenAI allows content as a list of parts; genkit's models read text parts only.
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ValueError(f"messages[{i}].content must be a string or a list of text parts")


def _from_openai(line: int, obj: dict) -> Request:
    """An OpenAI batch request line: custom_id, url, body with messages and sampling options."""
    req = Request(line, obj["custom_id"])
    try:
        _check_id(req.id)
        url = obj.get("url")
        if url is not None and url not in OPENAI_URLS:
            raise ValueError(f"url {url!r} is not supported; genkit runs {' and '.join(OPENAI_URLS)}")
        body = obj["body"]
        if not isinstance(body, dict):
            raise ValueError("'body' must be a JSON object")
        if "messages" in body:
            req.prompt = _messages_of(body["messages"])
        else:
            req.prompt = _prompt_of(body.get("prompt"), None)
        req.params = P.check_params(_openai_params(body), "body")
    except (ValueError, GenkitError) as e:
        req.error = str(e)
        if not isinstance(req.id, (str, int)) or isinstance(req.id, bool):
            req.id = line
    return req


def _openai_params(body: dict) -> dict:
    """OpenAI's options in genkit's terms. A temperature of 0 means greedy decoding, above 0
    sampling; without temperature, top_p or n the job's preset decides."""
    known = {"messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed"}
    for key in body:
        if key not in known and key not in OPENAI_IGNORED:
            raise ValueError(f"body.{key} is not supported by genkit; remove it or set it in 'params' of a genkit record")
    out: dict[str, Any] = {}
    for src in ("max_tokens", "max_completion_tokens"):
        if body.get(src) is not None:
            out["max_new_tokens"] = body[src]
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
            raise ValueError(f"body.temperature {temperature!r}: expected a number of at least 0")
        out["do_sample"] = temperature > 0
        if temperature > 0:
            out["temperature"] = temperature
    sampling = temperature is None or temperature > 0
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
        if sampling and body["top_p"] != 1:
            out["do_sample"] = True
    if body.get("n") is not None:
        out["num_return_sequences"] = body["n"]
        if sampling and body["n"] != 1:
            out["do_sample"] = True
    if body.get("stop") is not None:
        out["stop_strings"] = body["stop"]
    if body.get("seed") is not None:
        out["seed"] = body["seed"]
    return out


# ====================================================================== options and resolution


@dataclass
class JobOptions:
    input: str  # a path, or "-" for stdin
    output: str | None = None  # None: stdout
    input_format: str | None = None  # txt or jsonl; None: from the extension
    output_format: str = "genkit"  # genkit or openai
    preset: str | None = None
    generation_config: str | None = None
    params: dict = field(default_factory=dict)  # validated job-level parameters (flags, --set)
    vars: dict = field(default_factory=dict)
    system: str | None = None
    raw: bool = False
    batch_size: int = 64
    max_batch_tokens: int | None = None
    unordered: bool = False
    strict: bool = False
    overwrite: bool = False
    continuous: bool = True  # continuous batching where the strategy allows it


def resolve_requests(requests: list[Request], opts: JobOptions) -> None:
    """Each record's preset and parameters over the job's (record params win), checked
    without a model; a bad preset or combination becomes the record's error."""
    cache: dict[str, Any] = {}
    for req in requests:
        if req.error:
            continue
        overrides = {**opts.params, **req.params}
        key = json.dumps([req.preset, overrides, req.vars], sort_keys=True, default=str)
        if key not in cache:
            try:
                cache[key] = presets_mod.resolve(
                    req.preset or opts.preset, opts.generation_config, overrides, {**opts.vars, **req.vars}
                )
            except GenkitError as e:
                cache[key] = e
        if isinstance(cache[key], GenkitError):
            req.error = cache[key].message
        else:
            req.resolved = cache[key]


def derive_seed(job_seed: int, key: str) -> int:
    """A record's seed when it sets none: fixed by the job's seed and the record's id, so a
    resumed or re-sharded job samples exactly what an uninterrupted one does."""
    digest = hashlib.sha256(f"{job_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ====================================================================== records out


def format_result(req: Request, fmt: str, *, texts: list[str], finish: list[str], prompt_tokens: int,
                  completion_tokens: int, model: str, strategy: str, params: dict, seed: int,
                  timings: dict) -> dict:
    if fmt == "openai":
        return _openai_result(req, texts, finish, prompt_tokens, completion_tokens, model)
    many = len(texts) > 1
    record = {
        "id": req.id,
        "text": texts if many else texts[0],
        "finish_reason": finish if many else finish[0],
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "model": model,
        "preset": req.resolved.name,
        "strategy": strategy,
        "params": params,
        "seed": seed,
        "timings": timings,
    }
    if req.metadata is not None:
        record["metadata"] = req.metadata
    return record


def format_error(req: Request, fmt: str, message: str) -> dict:
    if fmt == "openai":
        return {
            "id": _openai_id("batch_req", req.key), "custom_id": req.id, "response": None,
            "error": {"code": "invalid_request", "message": message, "line": req.line},
        }
    record = {"id": req.id, "error": {"message": message, "line": req.line}}
    if req.metadata is not None:
        record["metadata"] = req.metadata
    return record


def _openai_id(prefix: str, key: str) -> str:
    # Stable ids: a resumed job writes the same ids an uninterrupted one does.
    return f"{prefix}_{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def _openai_result(req, texts, finish, prompt_tokens, completion_tokens, model) -> dict:
    chat = isinstance(req.prompt, list)
    choices = [
        {"index": i, **({"message": {"role": "assistant", "content": t}} if chat else {"text": t}),
         "logprobs": None, "finish_reason": OPENAI_FINISH.get(f, "stop")}
        for i, (t, f) in enumerate(zip(texts, finish))
    ]
    body = {
        "id": _openai_id("chatcmpl" if chat else "cmpl", req.key),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "system_fingerprint": f"genkit-{__version__}",
    }
    return {
        "id": _openai_id("batch_req", req.key), "custom_id": req.id,
        "response": {"status_code": 200, "request_id": _openai_id("req", req.key), "body": body},
        "error": None,
    }


def _dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


def _identity(record: Any) -> tuple[str, str, bool] | None:
    """(key, format, ok) of an output record, or None if it is not one of genkit's."""
    if not isinstance(record, dict):
        return None
    if "custom_id" in record and "response" in record:
        return record_key(record["custom_id"]), "openai", record.get("error") is None
    if "id" in record:
        return record_key(record["id"]), "genkit", "error" not in record
    return None


# ====================================================================== OUTPUT on disk


@dataclass
class _Line:
    key: str
    ok: bool
    path: Path
    offset: int
    length: int


class OutputStore:
    """OUTPUT and its parts: what earlier runs completed, appends, and the final rewrite.

    A process appends to one file (OUTPUT itself, or OUTPUT.part-R-of-N under accelerate).
    Every file of the job is read when the job starts (a record done anywhere is done), and the
    final rewrite merges them, the last line of a record winning (a failed record that a later
    run retried is replaced).
    """

    def __init__(self, path: Path, fmt: str, rank: int = 0, world: int = 1):
        self.path = path
        self.fmt = fmt
        self.rank, self.world = rank, world
        self.own = path if world == 1 else self.part_path(rank, world)
        self.lines: list[_Line] = []
        self._fh = None

    def part_path(self, rank: int, world: int) -> Path:
        return self.path.with_name(f"{self.path.name}.part-{rank}-of-{world}")

    def parts(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.part-*-of-*"))

    def remove_all(self) -> None:
        """--overwrite: start over (OUTPUT, every part, leftovers of a killed rewrite)."""
        for p in [self.path, *self.parts(), *self._temps()]:
            p.unlink(missing_ok=True)

    def _temps(self) -> list[Path]:
        return list(self.path.parent.glob(f".{self.path.name}.tmp-*"))

    def load(self) -> dict[str, bool]:
        """Scan OUTPUT and the parts; key -> ok for every record there (the last line wins)."""
        if self.path.is_dir():
            raise GenkitError(f"output {self.path} is a directory; pass a file path with -o")
        self.lines = []
        for p in [self.path, *self.parts()]:
            if p.is_file():
                self.lines.extend(self._scan(p, repair=p == self.own))
        return {ln.key: ln.ok for ln in self.lines}

    def _scan(self, path: Path, repair: bool) -> list[_Line]:
        """The records of one file. Only the last line may be incomplete (a kill in the middle of
        writing it): it is ignored, and cut off when `repair` (the file this process appends to)."""
        data = path.read_bytes()
        out, offset, number = [], 0, 0
        while offset < len(data):
            end = data.find(b"\n", offset)
            number += 1
            chunk = data[offset:] if end == -1 else data[offset:end]
            if not chunk.strip():
                offset = len(data) if end == -1 else end + 1
                continue
            try:
                ident = _identity(json.loads(chunk))
            except ValueError:
                ident = None
            if ident is None and end == -1:
                if repair:
                    os.truncate(path, offset)
                break
            if ident is None:
                raise GenkitError(
                    f"{path}: line {number} is not a genkit batch record; is -o pointing at another file? "
                    "Pass --overwrite to start over"
                )
            key, fmt, ok = ident
            if fmt != self.fmt:
                raise GenkitError(
                    f"{path} holds records in the {fmt} format but --output-format is {self.fmt}: "
                    "use the same format to resume, or --overwrite"
                )
            if end == -1 and repair:
                # The record is whole and only its newline is missing: finish the line.
                with open(path, "ab") as fh:
                    fh.write(b"\n")
            out.append(_Line(key, ok, path, offset, len(chunk)))
            offset = len(data) if end == -1 else end + 1
        return out

    def open(self) -> None:
        self.own.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.own, "ab", buffering=0)

    def write(self, record: dict) -> None:
        """One record, one write call, flushed: a kill leaves whole lines and at most one half line."""
        data = (_dumps(record) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            n = self._fh.write(view)
            view = view[n:]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finalize(self, order: list[str] | None) -> tuple[int, int]:
        """Rewrite OUTPUT from every file of the job: records in `order` (input order), or in
        the order they were written when `order` is None; then drop the parts. Returns the
        number of records in OUTPUT and how many of them failed."""
        self.load()
        latest: dict[str, _Line] = {}
        for ln in self.lines:
            latest[ln.key] = ln
        if order is None:
            order = [ln.key for ln in self.lines if latest[ln.key] is ln]
        elif set(latest) - set(order):
            foreign = sorted(set(latest) - set(order))[0]
            raise GenkitError(f"{self.path} has a record with id {foreign} that is not in the input; "
                              "is it the output of another job? Pass --overwrite to start over")
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        handles: dict[Path, Any] = {}
        try:
            with open(tmp, "wb") as out:
                for key in order:
                    ln = latest.get(key)
                    if ln is None:
                        continue
                    fh = handles.get(ln.path) or handles.setdefault(ln.path, open(ln.path, "rb"))
                    fh.seek(ln.offset)
                    out.write(fh.read(ln.length) + b"\n")
                out.flush()
                os.fsync(out.fileno())
        finally:
            for fh in handles.values():
                fh.close()
        os.replace(tmp, self.path)
        # What the final file now holds: the parts, and temporary files of rewrites killed midway.
        for p in [*self.parts(), *self._temps()]:
            p.unlink(missing_ok=True)
        written = [key for key in order if key in latest]
        return len(written), sum(1 for key in written if not latest[key].ok)


class StdoutSink:
    """Records to a stream: in input order (holding back the ones that finish early), or as
    they finish with `unordered`."""

    def __init__(self, stream: TextIO, order: list[str] | None):
        self.stream = stream
        self.order = order
        self.pending: dict[str, dict] = {}
        self.next = 0

    def write(self, record: dict) -> None:
        if self.order is None:
            self._emit(record)
            return
        ident = _identity(record)
        self.pending[ident[0]] = record
        while self.next < len(self.order) and self.order[self.next] in self.pending:
            self._emit(self.pending.pop(self.order[self.next]))
            self.next += 1

    def _emit(self, record: dict) -> None:
        self.stream.write(_dumps(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


# ====================================================================== the job


@dataclass
class Summary:
    total: int = 0  # records of this process's share
    done: int = 0
    failed: int = 0
    skipped: int = 0  # already done in OUTPUT
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    rank: int = 0
    world: int = 1

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.skipped

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class Job:
    opts: JobOptions
    requests: list[Request]  # the whole input, in order
    pending: list[Request]  # this process's records still to run
    store: OutputStore | None
    sink: Any
    summary: Summary
    state: Any = None  # accelerate's PartialState under `accelerate launch`
    final_records: int | None = None  # records in the finished OUTPUT (process 0)
    final_failed: int | None = None  # how many of them failed

    @property
    def needs_model(self) -> bool:
        return any(r.error is None for r in self.pending)


def distributed() -> tuple[int, int, Any]:
    """(rank, world size, PartialState) under `accelerate launch`, else (0, 1, None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    # Without CUDA, accelerate starts its multi-process (gloo) mode only when asked for the CPU.
    # Processes finish their shards at different times: the final barrier must outwait that.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=7))
    if state.num_processes <= 1:
        raise GenkitError("WORLD_SIZE is above 1 but accelerate started no process group: launch with "
                          "`accelerate launch --multi_gpu --num_processes N -m genkit batch ...` or torchrun")
    return state.process_index, state.num_processes, state


def prepare(opts: JobOptions, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> Job:
    """Read and check INPUT, resolve settings, and find what OUTPUT already holds."""
    if opts.output_format not in OUTPUT_FORMATS:
        raise GenkitError(f"--output-format {opts.output_format}: expected genkit or openai")
    if opts.batch_size < 1:
        raise GenkitError("--batch-size must be at least 1")
    if opts.max_batch_tokens is not None and opts.max_batch_tokens < 1:
        raise GenkitError("--max-batch-tokens must be at least 1")
    if opts.output and opts.input != "-" and Path(opts.output).resolve() == Path(opts.input).resolve():
        raise GenkitError(f"-o {opts.output} is the input file: write the records to another file")
    requests = read_requests(opts.input, opts.input_format, stdin)
    resolve_requests(requests, opts)
    rank, world, state = distributed()
    if world > 1 and not opts.output:
        raise GenkitError("accelerate launch needs -o OUTPUT: the processes write parts that are merged into it")
    mine = requests[rank::world]
    summary = Summary(total=len(mine), rank=rank, world=world)
    store, done = None, {}
    if opts.output:
        store, done = _open_output(opts, requests, rank, world, state)
    sink = store or StdoutSink(stdout or sys.stdout, None if opts.unordered else [r.key for r in requests])
    pending = [r for r in mine if not done.get(r.key)]
    summary.skipped = len(mine) - len(pending)
    if opts.strict:
        bad = next((r for r in pending if r.error), None)
        if bad is not None:
            raise _strict_error(opts, bad, bad.error)
    return Job(opts, requests, pending, store, sink, summary, state)


def _open_output(opts: JobOptions, requests: list[Request], rank: int, world: int, state):
    """The OutputStore and what it already holds (key -> ok), checked against the input."""
    store = OutputStore(Path(opts.output), opts.output_format, rank, world)
    if opts.overwrite and rank == 0:
        store.remove_all()
    if state is not None:
        state.wait_for_everyone()  # nobody reads OUTPUT while process 0 removes it
    done = store.load()
    known = {r.key for r in requests}
    foreign = next((k for k in done if k not in known), None)
    if foreign is not None:
        raise GenkitError(f"{opts.output} has a record with id {foreign} that is not in the input; "
                          "is it the output of another job? Pass --overwrite to start over")
    return store, done


def _strict_error(opts: JobOptions, req: Request, message: str) -> GenkitError:
    where = "stdin" if opts.input == "-" else opts.input
    return GenkitError(f"{where}: line {req.line} (id {req.id!r}): {message} (--strict stops at the first failed "
                       "record; fix it or drop --strict to write it as an error record and go on)")


def execute(job: Job, lm=None, *, on_update: Callable[[Summary], None] | None = None) -> Summary:
    """Run the pending records, write each as it completes, and finish OUTPUT."""
    runner = _Runner(job, lm, on_update)
    job.summary.started = time.perf_counter()  # tokens/s counts generation, not model loading
    if job.store is not None:
        job.store.open()
    try:
        runner.run()
    finally:
        job.sink.close()
    _finish(job)
    return job.summary


def _finish(job: Job) -> None:
    """Rewrite OUTPUT in input order (process 0, once every process is done)."""
    if job.store is None:
        return
    if job.state is not None:
        job.state.wait_for_everyone()
    if job.summary.rank == 0:
        job.final_records, job.final_failed = job.store.finalize(
            None if job.opts.unordered else [r.key for r in job.requests])


# ====================================================================== running records


@dataclass
class _Item:
    """A request ready for the engine."""

    req: Request
    settings: Any  # DecodeSettings
    engine_prompt: Any  # what Generation renders into the same text
    input_ids: list[int]
    seed: int
    max_new: int  # max_new_tokens capped by the model's context
    params: dict  # parameters that differ from the defaults (for the record)


class _Runner:
    def __init__(self, job: Job, lm, on_update):
        self.job = job
        self.opts = job.opts
        self.lm = lm
        self.on_update = on_update or (lambda s: None)
        self._settings: dict[str, Any] = {}
        self._assistants: dict[str, Any] = {}
        self._continuous: dict[str, bool] = {}  # strategy -> continuous batching possible

    # -------------------------------------------------------------- bookkeeping

    def fail(self, req: Request, message: str) -> None:
        if self.opts.strict:
            raise _strict_error(self.opts, req, message)
        self.job.sink.write(format_error(req, self.opts.output_format, message))
        self.job.summary.failed += 1
        self.on_update(self.job.summary)

    def succeed(self, item: _Item, texts, finish, completion_tokens, timings) -> None:
        s = item.settings
        record = format_result(
            item.req, self.opts.output_format, texts=texts, finish=finish,
            prompt_tokens=len(item.input_ids), completion_tokens=completion_tokens, model=self.lm.name,
            strategy=s.strategy, params=item.params, seed=item.seed, timings=timings,
        )
        self.job.sink.write(record)
        summary = self.job.summary
        summary.done += 1
        summary.prompt_tokens += len(item.input_ids)
        summary.completion_tokens += completion_tokens
        self.on_update(summary)

    # -------------------------------------------------------------- the plan

    def run(self) -> None:
        self.on_update(self.job.summary)
        items = []
        for req in self.job.pending:
            if req.error:
                self.fail(req, req.error)
                continue
            try:
                items.append(self.plan(req))
            except GenkitError as e:
                self.fail(req, e.message)
        for settings, group in self.groups(items):
            self.run_group(settings, group)

    def settings_for(self, generation: dict):
        from genkit.engine.settings import build

        key = json.dumps(generation, sort_keys=True, default=str)
        if key not in self._settings:
            try:
                self._settings[key] = build(self.lm, generation)
            except GenkitError as e:
                self._settings[key] = e
        if isinstance(self._settings[key], GenkitError):
            raise self._settings[key]
        return self._settings[key]

    def plan(self, req: Request) -> _Item:
        """Render the prompt, tokenize it, check its length, pick the seed."""
        from genkit import prompts

        lm, resolved = self.lm, req.resolved
        settings = self.settings_for(resolved.generation)
        system = req.system or self.opts.system or resolved.system
        prompt = presets_mod.render_prompt(resolved, req.prompt) if isinstance(req.prompt, str) else req.prompt
        templated = prompts.uses_chat(lm, self.opts.raw)
        text = prompts.to_text(lm, prompt, system=system, raw=self.opts.raw)
        ids = lm.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if not ids:
            raise GenkitError("the prompt is empty: give some text")
        ctx = lm.context_length
        if ctx and not lm.is_encoder_decoder and len(ids) >= ctx:
            raise GenkitError(f"the prompt is {len(ids)} tokens but the model's context holds {ctx}: shorten it")
        if "seed" in req.params:
            seed = req.params["seed"]
        else:
            seed = derive_seed(resolved.generation.get("seed") or 0, req.key)
        params = presets_mod.diff_from_defaults({k: v for k, v in settings.explicit.items() if k != "seed"})
        params["max_new_tokens"] = settings.max_new_tokens
        return _Item(req, settings, _engine_prompt(prompt, system, templated, text), ids, seed,
                     prompts.fit_max_new_tokens(lm, len(ids), settings.max_new_tokens), params)

    def groups(self, items: list[_Item]) -> Iterator[tuple[Any, list[_Item]]]:
        """Records that can share a batch, each group sorted by prompt length (least padding)."""
        groups: dict[str, list[_Item]] = {}
        for it in items:
            groups.setdefault(self.group_key(it), []).append(it)
        for group in groups.values():
            group.sort(key=lambda it: len(it.input_ids))
            yield group[0].settings, group

    def continuous(self, settings) -> bool:
        from genkit.engine import continuous

        if settings.strategy not in self._continuous:
            self._continuous[settings.strategy] = continuous.supported(self.lm, settings)
        return self.opts.continuous and self._continuous[settings.strategy]

    def group_key(self, it: _Item) -> str:
        values = dict(it.settings.values)
        values.pop("seed", None)
        if self.continuous(it.settings):
            # Each row of a continuous batch has its own length limit and stop strings.
            values.pop("max_new_tokens", None)
            values.pop("stop_strings", None)
            return "c:" + json.dumps(values, sort_keys=True, default=str)
        values["max_new_tokens"] = it.max_new
        return "s:" + json.dumps(values, sort_keys=True, default=str)

    # -------------------------------------------------------------- the engines

    def run_group(self, settings, group: list[_Item]) -> None:
        if self.continuous(settings):
            self.run_continuous(settings, group)
        else:
            for batch in self.static_batches(settings, group):
                self.run_static(settings, batch)

    def run_continuous(self, settings, group: list[_Item]) -> None:
        from genkit.engine.continuous import ContinuousBatcher, Job as EngineJob

        batcher = ContinuousBatcher(self.lm, settings, batch_size=self.opts.batch_size,
                                    max_batch_tokens=self.opts.max_batch_tokens)
        jobs = [EngineJob(it, it.input_ids, it.seed, it.max_new, it.settings.stop_strings) for it in group]
        for result in batcher.run(jobs):
            seqs = result.sequences
            timings = _timings(result.finished_at - result.started_at,
                               None if result.first_token_at is None else result.first_token_at - result.started_at,
                               result.completion_tokens)
            self.succeed(result.handle, [s.text for s in seqs], [s.finish_reason for s in seqs],
                         result.completion_tokens, timings)

    def static_batches(self, settings, group: list[_Item]) -> Iterator[list[_Item]]:
        """Consecutive slices of the sorted group within --batch-size rows and the token budget."""
        rows_per = max(settings.num_return_sequences, settings.num_beams)
        batch: list[_Item] = []
        for it in group:
            candidate = batch + [it]
            rows = len(candidate) * rows_per
            width = len(it.input_ids) + it.max_new  # sorted: the last is the longest
            budget = self.opts.max_batch_tokens
            if batch and (rows > self.opts.batch_size or (budget and rows * width > budget)):
                yield batch
                candidate = [it]
            batch = candidate
        if batch:
            yield batch

    def run_static(self, settings, batch: list[_Item]) -> None:
        from genkit.engine import Generation

        s = dataclasses.replace(settings, values={**settings.values, "max_new_tokens": batch[0].max_new})
        try:
            gen = Generation(
                self.lm, [it.engine_prompt for it in batch], s, raw=self.opts.raw,
                seeds=[it.seed for it in batch], assistant=self.assistant(s),
            )
            gen.run()
        except GenkitError as e:
            for it in batch:
                self.fail(it.req, e.message)
            return
        except Exception as e:  # an engine failure must not lose the other records
            for it in batch:
                self.fail(it.req, f"generation failed: {type(e).__name__}: {e}")
            return
        per = len(gen.results) // len(batch)
        stats = gen.stats
        for i, it in enumerate(batch):
            seqs = gen.results[i * per:(i + 1) * per]
            tokens = sum(len(r.token_ids) for r in seqs)
            self.succeed(it, [r.text for r in seqs], [r.finish_reason for r in seqs], tokens,
                         _timings(stats.elapsed_s, stats.time_to_first_token_s, tokens))

    def assistant(self, s):
        if not s.assistant_model:
            return None
        if s.assistant_model not in self._assistants:
            from genkit import api

            self._assistants[s.assistant_model] = api.load(
                s.assistant_model, dtype=str(self.lm.model.dtype).replace("torch.", ""))
        return self._assistants[s.assistant_model]


def _engine_prompt(prompt: Any, system: str | None, templated: bool, text: str) -> Any:
    """What `Generation` (which applies no system prompt here) renders into `text`: the chat
    with its system message for chat models, the text itself otherwise."""
    if not templated:
        return text
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    return messages


def _timings(elapsed: float, ttft: float | None, tokens: int) -> dict:
    return {
        "elapsed_s": round(elapsed, 4),
        "time_to_first_token_s": None if ttft is None else round(ttft, 4),
        "tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else 0.0,
    }
