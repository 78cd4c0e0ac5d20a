"""Tests for tfprune.surgery: the channel dependency graph and shrink()."""

import os

import keras
import numpy as np
import pytest
import surgery_zoo as zoo

from tfprune.surgery import DependencyGraph, ShrinkError, handlers, register_handler, shrink

L = keras.layers


def _x(model, batch=3, seed=1):
    rng = np.random.default_rng(seed)
    shape = (batch,) + tuple(model.inputs[0].shape[1:])
    return rng.standard_normal(shape).astype("float32")


def _outputs(model, x):
    return [np.asarray(y) for y in keras.tree.flatten(model(x, training=False))]


def assert_same_outputs(a, b, x):
    for ya, yb in zip(_outputs(a, x), _outputs(b, x), strict=True):
        scale = max(np.abs(ya).max(), 1e-12)
        np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-5 * scale)


def _killed_zoo(name, seed=0):
    model = zoo.randomize(zoo.ZOO[name](), seed=seed)
    killed = zoo.kill_half(model, seed=seed)
    return model, killed


@pytest.fixture(scope="module")
def shrunk_zoo():
    out = {}
    for name in zoo.ZOO:
        model, killed = _killed_zoo(name)
        small, info = shrink(model, return_info=True)
        out[name] = (model, killed, small, info)
    return out


# ------------------------------------------------------------------ exactness on the zoo


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_shrink_removes_coupled_dead_channels_exactly(name, shrunk_zoo):
    model, killed, small, info = shrunk_zoo[name]
    assert killed, "the zoo model should have prunable groups"
    assert small.count_params() < model.count_params()
    before, after = zoo.count_units(model), zoo.count_units(small)
    for layer_name, n in killed.items():
        assert after[layer_name] == before[layer_name] - n, layer_name
    assert info.params_after == small.count_params()
    assert [layer.name for layer in small.layers] == [layer.name for layer in model.layers]
    assert_same_outputs(model, small, _x(model))
    assert not any(isinstance(layer, keras.layers.Wrapper) for layer in small.layers)


# Not "resnet": with oneDNN on (TF 2.21, AVX-512 CPU), training a 1x1 stride-2 convolution
# (its projection shortcut) corrupts the heap and kills the process, shrunk or not.
@pytest.mark.parametrize("name", ["lenet5", "inception", "mobilenet", "nested", "two_outputs",
                                  "grouped", "ops"])
