"""One accelerator check, prepared for the first GPU/TPU a session is lent (at most 8 minutes).

    python bench/accelerator_check.py --out results/accelerator     # on the lent machine
    python bench/accelerator_check.py --dry --out /tmp/accelerator   # CPU, tiny sizes, seconds
    bash bench/accelerator_check.sh                                  # the device machine's one command

Three parts, each in its own subprocess under a timeout, so a crash, a hang or an
out-of-memory in one still leaves the others' results (and is itself recorded):

  tests     `pytest -m accelerator tests/test_accelerator.py`: logits in bf16/f32, greedy
            tokens, one SFT, one GRPO and one offloaded step against a float32 CPU reference;
            the figures the tests record (errors, the attention kernel taken) come back
            through pytest's JUnit XML.
  sft_step  bench/sft_step.py on qwen3_1_7b at 4096 tokens in bf16 (micro-batch 1, remat
            save_layer_inputs): MFU; and in the same process the memory plan
            (atlas_jax/plan.py make_plan) against the measured peak (memory_stats()).
  generate  bench/generate.py at batch 64: decode tokens/s, and the share of the device's
            read bandwidth (measured here with a jitted sum) the decode steps achieve.

Writes summary.json (sections: environment, tests, attention, sft_step, generate, memory;
each with a status) and summary.md under --out, beside each part's log: six files, inside
the device tool's eight. The parent never initialises a JAX backend, so the GPU's memory is
all the parts'. --dry runs the same parts on CPU with the tiny model and tiny sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import io
import json
import os
import platform
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "tests", "attention", "sft_step", "generate", "memory")


@dataclasses.dataclass(frozen=True)
class Sizes:
    pytest_args: tuple  # the test selection
    sft_args: tuple  # bench/sft_step.py's command line
    generate_args: tuple  # bench/generate.py's command line
    bandwidth_gib: float  # array read to measure the device's bandwidth
    timeouts_s: dict  # per part; the whole run is also capped by --budget-s


FULL = Sizes(
    pytest_args=("-m", "accelerator"),
    sft_args=("--model", "qwen3_1_7b", "--length", "4096", "--batch", "8", "--micro-batch", "1",
              "--dtype", "bfloat16", "--remat", "save_layer_inputs", "--skip-torch"),
    generate_args=("--batch", "64", "--skip-torch"),
    bandwidth_gib=2.0,
    timeouts_s={"tests": 150, "sft_step": 210, "generate": 120},
)
DRY = Sizes(
    pytest_args=("-m", "accelerator", "-k", "attention"),  # one test: the record plumbing, in seconds
    sft_args=("--model", "tiny", "--length", "128", "--batch", "2", "--micro-batch", "1", "--steps", "1",
              "--dtype", "bfloat16", "--remat", "save_layer_inputs", "--skip-torch"),
    generate_args=("--batch", "2", "--prompt", "8", "--new", "32", "--reps", "1", "--skip-torch"),
    bandwidth_gib=1 / 16,
    timeouts_s={"tests": 90, "sft_step": 90, "generate": 90},
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for summary.json, summary.md and the parts' logs")
    p.add_argument("--dry", action="store_true", help="CPU, tiny model and sizes (seconds)")
    p.add_argument("--budget-s", type=float, default=480.0, help="cap on the whole run (all parts)")
    p.add_argument("--child", choices=("sft_step", "generate"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.child and not args.out:
        p.error("--out is required")
    return args


# ---------------------------------------------------------------- parent: run the parts


def run_part(name: str, cmd: list, *, env: dict, timeout_s: float, log: Path) -> dict:
    """Runs `cmd` with stdout+stderr in `log`; {status, seconds, rc, [log_tail]}, never raises."""
    start = time.monotonic()
    record = {"command": " ".join(map(str, cmd)), "timeout_s": round(timeout_s)}
    if timeout_s < 5:
        print(f"[accelerator_check] {name}: skipped (no time left)", flush=True)
        return {**record, "status": "skipped", "error": "no time left in --budget-s", "seconds": 0.0}
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
            record.update(status="ok" if rc == 0 else "failed", rc=rc)
        except subprocess.TimeoutExpired:
            record.update(status="timeout", error=f"killed after {timeout_s:.0f} s")
        except OSError as e:
            record.update(status="error", error=repr(e))
    record["seconds"] = round(time.monotonic() - start, 1)
    if record["status"] != "ok":
        record["log_tail"] = log_tail(log)
    print(f"[accelerator_check] {name}: {record['status']} in {record['seconds']} s (log {log.name})", flush=True)
    return record


def log_tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])[-3000:]


def child_env(dry: bool, *, keep_cpu: bool = False) -> dict:
    """The parts' environment. Dry: CPU only. Otherwise JAX picks the accelerator; tests also
    need the CPU backend for the reference (and tests/conftest.py pins JAX to the CPU unless
    JAX_PLATFORMS is set, so it is set, empty meaning "every backend there is")."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    platforms = env.get("JAX_PLATFORMS", "")
    if dry:
        env["JAX_PLATFORMS"] = "cpu"
        # the benches lay their mesh over every device, and the dry sizes are written for one
        # (pytest's session, which runs this too, simulates 8 CPU devices)
        env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                  env.get("XLA_FLAGS", "")).strip()
    elif keep_cpu:
        env["JAX_PLATFORMS"] = platforms if not platforms or "cpu" in platforms else f"{platforms},cpu"
    return env


