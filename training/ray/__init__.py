"""What runs on Ray: the training driver (``driver``: the stages as one Ray Train job,
registered in MLflow), the Ray Train worker loop (``worker``), the latent cache
encoded by the ranks or by Ray tasks (``latent_cache``), submitting the driver as a Ray
Job (``submit``) and joining a cluster without hanging (``connection``)."""
