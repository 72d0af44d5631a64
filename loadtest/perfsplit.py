"""Where a server's CPU goes, from a `perf record -g` of it (`python -m loadtest.fanout --perf`):
user space by library, and the kernel by what its syscalls do. On loopback a write does the
sender's TCP send, then (in a softirq, in the writer's own context) the reader's TCP receive,
then wakes the reader; each is counted apart.

    python -m loadtest.perfsplit loadtest/results/logs-*/S1-proxy/perf.data
"""

from __future__ import annotations

import collections
import subprocess
import sys

_WRITE = {"ksys_write", "do_writev", "__sys_sendto", "__sys_sendmsg"}
_WAKE = {"sock_def_readable", "ep_poll_callback", "try_to_wake_up", "__wake_up_sync_key"}
_RECEIVE = {"tcp_v4_rcv", "process_backlog", "net_rx_action", "ip_local_deliver"}
_READ = {"ksys_read", "__sys_recvfrom", "do_readv"}
_EPOLL = {"do_epoll_wait", "__x64_sys_epoll_wait", "__x64_sys_epoll_pwait"}
_LIBRARIES = ("uvloop", "picows", "_codec", "orjson", "libpython", "python", "libc")


def category(frames: list[str]) -> str:
    leaf = frames[0]
    if "kernel" not in leaf:
        library = next((name for name in _LIBRARIES if name in leaf), "other")
        return f"user: {'python' if library == 'libpython' else library}"
    symbols = {f.split()[1] for f in frames if len(f.split()) > 1}
    if symbols & _WRITE:
        if symbols & _WAKE:
            return "kernel, write: waking the reader"
        if symbols & _RECEIVE:
            return "kernel, write: the reader's TCP receive (softirq)"
        return "kernel, write: the send path"
    if symbols & _READ:
        return "kernel: read"
    if symbols & _EPOLL:
        return "kernel: epoll_wait"
    return "kernel: other"


def split(path: str) -> dict[str, float]:
    out = subprocess.run(
        ["perf", "script", "-i", path, "-F", "ip,sym,dso"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts: collections.Counter[str] = collections.Counter()
    for sample in out.strip().split("\n\n"):
        frames = [line.strip() for line in sample.splitlines() if line.strip()]
        if frames:
            counts[category(frames)] += 1
    total = sum(counts.values()) or 1
    return {name: counts[name] / total for name in sorted(counts)}


def main(argv: list[str] | None = None) -> int:
    for path in argv or sys.argv[1:]:
        print(path)
        for name, share in split(path).items():
            print(f"  {share * 100:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
