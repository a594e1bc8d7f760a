"""Analysis tools: ``b2t-grad-norms`` (grad_norms.py) and ``b2t-bench`` (bench.py, measure.py)."""
