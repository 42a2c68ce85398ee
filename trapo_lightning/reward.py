"""The TRAPO reward (TRAPO.md, "Losses"): 1 if the final answer verifies against the reference answer, else 0.

The final answer is the content of the completion's last `\\boxed{...}`. It is parsed and compared with the real
`math_verify` package (`parse` + `verify`); the reference answer is wrapped as `\\boxed{answer}` so both sides go
through the same LaTeX normalisation. Only `LatexExtractionConfig` is used: math-verify's `ExprExtractionConfig`
goes through sympy's `parse_expr`, which evaluates Python code, and model output is never evaluated.

Each check ends in one `Verdict`, so a run can tell a model that answers wrongly from one that stops producing a
parseable answer or trips the time limit: `correct` (the only verdict with reward 1), `wrong`, `unparseable` (no
balanced `\\boxed{}`, math-verify finds no expression in it, or math-verify raises on it), and `timeout`. A
reference answer that math-verify cannot parse is bad data, not a model failure, and raises `ValueError`;
`reference_problem` runs that same parse of the reference alone, so that data sources reject such answers when
they load them (trapo_lightning/data/answers.py).

Time bound. By default (`isolate=True`) every check runs in the worker subprocess described below, so the limit
is hard in any thread: measured, in-process signal limits let a deep-nesting check run 23 s at a 1 s limit inside
the test suite's large heap, while the worker's bound held. With `isolate=False` the path depends on the thread,
because math-verify bounds its own work with `signal.alarm`, which Python allows on the main thread only
(elsewhere `signal.signal` raises ValueError). So
- on the main thread, the check runs in-process with math-verify's own limits (`parsing_timeout` of `parse`,
  `timeout_seconds` of `verify`, both `ceil(timeout_s)` whole seconds: `signal.alarm` counts whole seconds) and
  `raise_on_error=True`, so that its `TimeoutException` reaches us as `Verdict.timeout` instead of being turned
  into an empty parse or a silent `False`. These limits apply per parse and per comparison, so one check can take
  a small multiple of `timeout_s` (a parse plus a comparison, plus one reference parse per new answer string);
- off the main thread, the same check runs in a worker subprocess with math-verify's limits set to None, and the
  caller waits at most `timeout_s` seconds for the whole check. A late worker is killed, which also stops work
  stuck in C code that no signal can interrupt, and a fresh one is started for the next check. The worker is a
  fresh interpreter (`python -c`, talking over a socket pair), so it never inherits the caller's threads, locks or
  CUDA state. It is not a multiprocessing 'spawn'/'forkserver' child because those re-run the caller's `__main__`
  in the worker: a training script would be imported again, and one without an `if __name__ == "__main__"` guard
  would crash. It is started lazily and reused across checks; its startup (about half a second, mostly importing
  sympy) is not charged to any check.
Both paths run the same `_check` function, so they give the same verdicts except near the time limit. Checks from
several threads on one `MathVerifyReward` share its worker and run one at a time. The search for the last
`\\boxed{}` only looks at the final `max_completion_chars` characters, so huge completions stay fast.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import re
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from enum import Enum
from functools import lru_cache
from multiprocessing.connection import Connection
from typing import NamedTuple

from math_verify import LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

# Spawning a worker imports sympy and math-verify; on a busy machine that can take far longer than one check.
_WORKER_STARTUP_TIMEOUT_S = 120.0
_LATEX_ONLY = (LatexExtractionConfig(),)
_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
# A backslash escape such as `\{` is a literal brace in LaTeX, so it is consumed as one token and never nests.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


class Verdict(str, Enum):
    """How one completion was judged; only `correct` earns reward."""

    correct = "correct"
    wrong = "wrong"
    unparseable = "unparseable"
    timeout = "timeout"


class RewardResult(NamedTuple):
    """The verdict of one completion and its reward (1.0 for `Verdict.correct`, else 0.0)."""

    verdict: Verdict
    reward: float


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, or None if there is none or its braces never close.

    Braces nest (`\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`); escaped braces `\\{`, `\\}` are content. Runs in
    time linear in `len(text)`.
    """
    # The last `\\boxed` decides: one left without its `{` (a truncated completion) is no answer at all.
    start = text.rfind("\\boxed")
    opening = _BOXED_OPEN.match(text, start) if start >= 0 else None
    if opening is None:
        return None
    depth = 1
    for token in _BRACE_TOKEN.finditer(text, opening.end()):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return text[opening.end() : token.start()]
    return None


