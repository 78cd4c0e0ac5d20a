"""Layers producing a model's outputs keep all their units, whatever the method."""

import keras
import numpy as np
import pytest

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


# -- whatever follows the class layer (issue "Correct or loud", item 1) -----------------------

def _head(kind):
    """A classifier whose Dense(10) 'logits' is followed by ``kind`` before the output."""
    inp = keras.Input((12,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    logits = keras.layers.Dense(10, name="logits")(h)
    if kind == "softmax":
        out = keras.layers.Softmax(name="probs")(logits)
    elif kind == "activation_softmax":
        out = keras.layers.Activation("softmax", name="probs")(logits)
    elif kind == "linear_float32":  # as the mixed-precision guide recommends
        out = keras.layers.Activation("linear", dtype="float32", name="probs")(logits)
    elif kind == "reshape":
        out = keras.layers.Reshape((2, 5), name="probs")(logits)
    elif kind == "dropout":
        out = keras.layers.Dropout(0.1, name="probs")(logits)
    elif kind == "add":
        skip = keras.layers.Dense(10, name="skip")(h)
        out = keras.layers.Add(name="probs")([logits, skip])
    elif kind == "lambda":
        out = keras.layers.Lambda(lambda t: t * 2.0, name="probs")(logits)
    else:
        raise AssertionError(kind)
    return keras.Model(inp, out)


HEADS = ["softmax", "activation_softmax", "linear_float32", "reshape", "dropout", "add",
         "lambda"]


@pytest.mark.parametrize("kind", HEADS)
def test_filter_never_removes_classes_whatever_follows_the_class_layer(kind):
    model = _head(kind)
    pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=structures.Filter()))
    wrapped = {w.name for w in find_wrappers(pruned)}
    assert wrapped == {"hidden"}  # logits (and the Add's other branch) keep their 10 units
    x = np.random.default_rng(0).normal(size=(32, 12)).astype("float32")
    pruned.compile("sgd", "mse")
    pruned.fit(x, np.zeros((32, *model.output.shape[1:]), "float32"), epochs=1, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    small = tfprune.shrink(tfprune.strip(pruned))
    assert small.output.shape == model.output.shape
    assert small.get_layer("logits").units == 10


@pytest.mark.parametrize("kind", ["softmax", "add"])
def test_turbo_vbi_keeps_units_of_every_layer_reaching_an_output(kind):
    pruned = tfprune.prune(_head(kind), methods.TurboVBI(num_train_examples=100))
    by_name = {w.name: w.method for w in find_wrappers(pruned)}
    assert by_name["hidden"].prune_units is True
    assert by_name["logits"].prune_units is False
    if kind == "add":
        assert by_name["skip"].prune_units is False


def test_dpp_filter_leaves_the_class_layer_dense_behind_softmax():
    pruned = tfprune.prune(_head("softmax"), methods.DPP(2, 4, structure=structures.Filter()))
    assert {w.name for w in find_wrappers(pruned)} == {"hidden"}


def test_callable_layers_gets_the_unit_keeping_variant_with_a_warning():
    method = methods.Magnitude(0.5, structure=structures.Filter())
    with pytest.warns(UserWarning, match="'logits' keeps all its units"):
        pruned = tfprune.prune(_head("softmax"), layers=lambda layer: method)
    assert {w.name for w in find_wrappers(pruned)} == {"hidden"}


def test_naming_a_class_layer_with_a_unit_removing_structure_raises():
    with pytest.raises(ValueError, match="'logits', whose units reach a model output"):
        tfprune.prune(_head("softmax"), methods.Magnitude(0.5, structure=structures.Filter()),
                      layers=["logits"])


def test_no_layer_to_prune_message_names_the_output_layers():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, name="only"),
                              keras.layers.Softmax()])
    with pytest.raises(ValueError, match=r"nothing to prune in model .* every candidate layer "
                                         r"was left unwrapped \('only': .*layers whose units "
                                         r"reach a model output keep them"):
        tfprune.prune(model, methods.Magnitude(0.5, structure=structures.Filter()))
