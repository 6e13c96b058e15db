"""The pipelines' command lines: an expected failure is one line, ``error: ...``, and exit code 2.

A user who mistypes a path or points at a dead tracking server should read what to fix, not a
traceback (or, after Ray started, a page of Ray's log). Every ``python -m pipelines.<name>`` wraps
its ``main`` in ``run_main``, which turns the project's expected errors into that one line:

- ``SpecError`` (a spec, override or YAML file), ``TaskDataError`` (an eval task's data),
  ``CorpusError`` (a corpus line, an empty corpus), ``DatasetError`` (a dataset file that
  does not match its manifest), ``FileNotFoundError`` (an input path),
  ``CheckpointError`` / ``ConfigError`` (a missing or damaged checkpoint), ``TrackingUnreachable``;
- the same errors raised in a Ray worker and re-raised in the driver wrapped by Ray
  (``RayTaskError``, Train's ``WorkerGroupError``): the wrapper is opened and the cause reported.

Anything else is a bug and keeps its traceback. ``--debug`` (anywhere on the command line) or
``AUNET_DEBUG=1`` prints the traceback of an expected error too, before its line.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "AUNET_DEBUG"
MAX_CHARS = 600  # a third-party message (torch's unpickler, YAML's marks) can run to a page


def expected_types() -> tuple[type[BaseException], ...]:
    """The errors a user can cause and fix; imported when needed (the CLI starts without torch)."""
    from aunet.checkpoint import CheckpointError
    from aunet.config import ConfigError
    from pipelines.corpus import CorpusError
    from pipelines.data import DatasetError
    from pipelines.eval_tasks import TaskDataError
    from pipelines.runtime import TrackingUnreachable
    from pipelines.schema import SpecError

    return (
        SpecError,
        CorpusError,
        DatasetError,
        TaskDataError,
        CheckpointError,
        ConfigError,
        TrackingUnreachable,
        FileNotFoundError,
    )


def _wrapped(e: BaseException) -> list[BaseException]:
    """The exceptions ``e`` carries: Ray's ``cause``, Train's worker and controller failures, and
    Python's chain."""
    inner = [getattr(e, "cause", None), getattr(e, "controller_failure", None)]
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict):
        inner += list(failures.values())
    inner += [e.__cause__, e.__context__]
    return [x for x in inner if isinstance(x, BaseException)]


def _from_ray(e: BaseException) -> bool:
    # Ray's RayTaskError(SpecError) is also a SpecError, but its str() is the remote traceback.
    return type(e).__module__.split(".")[0] == "ray"


def expected_error(
    e: BaseException, extra: Sequence[type[BaseException]] = ()
) -> BaseException | None:
    """The expected error ``e`` is, or the one a Ray wrapper (or an exception chain) carries."""
    types = (*expected_types(), *extra)
    todo, seen = [e], set()
    while todo:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, types) and not _from_ray(x):
            return x
        todo += _wrapped(x)
    return None


def one_line(message: str) -> str:
    """``message`` on one line (whitespace runs collapsed), cut at ``MAX_CHARS``."""
    text = " ".join(str(message).split())
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (not as the value of a ``--set``), and whether it was there."""
    args, out, debug = list(argv), [], os.environ.get(DEBUG_ENV, "") not in ("", "0")
    for i, arg in enumerate(args):
        if arg == DEBUG_FLAG and (i == 0 or args[i - 1] != "--set"):
            debug = True
        else:
            out.append(arg)
    return out, debug


def run_main(
    fn: Callable[[list[str]], int],
    argv: Sequence[str] | None = None,
    extra: Sequence[type[BaseException]] = (),
) -> int:
    """``fn(argv)``; an expected error (or one of ``extra``) -> ``error: <one line>``, 2."""
    args, debug = split_debug(sys.argv[1:] if argv is None else argv)
    try:
        return fn(args)
    except Exception as e:
        found = expected_error(e, extra)
        if found is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(str(found))}", file=sys.stderr, flush=True)
        return 2
