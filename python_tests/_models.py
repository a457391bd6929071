"""Small models the tests share."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """torchvision-style residual block: conv-bn-relu, conv-bn, += shortcut (in place), relu."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)  # in place on the bn2 output, as torchvision does
        return F.relu(out)


def randomize_bns(model, seed):
    """Non-trivial BN statistics and affine parameters (eval mode afterwards)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.3 * torch.randn(c, generator=g))
    return model.eval()


class StageNet(nn.Module):
    """stem -> layer1 (H) -> layer2 (H/2) [-> layer3 (H/4)] -> pool -> fc, widths w, 2w[, 4w].

    A tiny CNN on 1-channel images with named stages for feature taps;
    ``stages=3`` (default) adds layer3.
    """

    def __init__(self, w, classes=5, stages=3):
        super().__init__()
        if stages not in (2, 3):
            raise ValueError(f"StageNet: stages must be 2 or 3, got {stages}")
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
                                    nn.BatchNorm2d(2 * w), nn.ReLU())
        out = 2 * w
        if stages == 3:
            self.layer3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False),
                                        nn.BatchNorm2d(4 * w), nn.ReLU())
            out = 4 * w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        if hasattr(self, "layer3"):
            x = self.layer3(x)
        return self.fc(torch.flatten(self.pool(x), 1))
