"""SFT records -> chat messages -> token ids with a completion-only loss mask.

Two schemas: `teaching` (Arc-ATLAS-Teach: problem, student approach -> diagnosis + guidance)
and `prompt_completion` (a prompt and a completion, each a string or a list of chat
messages). Field names come from DataConfig, so other datasets map onto either schema.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from atlas_jax.config import DataConfig

ADAPTIVE_TEACHING_SYSTEM_PROMPT = (
    "You are a teacher who helps a student solve a problem. You see the problem and how the "
    "student plans to solve it. First say in one or two sentences what the student has right "
    "or wrong. Then give the smallest hint that lets the student reach the answer alone, "
    "inside <teaching></teaching> tags. If the student is already right, say so and keep the "
    "hint very short. Never give a hint that would lead a correct student astray."
)

TEACHING_USER_TEMPLATE = "Problem: {problem}\n\nStudent approach: {approach}"
TEACHING_ASSISTANT_TEMPLATE = "{diagnosis}\n<teaching>{teaching}</teaching>"


class BadRecord(ValueError):
    """A row that cannot become a training example; the message is the reason counted."""


def _text(record: dict, key: str, *, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise BadRecord(f"missing field '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"field '{key}' is {type(value).__name__}, not str")
    if required and not value.strip():
        raise BadRecord(f"empty field '{key}'")
    return value.strip()


def teaching_messages(record: dict, cfg: DataConfig) -> list[dict]:
    """system + user (problem, approach) + assistant (diagnosis, <teaching> guidance)."""
    problem = _text(record, cfg.problem_field)
    approach = _text(record, cfg.approach_field, required=False) or "(none given)"
    diagnosis = _text(record, cfg.diagnosis_field, required=False)
    teaching = _text(record, cfg.teaching_field)
    # Some sources already wrap the guidance; the RL reward looks for exactly one pair.
    if "<teaching>" in teaching:
        assistant = f"{diagnosis}\n{teaching}".strip()
    else:
        assistant = TEACHING_ASSISTANT_TEMPLATE.format(diagnosis=diagnosis, teaching=teaching).strip()
    system = cfg.system_prompt if cfg.system_prompt is not None else ADAPTIVE_TEACHING_SYSTEM_PROMPT
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": TEACHING_USER_TEMPLATE.format(problem=problem, approach=approach)},
        {"role": "assistant", "content": assistant},
    ]


def _as_messages(value: Any, key: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"empty field '{key}'")
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise BadRecord(f"field '{key}' is neither a non-empty string nor a list of role/content messages")


def prompt_completion_messages(record: dict, cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(prompt messages, completion messages); a system message only when configured."""
    for key in (cfg.prompt_field, cfg.completion_field):
        if record.get(key) is None:
            raise BadRecord(f"missing field '{key}'")
    prompt = _as_messages(record[cfg.prompt_field], cfg.prompt_field, "user")
    completion = _as_messages(record[cfg.completion_field], cfg.completion_field, "assistant")
    if cfg.system_prompt is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": cfg.system_prompt}, *prompt]
    return prompt, completion


def split_messages(record: dict, cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """Any supported schema -> (prompt messages, completion messages)."""
    if cfg.format == "teaching":
        messages = teaching_messages(record, cfg)
        return messages[:-1], messages[-1:]
    if cfg.format == "prompt_completion":
        return prompt_completion_messages(record, cfg)
    raise ValueError(f"data.format={cfg.format!r} is not one of teaching, prompt_completion")


def render(record: dict, cfg: DataConfig, tokenizer) -> tuple[str, str]:
    """(prompt text ending in the assistant header, completion text) via the chat template."""
    prompt_msgs, completion_msgs = split_messages(record, cfg)
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
    if not full.startswith(prompt):
        # Templates that rewrite earlier turns (e.g. strip reasoning) break the split.
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r}: chat template output with the "
            "assistant turn does not start with the generation prompt; cannot mask the completion"
        )
    return prompt, full[len(prompt):]


def encode(
    prompt_ids: list[int], completion_ids: list[int], *, eos_id: Optional[int], completion_only: bool
) -> tuple[np.ndarray, np.ndarray]:
    """tokens [T] and loss_mask [T]; mask[t] = 1 when token t is a target (predicted at t-1).

    Prompt and completion are tokenized apart so no BPE merge crosses the boundary and the
    model trains on exactly the ids it will see at generation. Tokens after the completion's
    last EOS (the template's trailing newline) stay in the sequence but are not targets.
    """
    tokens_T = np.asarray(prompt_ids + completion_ids, dtype=np.int32)
    mask_T = np.zeros(len(tokens_T), dtype=np.float32)
    end = len(tokens_T)
    if eos_id is not None and eos_id in completion_ids:
        end = len(prompt_ids) + len(completion_ids) - completion_ids[::-1].index(eos_id)
    start = len(prompt_ids) if completion_only else 1
    mask_T[max(start, 1):end] = 1.0  # the first token of a sequence has no predecessor
    return tokens_T, mask_T


def fit_length(
    tokens_T: np.ndarray, mask_T: np.ndarray, max_length: int, policy: str
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Applies data.truncation to a long example; None = drop it."""
    if len(tokens_T) <= max_length:
        return tokens_T, mask_T
    if policy == "drop":
        return None
    tokens_T, mask_T = tokens_T[:max_length], mask_T[:max_length]
    return (tokens_T, mask_T) if mask_T.any() else None  # prompt alone filled the window
