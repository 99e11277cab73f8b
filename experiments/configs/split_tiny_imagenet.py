"""split_tiny_imagenet: 10 tasks x 20 classes (local directory only),
CIFAR ResNet-18 (nf 64), 100 epochs per task, batch 32 (PROTOCOLS.md).
"""

from esacl_jax.harness.config import CIFAR_METHODS, make_config

PROTOCOL = dict(benchmark="split_tiny_imagenet", model="resnet18", resnet_nf=64, epochs=100,
                batch_size=32,
                eval_batch_size=500, steps_per_call=100, checkpoint=True)


def get_config(method: str = "finetune"):
    return make_config(PROTOCOL, CIFAR_METHODS, method)
