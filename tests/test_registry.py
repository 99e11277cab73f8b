"""The method registry (`esacl_jax.harness.methods.registry`): one table, no import cycle."""

import ast
import pathlib

from esacl_jax.harness.methods import registry
from esacl_jax.harness.reporting import METHOD_ORDER
from experiments import compare


def test_registry_imports_nothing_from_the_methods():
    tree = ast.parse(pathlib.Path(registry.__file__).read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names]
    assert not [name for name in imported if name and name.startswith("esacl_jax")]


def test_every_name_maps_to_its_class():
    for name in registry.METHODS:
        assert registry.method_class(name).name == name


def test_lists_of_all_methods_derive_from_the_registry():
    assert METHOD_ORDER == tuple(registry.METHODS)
    assert set(compare.DEFAULT_METHODS) == set(registry.METHODS) - set(registry.BASE_FROM_CONFIG)
