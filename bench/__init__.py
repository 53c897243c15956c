"""``make bench``: the service's figures against a raw baseline measured in the same run.

``python -m bench`` starts the real stack (its own Postgres database and Redis, the
Stripe emulator, gunicorn and Celery as the Procfile runs them), drives it from a
separate load-generator process, and prints one JSON object (also written to
``bench/results/latest.json``). See ``bench/README.md`` for what each figure means.
"""
