"""A simulated vLLM worker (``tollgate worker-sim``) for dev mode, tests and benchmarks."""

from gateway.sim._config import Faults, SimConfig
from gateway.sim.app import create_sim_app

__all__ = ["Faults", "SimConfig", "create_sim_app"]
