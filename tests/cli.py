"""The environment of the suite's command-line children (`python main.py`, the launchers,
the benches): CPU, offline, the simulated devices they ask for, and the session's XLA
compile flags and compilation cache (tests/conftest.py); and `run_main`, which runs a
`python main.py` command through tests/forkserver.py where it can."""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
_lock = threading.Lock()
_servers: dict[int, "_ForkServer | None"] = {}  # per process (pytest worker): its fork server

# For the suite only (users' runs keep XLA's defaults): XLA:CPU's fusion emitters off and its
# LLVM backend at optimisation level 0. The suite is compile-bound, its programs tiny: the
# emitters flag compiles about 35% faster (the tiny model's SFT step and AdamW: 2.05 -> 1.26 s)
# and runs 6-10% slower (175 -> 186 ms a step); level 0 on top took tests/models/test_decoder.py
# from 80 to 29 s and tests/recipes/test_teacher_rcl.py + tests/rl/test_policy.py from 127 to
# 75 s (`-n 0`, Intel Xeon, 2026-12-03), every tolerance still met. A run of hundreds of steps
# is the exception: the quickstart student's 300 took 170 s with XLA's defaults and 480 s at
# level 0, so such a run goes to a child with `env(long_run=True)`.
COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"


def xla_flags(devices: int, *, long_run: bool = False) -> str:
    return f"--xla_force_host_platform_device_count={devices}" + ("" if long_run else f" {COMPILE_FLAGS}")


def env(devices: int = 1, *, compilation_cache: bool = True, long_run: bool = False) -> dict:
    """The session's environment for a child on `devices` simulated CPU devices. The session's
    own XLA_/JAX_ settings go, except its compilation cache, which the child shares unless
    `compilation_cache` is False (JAX_PERSISTENT_CACHE_* stay either way). A `long_run` child
    (hundreds of steps) compiles with XLA's defaults, whose programs run faster."""
    keep = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE") if compilation_cache else ("JAX_PERSISTENT_CACHE",)
    child = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_")) or k.startswith(keep)}
    child.update(XLA_FLAGS=xla_flags(devices, long_run=long_run), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                 TOKENIZERS_PARALLELISM="false")
    return child


def run_main(args: list[str], *, cwd, devices: int = 1, env_extra: dict | None = None,
             timeout: float = 400) -> subprocess.CompletedProcess:
    """`python main.py ARGS` from `cwd` on `devices` simulated devices, as subprocess.run with
    capture_output=True, text=True returns it. Forked from tests/forkserver.py (imports done
    once) when the command's environment allows it, else a plain subprocess."""
    child_env = {**env(devices), **(env_extra or {})}
    main = [sys.executable, str(ROOT / "main.py"), *args]
    server = _server()
    if server is None or _shared(child_env) != server.env:
        return subprocess.run(main, cwd=cwd, env=child_env, capture_output=True, text=True, timeout=timeout)
    return server.run(args, cwd, child_env, timeout, main)


def _shared(child_env: dict) -> dict:
    from tests.forkserver import SHARED_ENV
    return {k: v for k, v in child_env.items() if k.startswith(SHARED_ENV)}


def _server() -> "_ForkServer | None":
    """This process's fork server, started on first use (None where it cannot start)."""
    with _lock:
        if os.getpid() not in _servers:
            try:
                _servers[os.getpid()] = _ForkServer()
            except (OSError, RuntimeError):
                _servers[os.getpid()] = None
        return _servers[os.getpid()]


class _ForkServer:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="atlas_jax_forks_")
        self.socket = os.path.join(self.dir, "socket")
        server_env = env(1)
        self.env = _shared(server_env)
        self.process = subprocess.Popen([sys.executable, "-m", "tests.forkserver", self.socket], cwd=ROOT,
                                        env=server_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            self.process.kill()
            raise RuntimeError("tests/forkserver.py did not start")
        atexit.register(self.close)

    def run(self, args, cwd, child_env, timeout, main) -> subprocess.CompletedProcess:
        out = tempfile.NamedTemporaryFile(dir=self.dir, delete=False).name
        err = tempfile.NamedTemporaryFile(dir=self.dir, delete=False).name
        request = dict(args=list(args), cwd=str(cwd), env=child_env, stdout=out, stderr=err)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(timeout)
                conn.connect(self.socket)
                conn.sendall((json.dumps(request) + "\n").encode())
                reply = conn.makefile()
                pid = int(reply.readline())
                try:
                    status = reply.readline()
                except TimeoutError:
                    os.kill(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired(main, timeout) from None
                if not status:
                    raise RuntimeError(f"tests/forkserver.py lost the child of {args}")
            return subprocess.CompletedProcess(main, int(status), pathlib.Path(out).read_text(),
                                               pathlib.Path(err).read_text())
        finally:
            for name in (out, err):
                os.unlink(name)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