def tests_part(sizes: Sizes, out: Path, timeout_s: float, dry: bool) -> tuple[dict, dict]:
    """(tests section, attention section) from pytest's run and its JUnit XML."""
    xml = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-o", "junit_family=xunit1", f"--junitxml={xml}",
           *sizes.pytest_args, "tests/test_accelerator.py"]
    record = run_part("tests", cmd, env=child_env(dry, keep_cpu=True), timeout_s=timeout_s, log=out / "tests.log")
    cases = junit_cases(xml) if xml.exists() else []
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    record.update(counts, cases=cases)
    if record["status"] == "ok" and not cases:
        record.update(status="error", error="pytest exited 0 but wrote no test cases")
    props = {k: v for c in cases for k, v in c["properties"].items()}
    keys = ("platform", "device_kind", "jax_version", "attention_path", "custom_calls", "cudnn_probe")
    attention = {k: props[k] for k in keys if k in props}
    attention["status"] = "ok" if "attention_path" in attention else "failed"
    if attention["status"] != "ok":
        attention["error"] = "the attention test recorded nothing (see the tests section)"
    return record, attention


def junit_cases(xml: Path) -> list[dict]:
    """One {name, outcome, seconds, properties[, message]} per test case of a JUnit file."""
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = next((e for e in case if e.tag in ("failure", "error")), None)
        skipped = case.find("skipped") is not None
        item = {"name": case.get("name"), "outcome": "failed" if bad is not None else
                "skipped" if skipped else "passed", "seconds": round(float(case.get("time", 0)), 2),
                "properties": {p.get("name"): p.get("value") for p in case.iter("property")}}
        if bad is not None:
            item["message"] = (bad.get("message") or "")[:500]
        cases.append(item)
    return cases


def bench_part(kind: str, args: tuple, out: Path, timeout_s: float, dry: bool, bandwidth_gib: float) -> dict:
    """One bench script, run by this file's --child mode, which adds what only the same
    process can measure (peak memory, the device's bandwidth) to the parsed table."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", kind, "--result", str(result),
               "--bandwidth-gib", str(bandwidth_gib), "--", *args]
        record = run_part(kind, cmd, env=child_env(dry), timeout_s=timeout_s, log=out / f"{kind}.log")
        if result.exists():
            record.update(json.loads(result.read_text()))
    if record["status"] == "ok" and "error" in record:  # ran, but its table could not be read
        record["status"] = "error"
    return record


def environment(dry: bool) -> dict:
    """What ran where; nothing here touches a JAX backend."""
    env = {"status": "ok", "dry": dry, "python": platform.python_version(), "host": platform.node(),
           "jax_platforms": os.environ.get("JAX_PLATFORMS"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[package] = importlib.metadata.version(package)
    env["git_commit"] = _output(["git", "rev-parse", "--short", "HEAD"])
    if shutil.which("nvidia-smi"):
        env["nvidia_smi"] = _output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                     "--format=csv,noheader"])
    return env


def _output(cmd: list):
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
        if done.returncode == 0:
            return done.stdout.strip() or None
    return None


def run_all(args) -> dict:
    sizes, out = (DRY if args.dry else FULL), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    left = lambda part: min(sizes.timeouts_s[part], deadline - time.monotonic())  # noqa: E731
    summary = {"environment": environment(args.dry)}
    start = time.monotonic()
    summary["tests"], summary["attention"] = tests_part(sizes, out, left("tests"), args.dry)
    summary["sft_step"] = bench_part("sft_step", sizes.sft_args, out, left("sft_step"), args.dry, sizes.bandwidth_gib)
    summary["memory"] = summary["sft_step"].pop("memory", None) or {
        "status": "failed", "error": f"the sft_step part ended {summary['sft_step']['status']} before measuring"}
    summary["generate"] = bench_part("generate", sizes.generate_args, out, left("generate"), args.dry,
                                     sizes.bandwidth_gib)
    summary["environment"]["seconds"] = round(time.monotonic() - start, 1)
    summary["environment"]["device"] = (summary["sft_step"].get("device") or summary["generate"].get("device")
                                        or {"count": "?", "device_kind": summary["attention"].get("device_kind")})
    return {name: summary[name] for name in SECTIONS}


# ---------------------------------------------------------------- child: one bench in-process


class _Tee(io.TextIOBase):
    """stdout that also keeps a copy, so the log shows the table and the parser reads it."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text):
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def child(args) -> None:
    """Runs bench/<kind>.py as __main__ with the given arguments, then records its table and
    what only this process can measure; any failure is recorded, then re-raised (rc != 0)."""
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    script = ROOT / "bench" / f"{args.child}.py"
    sys.argv = [str(script), *bench_args]
    tee, result = _Tee(sys.stdout), {"bench_args": " ".join(bench_args)}
    try:
        with contextlib.redirect_stdout(tee):
            namespace = runpy.run_path(str(script), run_name="__main__")
        result.update(RECORDERS[args.child](tee.copy.getvalue(), namespace, args))
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"[:1000]
        raise
    finally:
        Path(args.result).write_text(json.dumps(result, indent=1, default=str))


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "count": jax.device_count()}


