"""`lance-mlx-launch`: MLX's own launcher (`mlx.launch`) with an exit status that says whether every rank succeeded."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from typing import Optional, Sequence

# mlx.launch (MLX 0.32, mlx/_distributed_utils/launch.py) logs a failed rank as "Node with rank R exited with
# code C" or "Node with rank R was killed", stops the other ranks, and still exits 0.
_FAILED_RANK = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


def launch_status(log_line: str, status: int) -> int:
    """The status after one line of the launcher's log: the first failed rank's exit code (1 if it was killed)."""
    m = _FAILED_RANK.search(log_line)
    if status or m is None:
        return status
    code = int(m.group(2)) if m.group(2) is not None else 1
    return code if 0 < code < 256 else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `mlx.launch ARGV` (the same arguments), pass its output through, and exit non-zero when a rank failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())",
           *argv]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    forward = lambda signum, frame: proc.send_signal(signum)  # the launcher stops its ranks on SIGINT / SIGTERM
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            status = launch_status(line, status)
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code or status


if __name__ == "__main__":
    sys.exit(main())
