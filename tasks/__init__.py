"""Celery tasks: thin wrappers over plain functions that take ids and clients."""
