"""WSGI entry point: ``gunicorn api.wsgi:app`` (or any WSGI server's ``api.wsgi:app``)."""

import logging

from api import create_app
from shared.adapters.logging import configure

# gunicorn sets up the JSON logs before it loads the app (gunicorn.conf.py); under a
# server that does not, the app's lines (the access line above all) are JSON all the same.
if not logging.getLogger().handlers:
    configure("web")

app = create_app()
