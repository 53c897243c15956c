"""Placeholder blueprint; filled in by its owner."""

from flask import Blueprint

bp = Blueprint("openapi", __name__)
