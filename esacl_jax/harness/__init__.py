"""The continual-learning harness: config schema, loop, methods, models, data and accounting.

Installed with the `harness` extra (`pip install "esacl_jax[harness]"`); it builds on the
optimizer library (`esacl_jax`) and never the other way round. Data flows one way:
config (`config.make_config`) -> benchmark (`data.load_benchmark`) -> method (`methods`) ->
loop (`loop.train_and_evaluate`) -> results.json -> reports (`reporting`).
"""

from esacl_jax.harness.config import base_config, make_config
from esacl_jax.harness.loop import TrainingError, format_summary, train_and_evaluate

__all__ = ["base_config", "make_config", "train_and_evaluate", "format_summary", "TrainingError"]
