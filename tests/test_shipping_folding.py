"""Batch norm folded into convolutions inside an exported program: what folds, what must not, and that the
program computes what it did, saves, validates and loads."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from pipeline.shipping.folding import fold_batch_norms


def _batch_norm(channels: int, seed: int) -> nn.BatchNorm2d:
    """A batch norm with statistics and affine parameters far from the identity."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) * 3 + 0.05)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
    return bn


class NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: a batch norm subclass with its activation inside."""

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                     self.eps)
        return nn.functional.relu6(x)


class Net(nn.Module):
    """Four batch norms that fold (after a bias-free conv, a conv with a bias, a depthwise conv, and a
    subclass with its activation) and two that must not: one whose conv output is read elsewhere too, and
    one after an addition."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), _batch_norm(8, 1)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=True), _batch_norm(8, 2)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), NormAct(8)
        self.c4, self.b4 = nn.Conv2d(8, 8, 1, bias=False), _batch_norm(8, 4)
        self.b5 = _batch_norm(8, 5)
        self.c6, self.b6 = nn.Conv2d(8, 8, 1, bias=False), _batch_norm(8, 6)
        self.b3.load_state_dict(_batch_norm(8, 3).state_dict())

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.b2(self.c2(x))
        x = self.b3(self.c3(x))
        raw = self.c4(x)
        x = self.b4(raw) + raw  # the conv's own output is read after its batch norm: no fold
        x = self.b5(x + 1.0)  # not after a convolution
        return self.b6(self.c6(x)).mean(dim=(2, 3))


def _batch_norms(program) -> int:
    return sum(n.target is torch.ops.aten.batch_norm.default for n in program.graph.nodes)


@pytest.fixture(scope="module")
def folded():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(4, 3, 20, 24)
    dims = ({0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("h", min=4, max=512),
             3: torch.export.Dim("w", min=4, max=512)},)
    with torch.no_grad():
        program = torch.export.export(net, (x,), dynamic_shapes=dims)
    before = len(program.state_dict)
    count = fold_batch_norms(program)
    return net, program, count, before


def test_every_batch_norm_read_only_after_its_convolution_is_folded_and_no_other(folded):
    _, program, count, _ = folded
    assert count == 4
    assert _batch_norms(program) == 2  # b4 (its conv's output read twice) and b5 (after an addition)


def test_the_folded_program_computes_what_the_network_does_at_other_sizes(folded):
    net, program, _, _ = folded
    for shape in [(1, 3, 7, 9), (3, 3, 33, 17)]:
        x = torch.randn(*shape)
        with torch.inference_mode():
            want, got = net(x), program.module()(x)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_folded_weights_leave_the_program_and_it_validates_saves_and_loads(folded):
    net, program, count, before = folded
    program.validate()
    # each fold drops the batch norm's weight, mean and variance (its bias holds the conv's new bias,
    # or is dropped too where the conv had a bias of its own)
    assert len(program.state_dict) <= before - 3 * count
    targets = {s.target for s in program.graph_signature.input_specs}
    assert "b1.running_mean" not in targets and "b1.weight" not in targets
    assert "b4.running_mean" in targets  # the unfolded one keeps its statistics
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(loaded.module()(x), program.module()(x))
        assert torch.allclose(loaded.module()(x), net(x), rtol=1e-5, atol=1e-5)


def test_a_convolution_whose_weight_is_shared_is_not_rewritten():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1, bias=False), _batch_norm(3, 7)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)  # one weight, two convolutions

    net = Shared().eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        program = torch.export.export(net, (x,))
    assert fold_batch_norms(program) == 0
    with torch.inference_mode():
        assert torch.allclose(program.module()(x), net(x))


def test_training_mode_and_bf16_convolutions_are_left_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), _batch_norm(4, 8)).eval().to(torch.bfloat16)
    with torch.no_grad():
        program = torch.export.export(net, (torch.randn(1, 3, 4, 4, dtype=torch.bfloat16),))
    assert fold_batch_norms(program) == 0  # bf16 weights would lose the fold's precision
    assert _batch_norms(program) == 1
    training = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), _batch_norm(4, 9)).train()
    program = torch.export.export(training, (torch.randn(2, 3, 4, 4),))
    assert fold_batch_norms(program) == 0  # batch statistics: nothing to fold


def test_a_batch_norm_that_is_the_programs_output_is_left_and_the_program_stays_valid():
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), _batch_norm(4, 10)).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        program = torch.export.export(net, (x,))
    assert fold_batch_norms(program) == 0
    program.validate()
    torch.export.save(program, io.BytesIO())
    with torch.inference_mode():
        assert torch.allclose(program.module()(x), net(x))


def test_a_convolution_on_an_unbatched_input_is_not_folded_along_the_wrong_dimension():
    """Conv1d on (C, L): the batch norm after it normalizes dimension 1 (L here, equal to C_out), not the
    convolution's output channels."""
    net = nn.Sequential(nn.Conv1d(3, 5, 1, bias=False), nn.BatchNorm1d(5), nn.ReLU()).eval()
    net[1].load_state_dict({k: v for k, v in _batch_norm(5, 11).state_dict().items()})
    x = torch.randn(3, 5)
    with torch.no_grad():
        program = torch.export.export(net, (x,))
    assert fold_batch_norms(program) == 0
    with torch.inference_mode():
        assert torch.allclose(program.module()(x), net(x))
