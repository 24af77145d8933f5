"""atlas_jax/hostmem.py: when a script (main.py for a run with huge_pages) re-executes with
glibc's huge-page tunable, and that the re-executed process keeps its argv and environment
and gets huge pages for malloc."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from atlas_jax import hostmem
from tests import cli

GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize("environ, libc, mode, expected", [
    ({}, GLIBC, "madvise", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "always", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", None),  # the user's own value stays
    ({}, GLIBC, "never", None),
    ({}, GLIBC, None, None),
    ({}, ("glibc", "2.31"), "madvise", None),  # before the tunable existed
    ({}, ("", ""), "madvise", None),  # musl and others
])
def test_huge_pages_environment(environ, libc, mode, expected):
    env = hostmem.huge_pages_environment({"PATH": "/bin", **environ}, libc, mode)
    if expected is None:
        assert env is None
    else:
        assert env == {"PATH": "/bin", "GLIBC_TUNABLES": expected}


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(str(path)) == "madvise"
    assert hostmem.thp_mode(str(tmp_path / "absent")) is None


PROBE = textwrap.dedent("""
    import ctypes, json, os, sys
    sys.path.insert(0, {root!r})
    from atlas_jax import hostmem
    hostmem.use_huge_pages(__file__)
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 64 << 20  # far above glibc's mmap threshold: a fresh mapping, as XLA's temporaries get
    ctypes.memset(libc.malloc(size), 1, size)
    huge_kib = next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages"))
    print(json.dumps(dict(argv=sys.argv[1:], tunables=os.environ.get("GLIBC_TUNABLES"), huge_kib=huge_kib,
                          marker=os.environ.get("PROBE_MARKER"))))
""")


def _probe(tmp_path, extra_env):
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(root=str(cli.ROOT)))
    env = {k: v for k, v in cli.env().items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, str(script), "--flag", "two words"], env={**env, **extra_env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _can_take_effect() -> bool:
    return (sys.platform.startswith("linux")
            and hostmem.huge_pages_environment({}, platform.libc_ver(), hostmem.thp_mode()) is not None)


def test_a_script_reexecutes_once_with_huge_pages_and_keeps_its_argv_and_environment(tmp_path):
    out = _probe(tmp_path, {"PROBE_MARKER": "kept"})
    assert out["argv"] == ["--flag", "two words"] and out["marker"] == "kept"
    if _can_take_effect():
        assert out["tunables"] == "glibc.malloc.hugetlb=1"
        assert out["huge_kib"] >= 32 << 10  # most of the 64 MiB block in 2 MiB pages
    else:
        assert out["tunables"] is None


def test_the_users_own_setting_is_kept(tmp_path):
    out = _probe(tmp_path, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert out["tunables"] == "glibc.malloc.hugetlb=0"
    if hostmem.thp_mode() == "madvise":  # only advised memory gets huge pages: none here
        assert out["huge_kib"] == 0


def test_reexecuted_only_where_the_command_line_ran_the_script(monkeypatch):
    main = str(cli.ROOT / "main.py")
    monkeypatch.chdir(cli.ROOT)
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "tests.forkserver", "/tmp/socket"])
    assert not hostmem.started_as_script(main)  # the suite's fork server runs main.py by runpy
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "pytest", "tests/test_memory_plan.py"])
    assert not hostmem.started_as_script(main)  # a test calling main._run
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-X", "importtime", "main.py", "+run=teacher_sft"])
    assert hostmem.started_as_script(main)


def test_main_reexecutes_before_jax_only_for_a_run_with_huge_pages(monkeypatch):
    import main
    from atlas_jax.config import compose

    calls = []

    class Stop(Exception):
        pass

    def use(script):
        calls.append(script)

    def stop(cfg):
        raise Stop

    monkeypatch.setattr(main.hostmem, "use_huge_pages", use)
    monkeypatch.setattr(main, "_use_compilation_cache", stop)  # the first step after the re-exec
    for overrides, expected in ((["+run=teacher_sft", "model=tiny"], [main.__file__]),
                                (["+run=teacher_sft", "model=tiny", "huge_pages=false"], []),
                                (["+run=teacher_rcl", "model=tiny"], [])):
        calls.clear()
        with pytest.raises(Stop):
            main._run(compose(overrides))
        assert calls == expected, overrides
