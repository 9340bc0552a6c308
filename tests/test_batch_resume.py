"""`genkit batch` jobs that are killed for real, and jobs spread over processes by accelerate.

Real subprocesses: a job is SIGKILLed at several points and re-run, and `accelerate launch`
starts two CPU processes; in every case the final OUTPUT must hold exactly one record per input,
in input order, equal to what one uninterrupted process writes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from test_batch import NO_EOS, cli, one_thread, records, stable, write_jsonl  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parent.parent


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_after(args: list, out: Path, lines: int) -> int:
    """Start `genkit ARGS`, SIGKILL it once OUTPUT holds at least `lines` records."""
    proc = subprocess.Popen([sys.executable, "-m", "genkit", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while complete_lines(out) < lines:
            if proc.poll() is not None:
                raise AssertionError(f"the job ended (rc {proc.returncode}) before writing {lines} records: "
                                     f"{proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    return proc.returncode


def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tiny_dir, tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"Story {i}: " + "once upon a time " * (i % 5)} for i in range(16)]
    rows[7]["params"] = {"do_sample": False}  # a greedy record among the sampled ones
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--model", tiny_dir, "-n", "40", "--sample", "--seed", "3", "--batch-size", "1", *NO_EOS]
    reference = tmp_path / "reference.jsonl"
    assert cli("batch", src, "-o", reference, *args)[0] == 0

    out = tmp_path / "out.jsonl"
    seen = 0
    for more in (1, 2, 2):  # killed after 1 record, then twice after 2 more (about 1, 3, 5 in all)
        rc = kill_after(["batch", src, "-o", out, *args], out, seen + more)
        assert rc == -signal.SIGKILL
        now = complete_lines(out)
        assert now >= seen + more  # each run kept what earlier runs wrote, and added its own
        seen = now
    code, _, err = cli("batch", src, "-o", out, *args)
    assert code == 0, err
    assert f"{16 - seen} done, 0 failed, {seen} skipped" in err
    final = records(out)
    assert [r["id"] for r in final] == [r["id"] for r in rows]  # exactly one per input, input order
    assert stable(final) == stable(records(reference))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "reference.jsonl"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_processes_write_the_single_process_file(tiny_dir, tmp_path):
    rows = [{"id": i, "prompt": "word " * (i + 1)} for i in range(7)]
    for r in rows[::2]:
        r["params"] = {"do_sample": True}  # sampled records must not depend on the process either
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--model", tiny_dir, "-n", "6", "--raw", "--set", "repetition_penalty=1.5", "--seed", "4", *NO_EOS]
    reference = tmp_path / "reference.jsonl"
    assert cli("batch", src, "-o", reference, *args)[0] == 0
    ref_lines = reference.read_text().splitlines(keepends=True)

    # A single-process run was killed earlier: records 5 and 0 done, half of record 3 written.
    out = tmp_path / "out.jsonl"
    out.write_text(ref_lines[5] + ref_lines[0] + ref_lines[3][:25])
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "genkit", "batch", str(src), "-o", str(out), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "process 1/2:" in r.stderr and "process 2/2:" in r.stderr
    assert "7 records merged from 2 processes" in r.stderr
    assert stable(records(out)) == stable(records(reference))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "reference.jsonl"]
