from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from helpers import ModelSnapshot

from captum_faithful._utils import (
    as_logits,
    check_finite,
    markdown_table,
    preserve_model_state,
    resolve_model,
)


def test_as_logits_reduces_model_outputs():
    logits = torch.randn(2, 3)
    assert as_logits({"logits": logits, "hidden": None}) is logits
    assert as_logits((logits, torch.zeros(1))) is logits
    with pytest.raises(TypeError, match="logits"):
        as_logits({"scores": logits})


def test_as_logits_reads_a_logits_attribute_before_the_first_element():
    """An output object that is not a mapping (a dataclass, a named tuple) is read
    at its ``logits`` attribute, as the demo and the benchmarks did with their own
    copies; a named tuple whose first field is not the logits is not misread."""
    logits = torch.randn(2, 3)
    assert as_logits(SimpleNamespace(logits=logits, hidden=torch.ones(1))) is logits
    Output = namedtuple("Output", ["hidden", "logits"])
    assert as_logits(Output(torch.zeros(2, 5), logits)) is logits
    with pytest.raises(TypeError, match="ModelOutput"):
        as_logits(SimpleNamespace(scores=logits))


def test_check_finite_names_the_argument():
    check_finite("inputs", (torch.ones(2),))
    with pytest.raises(ValueError, match="`attributions`"):
        check_finite("attributions", torch.tensor([1.0, float("nan")]))


def test_resolve_model_requires_a_module(cnn):
    assert resolve_model(cnn, None) is cnn
    assert resolve_model(cnn.forward, None) is cnn
    with pytest.raises(TypeError, match="model"):
        resolve_model(lambda x: x, None)


def test_preserve_model_state_restores_after_exception(cnn):
    cnn[0].weight.requires_grad_(False)
    snapshot = ModelSnapshot.take(cnn)
    with pytest.raises(RuntimeError, match="boom"):
        with preserve_model_state(cnn):
            cnn.train()
            for p in cnn.parameters():
                p.requires_grad_(True)
            raise RuntimeError("boom")
    snapshot.assert_same(cnn)


def test_markdown_table_aligns_numbers_right_and_escapes_pipes():
    text = markdown_table(["name", "kind", "value"], [["a|b", "x", 1.5]], 2)
    assert text.splitlines() == [
        "| name | kind | value |",
        "| --- | --- | ---: |",
        "| a\\|b | x | 1.5 |",
    ]
