"""Former home of :mod:`training.mlflow.registry`. The pyfunc entry of model versions
registered before the move imports ``DEFAULT_PARAMS`` from here, so it stays loadable."""

from training.mlflow.registry import DEFAULT_PARAMS

__all__ = ["DEFAULT_PARAMS"]
