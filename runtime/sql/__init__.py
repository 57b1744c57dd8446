"""The versioned migrations of the upstream `pgml` schema (`NNNN_name.sql`, applied in order).

Applied by `runtime.tabular.migrations`; `gen_functions.py` writes `0002_functions.sql`.
"""