def test_shrunk_model_keras_roundtrip_and_fine_tunes(name, shrunk_zoo, tmp_path):
    _, _, small, _ = shrunk_zoo[name]
    path = os.path.join(tmp_path, "small.keras")
    small.save(path)
    loaded = keras.models.load_model(path)
    x = _x(small)
    assert_same_outputs(small, loaded, x)
    n_out = len(loaded.outputs)
    loaded.compile(optimizer="sgd", loss=["mse"] * n_out)
    ys = [np.zeros((len(x),) + tuple(t.shape[1:]), "float32") for t in loaded.outputs]
    history = loaded.fit(x, ys if n_out > 1 else ys[0], epochs=1, batch_size=len(x), verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_shrunk_lenet_matches_in_litert(shrunk_zoo):
    import tensorflow as tf

    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter")
    _, _, small, _ = shrunk_zoo["lenet5"]
    flat = tf.lite.TFLiteConverter.from_keras_model(small).convert()
    interpreter = interpreter_mod.Interpreter(model_content=flat)
    interpreter.allocate_tensors()
    x = _x(small, batch=1)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    y = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(y, _outputs(small, x)[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the graph


def _group(graph, name):
    (group,) = [g for g in graph.groups if g.name == name]
    return group


def test_graph_couples_the_channels_of_a_residual_add():
    graph = DependencyGraph(zoo.resnet())
    names = sorted(g.name for g in graph.groups)
    assert names == ["b1a", "b2a", "b2b+b2proj", "head", "stem+b1b"]
    group = _group(graph, "stem+b1b")
    assert group.size == 8 and group.blocked_reason is None
    assert [(layer.name, list(idx)) for layer, idx in group.producers] == [
        ("stem", list(range(8))), ("b1b", list(range(8)))]
    assert sorted(layer.name for layer, _ in group.followers) == ["b1b_bn", "stem_bn"]
    assert sorted(layer.name for layer, _ in group.consumers) == ["b1a", "b2a", "b2proj"]
    assert "model output" in _group(graph, "head").blocked_reason


def test_group_scores_sum_over_coupled_producers():
    model = zoo.randomize(zoo.resnet())
    group = _group(DependencyGraph(model), "b2b+b2proj")
    expected = sum(np.linalg.norm(keras.ops.convert_to_numpy(layer.kernel).reshape(-1, 16),
                                  axis=0)[idx] for layer, idx in group.producers)
    np.testing.assert_allclose(group.scores(), expected, rtol=1e-5)
    ones = group.scores(lambda layer, idx: np.ones(len(idx)))
    np.testing.assert_array_equal(ones, np.full(16, 2.0))


def test_graph_follows_concatenate_offsets():
    graph = DependencyGraph(zoo.inception())
    group = _group(graph, "br3+side")
    assert [(layer.name, list(idx)) for layer, idx in group.producers] == [
        ("br3", list(range(6))), ("side", list(range(4, 10)))]
    assert [(layer.name, list(idx)) for layer, idx in group.followers] == [
        ("mix_bn", list(range(4, 10)))]


def test_graph_maps_flatten_to_dense_rows():
    graph = DependencyGraph(zoo.lenet5())
    group = _group(graph, "conv2")
    (consumer, rows), = group.consumers
    assert consumer.name == "fc1" and rows.shape == (50, 16)  # 4x4 positions per filter
    np.testing.assert_array_equal(rows[3], np.arange(16) * 50 + 3)
    assert "not element-wise" in _group(graph, "fc2").blocked_reason


def test_graph_follows_depthwise_multiplier():
    graph = DependencyGraph(zoo.mobilenet())
    group = _group(graph, "pw1")
    followers = {layer.name: idx for layer, idx in group.followers}
    np.testing.assert_array_equal(followers["dw2"], np.arange(16))
    (consumer, rows), = group.consumers
    assert consumer.name == "sep"
    np.testing.assert_array_equal(rows[5], [10, 11])  # depth_multiplier=2


def test_graph_sees_through_wrappers():
    class Passthrough(keras.layers.Wrapper):
        def call(self, x):
            return self.layer(x)

    inp = keras.Input((6,))
    h = Passthrough(L.Dense(8, activation="relu", name="wrapped"), name="wrapped")(inp)
    model = keras.Model(inp, L.Dense(2, name="head")(h))
    group = _group(DependencyGraph(model), "wrapped")
    (layer, idx), = group.producers
    assert isinstance(layer, L.Dense) and layer.name == "wrapped" and len(idx) == 8


def test_graph_stops_at_layers_it_cannot_follow_with_a_named_reason():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, name="c1")(inp)
    x = L.Permute((2, 1, 3), name="perm")(x)
    x = L.Conv2D(4, 3, name="c2")(x)
    model = keras.Model(inp, L.Flatten()(x))
    graph = DependencyGraph(model)
    assert graph.stops == [("perm", "moves the channel axis")]
    assert "perm" in _group(graph, "c1").blocked_reason

    inp = keras.Input((4, 6))
    h = L.LayerNormalization(name="ln")(L.Dense(6, name="d")(inp))
    h = L.Activation("softmax", name="sm")(L.Dense(5, name="e")(h))
    graph = DependencyGraph(keras.Model(inp, L.Dense(2, name="head")(h)))
    assert "changes the mean and variance" in _group(graph, "d").blocked_reason
    assert "not element-wise" in _group(graph, "e").blocked_reason


def test_register_handler_teaches_a_custom_layer():
    @keras.saving.register_keras_serializable("tfprune_test")
    class Scale2(L.Layer):
        def call(self, x):
            return 2.0 * x

    inp = keras.Input((8,))
    h = Scale2(name="scale")(L.Dense(6, name="d1")(inp))
    model = keras.Model(inp, L.Dense(2, name="head")(h))
    assert _group(DependencyGraph(model), "d1").blocked_reason is not None

    class Scale2Handler(handlers.Handler):
        def propagate(self, g, layer, inputs, node):
            (x,) = inputs
            return [(x.slots, 2.0 * x.const)]

    register_handler(Scale2, Scale2Handler())
    assert _group(DependencyGraph(model), "d1").blocked_reason is None
    zoo.randomize(model)
    zoo.kill_units(model.get_layer("d1"), [1, 4])
    small = shrink(model)
    assert small.get_layer("d1").units == 4
    assert_same_outputs(model, small, np.ones((2, 8), "float32"))


# ------------------------------------------------------------------ what must not be removed


def test_uncoupled_channel_of_a_residual_branch_is_kept():
    model = zoo.randomize(zoo.resnet())
    zoo.kill_units(model.get_layer("b1b"), [0, 3])
    zoo.kill_followers(model.get_layer("b1b_bn"), [0, 3])
    small, info = shrink(model, return_info=True)
    assert small.get_layer("b1b").filters == 8 and small.get_layer("stem").filters == 8
    assert info.removed == {}
    assert_same_outputs(model, small, _x(model))


def test_model_outputs_are_never_shrunk():
    model = zoo.randomize(zoo.two_outputs())
    zoo.kill_units(model.get_layer("h2"), [0, 1, 2])
    zoo.kill_units(model.get_layer("head_b"), [0])
    small, info = shrink(model, return_info=True)
    assert small.get_layer("h2").units == 16 and small.get_layer("head_b").units == 2
    reasons = {name: reason for name, _, reason in info.kept}
    assert "model output" in reasons["h2"] and "model output" in reasons["head_b"]
    assert_same_outputs(model, small, _x(model))


def test_lambda_mixing_channels_gives_an_exact_partial_shrink():
    inp = keras.Input((10, 10, 3))
    x = L.Conv2D(8, 3, activation="relu", name="c1")(inp)
    x = L.Lambda(lambda t: t[..., ::-1] + keras.ops.mean(t, axis=-1, keepdims=True),
                 name="mix")(x)
    x = L.Conv2D(8, 3, activation="relu", name="c2")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = zoo.randomize(keras.Model(inp, L.Dense(3, name="head")(x)))
    zoo.kill_units(model.get_layer("c1"), [0, 1, 2, 3])
    zoo.kill_units(model.get_layer("c2"), [0, 1, 2, 3])
    small, info = shrink(model, return_info=True)
    assert small.get_layer("c1").filters == 8  # channels read by the Lambda stay
    assert small.get_layer("c2").filters == 4
    ((group, count, reason),) = info.kept_for("c1")
    assert count == 4 and "'mix' (Lambda)" in reason
    assert ("mix", "a Lambda can do anything to channels") in info.stops
    assert_same_outputs(model, small, _x(model))


def test_all_dead_units_of_a_layer_keep_one():
    model = zoo.randomize(zoo.mlp())
    zoo.kill_units(model.get_layer("fc2"), np.arange(16))
    small, info = shrink(model, return_info=True)
    assert small.get_layer("fc2").units == 1
    assert any("last channel" in reason for _, _, reason in info.kept)
    assert_same_outputs(model, small, _x(model))


# ------------------------------------------------------------------ constant channels


def _bn_offset_model(padding, use_bias=True, reader="conv"):
    inp = keras.Input((9, 9, 2))
    x = L.Conv2D(4, 3, padding="same", use_bias=False, name="a")(inp)
    x = L.BatchNormalization(name="a_bn")(x)
    x = L.ReLU()(x)
    if reader == "conv":
        x = L.Conv2D(3, 3, padding=padding, use_bias=use_bias, name="b")(x)
    elif reader == "separable":
        x = L.SeparableConv2D(3, 3, padding=padding, depth_multiplier=2, use_bias=use_bias,
                              name="b")(x)
    elif reader == "conv1d":
        x = L.Reshape((81, 4))(x)
        x = L.Conv1D(3, 3, padding=padding, use_bias=use_bias, name="b")(x)
    else:  # Flatten -> Dense
        x = L.Dense(3, use_bias=use_bias, name="b")(L.Flatten()(x))
    x = L.Flatten()(x)
    model = zoo.randomize(keras.Model(inp, L.Dense(2, name="head")(x)))
    zoo.kill_units(model.get_layer("a"), [1])
    zoo.kill_followers(model.get_layer("a_bn"), [1], bn_beta=0.7)  # BN offset left alive
    return model


@pytest.mark.parametrize("reader,use_bias", [("conv", True), ("conv", False),
                                             ("separable", True), ("conv1d", True),
                                             ("dense", False)])
def test_live_bn_offset_is_folded_into_its_reader(reader, use_bias):
    model = _bn_offset_model("valid", use_bias, reader)
    small, info = shrink(model, return_info=True)
    assert small.get_layer("a").filters == 3
    assert info.folded == {"b": 1}
    assert small.get_layer("b").use_bias
    assert_same_outputs(model, small, _x(model))


@pytest.mark.parametrize("reader", ["conv", "separable", "conv1d"])
def test_live_bn_offset_before_same_padding_is_kept_and_reported(reader):
    model = _bn_offset_model("same", reader=reader)
    small, info = shrink(model, return_info=True)
    assert small.get_layer("a").filters == 4
    ((_, count, reason),) = info.kept_for("a")
    assert count == 1 and "padding='same'" in reason
    assert_same_outputs(model, small, _x(model))


def test_live_dense_bias_is_folded_into_the_next_dense():
    model = zoo.randomize(zoo.mlp())
    fc1 = model.get_layer("fc1")
    zoo.kill_units(fc1, [2, 5])
    fc1.bias.assign(np.where(np.arange(32) == 2, 0.8, fc1.bias.numpy()))  # relu(0.8) = 0.8
    small, info = shrink(model, return_info=True)
    assert small.get_layer("fc1").units == 30 and info.folded == {"fc2": 1}
    assert_same_outputs(model, small, _x(model))


def test_shared_layer_is_shrunk_consistently():
    shared = L.Dense(6, activation="relu", name="shared")
    a, b = keras.Input((5,)), keras.Input((5,))
    pre = L.Dense(5, name="pre")
    h = L.Add(name="add")([shared(pre(a)), shared(b)])
    model = zoo.randomize(keras.Model([a, b], L.Dense(2, name="head")(h)))
    zoo.kill_units(model.get_layer("shared"), [0, 4])
    zoo.kill_units(model.get_layer("pre"), [1])  # read by the shared layer: stays (input b)
    small = shrink(model)
    assert small.get_layer("shared").units == 4 and small.get_layer("pre").units == 5
    xs = [np.ones((2, 5), "float32"), np.full((2, 5), 0.5, "float32")]
    assert_same_outputs(model, small, xs)


# ------------------------------------------------------------------ self-check and errors


def test_self_check_names_the_broken_layer(monkeypatch):
    model, _ = _killed_zoo("vgg")
    original = handlers.BatchNormHandler.shrink_weights

    def broken(self, layer, masks):
        values = original(self, layer, masks)
        if layer.name == "c2_bn":
            values["beta"] = values["beta"][::-1] + 1.0
        return values

    monkeypatch.setattr(handlers.BatchNormHandler, "shrink_weights", broken)
    with pytest.raises(ShrinkError, match="'c2_bn'"):
        shrink(model)


def test_shrink_rejects_a_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = L.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match="subclassed"):
        shrink(net)


def test_shrink_strips_prune_wrappers_first():
    tfprune = pytest.importorskip("tfprune")
    try:
        from tfprune import methods, structures

        model = zoo.randomize(zoo.mlp())
        pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=structures.Filter()))
    except Exception as e:  # the pruning API is developed alongside
        pytest.skip(f"tfprune.prune unavailable: {e}")
    zoo.kill_units(pruned.get_layer("fc1").layer, [0, 1])
    small = shrink(pruned)
    assert not any(isinstance(layer, keras.layers.Wrapper) for layer in small.layers)
    assert small.get_layer("fc1").units <= 30


