"""The one subprocess wrapper: argument lists only, logged, failures reported once."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

from .errors import ToolError

log = logging.getLogger(__name__)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    stdin: int | None = subprocess.DEVNULL,
    capture: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` (never through a shell).

    With ``check`` a non-zero exit raises ``ToolError`` naming the command and
    the last line it wrote to stderr; with ``capture`` stdout and stderr are
    returned instead of passed through.  A command still running after
    ``timeout`` seconds is killed and ``subprocess.TimeoutExpired`` raised.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("running %s", shlex.join(args))
    try:
        result = subprocess.run(
            args,
            check=False,
            stdin=stdin,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if (capture or check) else None,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
        )
    except OSError as exc:
        raise ToolError(f"cannot run {args[0]}: {exc.strerror}") from exc
    if check and result.returncode != 0:
        raise ToolError(f"{shlex.join(args)} failed with exit code {result.returncode}: {_last_line(result.stderr)}")
    return result


def _last_line(data: bytes | None) -> str:
    lines = (data or b"").decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "(no message)"
