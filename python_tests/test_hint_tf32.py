"""hint_loss's allow_tf32: the default follows PyTorch's TF32 flag for convs, as the eager
1x1 conv it replaces does; True/False override it. Checked at the Triton launcher (what
precision the kernel is asked for), under the interpreter on CPU tensors."""
import pytest
import torch

import kdkernels
from kdkernels.ops import hint as ops_hint

from conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="checks the launcher's argument under the interpreter")


@pytest.fixture
def conv_precision():
    """Set cuDNN's conv fp32 precision for one test, restore it after."""
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision

    def set_(value):
        conv.fp32_precision = value

    yield set_
    conv.fp32_precision = saved


@pytest.fixture
def seen(monkeypatch):
    """The allow_tf32 each Triton launch was given."""
    from kdkernels.triton import hint as tri

    calls = []
    real = tri.hint_fused

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(tri, "hint_fused", spy)
    return calls


def _inputs():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(2, 16, 4, 4, generator=g, requires_grad=True)
    ft = torch.randn(2, 16, 4, 4, generator=g)
    w = torch.randn(16, 16, 1, 1, generator=g, requires_grad=True)
    return fs, ft, w


@pytest.mark.parametrize("precision,expected", [("tf32", True), ("ieee", False)])
def test_default_follows_cudnn_conv_flag(conv_precision, seen, precision, expected):
    conv_precision(precision)
    assert ops_hint.torch_allows_tf32() is expected
    kdkernels.hint_loss(*_inputs(), backend="triton").backward()
    assert seen == [expected]


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
@pytest.mark.parametrize("explicit", [True, False])
def test_explicit_overrides_the_flag(conv_precision, seen, precision, explicit):
    conv_precision(precision)
    kdkernels.hint_loss(*_inputs(), allow_tf32=explicit, backend="triton")
    assert seen == [explicit]


def test_legacy_flag_is_followed(seen):
    saved = torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision
    try:
        torch.backends.cudnn.allow_tf32 = False
        assert ops_hint.torch_allows_tf32() is False
        torch.backends.cudnn.allow_tf32 = True
        assert ops_hint.torch_allows_tf32() is True
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = saved


def test_hint_loss_module_default_follows_the_flag(conv_precision, seen):
    conv_precision("ieee")
    fs, ft, w = _inputs()
    conv = torch.nn.Conv2d(16, 16, 1)
    kdkernels.nn.HintLoss(backend="triton")(fs, ft, conv)
    assert seen == [False]


def test_compiled_default_follows_the_flag(conv_precision, seen):
    conv_precision("ieee")
    fs, ft, w = _inputs()
    fn = torch.compile(lambda a, b, c: kdkernels.hint_loss(a, b, c, backend="triton"), fullgraph=True)
    fn(fs, ft, w)
    assert seen == [False]