def test_hand_killed_residual_channels_are_removed_together():
    model = zoo.randomize(zoo.resnet())
    for conv in ("stem", "b1b"):  # channel 1 and 5 of the first residual stream, everywhere
        zoo.kill_units(model.get_layer(conv), [1, 5])
        zoo.kill_followers(model.get_layer(conv + "_bn"), [1, 5])
    small, info = shrink(model, return_info=True)
    assert info.removed == {"stem": (8, 6), "b1b": (8, 6)}
    assert small.get_layer("b1a").kernel.shape == (3, 3, 6, 8)
    assert small.get_layer("b2proj").kernel.shape == (1, 1, 6, 16)
    assert small.get_layer("b1b_bn").gamma.shape == (6,)
    assert_same_outputs(model, small, _x(model))


def test_concatenate_on_another_axis_couples_channels():
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(5, 1, name="a")(inp)
    b = L.Conv2D(5, 3, padding="same", name="b")(inp)
    x = L.Concatenate(axis=1, name="rows")([a, b])
    model = zoo.randomize(keras.Model(inp, L.Dense(2, name="head")(L.Flatten()(x))))
    assert [g.name for g in DependencyGraph(model).groups] == ["a+b", "head"]
    zoo.kill_units(model.get_layer("a"), [2])
    small = shrink(model)
    assert small.get_layer("a").filters == 5  # b's channel 2 is alive
    zoo.kill_units(model.get_layer("b"), [2])
    small = shrink(model)
    assert small.get_layer("a").filters == 4 and small.get_layer("b").filters == 4
    assert_same_outputs(model, small, _x(model))


