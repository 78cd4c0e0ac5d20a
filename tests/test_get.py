"""The one ``get()`` behaviour of `tfprune.methods`, `tfprune.structures` and `tfprune.schedules`.

Each module's ``get`` accepts an instance (returned as is), a registered name
(case, ``-`` and ``_`` do not matter; a class that needs arguments is a
ValueError saying so), a config dict from ``keras.saving.serialize_keras_object``
and None where None means something; everything else is a clear error.
"""

import keras
import pytest

from tfprune import methods, schedules, structures

# One row per module: its get, the argument name in messages, an instance, a name that
# builds an instance (None: every class needs arguments), a name of a class that needs
# arguments, what None gives (or the exception it raises), an object of another kind, and
# the registered names.
MODULES = {
    "methods": dict(
        get=methods.get, argument="method", make=lambda: methods.DPP(2, 4, seed=3),
        name=("Turbo-VBI", methods.TurboVBI), needs=("DPP", "DPP"),
        none=TypeError, other=lambda: structures.Filter(), registry=methods.BY_NAME),
    "structures": dict(
        get=structures.get, argument="structure", make=lambda: structures.KOutOfN(1, 4),
        name=("FILTER", structures.Filter), needs=("k-out-of-n", "KOutOfN"),
        none=structures.Unstructured(), other=lambda: schedules.ConstantSparsity(0.5, 0),
        registry=structures.ALL),
    "schedules": dict(
        get=schedules.get, argument="schedule",
        make=lambda: schedules.PolynomialDecay(0.1, 0.7, begin_step=2, end_step=40, power=2),
        name=None, needs=("Polynomial-Decay", "PolynomialDecay"),
        none=None, other=lambda: methods.Magnitude(0.5),
        registry={"constant_sparsity": schedules.ConstantSparsity,
                  "polynomial_decay": schedules.PolynomialDecay}),
}
IDS = sorted(MODULES)


@pytest.fixture(params=IDS)
def mod(request):
    return MODULES[request.param]


def test_an_instance_is_returned_as_is(mod):
    obj = mod["make"]()
    assert mod["get"](obj) is obj


@pytest.mark.parametrize("module", [k for k in IDS if MODULES[k]["name"]])  # schedules: none
@pytest.mark.parametrize("spelling", [str.lower, str.upper, lambda s: s.replace("_", "-"),
                                      lambda s: s.replace("_", "")])
def test_registered_names_ignore_case_dashes_and_underscores(module, spelling):
    mod = MODULES[module]
    name, cls = mod["name"]
    key = name.lower().replace("-", "_")
    obj = mod["get"](spelling(key))
    assert type(obj) is cls and obj.get_config() == cls().get_config()


def test_every_registered_name_builds_its_class_or_says_it_needs_arguments(mod):
    for name, cls in mod["registry"].items():
        try:
            obj = mod["get"](name)
        except ValueError as err:
            assert f"names {cls.__name__}, which needs arguments" in str(err), err
        else:
            assert type(obj) is cls


def test_a_name_of_a_class_that_needs_arguments_says_so(mod):
    name, cls_name = mod["needs"]
    with pytest.raises(ValueError, match=rf"`{mod['argument']}`='{name}' names {cls_name}, "
                                         r"which needs arguments.*pass an instance"):
        mod["get"](name)


def test_an_unknown_name_lists_the_allowed_names(mod):
    with pytest.raises(ValueError) as err:
        mod["get"]("polynomial")
    msg = str(err.value)
    assert f"`{mod['argument']}`='polynomial' is not a known name" in msg
    for name in mod["registry"]:
        assert repr(name) in msg, msg


def test_a_config_dict_round_trips(mod):
    obj = mod["make"]()
    config = keras.saving.serialize_keras_object(obj)
    again = mod["get"](config)
    assert type(again) is type(obj) and again is not obj
    assert again.get_config() == obj.get_config()


def test_a_config_dict_of_another_kind_is_a_type_error(mod):
    other = mod["other"]()
    config = keras.saving.serialize_keras_object(other)
    with pytest.raises(TypeError, match=rf"`{mod['argument']}`: the config dict .* deserializes "
                                        rf"to .*{type(other).__name__}.*which is not a tfprune"):
        mod["get"](config)


@pytest.mark.parametrize("config", [{"sparsity": 0.5}, {"class_name": "NoSuchClass", "config": {}}])
def test_a_dict_that_is_not_a_valid_config_is_a_value_error(mod, config):
    with pytest.raises(ValueError, match=rf"`{mod['argument']}`: the (config )?dict .*"
                                         "keras.saving.serialize_keras_object"):
        mod["get"](config)


def test_none_has_the_documented_meaning(mod):
    if mod["none"] is TypeError:
        with pytest.raises(TypeError, match=rf"`{mod['argument']}` must be .*got None"):
            mod["get"](None)
    else:
        assert mod["get"](None) == mod["none"]
        assert type(mod["get"](None)) is type(mod["none"])


@pytest.mark.parametrize("value", [0.5, 3, True, ["filter"], b"filter"])
def test_other_types_are_type_errors_naming_argument_value_and_allowed(mod, value):
    with pytest.raises(TypeError) as err:
        mod["get"](value)
    msg = str(err.value)
    assert msg.startswith(f"`{mod['argument']}` must be a tfprune."), msg
    assert "config dict" in msg and f"got {value!r} ({type(value).__name__})" in msg
    assert ("None (" in msg) == (mod["none"] is not TypeError), msg


def test_a_class_instead_of_an_instance_is_a_type_error(mod):
    cls = type(mod["make"]())
    with pytest.raises(TypeError, match=rf"`{mod['argument']}` must be an instance, got the "
                                        rf"class {cls.__name__}"):
        mod["get"](cls)


def test_constructor_arguments_use_the_same_rules():
    """Methods resolve `structure` and `schedule` through the same get."""
    assert methods.Magnitude(0.5, structure="Filter").structure == structures.Filter()
    with pytest.raises(ValueError, match="`structure`='block' names Block, which needs"):
        methods.Magnitude(0.5, structure="block")
    with pytest.raises(ValueError, match="`schedule`='polynomial' is not a known name"):
        methods.Magnitude(0.5, schedule="polynomial")
    with pytest.raises(TypeError, match="`schedule` must be .*got 0.5"):
        methods.Magnitude(0.5, schedule=0.5)
    config = keras.saving.serialize_keras_object(methods.Magnitude(0.5, structure="kernel"))
    assert methods.get(config).structure == structures.Kernel()
