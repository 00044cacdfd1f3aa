"""The front door: Captum's argument set means one thing in every method and metric."""

import pytest
import torch
from captum._utils.common import _select_targets
from helpers import small_cnn

from captum_faithful import (
    TransMM,
    UnlearnedIntegratedGradients,
    deletion_auc,
    faithfulness_correlation,
    insertion_auc,
    path_monotonicity,
    saco,
)
from captum_faithful._arguments import (
    format_additional_forward_args,
    format_baselines,
    format_inputs,
    format_target,
    repeat_rows,
    resolve_target,
    select_rows,
)


def test_resolve_target_forms():
    out = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 1.0]])
    assert resolve_target(out, None).tolist() == [1, 0]
    assert resolve_target(out, 2).tolist() == [2, 2]
    assert resolve_target(out, (2,)).tolist() == [2, 2]
    assert resolve_target(out, [0, 2]).tolist() == [0, 2]
    assert resolve_target(out, [(0,), (2,)]).tolist() == [0, 2]
    assert resolve_target(out, torch.tensor([2, 1])).tolist() == [2, 1]
    assert resolve_target(out, torch.tensor(1)).tolist() == [1, 1]
    with pytest.raises(ValueError, match="target"):
        resolve_target(out, 3)
    with pytest.raises(ValueError, match="target"):
        resolve_target(out, -1)
    with pytest.raises(ValueError, match="target"):
        resolve_target(out, [0, 1, 2])
    with pytest.raises(ValueError, match="target"):
        resolve_target(out, (0, 1))
    with pytest.raises(TypeError, match="target"):
        resolve_target(out, torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="target"):
        resolve_target(out, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="target"):
        resolve_target(out, "cat")
    with pytest.raises(TypeError, match="target"):
        resolve_target(out, True)


@pytest.mark.parametrize(
    "target", [3, (3,), [3, 1, 4, 1], [(3,), (1,), (4,), (1,)], torch.tensor(3),
               torch.tensor([3, 1, 4, 1])]
)  # fmt: skip
def test_every_captum_target_form_selects_what_captum_selects(target):
    """The classes resolved by the front door pick out exactly the scores Captum's
    own ``_select_targets`` picks for the same ``target``."""
    out = torch.randn(4, 6)
    classes = resolve_target(out, target)
    rows = torch.arange(4)
    assert torch.equal(out[rows, classes], _select_targets(out, target))


def test_one_score_per_sample_is_one_class():
    out = torch.tensor([0.3, -2.0])
    assert resolve_target(out, None).tolist() == [0, 0]
    assert resolve_target(out, 0).tolist() == [0, 0]
    with pytest.raises(ValueError, match="1 classes"):
        resolve_target(out, 1)
    with pytest.raises(ValueError, match="shape"):
        resolve_target(torch.zeros(2, 3, 4), None)


def test_format_target_before_the_forward_pass():
    assert format_target(None, 3) is None
    assert format_target((2,), 3).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="one class per sample"):
        format_target([1, 2], 3)
    with pytest.raises(ValueError, match=">= 0"):
        format_target(torch.tensor([0, -1, 2]), 3)
    with pytest.raises(ValueError, match="one dimension"):
        format_target(torch.tensor([[0], [1], [2]]), 3)


def test_format_inputs_remembers_the_tuple_and_checks():
    x = torch.rand(2, 3)
    assert format_inputs(x) == ((x,), False)
    assert format_inputs((x,)) == ((x,), True)
    with pytest.raises(TypeError, match="`inputs`"):
        format_inputs([x])
    with pytest.raises(TypeError, match="`inputs`"):
        format_inputs(())
    with pytest.raises(ValueError, match="same batch size"):
        format_inputs((x, torch.rand(3, 3)))
    with pytest.raises(ValueError, match="empty batch"):
        format_inputs(torch.rand(0, 3))
    with pytest.raises(ValueError, match="NaN"):
        format_inputs(torch.tensor([[float("nan")]]))
    with pytest.raises(TypeError, match="floating-point"):
        format_inputs(torch.ones(2, 3, dtype=torch.long), floating=True)


