"""pass@1 for code: each answer is run against the tests its record carries, in a sandboxed process.

The program is `code_prefix + code + test + check(entry_point)` (HumanEval's layout). `code` is the
answer's fenced code (`extract_code`: a chat model's prose around its code is cut). An answer that
writes the whole function (a line `def <entry_point>(` at column 0) replaces the prefix's function
instead of continuing it: the prefix's body becomes `pass` and the answer's definition follows, so the
prefix's imports still apply. It runs in a fresh Python
(`-I`: no environment, no user site) in a temporary directory of its own, as a process group of its own,
with these limits:
- wall time `TIMEOUT_S`, after which the whole group is killed (a hanging program fails);
- address space `MEMORY_MB` and CPU time (`resource`), and files of at most 16 MiB;
- its output goes nowhere (a program that prints megabytes costs nothing);
- no network: inside a new user and network namespace (`unshare -rn`) where the machine permits it;
  elsewhere a prelude replaces `socket.socket` before the program runs, which stops casual use but is no
  sandbox (`NETWORK` says which one is in force).
A program passes when it exits with status 0. Anything else (an exception, a failed assert, a crash, a
timeout, a limit) fails, and never stops the caller.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mtmoe.data.references import MetricSpec, Reference
from mtmoe.eval.metrics.base import TaskMetric

TIMEOUT_S = 5.0
MEMORY_MB = 1024
WORKERS = 2
_SOCKET_GUARD = (
    "import socket as _s\n"
    "def _no_network(*a, **k):\n"
    "    raise OSError('network access is disabled in pass@1 programs')\n"
    "_s.socket = _s.create_connection = _no_network\n"
    "del _s\n"
)


def extract_code(answer: str) -> str:
    """The code of an answer, by its fence lines (lines that start with three backticks).

    Two or more: the text between the first two. One: the text before it when there is any (a closing
    fence, with prose after it), else the text after it. None: the whole answer.
    """
    lines = answer.split("\n")
    fences = [i for i, line in enumerate(lines) if line.lstrip().startswith("```")]
    if len(fences) >= 2:
        return "\n".join(lines[fences[0] + 1 : fences[1]])
    if len(fences) == 1:
        before = "\n".join(lines[: fences[0]])
        return before if before.strip() else "\n".join(lines[fences[0] + 1 :])
    return answer


def program(answer: str, ref: Reference) -> str:
    """The test program of one answer (see the module docstring)."""
    code = extract_code(answer)
    prefix = ref.code_prefix
    whole = re.search(rf"^(async\s+)?def\s+{re.escape(ref.entry_point or '')}\s*\(", code, re.MULTILINE)
    if prefix and whole:
        prefix = f"{prefix.rstrip()}\n    pass\n\n"
    return f"{prefix}{code}\n\n{ref.test}\n\ncheck({ref.entry_point})\n"


@functools.cache
def network_isolation() -> str:
    """`unshare` when a new user and network namespace can be made here, else `guard`."""
    if shutil.which("unshare") is None:
        return "guard"
    try:
        ok = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return "unshare" if ok else "guard"


def _limit_resources() -> None:  # runs in the child, before exec
    memory = MEMORY_MB * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = int(TIMEOUT_S) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(source: str, timeout_s: float = TIMEOUT_S) -> str:
    """Runs `source` sandboxed (see the module docstring); returns `passed`, `failed` or `timeout`."""
    isolation = network_isolation()
    if isolation == "guard":
        source = _SOCKET_GUARD + source
    with tempfile.TemporaryDirectory(prefix="mtmoe-pass1-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(source, encoding="utf-8")
        cmd = [sys.executable, "-I", str(path)]
        if isolation == "unshare":
            cmd = ["unshare", "-rn", *cmd]
        env = {"PATH": os.defpath, "HOME": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_limit_resources,  # noqa: PLW1509 (no threads are started in the child)
        )
        try:
            return "passed" if proc.wait(timeout=timeout_s) == 0 else "failed"
        except subprocess.TimeoutExpired:
            return "timeout"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class PassAt1(TaskMetric):
    """The share of answers whose program passes the record's tests (greedy answers, one each)."""

    name = "pass@1"

    def check(self, ref: Reference, spec: MetricSpec) -> None:
        """Every record must carry its tests: `test` (defining `check`) and `entry_point`."""
        missing = [k for k in ("test", "entry_point") if not getattr(ref, k)]
        if missing:
            raise ValueError(f"pass@1 needs the record's {' and '.join(repr(k) for k in missing)}")

    def score(self, answers: list[str], refs: list[Reference], spec: MetricSpec) -> dict[str, float]:
        """Percentage passed, and the percentage that timed out."""
        sources = [program(p, r) for p, r in zip(answers, refs, strict=True)]
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            outcomes = list(pool.map(run_program, sources))
        n = len(outcomes)
        pct = (lambda k: 100.0 * outcomes.count(k) / n) if n else (lambda k: 0.0)
        return {"score": pct("passed"), "timeout": pct("timeout")}