def record_sft(text: str, namespace: dict, args) -> dict:
    """MFU and step time from sft_step's table; the memory plan against the measured peak."""
    row = re.search(r"^atlas_jax \(jit step\)\s+([\d.]+)\s+(\d+)\s+\S+\s+([\d.]+)\s+([\d.]+)%\s+(\S+)\s*$",
                    text, re.MULTILINE)
    if row is None:
        return {"error": "no 'atlas_jax (jit step)' row in sft_step's output", "device": device_info()}
    mfu = row.group(5)
    header = re.search(r"^SFT step: .*$", text, re.MULTILINE)
    bench = namespace["parse"]()  # sft_step's own parser on the same sys.argv
    return {"device": device_info(), "table": header.group(0) if header else None,
            "seconds_per_step": float(row.group(1)), "tokens_per_s": int(row.group(2)),
            "achieved_gflops_per_device": float(row.group(3)), "of_measured_matmul": float(row.group(4)) / 100,
            "mfu": float(mfu.rstrip("%")) / 100 if mfu.endswith("%") else None,
            "memory": memory_record(bench)}


def memory_record(bench) -> dict:
    """make_plan for sft_step's run (full fine-tuning, f32 params, the same mesh) against
    the allocator's peak after it (memory_stats() is None on CPU: then unmeasured)."""
    import jax

    from atlas_jax import parallel, plan
    from atlas_jax.config import MeshConfig, compose

    cfg = compose(["+run=teacher_sft", f"model={bench.model}", f"data.max_length={bench.length}",
                   f"batch.global_batch_size={bench.batch}", f"batch.micro_batch_size={bench.micro_batch}",
                   f"model.dtype={bench.dtype}", "model.param_dtype=float32", f"model.remat={bench.remat}"])
    p = plan.make_plan(cfg, parallel.make_mesh(MeshConfig()))
    record = {"status": "ok", "plan_bytes": {k: int(getattr(p, f"bytes_{k}")) for k in
                                             ("params", "grads", "optimizer", "activations", "total")}}
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    record.update(measured_peak_bytes=peak, bytes_limit=stats.get("bytes_limit"),
                  measured_over_plan=round(peak / p.bytes_total, 3) if peak else None)
    if peak is None:
        record["note"] = f"memory_stats() has no peak_bytes_in_use on {jax.devices()[0].platform}"
    return record


GENERATE_ROWS = {"decode_tokens_per_s": "atlas_jax decode tokens/s", "roofline_tokens_per_s": "roofline decode tokens/s",
                 "matmul_floor_tokens_per_s": "matmul floor tokens/s",
                 "end_to_end_tokens_per_s": "atlas_jax end-to-end tokens/s",
                 "compile_s": "atlas_jax compile s (apart)", "bytes_per_step_mb": "bytes read per decode step MB"}