def test_format_baselines_every_form():
    x = torch.rand(2, 3, 12, 12)
    y = torch.rand(2, 5)
    zero, mean = format_baselines(("zero", "mean"), (x, y))
    assert torch.equal(zero, torch.zeros_like(x))
    assert torch.allclose(mean, y.mean(dim=1, keepdim=True).expand_as(y))
    (number,) = format_baselines(0.5, (x,))
    assert torch.equal(number, torch.full_like(x, 0.5))
    colour = torch.rand(1, 3, 1, 1)
    (tensor,) = format_baselines(colour, (x,))
    assert torch.equal(tensor, colour.expand_as(x))
    (called,) = format_baselines(lambda t: t.flip(-1), (x,))
    assert torch.equal(called, x.flip(-1))
    shared = format_baselines(1.0, (x, y))
    assert [b.shape for b in shared] == [x.shape, y.shape]
    with pytest.raises(ValueError, match="one entry per input"):
        format_baselines((0.0,), (x, y))
    with pytest.raises(ValueError, match="broadcast"):
        format_baselines(torch.zeros(3, 3, 12, 12), (x,))
    with pytest.raises(ValueError, match="`baselines` must be one of"):
        format_baselines("black", (x,))
    with pytest.raises(TypeError, match="`baselines`"):
        format_baselines(object(), (x,))


def test_additional_forward_args_batch_size_is_checked_and_rows_follow():
    mask = torch.arange(6).view(3, 2)
    args = format_additional_forward_args((mask, 7, torch.tensor(2.0)), 3)
    rows = select_rows(args, torch.tensor([2, 2, 0]))
    assert torch.equal(rows[0], mask[[2, 2, 0]])
    assert rows[1:] == (7, torch.tensor(2.0))
    repeated = repeat_rows(args, 2, 3)
    assert torch.equal(repeated[0], torch.cat([mask, mask]))
    assert format_additional_forward_args(None, 3) is None
    assert format_additional_forward_args(mask, 3)[0] is mask
    with pytest.raises(
        ValueError, match=r"`additional_forward_args\[0\]`.*batch size 4"
    ):
        format_additional_forward_args((mask, 7), 4)
    with pytest.raises(ValueError, match="`additional_forward_args` must have"):
        format_additional_forward_args(mask, 4)


def _metric_calls(model, x, attributions):
    return {
        "insertion_auc": lambda **kw: insertion_auc(model, x, attributions, n_steps=4, **kw),
        "deletion_auc": lambda **kw: deletion_auc(model, x, attributions, n_steps=4, **kw),
        "saco": lambda **kw: saco(model, x, attributions, n_groups=4, **kw),
        "faithfulness_correlation": lambda **kw: faithfulness_correlation(
            model, x, attributions, n_samples=8,
            generator=torch.Generator().manual_seed(0), **kw),
        "path_monotonicity": lambda **kw: path_monotonicity(model, x, 0.0, n_steps=4, **kw),
    }  # fmt: skip


@pytest.mark.parametrize(
    "name", ["insertion_auc", "deletion_auc", "saco", "faithfulness_correlation",
             "path_monotonicity"]
)  # fmt: skip
def test_metrics_read_captum_targets_alike(name):
    """``target=(3,)`` (Captum's index of the class dimension) means class 3 for
    every sample in every metric, also with a batch of several samples, and a
    tensor ``additional_forward_args`` of the wrong batch size is named."""
    torch.manual_seed(0)
    cnn = small_cnn()
    scale = torch.tensor([[1.0], [2.0], [0.5]])

    def model(x, factor):
        return cnn(x) * factor

    x = torch.rand(3, 3, 8, 8)
    attributions = torch.rand(3, 1, 8, 8)
    call = _metric_calls(model, x, attributions)[name]
    expected = call(target=3, additional_forward_args=(scale,))
    assert torch.equal(call(target=(3,), additional_forward_args=(scale,)), expected)
    assert torch.equal(
        call(target=torch.tensor([3, 3, 3]), additional_forward_args=(scale,)),
        expected,
    )
    with pytest.raises(ValueError, match=r"`additional_forward_args\[0\]`"):
        call(target=3, additional_forward_args=(scale[:2],))


