"""The Tollgate gateway: an ASGI app that fronts vLLM workers with the Workers AI API."""

from gateway.app import create_app, create_app_from_environment
from gateway.deps import Dependencies, build_dependencies

__all__ = ["Dependencies", "build_dependencies", "create_app", "create_app_from_environment"]