def record_generate(text: str, namespace: dict, args) -> dict:
    """generate's table (its roofline uses host read bandwidth) plus the share of the
    device's own read bandwidth that the measured decode steps reach."""
    rows = dict(re.split(r"\s{2,}", line.strip())[:2] for line in text.splitlines()
                if len(re.split(r"\s{2,}", line.strip())) >= 2)
    missing = [label for label in GENERATE_ROWS.values() if label not in rows]
    if missing:
        return {"error": f"rows missing from generate's output: {missing}", "device": device_info()}
    result = {key: float(rows[label].replace(",", "")) for key, label in GENERATE_ROWS.items()}
    batch = int(re.search(r"^batch (\d+),", text, re.MULTILINE).group(1))
    bandwidth = device_read_bandwidth(args.bandwidth_gib)
    achieved = result["decode_tokens_per_s"] / batch * result["bytes_per_step_mb"] * 1e6
    return {**result, "device": device_info(), "batch": batch, "host_read_bandwidth_gbps": rows.get(
        "read bandwidth GB/s, 1 thread / all"), "device_read_bandwidth_gbps": round(bandwidth / 1e9, 1),
        "achieved_read_gbps": round(achieved / 1e9, 1), "bandwidth_share": round(achieved / bandwidth, 4)}


def device_read_bandwidth(gib: float, repeats: int = 10) -> float:
    """Bytes/s of a jitted sum over a float32 array on the default device (best of N): the
    read ceiling a decode step (all weights + its KV, once) is held to; HBM on a GPU/TPU."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


RECORDERS = {"sft_step": record_sft, "generate": record_generate}


# ---------------------------------------------------------------- summary


def headline(name: str, s: dict) -> str:
    """One line per section for the Markdown table."""
    if s.get("status") != "ok" and name != "tests":
        return s.get("error", "")[:160]
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    if name == "environment":
        device = s.get("device") or {}
        return f"{device.get('count', '?')} x {device.get('device_kind', '?')}, jax {s.get('jax')}, {s['seconds']} s"
    if name == "tests":
        return f"{s.get('passed', 0)} passed, {s.get('failed', 0)} failed, {s.get('skipped', 0)} skipped"
    if name == "attention":
        return f"{s['attention_path']} (custom calls: {s.get('custom_calls')}); cuDNN probe: {s.get('cudnn_probe')}"
    if name == "sft_step":
        mfu = "n/a" if s["mfu"] is None else f"{s['mfu']:.1%}"
        return f"MFU {mfu}, {s['seconds_per_step']:.3f} s/step, {s['tokens_per_s']:,} tokens/s"
    if name == "generate":
        return (f"decode {s['decode_tokens_per_s']:,.0f} tokens/s at batch {s['batch']}: "
                f"{s['bandwidth_share']:.1%} of {s['device_read_bandwidth_gbps']:,} GB/s measured")
    measured = s["measured_peak_bytes"]
    peak = f"{gib(measured)} ({s['measured_over_plan']}x the plan)" if measured else "unavailable"
    return f"plan {gib(s['plan_bytes']['total'])}, measured peak {peak}"


def _cell(text) -> str:
    """Text for a Markdown table cell (the cuDNN probe's |cudnn - xla| would split it)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _safe_headline(name: str, s: dict) -> str:
    try:
        return _cell(headline(name, s))
    except (KeyError, TypeError, ValueError) as e:  # a partial record must not lose the summary
        return _cell(f"(unreadable record: {e!r})")


def markdown(summary: dict) -> str:
    lines = ["# Accelerator check", "", "| section | status | result |", "| --- | --- | --- |"]
    lines += [f"| {name} | {s.get('status')} | {_safe_headline(name, s)} |" for name, s in summary.items()]
    cases = summary["tests"].get("cases", [])
    if cases:
        lines += ["", "## Tests", "", "| test | outcome | s | recorded |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['name']} | {c['outcome']} | {c['seconds']} | "
                  + _cell("; ".join(f"{k}={v}" for k, v in c["properties"].items())) + " |" for c in cases]
    plan_bytes = summary["memory"].get("plan_bytes")
    if plan_bytes:
        lines += ["", "## Memory (GiB per device)", "", "| " + " | ".join(plan_bytes) + " | measured peak |",
                  "| --- " * (len(plan_bytes) + 1) + "|",
                  "| " + " | ".join(f"{b / 2**30:.2f}" for b in plan_bytes.values()) + " | "
                  + (f"{summary['memory']['measured_peak_bytes'] / 2**30:.2f}"
                     if summary["memory"]["measured_peak_bytes"] else "n/a") + " |"]
    for name, s in summary.items():
        if s.get("log_tail") or s.get("error"):
            lines += ["", f"## {name}: {s.get('status')}", "", "```", s.get("error", ""), s.get("log_tail", ""), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse()
    if args.child:
        return child(args)
    summary = run_all(args)
    out = Path(args.out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
