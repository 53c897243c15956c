"""Celery worker entry points: ``celery -A worker.app worker`` and ``celery -A worker.app beat``."""
