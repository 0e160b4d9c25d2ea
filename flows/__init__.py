"""Orchestration: the Prefect flows, their schedules, and the ``ldm`` command line."""
