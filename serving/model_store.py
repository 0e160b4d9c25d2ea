"""The model a replica serves: resolved from the registry, loaded, and swapped when
the alias moves.

:class:`ModelStore` resolves ``models:/NAME@ALIAS`` to a version number first and
then loads that exact version (``models:/NAME/V``), so the version it reports is
the one whose weights it holds even if the alias moves during the download.
:class:`AliasWatcher` polls the alias in a daemon thread; a new version is loaded
completely before one reference assignment makes it current, so requests already
validated against the old :class:`LoadedModel` finish on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlflow import MlflowClient

from data.environment import redact
from training.diffusion.exposure import EpsScalingDefaults
from training.latent_diffusion import LatentDiffusion
from training.mlflow.model_uri import ModelRef
from training.mlflow.registry import load_model_version, resolve_model_version
from training.mlflow.tracking import DATASET_DIGEST_TAG, DATASET_URL_TAG, EPS_SCALING_TAG

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """One registered version, ready to sample."""

    model: LatentDiffusion
    name: str
    version: str
    alias: str | None
    run_id: str | None
    loaded_at: float  # time.time() when loading finished
    # lineage: the dataset the version's run trained on (its manifest and sha256)
    dataset_url: str | None = None
    dataset_digest: str | None = None
    # the b a request without eps_scaling gets, searched per sampler and step count
    eps_defaults: EpsScalingDefaults = EpsScalingDefaults({})


class ModelStore:
    """Resolves and loads versions of one registered model."""

    def __init__(self, ref: ModelRef, tracking_uri: str, device: str = "cpu"):
        self.ref = ref
        self.tracking_uri = tracking_uri
        self.device = device
        self.client = MlflowClient(tracking_uri)

    def resolve_version(self) -> str:
        """The version the alias points at now (the fixed version if there is no alias)."""
        try:
            return resolve_model_version(self.ref.uri, self.tracking_uri)[1]
        except Exception as error:
            raise RuntimeError(
                f"cannot resolve {self.ref.uri} at MLflow {redact(self.tracking_uri)}: "
                f"{redact(str(error))}. "
                f"Check that the tracking server is reachable and that model "
                f"'{self.ref.name}' has alias @{self.ref.alias} (e.g. 'ldm promote')."
            ) from error

    def load(self, version: str) -> LoadedModel:
        """Download and rebuild ``version`` in eval mode on this store's device."""
        uri = self.ref.version_uri(version)
        try:
            registered = self.client.get_model_version(self.ref.name, version)
            run_id = registered.run_id
            tags = self.client.get_run(run_id).data.tags if run_id else {}
            model = load_model_version(uri, self.tracking_uri, device=self.device)
        except Exception as error:
            raise RuntimeError(
                f"cannot load {uri} from MLflow {redact(self.tracking_uri)}: {redact(str(error))}"
            ) from error
        return LoadedModel(
            model,
            self.ref.name,
            version,
            self.ref.alias,
            run_id,
            time.time(),
            dataset_url=tags.get(DATASET_URL_TAG),
            dataset_digest=tags.get(DATASET_DIGEST_TAG),
            eps_defaults=_eps_defaults(registered.tags.get(EPS_SCALING_TAG), uri),
        )

    def load_current(self) -> LoadedModel:
        return self.load(self.resolve_version())


def _eps_defaults(tag: str | None, uri: str) -> EpsScalingDefaults:
    """The version's searched epsilon scaling; none (b = 1) if its tag is unreadable."""
    try:
        return EpsScalingDefaults.from_json(tag)
    except ValueError as error:
        logger.warning("%s: ignoring its %s tag: %s", uri, EPS_SCALING_TAG, error)
        return EpsScalingDefaults({})


class AliasWatcher:
    """Every ``interval_s``, resolve the alias; when the version changed, load it and
    hand it to ``on_new``. Failures are logged (with the reason) and their time kept
    in :attr:`last_failure`; the current model keeps serving."""

    def __init__(
        self,
        store: ModelStore,
        current_version: Callable[[], str],
        on_new: Callable[[LoadedModel], None],
        interval_s: float,
    ):
        self.store = store
        self.current_version = current_version
        self.on_new = on_new
        self.interval_s = interval_s
        self.last_failure: float | None = None  # time.time() of the last failed check
        self.last_check: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alias-watcher", daemon=True)

    def start(self) -> AliasWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def poll_once(self) -> bool:
        """One check; True when a new version was loaded and handed over."""
        try:
            version = self.store.resolve_version()
            if version == self.current_version():
                self.last_failure = None
                return False
            loaded = self.store.load(version)
        except Exception as error:  # keep serving the current version
            self.last_failure = time.time()
            logger.warning("model reload failed, still serving the current version: %s", error)
            return False
        finally:
            self.last_check = time.time()
        self.on_new(loaded)
        self.last_failure = None
        logger.info("now serving %s version %s", loaded.name, loaded.version)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll_once()
