"""Measurement tools: attention cost and network speed (``snakemake network_costs``).

Nothing the workflow's runtime modules import lives here, and nothing here is imported by them:
the rule ``benchmark`` (``tools/benchmark.py``) and the hand-run tools in ``tools/`` use it.
"""
