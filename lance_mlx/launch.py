"""`lance-mlx-launch`: MLX's own launcher (`mlx.launch`) with its hosts checked first and an exit status that says
whether every rank succeeded."""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence

from .errors import InvalidRequestError

PROG = "lance-mlx-launch"

# mlx.launch (MLX 0.32, mlx/_distributed_utils/launch.py) logs a failed rank as "Node with rank R exited with
# code C" or "Node with rank R was killed", stops the other ranks, and still exits 0.
_FAILED_RANK = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
# mlx.launch runs a rank on this machine only when its host is exactly this address (RemoteProcess.__init__);
# every other host is reached with `ssh -tt -o LogLevel=QUIET HOST`, which exits 255 and says nothing when the
# connection fails.
LOCAL_HOST = "127.0.0.1"
SSH_FAILED = 255
# The backends mlx.launch knows (launch.py::main).
BACKENDS = ("ring", "mpi", "nccl", "jaccl", "jaccl-ring")
SSH_TIMEOUT_S = 5  # a reachable Mac on the local network answers well within this

_HOSTFILE_FORMAT = ('a JSON list of hosts, e.g. [{"ssh": "mac1.local", "ips": ["192.168.1.10"]}, ...], or an object '
                    'with such a "hosts" list (docs/distributed.md)')


class LaunchError(InvalidRequestError):
    """A host file or host list that cannot launch anything (reported in one line, exit 2)."""


def launch_status(log_line: str, status: int) -> int:
    """The status after one line of the launcher's log: the first failed rank's exit code (1 if it was killed)."""
    m = _FAILED_RANK.search(log_line)
    if status or m is None:
        return status
    code = int(m.group(2)) if m.group(2) is not None else 1
    return code if 0 < code < 256 else 1


def _parse_hosts_options(argv: Sequence[str]) -> argparse.Namespace:
    """The options of `mlx.launch` that name the hosts (the others are left to it)."""
    p = argparse.ArgumentParser(prog=PROG, add_help=False)
    for flag in ("--hostfile", "--hosts", "--backend"):
        p.add_argument(flag)
    p.add_argument("-n", "--repeat-hosts", default="1")
    p.add_argument("--print-python", action="store_true")
    p.add_argument("-h", "--help", action="store_true")
    return p.parse_known_args(list(argv))[0]


def read_hostfile(path) -> tuple:
    """(ssh names, ips per host, backend) of an `mlx.launch` host file, or LaunchError saying what is wrong."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LaunchError(f"host file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LaunchError(f"cannot read the host file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise LaunchError(f"host file {path} is not valid JSON ({e}); it must be {_HOSTFILE_FORMAT}") from None
    backend = data.get("backend", "") if isinstance(data, dict) else ""
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not isinstance(backend, str):
        raise LaunchError(f"host file {path} holds {type(data).__name__}; it must be {_HOSTFILE_FORMAT}")
    if not hosts:
        raise LaunchError(f"host file {path} lists no hosts; it must be {_HOSTFILE_FORMAT}")
    names, ips = [], []
    for i, h in enumerate(hosts):
        if not (isinstance(h, dict) and isinstance(h.get("ssh"), str) and h["ssh"].strip()):
            raise LaunchError(f"host file {path}: host {i} ({json.dumps(h)[:80]}) has no \"ssh\" name; each host "
                              'is an object like {"ssh": "mac1.local", "ips": ["192.168.1.10"]}')
        host_ips = h.get("ips", [])
        if not (isinstance(host_ips, list) and all(isinstance(a, str) and a for a in host_ips)):
            raise LaunchError(f"host file {path}: host {i} ({h['ssh']}) has \"ips\" {json.dumps(host_ips)[:80]}; it "
                              'must be a list of addresses, e.g. ["192.168.1.10"]')
        names.append(h["ssh"])
        ips.append(host_ips)
    return names, ips, backend


def probe_host(host: str) -> Optional[str]:
    """None when `ssh HOST` logs in without a password within SSH_TIMEOUT_S, else ssh's own reason."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", host, "true"]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                           timeout=3 * SSH_TIMEOUT_S)
    except FileNotFoundError:
        return "no ssh client is installed"
    except subprocess.TimeoutExpired:
        return f"no answer within {3 * SSH_TIMEOUT_S} s"
    if r.returncode == 0:
        return None
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else f"ssh exited with code {r.returncode}"


