"""WSGI entry point: ``gunicorn api.wsgi:app`` (or any WSGI server's ``api.wsgi:app``)."""

import gc
import logging

from api import create_app
from shared.adapters.logging import configure

# gunicorn sets up the JSON logs before it loads the app (gunicorn.conf.py); under a
# server that does not, the app's lines (the access line above all) are JSON all the same.
if not logging.getLogger().handlers:
    configure("web")

app = create_app()

# What is loaded by now lives as long as the process: keep it out of the cyclic garbage
# collector's full passes. Each of those walked the whole app (about 140,000 objects) and
# held the process for 75-150 ms, every request it was serving with it (make bench,
# initiation at 32 connections, a gc callback timing each pass); frozen, a full pass
# takes about 2 ms.
gc.freeze()
