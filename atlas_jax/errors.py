"""Turns configuration and usage errors into the one line a user needs.

Hydra and OmegaConf report a bad override or YAML key over several lines (message,
full_key, reference_type, the config search path). A user needs the key, the value
and the way out; `one_line` extracts them, and an unknown key gets the key that replaces
it (atlas_jax/migration.py). Anything that is not a usage error returns
None so the caller re-raises it with its traceback: bugs keep their stack.
"""

from __future__ import annotations

import re
from typing import Optional

from hydra.errors import HydraException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from atlas_jax import migration
from atlas_jax.config import UsageError

_NOISE = ("full_key:", "reference_type=", "object_type=", "Config search path", "provider=",
          "Set the environment variable")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def _from_omegaconf(error: OmegaConfBaseException, where: str = "") -> str:
    key = getattr(error, "full_key", None)
    first = next((l for l in _lines(error) if not l.startswith(_NOISE)), type(error).__name__)
    prefix = f"{key}: " if key else ""
    return f"{prefix}{first}{where}{_unknown_key_hint(error, key)}"


def _unknown_key_hint(error: OmegaConfBaseException, key: Optional[str]) -> str:
    """The tail for an unknown key: "; use model.dtype" for an ATLAS/TRL/HF Trainer name,
    "; did you mean trainer.learning_rate?" for a near miss (atlas_jax/migration.py)."""
    if not key or not isinstance(error, (ConfigKeyError, ConfigAttributeError)):
        return ""
    if not re.search(r"Key '[^']+' not in '", str(error)):  # e.g. a missing value, not an unknown key
        return ""
    found = migration.hint(key)
    return f"; {found}" if found else ""


def _from_hydra(error: HydraException) -> str:
    cause = error.__cause__ or error.__context__
    lines = _lines(error)
    text = " ".join(lines)
    source = re.match(r"In '([^']+)'", lines[0]) if lines else None
    where = f" (in configs/{source.group(1)}.yaml)" if source else ""
    if isinstance(cause, OmegaConfBaseException):
        return _from_omegaconf(cause, where)
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group = missing.group(1).split("/")[0]
        options = [l for l in lines if not l.startswith(_NOISE)]
        start = next((i for i, l in enumerate(options) if l.startswith("Available options")), None)
        choices = [o for o in options[start + 1:]] if start is not None else []
        choices = [c for c in choices if not c.startswith("schema")]
        hint = f"; available {group} options: {', '.join(choices)}" if choices else ""
        return f"no config '{missing.group(1)}'{hint}"
    key_line = next((l for l in lines if l.startswith("full_key:")), None)
    body = [l for l in lines if not l.startswith(_NOISE)]
    if source and len(body) > 1:  # "In 'x': SomeError raised while composing config:" + message
        return f"{key_line.split(':', 1)[1].strip() + ': ' if key_line else ''}{body[1]}{where}"
    return " ".join(body)


def one_line(error: BaseException) -> Optional[str]:
    """The one-line message for a usage error, or None for anything else."""
    if isinstance(error, UsageError):
        return str(error)
    if isinstance(error, HydraException):
        return _from_hydra(error)
    if isinstance(error, OmegaConfBaseException):
        return _from_omegaconf(error)
    return None
