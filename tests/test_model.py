"""Model builder: shapes and parameter counts against hand-computed Keras numbers, errors, semantics."""

from __future__ import annotations

import math

import pytest
import torch

from fcclass.config.layers import LAYER_CLASSES, Conv2D
from fcclass.config.sections import ModelConfig
from fcclass.errors import ModelError
from fcclass.model.layers import BUILDERS, BuildContext, build_layer
from fcclass.model.network import build_model


def model(layers: list[dict], shape=(1, 28, 28), classes: int = 10):
    return build_model(ModelConfig.model_validate({"layers": layers}), shape, classes)


def test_keras_parameter_counts_of_the_classic_cnn() -> None:
    # keras.Sequential([Input((28,28,1)), Conv2D(32,3,'relu'), MaxPooling2D(), Conv2D(64,3,'relu'),
    # MaxPooling2D(), Flatten(), Dense(128,'relu'), Dropout(.5), Dense(10,'softmax')]).summary()
    net = model([
        {"type": "Conv2D", "filters": 32, "kernel_size": 3, "activation": "relu"},
        {"type": "MaxPooling2D", "pool_size": 2},
        {"type": "Conv2D", "filters": 64, "kernel_size": 3, "activation": "relu"},
        {"type": "MaxPooling2D", "pool_size": 2},
        {"type": "Flatten"},
        {"type": "Dense", "units": 128, "activation": "relu"},
        {"type": "Dropout", "rate": 0.5},
        {"type": "Dense", "activation": "softmax"},
    ])
    s = net.summary()
    assert [li.output_shape for li in s.layers] == [(32, 26, 26), (32, 13, 13), (64, 11, 11), (64, 5, 5), (1600,), (128,), (128,), (10,)]
    assert [li.params for li in s.layers] == [3 * 3 * 1 * 32 + 32, 0, 3 * 3 * 32 * 64 + 64, 0, 0, 1600 * 128 + 128, 0, 128 * 10 + 10]
    assert s.total_params == 320 + 18496 + 204928 + 1290 == 225034
    assert s.trainable_params == s.total_params and s.non_trainable_params == 0
    assert [li.name for li in s.layers] == ["conv2d", "max_pooling2d", "conv2d_1", "max_pooling2d_1", "flatten", "dense", "dropout", "dense_1"]
    assert sum(p.numel() for p in net.parameters()) == s.total_params


def test_dense_without_bias_and_batchnorm_and_frozen_layers_count_like_keras() -> None:
    s = model([
        {"type": "Flatten"},
        {"type": "Dense", "units": 64, "use_bias": False},
        {"type": "BatchNormalization"},
        {"type": "Dense", "units": 32, "trainable": False},
        {"type": "Dense"},
    ]).summary()
    assert s.layers[1].params == 784 * 64  # n*m without bias
    assert s.layers[2].params == 4 * 64  # gamma, beta, moving mean, moving variance
    assert (s.layers[2].trainable_params, s.layers[2].non_trainable_params) == (128, 128)
    assert (s.layers[3].trainable_params, s.layers[3].non_trainable_params) == (0, 64 * 32 + 32)
    assert s.total_params == 784 * 64 + 256 + 64 * 32 + 32 + 32 * 10 + 10
    assert s.non_trainable_params == 128 + 64 * 32 + 32


def test_frozen_layer_does_not_change_when_trained() -> None:
    net = model([{"type": "Flatten"}, {"type": "Dense", "units": 8, "trainable": False, "name": "frozen"}, {"type": "Dense"}])
    before = net.body.frozen.weight.detach().clone()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
    loss = torch.nn.functional.cross_entropy(net(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert torch.equal(before, net.body.frozen.weight)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "expected"),
    [(28, 3, 1, "valid", 26), (28, 3, 1, "same", 28), (28, 3, 2, "same", 14), (7, 3, 2, "same", 4),
     (28, 4, 1, "same", 28), (28, 5, 2, "valid", 12), (9, 2, 2, "same", 5)],
)
def test_conv_output_sizes_match_keras(size: int, kernel: int, stride: int, padding: str, expected: int) -> None:
    net = model([{"type": "Conv2D", "filters": 2, "kernel_size": kernel, "strides": stride, "padding": padding},
                 {"type": "Flatten"}, {"type": "Dense"}], shape=(1, size, size))
    assert net.summary().layers[0].output_shape == (2, expected, expected)
    assert net(torch.zeros(2, 1, size, size)).shape == (2, 10)  # the real module agrees with the inferred shape


def test_a_model_without_conv_is_a_plain_mlp_over_flattened_input() -> None:
    net = model([{"type": "Dense", "units": 128, "activation": "relu"}, {"type": "Dense"}])
    assert net.summary().layers[0].params == 784 * 128 + 128
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert model([{"type": "Dense"}], shape=(20,), classes=3)(torch.zeros(5, 20)).shape == (5, 3)


