"""Prefect flows of polyburn."""
