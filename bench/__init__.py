"""Load and latency harness: one simulated vLLM worker measured directly and through Tollgate, in one run.

Run it as ``python -m bench.run`` (see ``bench/README.md``). The product never imports this package.
"""
