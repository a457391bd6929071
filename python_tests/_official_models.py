"""Small models with the interfaces of the public KD code bases that users port.

Written for these tests (not copied): each reproduces only the calling
convention that matters to a port.

* :class:`CifarResNet` - RepDistiller / ReviewKD CIFAR students:
  ``forward(x, is_feat=False, preact=False)`` returns the logits, or with
  ``is_feat=True`` ``([stem, layer1, layer2, layer3, pooled], logits)``: five
  features for four ReviewKD levels (the stem output is the extra one).
* :class:`ImageNetResNet` - the ReviewKD ImageNet student: four stages on a 56x56
  input (56, 28, 14, 7) plus the pooled vector, ``is_feat=True`` as above.
* :class:`DictResNet` - mdistiller's model zoo: ``forward(x)`` returns
  ``(logits, {"feats": [...], "preact_feats": [...], "pooled_feat": ...})``.
* :class:`CachingVGG` - the FSKD VGG with ``save_feature=True``: every forward
  keeps its conv outputs (with their autograd graph) on the module.
* :func:`pruned_vgg` - a teacher VGG, a student with some channels of every
  block pruned away, and per-block masks of the teacher's kept channels.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from _models import BasicBlock, randomize_bns


class _Block(BasicBlock):
    """BasicBlock's layers (conv-bn-relu, conv-bn, + shortcut); the pre-activation sum is returned too."""

    def forward(self, x):
        pre = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x)
        return F.relu(pre), pre


class CifarResNet(nn.Module):
    """A CIFAR ResNet with the RepDistiller / ReviewKD ``is_feat`` interface (ReLUs are functional,
    so the pre-activation features cannot be tapped by module name)."""

    def __init__(self, widths=(4, 4, 8, 16), num_classes=10, strides=(1, 2, 2), pooled_4d=False):
        super().__init__()
        self.pooled_4d = pooled_4d  # the pooled feature as (N, C, 1, 1) instead of (N, C)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = _Block(widths[0], widths[1], strides[0])
        self.layer2 = _Block(widths[1], widths[2], strides[1])
        self.layer3 = _Block(widths[2], widths[3], strides[2])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x, is_feat=False, preact=False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = self.layer1(f0)
        f2, p2 = self.layer2(f1)
        f3, p3 = self.layer3(f2)
        pooled = F.adaptive_avg_pool2d(f3, 1).flatten(1)
        logits = self.fc(pooled)
        if not is_feat:
            return logits
        last = pooled[:, :, None, None] if self.pooled_4d else pooled
        feats = [f0, p1, p2, p3, last] if preact else [f0, f1, f2, f3, last]
        return feats, logits


class ImageNetResNet(nn.Module):
    """Four stages at 56, 28, 14, 7 for a 56x56 input, with the ``is_feat`` interface:
    ``([layer1, layer2, layer3, layer4, pooled], logits)``."""

    def __init__(self, widths=(4, 4, 8, 8, 8), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layers = nn.ModuleList(_Block(widths[i], widths[i + 1], 1 if i == 0 else 2) for i in range(4))
        self.fc = nn.Linear(widths[4], num_classes)

    def forward(self, x, is_feat=False):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = []
        for layer in self.layers:
            x, _ = layer(x)
            feats.append(x)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = self.fc(pooled)
        return (feats + [pooled], logits) if is_feat else logits


class DictResNet(CifarResNet):
    """mdistiller's convention: ``(logits, {"feats", "preact_feats", "pooled_feat"})`` always."""

    def forward(self, x):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = self.layer1(f0)
        f2, p2 = self.layer2(f1)
        f3, p3 = self.layer3(f2)
        pooled = F.adaptive_avg_pool2d(f3, 1).flatten(1)
        feats = {"feats": [f0, f1, f2, f3], "preact_feats": [f0, p1, p2, p3], "pooled_feat": pooled}
        return self.fc(pooled), feats


def _vgg_layers(widths, pool_after=(2,)):
    layers, cin = [], 3
    for i, w in enumerate(widths, 1):
        layers += [(f"conv{i}", nn.Conv2d(cin, w, 3, padding=1, bias=False)),
                   (f"bn{i}", nn.BatchNorm2d(w)), (f"relu{i}", nn.ReLU(inplace=True))]
        if i in pool_after:
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
        cin = w
    return nn.Sequential(OrderedDict(layers)), cin


class CachingVGG(nn.Module):
    """A VGG whose forward, with ``save_feature=True``, keeps each block's output on
    ``self.features_cache`` - tensors that carry their autograd graph."""

    def __init__(self, widths=(4, 8, 8), num_classes=5, save_feature=True):
        super().__init__()
        self.feature, cin = _vgg_layers(widths)
        self.classifier = nn.Linear(cin, num_classes)
        self.save_feature = save_feature
        self.features_cache = []

    def forward(self, x):
        self.features_cache = []
        for m in self.feature:
            x = m(x)
            if self.save_feature and isinstance(m, nn.BatchNorm2d):
                self.features_cache.append(x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class VGG(nn.Module):
    """The plain VGG that :func:`pruned_vgg` prunes: ``feature.convN``/``bnN`` blocks, a classifier."""

    def __init__(self, widths=(8, 8, 16), num_classes=5):
        super().__init__()
        self.widths = tuple(widths)
        self.feature, cin = _vgg_layers(widths)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.feature(x), 1).flatten(1))




def pruned_vgg(widths=(8, 8, 16), keep=(5, 6, 11), seed=0):
    """``(teacher, student, masks)``: the student keeps ``keep[i]`` channels of block i
    (the teacher's largest-|gamma| ones, as network slimming prunes); ``masks[i]`` is the
    boolean mask of those channels over the teacher's block i. The student's weights
    are the teacher's kept rows and columns, so its features differ from the teacher's
    kept channels only through the pruned inputs."""
    torch.manual_seed(seed)
    teacher = randomize_bns(VGG(widths), seed)
    student = VGG(keep).eval()
    masks, prev = [], None
    for i, w in enumerate(widths, 1):
        bn_t = getattr(teacher.feature, f"bn{i}")
        idx = bn_t.weight.detach().abs().argsort(descending=True)[: keep[i - 1]].sort().values
        mask = torch.zeros(w, dtype=torch.bool)
        mask[idx] = True
        masks.append(mask)
        conv_t, conv_s = getattr(teacher.feature, f"conv{i}"), getattr(student.feature, f"conv{i}")
        bn_s = getattr(student.feature, f"bn{i}")
        with torch.no_grad():
            wt = conv_t.weight[idx]
            conv_s.weight.copy_(wt if prev is None else wt[:, prev])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn_s, name).copy_(getattr(bn_t, name)[idx])
        prev = idx
    with torch.no_grad():
        student.classifier.weight.copy_(teacher.classifier.weight[:, prev])
        student.classifier.bias.copy_(teacher.classifier.bias)
    return teacher, student, masks
