"""Host memory: transparent huge pages for the large buffers XLA:CPU allocates every step.

XLA:CPU takes each execution's temporaries from malloc (qwen3_33m's SFT step: 1.25 GiB) and
frees them after it. glibc serves blocks that large with a fresh mmap and returns them with
munmap, so the kernel faults every 4 KiB page of that memory in again on every step (about
340k faults a step there). glibc >= 2.35 can advise those mappings to use transparent huge
pages (its tunable `glibc.malloc.hugetlb=1`; 2 MiB pages, 512x fewer faults and TLB entries),
but it reads tunables only when a process starts, so `use_huge_pages()` re-executes the
process once with the tunable set. main.py does so for a run whose `huge_pages` is true.

It is a per-run choice because it does not help every workload (2-core AMD EPYC VM,
2026-12-08): the SFT step got 7-16% faster (bench/sft_step.py, qwen3_33m, 8 x 256 and
4 x 512, interleaved pairs), so run/teacher_sft.yaml turns it on; the GRPO update got ~10%
slower (bench/grpo_step.py --lengths varied, 5 interleaved pairs: 5.2-5.5 s vs 4.6-4.9 s,
with twice the kernel time, most of it clearing huge pages: perf put clear_page at 12% of
samples vs 1%), so RL runs keep glibc's default. A user's own `glibc.malloc.hugetlb` in
GLIBC_TUNABLES (0 turns it off) is kept; systems without glibc >= 2.35, or whose kernel has
THP off, are left alone.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
    """The kernel's transparent-huge-page mode (always / madvise / never), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.find("[") + 1:text.find("]")] if "[" in text else None


def huge_pages_environment(environ: Mapping[str, str], libc: tuple[str, str], mode: Optional[str]) -> Optional[dict]:
    """The environment to re-execute with, or None where it would change nothing."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables or mode not in ("always", "madvise"):
        return None
    name, version = libc
    if name != "glibc" or tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (2, 35):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def started_as_script(script: str) -> bool:
    """Whether this process's own command line ran `script` (`python [flags] SCRIPT ...`), so
    re-executing it repeats this run; not so under a fork server, runpy, -m, -c or a test."""
    path = os.path.abspath(script)
    return any(os.path.abspath(arg) == path for arg in sys.orig_argv[1:])


def use_huge_pages(script: str) -> None:
    """Re-execute this process, started as `python SCRIPT ...`, with glibc's huge-page tunable
    set, where it is not yet and can take effect (Linux, glibc >= 2.35, THP not off). Call
    before any work: it does not return when it re-executes; argv, interpreter flags and the
    rest of the environment are kept."""
    if not sys.platform.startswith("linux") or not started_as_script(script):
        return
    env = huge_pages_environment(os.environ, platform.libc_ver(), thp_mode())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
