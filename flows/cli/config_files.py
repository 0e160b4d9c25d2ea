"""Config files and config errors of the ``ldm`` commands.

A config the user can fix (a YAML or JSON syntax error, a wrong type, an unknown
field, a value out of range) is one line per problem naming the field, no
traceback, and exit status 2, as for a bad command-line option.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CONFIG_ERROR = 2  # the exit status of a bad option or config, as argparse uses


def read_config_file(path: Path) -> dict[str, Any]:
    """A JSON or YAML (``.yaml``/``.yml``) mapping; ValueError saying where it is wrong."""
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON at line {error.lineno}, column {error.colno}: "
                f"{error.msg}"
            ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def config_error(prog: str, error: Exception, option_style: bool = False) -> int:
    """Print ``error`` (a pydantic ValidationError or a ValueError) for people and
    return :data:`CONFIG_ERROR`. With ``option_style`` a field ``max_steps`` is shown
    as the option ``--max-steps``."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        print(f"{prog}: error: {error}", file=sys.stderr)
        return CONFIG_ERROR
    for problem in error.errors(include_url=False):
        location = [str(part) for part in problem["loc"]]
        if option_style and location:
            where = "--" + location[0].replace("_", "-")
        else:
            where = ".".join(location) or "config"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field (check its spelling and nesting)"
        print(f"{prog}: error: {where}: {message}", file=sys.stderr)
    return CONFIG_ERROR
