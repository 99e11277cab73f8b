"""split_digits: scikit-learn's bundled 8x8 digits, 5 x 2 classes, MLP 64-100-100-10.

The offline default (`make run`): real data that ships inside a dependency, runs in seconds.
"""

from esacl_jax.harness.config import MNIST_METHODS, make_config

PROTOCOL = dict(benchmark="split_digits", model="mlp", mlp_widths=(100, 100), epochs=5,
                batch_size=10, eval_batch_size=500, steps_per_call=50)


def get_config(method: str = "finetune"):
    return make_config(PROTOCOL, MNIST_METHODS, method)
