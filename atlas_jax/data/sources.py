"""Raw rows from the built-in synthetic set, a local file, or the Hugging Face hub;
seeded train/eval carve; bad-row accounting shared by the SFT and RL pipelines."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from atlas_jax.config import DataConfig, UsageError
from atlas_jax.data import synthetic

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic_math"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(UsageError):
    """Input data that cannot be trained on; the message is one line naming the file."""


@dataclasses.dataclass
class RowReport:
    """What happened to the rows of one pipeline; becomes its one summary log line."""

    origin: str
    total: int = 0
    bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncated: int = 0
    dropped_long: int = 0

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def check(self, max_bad_fraction: float) -> None:
        fraction = self.num_bad / max(self.total, 1)
        if fraction > max_bad_fraction:
            raise DataError(
                f"{self.origin}: {fraction:.1%} of rows are bad ({self.num_bad}/{self.total}: "
                f"{self._reasons()}) > data.max_bad_fraction={max_bad_fraction}"
            )

    def _reasons(self) -> str:
        return ", ".join(f"{reason} x{n}" for reason, n in self.bad.most_common(3)) or "none"

    def summary(self, name: str, kept: int) -> str:
        return (
            f"data {name}: {kept} examples kept of {self.total} rows from {self.origin}; "
            f"skipped {self.num_bad} bad ({self._reasons()}); "
            f"truncated {self.truncated}, dropped {self.dropped_long} over max_length"
        )


# An undecodable line is kept as this marker so it is counted with the other bad rows.
_UNDECODABLE = object()


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                rows.append(_UNDECODABLE)
    return rows


def _read_local(path: Path) -> list[Any]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _read_jsonl(path)  # .json files are often JSON lines
        return data if isinstance(data, list) else [data]
    return _read_jsonl(path)


def _read_hub(cfg: DataConfig, split: str) -> list[Any]:
    import datasets

    try:
        ds = datasets.load_dataset(
            cfg.dataset_id_or_path, name=cfg.dataset_config, data_files=cfg.data_files, split=split
        )
    except Exception as e:  # noqa: BLE001 - many network/hub error types; one line either way
        raise DataError(
            f"data.dataset_id_or_path={cfg.dataset_id_or_path!r} (split {split!r}) could not be loaded "
            f"from the Hugging Face hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return list(ds)


# Built-in sets, generated from (data.num_synthetic_examples, data.synthetic_seed):
# name -> {data.kind: generator}. The synthetic_world_* sets are the teaching world of
# data/synthetic.py (its student's traces, its teacher's traces, its problems).
BUILTIN = {
    SYNTHETIC: {"sft": synthetic.sft_records, "rl": synthetic.rl_records},
    "synthetic_world_student": {"sft": synthetic.world_student_records},
    "synthetic_world_teacher": {"sft": synthetic.world_teacher_records},
    "synthetic_world": {"rl": synthetic.world_rl_records},
}


def _builtin_rows(cfg: DataConfig) -> list[dict]:
    generators = BUILTIN[cfg.dataset_id_or_path]
    if cfg.kind not in generators:
        raise DataError(f"data.dataset_id_or_path={cfg.dataset_id_or_path!r} is a built-in "
                        f"{'/'.join(generators)} set, but data.kind={cfg.kind!r}")
    return generators[cfg.kind](cfg.num_synthetic_examples, cfg.synthetic_seed)


def read_rows(cfg: DataConfig, split: Optional[str] = None) -> tuple[list[Any], str]:
    """(raw rows, origin) of the configured source; `split` overrides cfg.split (hub only)."""
    source = cfg.dataset_id_or_path
    if source in BUILTIN:
        return _builtin_rows(cfg), f"{source}(seed={cfg.synthetic_seed})"
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(f"data.dataset_id_or_path={source!r}: no such file")
        return _read_local(path), str(path)
    origin = f"{source}/{cfg.data_files}" if cfg.data_files else source
    return _read_hub(cfg, split or cfg.split), origin


def clean(rows: list[Any], convert: Callable[[dict], Any], exceptions: tuple, report: RowReport) -> list[Any]:
    """Applies `convert` to each row; rows it rejects (raising `exceptions`) are counted."""
    kept = []
    for row in rows:
        report.total += 1
        if row is _UNDECODABLE:
            report.bad["undecodable line"] += 1
        elif not isinstance(row, dict):
            report.bad[f"row is {type(row).__name__}, not an object"] += 1
        else:
            try:
                kept.append(convert(row))
            except exceptions as e:
                report.bad[str(e)] += 1
    return kept


def carve(items: list[Any], cfg: DataConfig, split: str) -> list[Any]:
    """Seeded train/eval split by data.eval_split_ratio, then the sample caps."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} is not one of train, eval")
    if cfg.eval_split is None:
        order = np.random.default_rng(cfg.split_seed).permutation(len(items))
        n_eval = int(round(len(items) * cfg.eval_split_ratio))
        if cfg.eval_split_ratio > 0 and len(items) > 1:
            n_eval = max(n_eval, 1)
        chosen = order[:n_eval] if split == "eval" else order[n_eval:]
        items = [items[i] for i in np.sort(chosen)]
    cap = cfg.max_eval_samples if split == "eval" else cfg.max_train_samples
    return items[:cap] if cap is not None else items


def load(cfg: DataConfig, split: str, convert: Callable[[dict], Any], exceptions: tuple) -> tuple[list[Any], RowReport]:
    """Rows of one split, converted; bad rows skipped, counted and checked against the limit."""
    source_split = cfg.eval_split if (split == "eval" and cfg.eval_split is not None) else cfg.split
    rows, origin = read_rows(cfg, source_split)
    report = RowReport(origin)
    items = clean(rows, convert, exceptions, report)
    report.check(cfg.max_bad_fraction)
    return carve(items, cfg, split), report


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def final_answer(value: Any, answer_format: str, key: str) -> str:
    """Ground truth as text; gsm8k's '... #### 1,234' becomes '1234'."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"field '{key}' is {type(value).__name__}, not a string or number")
    text = str(value).strip()
    if answer_format == "gsm8k":
        match = _GSM8K_FINAL.search(text)
        if not match:
            raise ValueError(f"field '{key}' has no '#### answer'")
        text = match.group(1).replace(",", "").replace("$", "").strip()
    if not text:
        raise ValueError(f"empty answer in '{key}'")
    return text
