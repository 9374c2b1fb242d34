"""The study: experiment grids, sweep runner and figure maker (``python -m experiments``)."""
