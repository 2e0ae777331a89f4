"""TEST-ONLY fault injection: stop, interrupt or pause apppot-snap at an exact point.

``APPPOT_TEST_FAULT=POINT:N:ACTION`` (read here and nowhere else) acts when the
process reaches ``POINT`` for the N-th time (counting from 1).  POINTs are
named where the code calls ``reached()``: ``rename`` (each rename that makes a
file visible: a merged entry, a manifest, a delta), ``write`` (each write to
a delta being made), ``locked`` (the root's lock was just taken), ``scanned``
(the walk has listed the root; no file was read yet: walking and reading then
go on together), ``stage`` (a merge is
about to stage a file's content), ``staged`` (a merge checked and staged
everything and is about to change the root).  ACTIONs:

- ``kill``: SIGKILL, as a crash or the OOM killer would;
- ``int``: SIGINT to the process itself, as Ctrl-C would;
- ``pause:FIFO``: open the named pipe FIFO for reading (which returns once the
  test opens it for writing: the test then knows the process is at the point),
  then wait until the test closes its end.

Nothing here is for users; unset, it costs one comparison per point.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("APPPOT_TEST_FAULT") or None
_counts: dict[str, int] = {}


def reached(point: str) -> None:
    """Called at each named point; acts only when APPPOT_TEST_FAULT names this point and count."""
    if _SPEC is None:
        return
    name, _, rest = _SPEC.partition(":")
    if name != point:
        return
    nth, _, action = rest.partition(":")
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != int(nth):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "int":
        os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at the next bytecode
    elif action.startswith("pause:"):
        fd = os.open(action.partition(":")[2], os.O_RDONLY)
        try:
            while os.read(fd, 4096):
                pass
        finally:
            os.close(fd)
    else:
        raise ValueError(f"APPPOT_TEST_FAULT: unknown action {action!r}")
