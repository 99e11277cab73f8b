"""permuted_mnist: 20 domain-IL tasks (a fixed pixel permutation each), MLP, 1 epoch, batch 128."""

from esacl_jax.harness.config import MNIST_METHODS, make_config

PROTOCOL = dict(benchmark="permuted_mnist", model="mlp", mlp_widths=(100, 100), epochs=1,
                batch_size=128, replay_batch_size=128)


def get_config(method: str = "finetune"):
    methods = {name: {k: v for k, v in row.items() if k != "replay_batch_size"}
               for name, row in MNIST_METHODS.items()}
    return make_config(PROTOCOL, methods, method)
