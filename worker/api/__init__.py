"""The HTTP API (``pneumoscreen api``): ``app`` builds the FastAPI application and its routes,
``auth`` the bearer token and the audit log, ``metrics`` the Prometheus collector, ``schemas``
the answers' shapes."""

from worker.api.app import create_app

__all__ = ["create_app"]