def test_shrink_info_reads_well(capsys):
    model, _ = _killed_zoo("two_outputs")
    shrink(model, verbose=True)
    out = capsys.readouterr().out
    assert "h1: 32 -> 16 units" in out and "parameters" in out


# ------------------------------------------------------------------ grouped convolutions


def _layer_weight(layer, name):
    (v,) = [v for v in layer.weights if v.name == name]
    return keras.ops.convert_to_numpy(v)


def test_depthwise_like_grouped_conv_is_coupled_with_its_producer():
    graph = DependencyGraph(zoo.grouped())
    group = _group(graph, "c1+dwlike")
    assert group.size == 8 and group.blocked_reason is None
    prods = [(layer.name, list(idx)) for layer, idx in group.producers]
    # groups=8 over 8 channels, 16 filters: filters 2c and 2c+1 read channel c only
    assert prods == [("c1", list(range(8))), ("dwlike", list(range(0, 16, 2))),
                     ("dwlike", list(range(1, 16, 2)))]
    assert graph.stops == []


def test_general_grouped_conv_couples_the_same_position_of_every_group():
    graph = DependencyGraph(zoo.PARTIAL["grouped_general"]())
    # 4 groups of 2 input channels: channel i of every group is one channel
    c1 = _group(graph, "c1")
    assert c1.size == 2
    assert sorted(np.concatenate([idx for _, idx in c1.producers]).tolist()) == list(range(8))
    assert [list(idx) for _, idx in c1.producers][:2] == [[0, 1], [2, 3]]
    # 4 groups of 3 filters: filter j of every group is one unit
    g4 = _group(graph, "g4")
    assert g4.size == 3 and [list(idx) for _, idx in g4.producers] == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


