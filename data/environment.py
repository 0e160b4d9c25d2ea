"""Which environment variables are settings and which are secrets.

Settings (where the S3 server is, which region) may travel with work sent to a
cluster: a Ray Job, a Serve config, a joined cluster's runtime environment.
Secrets never leave the environment of the process that has them: a local Ray
inherits it, and the nodes of a remote cluster take credentials from their own
environment (an instance role, a Kubernetes Secret, the standard AWS chain).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# Where S3 and MLflow's artifact store are: safe to pass to a cluster.
SETTINGS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
)
# Credentials: never put into a runtime env, a job config, a parameter or a log.
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "LDM_API_TOKEN",
)
# Everything that changes which S3 client a process should build.
S3_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def settings_env() -> dict[str, str]:
    """The settings of :data:`SETTINGS_ENV` that are set here (never a secret)."""
    return {name: os.environ[name] for name in SETTINGS_ENV if os.environ.get(name)}


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """``text`` with every secret value of the environment and the user:password part
    of URLs replaced by ``***``, for messages that may reach a log or a client."""
    env = os.environ if env is None else env
    for name in SECRET_ENV:
        value = env.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub(r"\g<scheme>***@", text)
