"""What talks to MLflow: tracking URIs and experiments (``tracking``), logging that
survives an outage (``run_tracker``), the model registry and its one ``models:/``
parser (``registry``, ``model_uri``) and the pyfunc entry of a registered model
(``pyfunc``). Importing this package loads nothing; each module imports what it uses."""