@pytest.mark.parametrize("name", ["grouped", "grouped_general"])
def test_grouped_convolutions_shrink_exactly(name):
    model = zoo.randomize({**zoo.ZOO, **zoo.PARTIAL}[name](), seed=2)
    killed = zoo.kill_half(model, seed=2)
    small, info = shrink(model, return_info=True)
    assert_same_outputs(model, small, _x(model))
    before, after = zoo.count_units(model), zoo.count_units(small)
    for layer_name, n in killed.items():
        assert after[layer_name] == before[layer_name] - n, layer_name
    if name == "grouped":
        dw = small.get_layer("dwlike")
        assert dw.groups == after["c1"] == 4 and dw.kernel.shape == (3, 3, 1, 8)
    else:
        g4 = small.get_layer("g4")
        assert g4.groups == 4 and g4.kernel.shape == (3, 3, 1, 8)


def test_dead_input_channel_of_a_general_grouped_conv_is_folded_per_group():
    """A constant nonzero channel read by a 'valid' grouped conv goes into its group's bias."""
    model = zoo.randomize(zoo.PARTIAL["grouped_general"](), seed=4)
    c1 = model.get_layer("c1")
    # channels 1, 3, 5, 7 (position 1 of every group of g4) constant: relu(bias) > 0
    zoo._set(c1, "kernel", lambda k: k.__setitem__((..., [1, 3, 5, 7]), 0))
    zoo._set(c1, "bias", lambda b: b.__setitem__([1, 3, 5, 7], [0.5, 1.0, 1.5, 2.0]))
    small, info = shrink(model, return_info=True)
    assert small.get_layer("c1").filters == 4
    assert info.folded == {"g4": 1}  # one coupled channel (4 input channels) folded
    assert small.get_layer("g4").kernel.shape == (3, 3, 1, 12)
    assert_same_outputs(model, small, _x(model))


