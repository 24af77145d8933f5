"""tests/cli.py's `run_main` (a command forked from tests/forkserver.py) gives what a fresh
`python main.py` process gives: the same exit status and the same output, on the simulated
devices the command asks for."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests import cli


def _untimed(text: str) -> str:
    return re.sub(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\]", "[time]", text, flags=re.M)  # log lines' stamps


@pytest.mark.parametrize("args, devices", [
    (["+run=teacher_sft", "mesh=8gpu", "dry_run=true"], 8),  # the plan on 8 devices
    (["+run=teacher_sft", "mesh=8gpu", "dry_run=true"], 1),  # refused: 1 device visible
    (["+run=teacher_rcl", "trainer.learnig_rate=1e-5"], 1),  # a config error
])
def test_a_forked_command_is_a_fresh_process(args, devices, tmp_path):
    forked = cli.run_main(args, cwd=tmp_path, devices=devices)
    fresh = subprocess.run([sys.executable, str(cli.ROOT / "main.py"), *args], cwd=tmp_path, env=cli.env(devices),
                           capture_output=True, text=True, timeout=300)
    assert cli._server() is not None  # the command was forked, not run as a subprocess
    same = lambda r: (r.returncode, _untimed(r.stdout), _untimed(r.stderr))  # noqa: E731
    assert same(forked) == same(fresh)
    assert forked.returncode == (0 if devices == 8 else 2)


def test_an_environment_the_server_cannot_give_runs_as_a_subprocess(tmp_path):
    """A JAX_ variable the preloaded jax read at import: not forked, and it takes effect."""
    result = cli.run_main(["+run=teacher_sft", "mesh=8gpu", "dry_run=true"], cwd=tmp_path, devices=8,
                          env_extra={"JAX_PLATFORMS": "nope"})
    assert result.returncode != 0 and "nope" in result.stdout + result.stderr