def _parse_boxed(content: str, op_timeout: int | None) -> list:
    return parse(
        f"\\boxed{{{content}}}",
        extraction_config=_LATEX_ONLY,
        fallback_mode="no_fallback",
        parsing_timeout=op_timeout,
        raise_on_error=True,
    )


@lru_cache(maxsize=4096)
def _parse_reference(answer: str, op_timeout: int | None) -> tuple:
    # The same reference is scored against G completions in a row; parse it once.
    return tuple(_parse_boxed(answer, op_timeout))


def _check(content: str | None, answer: str, op_timeout: int | None) -> Verdict | None:
    """Judges one final answer (None: no balanced `\\boxed{}`); returns None if the reference does not parse."""
    try:
        gold = _parse_reference(answer, op_timeout)
    except TimeoutException:
        return Verdict.timeout
    except Exception:  # latex2sympy raises many types on malformed LaTeX; all mean "does not parse"
        return None
    if not gold:
        return None
    if content is None:
        return Verdict.unparseable
    try:
        predicted = _parse_boxed(content, op_timeout)
        if not predicted:
            return Verdict.unparseable
        equal = verify(list(gold), predicted, timeout_seconds=op_timeout, raise_on_error=True)
    except TimeoutException:
        return Verdict.timeout
    except Exception:  # math-verify failing on model output is the model's answer being unusable, not a crash
        return Verdict.unparseable
    return Verdict.correct if equal else Verdict.wrong


def _serve(fd: int) -> None:
    """Body of the worker process: answers `(content, answer)` requests on socket `fd` until the caller closes it."""
    conn = Connection(fd)
    # math-verify warns once that its timeouts are disabled; here the caller enforces the deadline.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    conn.send("ready")
    while True:
        try:
            content, answer = conn.recv()
        except EOFError:
            return
        verdict = _check(content, answer, op_timeout=None)
        conn.send(None if verdict is None else verdict.value)


# Run as `python -c`: argv[1] is the socket's fd, argv[2:] the caller's sys.path. Ctrl-C reaches the whole process
# group; the caller decides what to do and the worker ends when its socket closes.
_WORKER_BOOTSTRAP = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); sys.path[:] = sys.argv[2:]; "
    "from trapo_lightning.reward import _serve; _serve(int(sys.argv[1]))"
)


@contextlib.contextmanager
def _collector_paused():
    """No garbage collection inside: an alarm that fires while the collector runs a finalizer is lost (its
    exception is swallowed as "ignored in __del__"), so math-verify's signal limit would not end the check. Seen in
    a large heap: 46 s at a 1 s limit, 1.0 s with collection paused."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class _WorkerLate(Exception):
    """The worker did not answer within the check's time limit."""


def _stop(process: subprocess.Popen, conn: Connection) -> None:
    process.kill()
    process.wait()
    conn.close()


class _Worker:
    """A worker process running `_check`; the caller enforces each deadline by killing it."""

    def __init__(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        with child_sock:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOTSTRAP, str(child_sock.fileno()), *sys.path],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        self._conn = Connection(parent_sock.detach())
        # Also runs at interpreter exit, so a worker busy with a check never outlives its caller.
        self._finalizer = weakref.finalize(self, _stop, self._process, self._conn)
        try:
            ready = self._conn.poll(_WORKER_STARTUP_TIMEOUT_S) and self._conn.recv() == "ready"
        except EOFError:
            ready = False
        if not ready:
            self._finalizer()
            raise RuntimeError(
                f"the math-verify reward worker did not start within {_WORKER_STARTUP_TIMEOUT_S:.0f} s "
                f"(exit code {self._process.returncode})"
            )

    def is_alive(self) -> bool:
        return self._process.poll() is None

    def check(self, content: str | None, answer: str, timeout_s: float) -> Verdict | None:
        """`_check` in the worker; raises `_WorkerLate` past `timeout_s` and EOFError if the worker died."""
        self._conn.send((content, answer))
        if not self._conn.poll(timeout_s):
            raise _WorkerLate
        code = self._conn.recv()
        return None if code is None else Verdict(code)

    def close(self) -> None:
        self._finalizer()


