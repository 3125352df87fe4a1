"""Measurement tools: attention cost and network speed (``snakemake network_costs``).

Read in this order: :mod:`.counting` (FLOPs and map sizes by formula and by PyTorch's counter),
:mod:`.timing` (time, memory, the machine's ceiling, the speed targets), :mod:`.report` (CSV,
Markdown, figure), :mod:`.run` (:func:`run_benchmark`, everything in one call).

Nothing the workflow's runtime modules import lives here, and nothing here is imported by them:
the rule ``network_costs`` (``scripts/benchmark.py``) and the hand-run tools in ``tools/`` use it.
"""