def test_uni_and_transmm_read_captum_targets_alike():
    from tiny_vits import hf_vit, images

    torch.manual_seed(0)
    cnn = small_cnn()
    x = torch.rand(3, 3, 8, 8)
    uni = UnlearnedIntegratedGradients(cnn)
    assert torch.equal(uni.attribute(x, target=(3,)), uni.attribute(x, target=3))
    transmm = TransMM(hf_vit().model)
    images = images()
    assert torch.equal(
        transmm.attribute(images, target=(1,)), transmm.attribute(images, target=1)
    )


def _float_target_calls():
    """Every method and metric that takes Captum's ``target``, called on a batch of
    two with ``target`` given as a floating-point tensor of whole class indices."""
    from sae_factory import make_sae
    from tiny_vits import hf_vit, images

    from captum_faithful import (
        FaithfulnessEnsemble,
        FeatureGatedTransMM,
        LayerUnlearnedIntegratedGradients,
        parameter_randomization,
    )

    cnn = small_cnn()
    x = torch.rand(2, 3, 8, 8)
    attributions = torch.rand(2, 1, 8, 8)
    vit = hf_vit().model
    pictures = images(2)
    metrics = {
        name: (lambda target, call=call: call(target=target))
        for name, call in _metric_calls(cnn, x, attributions).items()
    }
    return {
        "UnlearnedIntegratedGradients": lambda target: UnlearnedIntegratedGradients(
            cnn, pgd_steps=1
        ).attribute(x, target=target, n_steps=2),
        "LayerUnlearnedIntegratedGradients": lambda target: (
            LayerUnlearnedIntegratedGradients(cnn, cnn[0], pgd_steps=1).attribute(
                x, target=target, n_steps=2
            )
        ),
        "FaithfulnessEnsemble": lambda target: FaithfulnessEnsemble(
            cnn, n_iter=1
        ).attribute(x, target=target),
        "TransMM": lambda target: TransMM(vit).attribute(pictures, target=target),
        "FeatureGatedTransMM": lambda target: FeatureGatedTransMM(
            vit, {0: make_sae("standard")}
        ).attribute(pictures, target=target),
        "parameter_randomization": lambda target: parameter_randomization(
            lambda m, inputs, t: m(inputs), cnn, x, target=target
        ),
        **metrics,
    }


@pytest.mark.parametrize(
    "name",
    ["UnlearnedIntegratedGradients", "LayerUnlearnedIntegratedGradients",
     "FaithfulnessEnsemble", "TransMM", "FeatureGatedTransMM",
     "parameter_randomization", "insertion_auc", "deletion_auc", "saco",
     "faithfulness_correlation", "path_monotonicity"],
)  # fmt: skip
@pytest.mark.parametrize(
    "target", [torch.tensor([1.0, 2.0]), torch.tensor(1.0)], ids=["rows", "scalar"]
)
def test_a_floating_point_target_is_refused_everywhere(name, target):
    """Captum indexes the output with ``target``, so a float tensor (even of whole
    numbers, which Captum's own methods refuse) is no class index: every method
    and metric refuses it, naming ``target`` and its dtype, before any forward."""
    call = _float_target_calls()[name]
    with pytest.raises(
        TypeError, match=r"`target`.*integer.*torch\.float32.*target\.long\(\)"
    ):
        call(target)
    assert call(target.long()) is not None


def _dtype_calls():
    """Every method and metric with a known model, on inputs of any dtype."""
    from tiny_vits import timm_vit

    from captum_faithful import (
        FaithfulnessEnsemble,
        LayerUnlearnedIntegratedGradients,
        activation_deviation,
        parameter_randomization,
    )

    cnn = small_cnn()
    vit = timm_vit().model

    def metric(name):
        def call(x):
            a = torch.rand(x.shape[0], 1, *x.shape[2:])
            return _metric_calls(cnn, x, a.to(x.dtype))[name](target=1)

        return call

    return cnn, vit, {
        "UnlearnedIntegratedGradients": lambda x: UnlearnedIntegratedGradients(
            cnn, pgd_steps=1).attribute(x, target=1, n_steps=2),
        "LayerUnlearnedIntegratedGradients": lambda x: (
            LayerUnlearnedIntegratedGradients(cnn, cnn[3], pgd_steps=1).attribute(
                x, target=1, n_steps=2)),
        "FaithfulnessEnsemble": lambda x: FaithfulnessEnsemble(cnn, n_iter=1).attribute(
            x, target=1),
        "TransMM": lambda x: TransMM(vit).attribute(
            torch.nn.functional.interpolate(x, size=24).to(x.dtype)),
        "activation_deviation": lambda x: activation_deviation(cnn, "conv", x, x / 2),
        "parameter_randomization": lambda x: parameter_randomization(
            lambda m, inputs, t: m(inputs), cnn, x),
        **{name: metric(name) for name in ("insertion_auc", "deletion_auc", "saco",
                                           "faithfulness_correlation",
                                           "path_monotonicity")},
    }  # fmt: skip


