"""The Pix2Pix U-Net generator, as published (Isola et al. 2017, ``unet_256``).

Eight down-sampling levels for 256x256 input (seven for ``unet_128``), skip
connections between mirrored levels, dropout (p=0.5) in the innermost ``ngf*8``
blocks, BatchNorm, LeakyReLU(0.2) going down, ReLU going up, tanh output.

This module imports only torch: the service loads it without any training code.
"""

from __future__ import annotations

import torch
from torch import nn

ARCHITECTURES = {"unet_256": 8, "unet_128": 7}
INPUT_SIZES = {"unet_256": 256, "unet_128": 128}


class UnetSkipBlock(nn.Module):
    """One U-Net level: down -> [submodule] -> up, with the input concatenated on the way out."""

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        input_nc: int | None = None,
        submodule: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
        use_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        if input_nc is None:
            input_nc = outer_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=False)
        downrelu = nn.LeakyReLU(0.2, True)
        downnorm = nn.BatchNorm2d(inner_nc)
        uprelu = nn.ReLU(True)
        upnorm = nn.BatchNorm2d(outer_nc)
        layers: list[nn.Module]
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            assert submodule is not None
            layers = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(
                inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=False
            )
            layers = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(
                inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=False
            )
            assert submodule is not None
            layers = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            out: torch.Tensor = self.model(x)
            return out
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """Pix2Pix U-Net generator: ``input_nc`` channels in, ``output_nc`` channels in [-1, 1] out."""

    def __init__(
        self,
        input_nc: int = 1,
        output_nc: int = 3,
        num_downs: int = 8,
        ngf: int = 64,
        use_dropout: bool = True,
    ) -> None:
        super().__init__()
        if num_downs < 5:
            raise ValueError("num_downs must be at least 5")
        block = UnetSkipBlock(ngf * 8, ngf * 8, innermost=True)
        for _ in range(num_downs - 5):
            block = UnetSkipBlock(ngf * 8, ngf * 8, submodule=block, use_dropout=use_dropout)
        block = UnetSkipBlock(ngf * 4, ngf * 8, submodule=block)
        block = UnetSkipBlock(ngf * 2, ngf * 4, submodule=block)
        block = UnetSkipBlock(ngf, ngf * 2, submodule=block)
        self.model = UnetSkipBlock(
            output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out


def build_generator(architecture: str, ngf: int, input_nc: int = 1, output_nc: int = 3) -> UnetGenerator:
    """A generator of a named architecture (``unet_256`` or ``unet_128``)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    return UnetGenerator(
        input_nc=input_nc, output_nc=output_nc, num_downs=ARCHITECTURES[architecture], ngf=ngf
    )