# ------------------------------------------------------------------ operation nodes


def test_graph_follows_operation_nodes_with_scalar_and_per_channel_constants():
    model = zoo.ops()
    kinds = {type(n.operation).__name__ for d in model._nodes_by_depth.values() for n in d}
    assert {"Add", "Multiply", "Relu6", "TrueDivide"} <= kinds  # operations, not layers
    graph = DependencyGraph(model)
    assert graph.stops == []
    # the excite conv's channels multiply the c1 channels (squeeze-and-excite)
    assert _group(graph, "c1+excite").blocked_reason is None


def test_operation_nodes_shrink_exactly_and_per_channel_constants_are_sliced():
    model = zoo.randomize(zoo.ops(), seed=1)
    zoo.kill_units(model.get_layer("c1"), [0, 2, 5])
    zoo.kill_units(model.get_layer("excite"), [0, 2, 5])
    small, info = shrink(model, return_info=True)
    assert info.removed == {"c1": (8, 5), "excite": (8, 5)}
    assert small.get_layer("c2").kernel.shape == (3, 3, 5, 8)
    assert_same_outputs(model, small, _x(model))


def test_operation_broadcasting_one_channel_is_a_named_stop():
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, name="c1")(inp)
    gate = L.Conv2D(1, 1, name="gate")(x)
    model = keras.Model(inp, L.Flatten()(L.Conv2D(2, 1, name="c2")(x * gate)))
    graph = DependencyGraph(model)
    ((name, reason),) = graph.stops
    assert name.startswith("multiply") and "broadcasts an input of 1 channels to 8" in reason
    assert "multiply" in _group(graph, "c1").blocked_reason


# ------------------------------------------------------------------ ConvNeXt pieces


