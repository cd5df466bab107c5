"""Reads a SASL password by reference (environment variable or file), inside the activity.

The only module that touches password values. Errors name the reference (variable name or
path), never the value, so they may go into workflow history and logs.
"""

from __future__ import annotations

import os
from pathlib import Path

from postflow.config import SaslSettings

__all__ = ["SecretError", "read_password"]


class SecretError(Exception):
    """The password cannot be read; the message says which setting and why, nothing more."""


def read_password(sasl: SaslSettings, where: str) -> str:
    """The password `sasl` refers to; `where` is the setting's key, e.g. `transports.x.sasl`.

    Read on every use, so a rotated secret takes effect without restarting the worker.
    """
    if sasl.password_env is not None:
        value = os.environ.get(sasl.password_env)
        if value is None:
            raise SecretError(
                f"{where}.password_env: environment variable {sasl.password_env} is not set"
            )
        setting = f"{where}.password_env: environment variable {sasl.password_env}"
    else:
        assert sasl.password_file is not None
        try:
            value = Path(sasl.password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
            raise SecretError(f"{where}.password_file: {sasl.password_file}: {reason}") from None
        setting = f"{where}.password_file: {sasl.password_file}"
        # Files usually end with a newline that is not part of the secret.
        value = value.rstrip("\r\n")
    if not value:
        raise SecretError(f"{setting} is empty")
    return value
