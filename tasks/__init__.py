"""Prefect tasks: thin wrappers over the polyburn core, with retries where the I/O is."""
