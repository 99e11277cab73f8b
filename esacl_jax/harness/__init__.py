"""The continual-learning harness: config schema, loop, methods, models, data and accounting.

Installed with the `harness` extra (`pip install "esacl_jax[harness]"`); it builds on the
optimizer library (`esacl_jax`) and never the other way round. Data flows one way:
config (`config.make_config`) -> benchmark (`data.load_benchmark`) -> method (`methods`) ->
loop (`loop.train_and_evaluate`) -> results.json -> reports (`reporting`).
"""

try:
    from esacl_jax.harness.config import base_config, make_config
    from esacl_jax.harness.loop import TrainingError, format_summary, train_and_evaluate
except ModuleNotFoundError as error:  # the library installed without the harness extra
    if (error.name or "").partition(".")[0] == "esacl_jax":
        raise
    raise ModuleNotFoundError(
        f"esacl_jax.harness needs the harness extra ({error.name} is not installed): "
        'pip install "esacl_jax[harness]"', name=error.name) from None

__all__ = ["base_config", "make_config", "train_and_evaluate", "format_summary", "TrainingError"]