DTYPE_CALLS = (
    "UnlearnedIntegratedGradients", "LayerUnlearnedIntegratedGradients",
    "FaithfulnessEnsemble", "TransMM", "activation_deviation",
    "parameter_randomization", "insertion_auc", "deletion_auc", "saco",
    "faithfulness_correlation", "path_monotonicity",
)  # fmt: skip


@pytest.mark.parametrize("name", DTYPE_CALLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_inputs_of_another_dtype_than_the_model_are_named(name, dtype):
    """A float32 model fed float64/float16/bfloat16 inputs fails in its first
    forward with torch's RuntimeError about a bias; every method and metric
    turns it into a TypeError naming `inputs`, both dtypes and the fix, and the
    model comes back untouched."""
    from helpers import ModelSnapshot

    cnn, vit, calls = _dtype_calls()
    snapshots = [(m, ModelSnapshot.take(m)) for m in (cnn, vit)]
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(
        TypeError,
        match=rf"`inputs` have dtype {dtype}, the model's parameters "
        rf"torch\.float32.*inputs\.to\(torch\.float32\)",
    ) as error:
        calls[name](x.to(dtype))
    assert isinstance(error.value.__cause__, RuntimeError)
    for model, snapshot in snapshots:
        snapshot.assert_same(model)
    assert calls[name](x) is not None


def test_a_model_that_casts_its_inputs_is_not_refused():
    """Only a forward that fails is explained: a Hugging Face ViT casts the pixel
    values to its weights' dtype itself, so float64 images run as before."""
    from tiny_vits import hf_vit, images

    model = hf_vit().model
    pictures = images(2)
    attributions = TransMM(model).attribute(pictures.double())
    assert attributions.dtype == torch.float64
    torch.testing.assert_close(
        attributions.float(), TransMM(model).attribute(pictures), rtol=1e-4, atol=1e-6
    )


def test_meta_tensors_are_refused_by_name():
    """A tensor on the meta device has a shape but no values: the front door
    refuses it by name before anything reads a value from it."""
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"`inputs` are on the meta device.*\.to\("):
        format_inputs(x.to("meta"))
    with pytest.raises(ValueError, match=r"`baselines` are on the meta device"):
        format_baselines(torch.zeros(1, 3, 1, 1, device="meta"), (x,))
    with pytest.raises(ValueError, match=r"`inputs` are on the meta device"):
        UnlearnedIntegratedGradients(small_cnn()).attribute(x.to("meta"), target=0)
    with pytest.raises(ValueError, match=r"`inputs` are on the meta device"):
        saco(small_cnn(), x.to("meta"), x, n_groups=4)


@pytest.mark.parametrize("value", [1.0, float("nan")])
def test_an_output_without_a_batch_is_named_by_its_shape(value):
    """A forward that returns a 0-d tensor (finite or NaN) has no samples to
    check: the methods name the expected output shape, not a NaN."""
    from captum_faithful import FaithfulnessEnsemble

    cnn = small_cnn()

    def forward(x):
        return cnn(x).sum() * value

    for explainer in (
        UnlearnedIntegratedGradients(forward, model=cnn),
        FaithfulnessEnsemble(forward, model=cnn, n_iter=1),
    ):
        with pytest.raises(ValueError, match=r"class scores of shape .*got shape \(\)"):
            explainer.attribute(torch.rand(2, 3, 8, 8))
