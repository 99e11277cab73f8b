"""split_cifar100: 10 tasks x 10 classes,
CIFAR ResNet-18 (nf 64), 50 epochs per task, batch 32 (PROTOCOLS.md).
"""

from esacl_jax.harness.config import CIFAR_METHODS, make_config

PROTOCOL = dict(
    benchmark="split_cifar100", model="resnet18", resnet_nf=64, epochs=50, batch_size=32,
    eval_batch_size=500, steps_per_call=100, checkpoint=True)


def get_config(method: str = "finetune"):
    return make_config(PROTOCOL, CIFAR_METHODS, method)
