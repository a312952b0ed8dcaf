"""The classic LeNet-5 for 32x32 single-channel images."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lib.core.structures import Structure, rows_and_columns

WIDTHS = {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}


class LeNet5(nn.Module):
    """conv5-pool-conv5-pool then three fully connected layers; 61,706 parameters for 10 classes.

    Layers are named attributes (not one Sequential) so pruning and surgery code can
    address them by name: conv1, conv2, fc1, fc2, fc3.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: dict[str, int] | None = None) -> None:
        """``widths``: channels of conv1 and conv2 and units of fc1 and fc2, as ``architecture()`` gives
        them after surgery; None for the classic 6, 16, 120, 84."""
        super().__init__()
        w = {**WIDTHS, **(widths or {})}
        self.conv1 = nn.Conv2d(in_channels, w["conv1"], kernel_size=5)
        self.conv2 = nn.Conv2d(w["conv1"], w["conv2"], kernel_size=5)
        self.fc1 = nn.Linear(w["conv2"] * 5 * 5, w["fc1"])
        self.fc2 = nn.Linear(w["fc1"], w["fc2"])
        self.fc3 = nn.Linear(w["fc2"], num_classes)

    def architecture(self) -> dict[str, Any]:
        """The widths of the four layers surgery can narrow (lib/surgery/cut.py; the task rebuilds from it)."""
        return {"conv1": self.conv1.out_channels, "conv2": self.conv2.out_channels,
                "fc1": self.fc1.out_features, "fc2": self.fc2.out_features}

    def architecture_without(self, removed: list[Structure], blocks: list[str]) -> dict[str, Any]:
        """The widths once the ``removed`` channels and units are gone (LeNet-5 has no residual blocks)."""
        arch = self.architecture()
        for unit in removed:
            arch[unit.group] -= 1
        return arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes) for images of shape (N, C, 32, 32)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 32 -> 28 -> 14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 14 -> 10 -> 5
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def structures(self) -> list[Structure]:
        """Channels of both convolutions and units of the two hidden fully connected layers
        (lib/core/structures.py); conv2's channel c feeds fc1's 25 inputs c*25 .. c*25+24 (5x5 pixels)."""
        pixels = 5 * 5
        return (rows_and_columns("channel", "conv1", "conv1.weight", "conv2.weight", self.conv1.out_channels)
                + rows_and_columns("channel", "conv2", "conv2.weight", "fc1.weight", self.conv2.out_channels,
                                   columns=pixels)
                + rows_and_columns("unit", "fc1", "fc1.weight", "fc2.weight", self.fc1.out_features)
                + rows_and_columns("unit", "fc2", "fc2.weight", "fc3.weight", self.fc2.out_features))