def check_hosts(argv: Sequence[str]) -> List[str]:
    """The hosts of a launch's arguments, checked: a readable, non-empty host file (or --hosts list) whose remote
    hosts answer over ssh. Raises LaunchError naming the first problem."""
    opts = _parse_hosts_options(argv)
    if opts.backend is not None and opts.backend not in BACKENDS:
        raise LaunchError(f"unknown --backend {opts.backend!r}: use one of {', '.join(BACKENDS)}")
    if opts.hostfile is not None:
        names, ips, backend = read_hostfile(opts.hostfile)
        if backend and opts.backend is None and backend not in BACKENDS:
            raise LaunchError(f"host file {opts.hostfile} names the unknown backend {backend!r}: use one of "
                              f"{', '.join(BACKENDS)}")
        if (opts.backend or backend or "ring") == "ring" and len(names) > 1:
            no_ips = [n for n, a in zip(names, ips) if not a]
            if no_ips:
                raise LaunchError(f"host file {opts.hostfile}: {', '.join(no_ips)} list(s) no \"ips\"; the ring "
                                  'backend connects the ranks by IP address: add "ips": ["ADDRESS"] to each host')
    else:
        listed = (opts.hosts if opts.hosts is not None else LOCAL_HOST).split(",")
        if not all(n.strip() for n in listed):
            raise LaunchError(f"--hosts {opts.hosts!r} has an empty host name; give a comma-separated list, e.g. "
                              "--hosts 192.168.1.10,192.168.1.11")
        repeats = int(opts.repeat_hosts) if opts.repeat_hosts.isdigit() and int(opts.repeat_hosts) > 0 else 1
        names = [n for n in listed for _ in range(repeats)]  # rank i runs on names[i], as mlx.launch assigns them
    remote = sorted({n for n in names if n != LOCAL_HOST})
    if remote:
        with ThreadPoolExecutor(max_workers=min(8, len(remote))) as pool:
            reasons = dict(zip(remote, pool.map(probe_host, remote)))
        bad = [(h, why) for h, why in reasons.items() if why is not None]
        if bad:
            host, why = bad[0]
            raise LaunchError(f"cannot reach {host} over ssh ({why}); every rank starts with `ssh {host}`: check the "
                              "name, that Remote Login is on there and that `ssh " + host + "` logs in without a "
                              "password" + (f" (also unreachable: {', '.join(h for h, _ in bad[1:])})" if bad[1:]
                                            else ""))
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check the hosts, run `mlx.launch ARGV` (the same arguments), pass its output through, and exit non-zero when
    a rank failed; a host file or host that cannot work exits 2 with one line and launches nothing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = _parse_hosts_options(argv)
    hosts: List[str] = []
    if not (opts.help or opts.print_python):
        try:
            hosts = check_hosts(argv)
        except LaunchError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
    # the launcher's argparse names itself after sys.argv[0], which is "-c" under `python -c`
    cmd = [sys.executable, "-c", f"import sys; sys.argv[0] = {PROG!r}; "
           "from mlx._distributed_utils.launch import main; sys.exit(main())", *argv]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    forward = lambda signum, frame: proc.send_signal(signum)  # the launcher stops its ranks on SIGINT / SIGTERM
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    status, lost = 0, None
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            status = launch_status(line, status)
            m = _FAILED_RANK.search(line)
            if lost is None and m and m.group(2) == str(SSH_FAILED):
                lost = int(m.group(1))
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if lost is not None and lost < len(hosts) and hosts[lost] != LOCAL_HOST:
        print(f"{PROG}: rank {lost} on {hosts[lost]} exited with code {SSH_FAILED}: the ssh connection to it failed "
              f"or dropped; check that `ssh {hosts[lost]}` works", file=sys.stderr)
    return code or status


if __name__ == "__main__":
    sys.exit(main())
