"""Layers producing a model's outputs keep all their units, whatever the method."""

import keras

import tfprune
from tfprune import methods, structures
from tfprune.wrapper import find_wrappers


def _mlp():
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="hidden"),
                             keras.layers.Dense(3, name="out")])


def test_filter_structure_leaves_the_output_layer_unwrapped():
    pruned = tfprune.prune(_mlp(), methods.Magnitude(0.5, structure=structures.Filter()))
    assert [w.name for w in find_wrappers(pruned)] == ["hidden"]


def test_unit_pruning_method_gets_prune_units_false_on_the_output_layer():
    pruned = tfprune.prune(_mlp(), methods.TurboVBI(num_train_examples=100))
    by_name = {w.name: w for w in find_wrappers(pruned)}
    assert by_name["hidden"].method.prune_units is True
    assert by_name["out"].method.prune_units is False


def test_weight_level_structure_still_prunes_the_output_layer():
    pruned = tfprune.prune(_mlp(), methods.Magnitude(0.5))
    assert [w.name for w in find_wrappers(pruned)] == ["hidden", "out"]
