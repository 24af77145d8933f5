"""bench/accelerator_check.py --dry: the one prepared accelerator check runs end to end on
CPU (tiny model, tiny sizes) and writes a summary with every section."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "tests", "attention", "sft_step", "generate", "memory")


def test_dry_run_writes_every_section(tmp_path):
    done = subprocess.run([sys.executable, "bench/accelerator_check.py", "--dry", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert tuple(summary) == SECTIONS
    failed = {name: s.get("error") or s.get("log_tail") for name, s in summary.items() if s["status"] != "ok"}
    assert not failed, failed  # on CPU every part runs
    assert summary["tests"]["passed"] >= 1 and summary["tests"]["failed"] == 0
    assert summary["attention"]["attention_path"] == "xla"
    assert summary["sft_step"]["tokens_per_s"] > 0 and summary["generate"]["decode_tokens_per_s"] > 0
    assert 0 < summary["generate"]["bandwidth_share"]
    assert summary["memory"]["plan_bytes"]["total"] > 0
    markdown = (tmp_path / "summary.md").read_text()
    assert markdown.startswith("# Accelerator check") and all(f"| {name} | ok |" in markdown for name in SECTIONS)
