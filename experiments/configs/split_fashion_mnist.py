"""split_fashion_mnist: 5 tasks x 2 classes,
MLP 784-100-100-10, 1 epoch per task, batch 10 (PROTOCOLS.md).
"""

from esacl_jax.harness.config import MNIST_METHODS, make_config

PROTOCOL = dict(
    benchmark="split_fashion_mnist", model="mlp", mlp_widths=(100, 100), epochs=1, batch_size=10)


def get_config(method: str = "finetune"):
    return make_config(PROTOCOL, MNIST_METHODS, method)
