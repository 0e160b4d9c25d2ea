"""Guided sampling from a registered model over HTTP with Ray Serve.

- :mod:`serving.config`: ``AppConfig``, the typed arguments of the Serve app.
- :mod:`serving.schemas`: request and response models, validated against the limits
  of the app and the classes of the model that serves the request.
- :mod:`serving.sampler`: per-request generators and the batch sampler (no Ray).
- :mod:`serving.model_store`: resolving ``models:/NAME@ALIAS``, loading, hot reload.
- :mod:`serving.app`: the Ray Serve deployment and ``build_app`` for ``serve run``.
- :mod:`serving.client`: a small HTTP client used by ``ldm sample``.
- :mod:`serving.ingress`: HAProxy instead of Serve's proxy in front of the replicas.

Importing this package loads nothing heavy; each module imports what it uses.
"""