class MathVerifyReward:
    """Binary reward of TRAPO: math-verify on the last `\\boxed{}` of a completion against the reference answer.

    Safe to call from any thread; see the module docstring for how each check's time is bounded.
    """

    reward_range = (0.0, 1.0)
    """Every reward is 0 or 1: sampling may settle later micro-groups' guidance early (`sampling`)."""

    def __init__(self, timeout_s: float = 5.0, max_completion_chars: int = 20000, isolate: bool = True) -> None:
        """
        Args:
            timeout_s: Time limit of one check in seconds; a check that exceeds it gets `Verdict.timeout` (reward
                0, counted apart). In the worker it is a hard limit on the whole check; in-process (main thread,
                `isolate: false`) it is math-verify's own per-parse and per-comparison limit, in whole seconds.
            max_completion_chars: Only this many trailing characters of a completion are searched for the final
                `\\boxed{...}`, which keeps huge completions fast; a final answer that starts before them is
                unparseable.
            isolate: Run every check in the worker process, so the time limit is hard in any thread (about 0.5 ms
                per check of overhead). False checks in-process on the main thread, with math-verify's signal
                limits: about 4x faster per check, but a check stuck in C code or slowed by the garbage collector
                of a large training process can overrun them (seen: 23 s at a 1 s limit with the test suite's heap).
        """
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
            raise ValueError(f"timeout_s must be a number of seconds, got {timeout_s!r}")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
        if isinstance(max_completion_chars, bool) or not isinstance(max_completion_chars, int):
            raise ValueError(f"max_completion_chars must be an int, got {max_completion_chars!r}")
        if max_completion_chars <= 0:
            raise ValueError(f"max_completion_chars must be > 0, got {max_completion_chars}")
        self.timeout_s = float(timeout_s)
        self.max_completion_chars = max_completion_chars
        self.isolate = isolate
        self._signal_timeout = math.ceil(self.timeout_s)
        self._worker: _Worker | None = None
        self._worker_lock = threading.Lock()

    def __call__(self, completions: Sequence[str], answers: Sequence[str]) -> list[RewardResult]:
        """Scores `completions[i]` against `answers[i]`."""
        if len(completions) != len(answers):
            raise ValueError(f"got {len(completions)} completions but {len(answers)} answers")
        return [self.score(completion, answer) for completion, answer in zip(completions, answers)]

    def score(self, completion: str, answer: str) -> RewardResult:
        """Scores one completion; raises ValueError if `answer` itself cannot be parsed by math-verify."""
        verdict = self._judge(last_boxed(completion[-self.max_completion_chars :]), answer)
        if verdict is None:
            raise ValueError(f"math-verify cannot parse the reference answer {answer!r} (as \\boxed{{{answer}}})")
        return RewardResult(verdict, 1.0 if verdict is Verdict.correct else 0.0)

    def reference_problem(self, answer: str) -> str | None:
        """Why no completion could ever be graded against `answer`, or None if it parses. The reference's parse
        of `score`, on the same path with the same time bound: a data source calls it when loading, so an answer
        accepted there is one the reward can grade."""
        verdict = self._judge(None, answer)  # no completion: `_check` parses only the reference
        if verdict is None:
            return "math-verify cannot parse it or finds no expression in it (read inside \\boxed{})"
        if verdict is Verdict.timeout:
            return f"math-verify did not parse it within {self.timeout_s:g} s"
        return None

    def _judge(self, content: str | None, answer: str) -> Verdict | None:
        if not self.isolate and threading.current_thread() is threading.main_thread():
            with _collector_paused():
                return _check(content, answer, self._signal_timeout)
        return self._check_in_worker(content, answer)

    def _check_in_worker(self, content: str | None, answer: str) -> Verdict | None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = _Worker()
            try:
                return self._worker.check(content, answer, self.timeout_s)
            except _WorkerLate:
                self._discard_worker()
                return Verdict.timeout
            except (EOFError, OSError):
                # The worker died on this input (e.g. a C-level crash inside sympy): the answer is unusable.
                self._discard_worker()
                return Verdict.unparseable

    def _discard_worker(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def close(self) -> None:
        """Stops the worker process, if one was started; a later off-main-thread check starts a new one."""
        with self._worker_lock:
            self._discard_worker()

    def __getstate__(self) -> dict:
        # A process and a lock do not pickle (ddp_spawn, deepcopy); the copy starts its own worker when needed.
        state = self.__dict__.copy()
        state["_worker"] = None
        del state["_worker_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._worker_lock = threading.Lock()


def verdict_counts(results: Sequence[RewardResult]) -> dict[str, int]:
    """Number of results per verdict, with a key (the verdict's value) for every verdict, zeros included."""
    counts = dict.fromkeys((verdict.value for verdict in Verdict), 0)
    for result in results:
        counts[result.verdict.value] += 1
    return counts
