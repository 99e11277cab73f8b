"""The split_fashion_mnist_cnn_e5 protocol (`esacl_jax.harness.config.BENCHMARK_PROTOCOLS`)."""

from esacl_jax.harness.config import get_config as _get_config


def get_config(method: str = "finetune"):
    return _get_config("split_fashion_mnist_cnn_e5", method)
