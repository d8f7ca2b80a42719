"""Models: shapes on flat and image inputs, empty batches, DDP-safe parameters, config errors."""

from __future__ import annotations

import functools
import math
import pickle

import pytest
import torch

from ray_sebs.errors import ConfigError
from ray_sebs.models import MODEL_NAMES, build_model, check_model

DIGITS_SHAPE = (1, 8, 8)
CASES = [
    ("logreg", (64,)),
    ("logreg", DIGITS_SHAPE),
    ("mlp", (64,)),
    ("mlp", DIGITS_SHAPE),
    ("mlp", (3, 32, 32)),
    ("cnn", DIGITS_SHAPE),
    ("cnn", (3, 32, 32)),
    ("cnn", (2, 4, 5)),
]


@pytest.mark.parametrize(("name", "input_shape"), CASES)
@pytest.mark.parametrize("rows", [0, 1, 5])
def test_forward_takes_flat_features_and_returns_logits(name: str, input_shape: tuple[int, ...],
                                                        rows: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, input_shape, 10)
    logits = model(torch.randn(rows, math.prod(input_shape)))
    assert logits.shape == (rows, 10)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize(("name", "input_shape"), CASES)
def test_every_parameter_gets_a_gradient(name: str, input_shape: tuple[int, ...]) -> None:
    # DDP without find_unused_parameters hangs or errors if a parameter is left out of the graph.
    model = build_model(name, input_shape, 3)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, math.prod(input_shape))),
                                             torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_empty_batch_backward(name: str) -> None:
    # A rank may get a micro-batch of 0 rows; a summed loss over it must still backprop.
    model = build_model(name, DIGITS_SHAPE, 10)
    model(torch.randn(0, 64)).sum().backward()


def test_mlp_default_is_64_128_10_on_digits() -> None:
    model = build_model("mlp", DIGITS_SHAPE, 10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 128), (128, 10)]
    wide = build_model("mlp", (64,), 10, hidden_sizes=(32, 16))
    linears = [m for m in wide.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16), (16, 10)]


def test_logreg_is_one_linear_layer() -> None:
    model = build_model("logreg", (64,), 10)
    assert sum(p.numel() for p in model.parameters()) == 64 * 10 + 10


def test_no_batch_norm() -> None:
    for name in MODEL_NAMES:
        model = build_model(name, (3, 32, 32), 10)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_partial_pickles_and_builds() -> None:
    factory = functools.partial(build_model, "cnn", DIGITS_SHAPE, 10)
    restored = pickle.loads(pickle.dumps(factory))
    assert restored()(torch.randn(2, 64)).shape == (2, 10)


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as error:
        check_model("resnet", (64,))
    assert error.value.field == "model"
    assert "resnet" in str(error.value)
    assert all(name in str(error.value) for name in MODEL_NAMES)
    with pytest.raises(ConfigError):
        build_model("resnet", (64,), 10)


@pytest.mark.parametrize("input_shape", [(64,), (1, 3, 8), (1, 8, 3), (8, 8)])
def test_cnn_needs_image_shaped_data(input_shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError) as error:
        check_model("cnn", input_shape)
    assert error.value.field == "model"
    assert str(input_shape) in str(error.value)
    assert "mlp" in error.value.fix


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_flat_models_accept_any_shape(name: str) -> None:
    check_model(name, (64,))
    check_model(name, (3, 32, 32))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"input_shape": ()}, "input_shape"),
    ({"input_shape": (0,)}, "input_shape"),
    ({"num_classes": 0}, "num_classes"),
    ({"hidden_sizes": (0,)}, "hidden_sizes"),
])
def test_bad_arguments(kwargs: dict[str, object], field: str) -> None:
    arguments: dict[str, object] = {"input_shape": (64,), "num_classes": 10, **kwargs}
    hidden = arguments.pop("hidden_sizes", (128,))
    with pytest.raises(ConfigError) as error:
        build_model("mlp", arguments["input_shape"], arguments["num_classes"],  # type: ignore[arg-type]
                    hidden_sizes=hidden)  # type: ignore[arg-type]
    assert error.value.field == field
