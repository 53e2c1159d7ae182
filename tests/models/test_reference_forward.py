"""PreAct ResNet and WideResNet against the forward passes of the reference code they follow.

Parameter counts and output shapes cannot tell a pre-activation block from a post-activation one,
or a shortcut on the raw input from one on the pre-activated input. Here each block's forward is
written out as the reference code computes it (Wong et al. 2020's and Rice et al. 2020's
PreActBlock; the WideResNet BasicBlock of Zagoruyko & Komodakis as TRADES and MART ship it), over
the same layers with randomised batch-norm statistics, and must equal fortify's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fortify.models.resnet import PreActResNet
from fortify.models.wideresnet import WideResNet


def _randomise_batch_norms(model: nn.Module) -> nn.Module:
    """Statistics and affine parameters far from the identity, so that every BN-ReLU shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.double().eval()


def _preact_block(block, x):
    # out = relu(bn1(x)); shortcut = self.shortcut(out) if it exists else x;
    # out = conv1(out); out = conv2(relu(bn2(out))); out += shortcut
    out = F.relu(block.bn1(x))
    shortcut = block.shortcut(out) if block.shortcut is not None else x
    out = block.conv1(out)
    out = block.conv2(F.relu(block.bn2(out)))
    return out + shortcut


def _wide_block(block, x):
    # equalInOut: out = relu(bn1(x)), the identity shortcut takes the raw x; otherwise x itself is
    # replaced by relu(bn1(x)) and the 1x1 shortcut takes that
    equal_in_out = block.shortcut is None
    if equal_in_out:
        out = F.relu(block.bn1(x))
    else:
        x = F.relu(block.bn1(x))
        out = x
    out = F.relu(block.bn2(block.conv1(out)))
    out = block.conv2(out)  # dropout (between relu2 and conv2) is off in eval mode
    return (x if equal_in_out else block.shortcut(x)) + out


def _reference_net(model, stages, block_forward, x):
    """Stem, the stages' blocks, BN-ReLU, average pooling over the whole map (4x4 for PreAct
    ResNet, 8x8 for WideResNet at 32x32 inputs, as the references hard-code it), linear head."""
    out = model.conv1(x)
    for stage in stages:
        for block in stage:
            out = block_forward(block, out)
    out = F.relu(model.bn(out))
    out = F.avg_pool2d(out, out.shape[-1])
    return model.linear(out.flatten(1))


def test_preact_resnet_computes_the_reference_forward():
    model = _randomise_batch_norms(PreActResNet((1, 1, 1, 1), num_classes=10, widths=(8, 16, 16, 32)))
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = _reference_net(model, model.layers, _preact_block, x)
        torch.testing.assert_close(model(x), reference, rtol=1e-10, atol=1e-10)


def test_wide_resnet_computes_the_reference_forward():
    # WRN-16-2: two blocks per group, so each group has a projection block and an identity block
    model = _randomise_batch_norms(WideResNet(16, 2, num_classes=10, dropout=0.3))
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = _reference_net(model, model.groups, _wide_block, x)
        torch.testing.assert_close(model(x), reference, rtol=1e-10, atol=1e-10)
