"""``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``: the one parser of registered
model URIs (the Serve app's config, the registry, the command line). Imports nothing
from MLflow, so a config can be checked without it."""

from __future__ import annotations

import re
from dataclasses import dataclass

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    """A registered model named by alias (followed on reload) or by fixed version."""

    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else self.version_uri(self.version)

    def version_uri(self, version: str | None) -> str:
        return f"models:/{self.name}/{version}"


def parse_model_uri(uri: str, setting: str = "model_uri") -> ModelRef:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → :class:`ModelRef`; the
    error names ``setting``, the option or field the URI came from."""
    match = _MODEL_URI.match(uri.strip())
    if match is None:
        raise ValueError(
            f"{setting} must look like models:/NAME@ALIAS (e.g. models:/ldm@champion) "
            f"or models:/NAME/VERSION (e.g. models:/ldm/3), got {uri!r}"
        )
    return ModelRef(match["name"], match["alias"], match["version"])