def test_global_average_pooling_and_average_pooling() -> None:
    s = model([{"type": "Conv2D", "filters": 16, "kernel_size": 3, "padding": "same"}, {"type": "AveragePooling2D", "pool_size": 2, "strides": 1},
               {"type": "GlobalAveragePooling2D"}, {"type": "Dense"}]).summary()
    assert [li.output_shape for li in s.layers] == [(16, 28, 28), (16, 27, 27), (16,), (10,)]


def test_every_layer_type_builds() -> None:
    examples = {
        "Conv2D": {"filters": 4, "kernel_size": 3}, "MaxPooling2D": {}, "AveragePooling2D": {}, "BatchNormalization": {},
        "Activation": {"activation": "relu"}, "Dropout": {"rate": 0.1},
        "Backbone": {"arch": "mobilenet_v3_small", "weights": None},
    }
    assert set(examples) | {"Flatten", "Dense", "GlobalAveragePooling2D"} == set(LAYER_CLASSES)
    for type_name, args in examples.items():
        net = model([{"type": type_name, **args}, {"type": "Flatten"}, {"type": "Dense"}], shape=(3, 8, 8))
        assert net(torch.zeros(2, 3, 8, 8)).shape == (2, 10), type_name


def test_a_layer_type_builds_from_its_config_and_input_shape() -> None:
    # each layer type has its builder: adding one is its config class and one builder, build_model only loops
    assert all(any(c in BUILDERS for c in cls.__mro__) for cls in LAYER_CLASSES.values())
    ctx = BuildContext(where="model.layers[0] (Conv2D 'c')", num_classes=10, last_dense=False, final_softmax=False,
                       previous=None, previous_block=None, regularized=[], frozen_norms=[])
    conv = Conv2D(type="Conv2D", filters=8, kernel_size=[3, 5], strides=2, activation="relu", kernel_regularizer={"l2": 0.1})
    modules, shape = build_layer(conv, (3, 28, 28), ctx)
    assert shape == (8, (28 - 3) // 2 + 1, (28 - 5) // 2 + 1)
    assert [type(m) for m in modules] == [torch.nn.Conv2d, torch.nn.ReLU]
    assert ctx.regularized == [(modules[0], 0.0, 0.1)]  # collected for Network.regularization_loss
    with pytest.raises(ModelError, match=r"^model.layers\[0\] \(Conv2D 'c'\) needs image input .* gets \(784\)"):
        build_layer(conv, (784,), ctx)


def test_sizes_given_as_one_int_or_a_pair_build_the_same_layer() -> None:
    square = model([{"type": "Conv2D", "filters": 2, "kernel_size": 3, "strides": 2}, {"type": "MaxPooling2D", "pool_size": 2},
                    {"type": "Flatten"}, {"type": "Dense"}])
    pairs = model([{"type": "Conv2D", "filters": 2, "kernel_size": [3, 3], "strides": [2, 2]}, {"type": "MaxPooling2D", "pool_size": [2, 2]},
                   {"type": "Flatten"}, {"type": "Dense"}])
    assert repr(square) == repr(pairs)
    assert [li.output_shape for li in square.summary().layers] == [(2, 13, 13), (2, 6, 6), (72,), (10,)]


def test_softmax_is_applied_at_inference_not_in_the_logits() -> None:
    net = model([{"type": "Flatten"}, {"type": "Dense", "activation": "softmax"}]).eval()
    x = torch.randn(4, 1, 28, 28) * 5
    logits = net(x)
    assert not torch.allclose(logits.sum(1), torch.ones(4))
    assert torch.allclose(net.predict_proba(x).sum(1), torch.ones(4))
    assert torch.allclose(net.predict_proba(x), torch.softmax(logits, 1))
    # A separate final Activation(softmax) behaves the same way.
    net2 = model([{"type": "Flatten"}, {"type": "Dense"}, {"type": "Activation", "activation": "softmax"}])
    assert len(list(net2.body.children())) == 3 and not any(isinstance(m, torch.nn.Softmax) for m in net2.modules())


def test_l1_l2_regularizer_penalty_equals_keras_regularization_loss() -> None:
    from fcclass.bench.runner import _import_keras, keras_available

    if not keras_available():
        pytest.skip("Keras is not installed (pip install -e '.[bench]')")
    keras = _import_keras()
    net = model([{"type": "Flatten"}, {"type": "Dense", "units": 8, "name": "hidden", "kernel_regularizer": {"l1": 0.01, "l2": 0.001}},
                 {"type": "Dense"}])
    layer = keras.layers.Dense(8, kernel_regularizer=keras.regularizers.L1L2(l1=0.01, l2=0.001))
    layer.build((None, 784))
    layer.kernel.assign(net.body.hidden.weight.detach().T.numpy())  # Keras stores the kernel as (in, out)
    keras_penalty = float(sum(keras.ops.convert_to_numpy(loss) for loss in layer.losses))
    assert net.regularization_loss().item() == pytest.approx(keras_penalty, rel=1e-5)
    assert model([{"type": "Flatten"}, {"type": "Dense"}]).regularization_loss() is None


def test_initializers_follow_keras_statistics() -> None:
    torch.manual_seed(0)
    net = model([{"type": "Flatten"}, {"type": "Dense", "units": 512, "kernel_initializer": "he_normal", "bias_initializer": "ones", "name": "he"},
                 {"type": "Dense", "kernel_initializer": "glorot_uniform", "name": "gu"}])
    he = net.body.he[0].weight if isinstance(net.body.he, torch.nn.Sequential) else net.body.he.weight
    assert abs(he.std().item() - math.sqrt(2 / 784)) < 0.003
    assert he.abs().max().item() <= 2 * math.sqrt(2 / 784) / 0.8796 + 1e-6  # truncated at two std
    bias = net.body.he[0].bias if isinstance(net.body.he, torch.nn.Sequential) else net.body.he.bias
    assert torch.all(bias == 1)
    limit = math.sqrt(6 / (512 + 10))
    assert net.body.gu.weight.abs().max().item() <= limit
    assert net.body.gu.weight.abs().max().item() > 0.9 * limit
    assert torch.all(net.body.gu.bias == 0)  # Keras default bias: zeros


def test_shape_errors_name_the_layer_and_the_fix() -> None:
    with pytest.raises(ModelError, match=r"model.layers\[1\] \(Dense 'dense'\).*\(8, 26, 26\).*Flatten"):
        model([{"type": "Conv2D", "filters": 8, "kernel_size": 3}, {"type": "Dense"}])
    with pytest.raises(ModelError, match=r"kernel 5x5 is larger than its input 3x3"):
        model([{"type": "Conv2D", "filters": 8, "kernel_size": 5}, {"type": "Flatten"}, {"type": "Dense"}], shape=(1, 3, 3))
    with pytest.raises(ModelError, match=r"10 classes but units is 7"):
        model([{"type": "Flatten"}, {"type": "Dense", "units": 7}])
    with pytest.raises(ModelError, match=r"needs 'units'"):
        model([{"type": "Flatten"}, {"type": "Dense"}, {"type": "Dense"}])
    with pytest.raises(ModelError, match="used twice"):
        model([{"type": "Flatten", "name": "x"}, {"type": "Dense", "name": "x"}])


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "tanh", "gelu"])
def test_activation_before_max_pooling_gives_the_same_outputs_and_gradients(activation: str) -> None:
    # The builder runs a non-decreasing activation after the pool (cheaper); the maths must be conv -> f -> pool.
    torch.manual_seed(0)
    net = model([
        {"type": "Conv2D", "filters": 8, "kernel_size": 3, "activation": activation},
        {"type": "MaxPooling2D", "pool_size": 2},
        {"type": "Flatten"},
        {"type": "Dense"},
    ], shape=(3, 12, 12))
    conv, dense = net.body.conv2d[0], net.body.dense
    x = torch.randn(4, 3, 12, 12)
    f = {"relu": torch.relu, "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.2), "elu": torch.nn.functional.elu,
         "tanh": torch.tanh, "gelu": torch.nn.functional.gelu}[activation]
    expected = dense(torch.max_pool2d(f(torch.nn.functional.conv2d(x, conv.weight, conv.bias)), 2).flatten(1))
    (g_expected,) = torch.autograd.grad(expected.square().sum(), conv.weight)
    got = net(x)
    (g_got,) = torch.autograd.grad(got.square().sum(), conv.weight)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g_got, g_expected)
    moved = activation != "gelu"  # gelu is not monotonic: it stays before the pool
    assert (len(net.body.conv2d) == 1) == moved
    # parameter names do not depend on where the activation runs: old checkpoints still load
    assert "body.conv2d.0.weight" in net.state_dict()


