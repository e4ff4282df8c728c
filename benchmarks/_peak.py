"""Run a module or script as ``python -m`` / ``python`` would, and write this process's peak resident memory
(VmHWM, MiB) to a file when it exits.

    python benchmarks/_peak.py OUT.txt -m rclip_cli.main zeroshot ...
    python benchmarks/_peak.py OUT.txt script.py args...

Why not ``wait4``'s ``ru_maxrss``: Linux carries a process's high-water mark across ``exec``, so a child forked from
a large benchmark process reports at least the parent's memory. VmHWM belongs to the new address space alone.
"""

import atexit
import runpy
import sys

from _common import peak_rss_mib


def main() -> None:
    out, rest = sys.argv[1], sys.argv[2:]
    atexit.register(lambda: open(out, "w").write(f"{peak_rss_mib():.1f}\n"))
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