def test_convnext_block_removes_hidden_units_and_names_the_layernorm_stops():
    model = zoo.randomize(zoo.PARTIAL["convnext_block"](), seed=5)
    graph = DependencyGraph(model)
    assert sorted(name for name, _ in graph.stops) == ["block_ln", "stem_ln"]
    assert all("LayerNormalization normalizes over the channel axis" in reason
               and "cannot be removed exactly" in reason for _, reason in graph.stops)
    residual = _group(graph, "dwconv+pw2")  # coupled through the grouped conv and `x + y`
    assert [layer.name for layer, _ in residual.followers] == ["layer_scale"]
    assert "stem_ln" in residual.blocked_reason
    killed = zoo.kill_half(model, seed=5)
    assert killed == {"pw1": 16}  # the only group that is not blocked
    small, info = shrink(model, return_info=True)
    assert info.removed == {"pw1": (32, 16)}
    assert [name for name, _ in info.stops] == [name for name, _ in graph.stops]
    assert "graph stops at block_ln: LayerNormalization" in str(info)
    assert_same_outputs(model, small, _x(model))


def test_dead_channels_before_a_layernorm_are_kept_and_reported():
    model = zoo.randomize(zoo.PARTIAL["convnext_block"](), seed=5)
    zoo.kill_units(model.get_layer("stem"), [1, 6])
    small, info = shrink(model, return_info=True)
    assert small.get_layer("stem").filters == 8
    ((group, count, reason),) = info.kept
    assert group == "stem" and count == 2 and "LayerNormalization" in reason
    assert_same_outputs(model, small, _x(model))


def test_layer_scale_rescaling_and_unit_normalization_follow_their_channels():
    from keras.src.applications.convnext import LayerScale

    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inp)
    x = LayerScale(0.5, 6, name="scale")(x)
    x = L.Rescaling([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], name="rescale")(x)
    x = L.UnitNormalization(name="unit")(x)
    model = zoo.randomize(keras.Model(inp, L.Flatten()(L.Conv2D(2, 3, name="c2")(x))), seed=6)
    graph = DependencyGraph(model)
    assert graph.stops == []
    assert [layer.name for layer, _ in _group(graph, "c1").followers] == ["scale"]
    zoo.kill_units(model.get_layer("c1"), [0, 3])
    small = shrink(model)
    assert small.get_layer("c1").filters == 4
    assert small.get_layer("scale").projection_dim == 4
    assert list(small.get_layer("rescale").scale) == [2.0, 3.0, 5.0, 6.0]
    assert_same_outputs(model, small, _x(model))


def _rms_model():
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inp)
    x = L.RMSNormalization(epsilon=0.5, name="rms")(x)  # a large epsilon: its rescaling matters
    return zoo.randomize(keras.Model(inp, L.Flatten()(L.Conv2D(2, 3, name="c2")(x))), seed=7)


def test_zero_channels_before_rms_normalization_are_removed_exactly():
    model = _rms_model()
    assert DependencyGraph(model).stops == []
    zoo.kill_units(model.get_layer("c1"), [1, 4])
    small = shrink(model)
    assert small.get_layer("c1").filters == 4
    rms = small.get_layer("rms")
    assert rms.epsilon == pytest.approx(0.5 * 6 / 4)
    assert_same_outputs(model, small, _x(model))


def test_constant_channel_before_rms_normalization_is_kept_and_reported():
    model = _rms_model()
    c1 = model.get_layer("c1")
    zoo._set(c1, "kernel", lambda k: k.__setitem__((..., [1]), 0))  # channel 1 = its bias
    zoo._set(c1, "bias", lambda b: b.__setitem__(1, 0.7))
    zoo._set(model.get_layer("rms"), "scale", lambda s: s.__setitem__(1, 0.0))  # output 0
    small, info = shrink(model, return_info=True)
    assert small.get_layer("c1").filters == 6
    ((group, count, reason),) = info.kept
    assert group == "c1" and count == 1 and "root mean square" in reason
    assert_same_outputs(model, small, _x(model))
