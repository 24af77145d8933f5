"""A fork server for the suite's `python main.py` children (tests/cli.py: `run_main`).

A dry run or a config error takes about 5 s as a fresh process, 4 of them importing jax,
flax and the rest; tests/test_docs_configuration.py alone starts some forty such children.
This process imports those third-party libraries once and forks a child per command. The
child takes the command's working directory, environment, argv and output files, then runs
main.py as `python main.py` would (`__main__`, atexit handlers, exit status); atlas_jax and
main.py are imported fresh in every child, so the project's own import-time code runs as in
a new process. XLA reads XLA_FLAGS when a backend starts, which no library does at import
(checked below), so each child's simulated device count and compile flags apply.

What a preloaded library reads from the environment at import is fixed at the server's
values: `run_main` forks only for commands whose variables under SHARED_ENV equal the
server's, and starts a plain subprocess otherwise.

Protocol, one connection per command: the client sends one JSON line {args, cwd, env,
stdout, stderr}; the server answers the child's pid, then its exit status (negative: the
signal that ended it), one line each.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import runpy
import signal
import socket
import sys

MAIN = pathlib.Path(__file__).resolve().parents[1] / "main.py"
PRELOADED = ("numpy", "jax", "jax.numpy", "flax.nnx", "optax", "orbax.checkpoint", "qwix", "hydra", "omegaconf")
SHARED_ENV = ("JAX_", "HF_", "TOKENIZERS_", "TRANSFORMERS_", "PYTHON")  # read by the preloaded imports


def serve(path: str) -> None:
    for name in PRELOADED:
        importlib.import_module(name)
    from jax._src import xla_bridge
    assert not xla_bridge.backends_are_initialized(), "a preloaded import started a jax backend"
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.settimeout(5.0)
    parent = os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:  # the client (a pytest process) is gone: stop
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            listener.close()
            _handle(conn)  # returns only in the command's child
            return
        conn.close()
    sys.exit(0)


def _handle(conn: socket.socket) -> None:
    """Forks the command's child and reports its pid and exit status; in the child, returns."""
    request = json.loads(conn.makefile().readline())
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become(request)
        return
    conn.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def _become(request: dict) -> None:
    """This process turns into `python main.py ARGS` run from request['cwd']."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, name in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
        target = os.open(name, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [str(MAIN), *request["args"]]
    sys.path[0] = str(MAIN.parent)


if __name__ == "__main__":
    serve(sys.argv[1])
    # only a command's child gets here: run main.py as the interpreter would, then exit
    # through the interpreter (SystemExit's status, atexit handlers, flushed streams)
    runpy.run_path(str(MAIN), run_name="__main__")
