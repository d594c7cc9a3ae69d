"""dpo_dist: distributed Direct Preference Optimization with a cached reference pass."""

__version__ = "0.1.0"
