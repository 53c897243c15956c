"""Placeholder blueprint for the operators' console; filled in by its owner."""

from flask import Blueprint

bp = Blueprint("console", __name__, url_prefix="/console")