def test_dropout_drops_the_configured_fraction_and_rescales() -> None:
    torch.manual_seed(0)
    net = model([{"type": "Flatten"}, {"type": "Dropout", "rate": 0.3}, {"type": "Dense"}])
    drop = net.body.dropout
    x = torch.ones(200, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    # kept values are scaled by 1 / (1 - p), p as the mask draws it (rounded to 1/32768): the mean is unchanged
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7), rtol=1e-4, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * mask * scale)/dx = mask * scale
    assert not torch.equal(drop(x), drop(x))  # a new mask each call
    net.eval()
    assert torch.equal(drop(x), x)
    torch.manual_seed(1)
    a = drop.train()(x)
    torch.manual_seed(1)
    assert torch.equal(a, drop(x))  # the mask comes from torch's seeded generator: runs are reproducible


def test_a_dropout_rate_just_below_one_trains() -> None:
    # the config allows any rate < 1; the CPU mask rounds the rate to 1/32768, and 0.99999 rounds to 1
    torch.manual_seed(0)
    net = model([{"type": "Flatten"}, {"type": "Dropout", "rate": 0.99999}, {"type": "Dense"}])
    x = torch.ones(2000, 1, 28, 28)  # about 16 of these 1.6 million values are kept
    y = net.body.dropout(x)
    kept = y[y != 0]
    assert torch.isfinite(y).all() and 0 < len(kept) < 100
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - 0.99999)))  # the expected output is still the input
    assert torch.isfinite(net(x)).all()
