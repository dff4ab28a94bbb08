"""One check for every device setting (``score.device``, ``trainer.accelerator``,
``search --device``): a name torch knows, present on this machine, else a
:class:`~retrieval.errors.ConfigError` naming the key and the fix.

torch is imported when a check runs, not with this module, so config validation stays
cheap to import.
"""

from __future__ import annotations

import re

from retrieval.errors import ConfigError

#: ``trainer.accelerator`` values Lightning accepts, and the device kind each needs
ACCELERATORS = {"auto": None, "cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "mps": "mps"}
_DEVICE = re.compile(r"^(cpu|cuda|mps)(?::(\d+))?$")


def _available(kind: str) -> int:
    """How many devices of ``kind`` this machine has (``cpu``: 1)."""
    import torch

    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return int(mps is not None and mps.is_available())
    return 1


def check_device(value: object, key: str) -> str:
    """``value`` if it names a device this machine has: ``auto``, ``cpu``, ``cuda``,
    ``cuda:I`` or ``mps``.

    Raises:
        ConfigError: an unknown name, or a device this machine lacks (names ``key``).
    """
    text = str(value).strip().lower()
    if text == "auto":
        return text
    match = _DEVICE.match(text)
    if match is None:
        raise ConfigError(
            f"{key}={value!r} is not a device: use auto (GPU when present), cpu or cuda[:i]"
        )
    kind, number = match.group(1), match.group(2)
    count = _available(kind)
    if kind == "cpu" and number not in (None, "0"):
        raise ConfigError(f"{key}={value!r}: there is one cpu device; use cpu or auto")
    if count == 0:
        raise ConfigError(
            f"{key}={value!r}: this machine has no {kind} device (torch sees none); "
            f"use {key}=cpu or auto"
        )
    if number is not None and int(number) >= count:
        raise ConfigError(
            f"{key}={value!r}: this machine has {count} {kind} device(s), numbered from 0; "
            f"use {kind}:0 .. {kind}:{count - 1}, or auto"
        )
    return text


def check_accelerator(value: object, key: str = "trainer.accelerator") -> str:
    """``value`` if it is a Lightning accelerator this machine has (``auto``, ``cpu``,
    ``gpu``/``cuda``, ``mps``).

    Raises:
        ConfigError: an unknown accelerator, or one whose device this machine lacks.
    """
    text = str(value).strip().lower()
    if text not in ACCELERATORS:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(ACCELERATORS)}")
    kind = ACCELERATORS[text]
    if kind is not None and _available(kind) == 0:
        raise ConfigError(
            f"{key}={value!r}: this machine has no {kind} device (torch sees none); "
            f"use {key}=cpu or auto"
        )
    return text
