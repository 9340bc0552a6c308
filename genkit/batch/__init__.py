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

from genkit.batch.job import distributed, execute, prepare
from genkit.batch.plan import Job, JobOptions, Summary, resolve_requests
from genkit.batch.reading import FORMATS, RECORD_KEYS, input_format, parse_jsonl, read_requests
from genkit.batch.records import OUTPUT_FORMATS, format_error, format_result
from genkit.batch.requests import Request, record_key
from genkit.batch.store import OutputStore, StdoutSink

__all__ = [
    "FORMATS", "OUTPUT_FORMATS", "RECORD_KEYS", "Job", "JobOptions", "OutputStore", "Request", "StdoutSink",
    "Summary", "distributed", "execute", "format_error", "format_result", "input_format",
    "parse_jsonl", "prepare", "read_requests", "record_key", "resolve_requests",
]
