"""pneumo's own small CNNs: R1's seed CNN exactly, and the R2/R4/R5 family with dropout,
batch-norm, padding and stride options."""

from __future__ import annotations

import torch
from torch import nn


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class SeedCNN(nn.Module):
    """R1's CNN exactly: Conv16-ReLU-BN-Pool, Conv32-ReLU-Pool, Conv64-ReLU-Pool, Dense512-ReLU, Dense(out)."""

    def __init__(self, num_out: int = 1, in_channels: int = 1, input_size: int = 150):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(16), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        s = input_size
        for _ in range(3):
            s = _conv_out(s, 3, 1, 0) // 2
        if s < 1:
            raise ValueError(f"seed_cnn: input_size={input_size} is too small (need >= 22)")
        self.flatten = nn.Flatten()
        self.fc = nn.Sequential(nn.Linear(64 * s * s, 512), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(512, num_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.flatten(self.features(x))))


class DropoutCNN(nn.Module):
    """R2/R4/R5's CNN family: conv blocks with optional batch norm, padding and stride, dropout, dense head."""

    def __init__(
        self,
        num_out: int = 1,
        in_channels: int = 1,
        input_size: int = 150,
        filters: tuple[int, ...] = (32, 64, 128, 128),
        dropout: float = 0.3,
        batch_norm: bool = True,
        padding: str = "same",
        stride: int = 1,
        dense: int = 256,
    ):
        super().__init__()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding={padding!r}: valid: same, valid")
        if stride not in (1, 2):
            raise ValueError(f"stride={stride}: valid: 1, 2")
        pad = 1 if padding == "same" else 0
        layers: list[nn.Module] = []
        ch, s = in_channels, input_size
        for f in filters:
            block: list[nn.Module] = [nn.Conv2d(ch, f, 3, stride=stride, padding=pad, bias=not batch_norm)]
            if batch_norm:
                block.append(nn.BatchNorm2d(f))
            block += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            if dropout > 0:
                block.append(nn.Dropout2d(dropout / 2))
            layers.append(nn.Sequential(*block))
            ch, s = f, _conv_out(s, 3, stride, pad) // 2
            if s < 1:
                raise ValueError(f"cnn_dropout: input_size={input_size} too small for {len(filters)} blocks at stride {stride}")
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.fc = nn.Sequential(nn.Linear(ch * s * s, dense), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.classifier = nn.Linear(dense, num_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.flatten(self.features(x))))
