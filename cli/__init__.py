"""The ``refunds`` console script: an entry point over ``shared``, like ``api`` and ``worker``."""
