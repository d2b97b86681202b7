"""Pix2Pix as published (Isola et al. 2017): PatchGAN discriminator, losses, one training step.

- Generator: :func:`dicom_node.inference.generator.build_generator` (U-Net, ``unet_256`` / ``unet_128``).
- Discriminator: the 70x70 PatchGAN (``n_layers=3``, BatchNorm, LeakyReLU 0.2) on the
  input and the target (or generated) image concatenated along channels.
- Losses: vanilla GAN (``BCEWithLogitsLoss`` against all-ones / all-zeros patch maps)
  plus ``lambda_l1`` (100) times the L1 distance between generated and target image.
  Optionally (not in the publication) the L1 term weighs some pixels more, e.g. tumour
  regions (``train_step(..., l1_weight=...)``: the mean of weight x |fake - target|).
  The discriminator loss is halved, as in the reference implementation.
- Optimisers: Adam, lr 2e-4, betas (0.5, 0.999), for both networks.
- Learning rate: constant for ``epochs`` epochs, then linearly to zero over
  ``decay_epochs`` epochs (the reference ``lambda_rule``), stepped once per epoch.
- Weights initialised N(0, 0.02) (BatchNorm weights N(1, 0.02), biases 0).

On CUDA the forward passes run under ``torch.autocast`` (float16) with a gradient scaler.

Optionally (not in the publication) an exponential moving average of the generator's
weights (``ema_decay``, e.g. 0.999) is kept beside it; validation and export then use
the average, which carries less of the GAN's step-to-step texture.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dicom_node.inference.generator import UnetGenerator, build_generator


class PatchDiscriminator(nn.Module):
    """The Pix2Pix ``NLayerDiscriminator``: a grid of real/fake logits, one per image patch.

    With ``n_layers=3`` each output logit sees a 70x70 patch of the input.
    """

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out


def init_weights(net: nn.Module, gain: float = 0.02) -> None:
    """The reference "normal" initialisation."""

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(module.weight, 0.0, gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, gain)
            nn.init.zeros_(module.bias)

    net.apply(init)


def linear_decay_lambda(epochs: int, decay_epochs: int) -> Any:
    """Multiplier of the base learning rate for a 0-based epoch index."""

    def rule(epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - epochs) / float(decay_epochs + 1)

    return rule


@dataclass(frozen=True)
class Pix2PixConfig:
    architecture: str = "unet_256"
    ngf: int = 64
    ndf: int = 64
    input_nc: int = 1
    output_nc: int = 3
    lr: float = 2e-4
    beta1: float = 0.5
    lambda_l1: float = 100.0
    epochs: int = 100
    decay_epochs: int = 100
    ema_decay: float = 0.0  # 0 = no weight average (as published)
    cpu_bf16: bool = False  # bfloat16 autocast on the CPU (AVX-512 BF16: about 2x a step)
    #: "l1" (as published: the generator learns the conditional median) or "l2": the
    #: squared error over L2_SCALE (its gradient equals L1's at a residual of L2_SCALE / 2),
    #: whose minimiser is the conditional mean, E[target | input], the oracle's quantity.
    recon_loss: str = "l1"
    #: In the tumour masks (pixels whose per-pixel L1 weight is above 1), the L1 becomes
    #: the pinball loss of this quantile, doubled (0.5: plain L1): a generator drawing a
    #: tumour lower than its PET costs 2q x the error, higher 2(1 - q) x. Above 0.5 it
    #: learns that quantile of the uptake the T1C allows instead of its median.
    tumour_quantile: float = 0.5


#: Target units (the uptake's [-1, 1] mapping) that scale the "l2" reconstruction loss.
L2_SCALE = 0.1
RECON_LOSSES = ("l1", "l2")


def tumour_pinball(residual: torch.Tensor, tumour: torch.Tensor, quantile: float
                   ) -> torch.Tensor:
    """Per-pixel reconstruction error for ``residual`` = fake - target: |residual| outside
    ``tumour``; inside, twice the pinball loss of ``quantile`` (under-drawing costs
    ``2 * quantile``, over-drawing ``2 * (1 - quantile)`` per unit)."""
    under = residual < 0
    slope = torch.where(under, torch.full_like(residual, 2.0 * quantile),
                        torch.full_like(residual, 2.0 * (1.0 - quantile)))
    return torch.where(tumour, slope * residual.abs(), residual.abs())


class Pix2Pix:
    """Generator, discriminator, their optimisers, schedulers and the AMP scaler."""

    def __init__(self, config: Pix2PixConfig, device: torch.device) -> None:
        if config.tumour_quantile != 0.5 and config.recon_loss != "l1":
            raise ValueError("tumour_quantile replaces the L1 in the tumour masks: it needs "
                             "recon_loss 'l1'")
        self.config = config
        self.device = device
        self.use_amp = device.type == "cuda"
        self.generator: UnetGenerator = build_generator(
            config.architecture, config.ngf, input_nc=config.input_nc, output_nc=config.output_nc
        )
        self.discriminator = PatchDiscriminator(config.input_nc + config.output_nc, config.ndf)
        init_weights(self.generator)
        init_weights(self.discriminator)
        self.generator.to(device)
        self.discriminator.to(device)
        self.generator_ema: UnetGenerator | None = None
        if config.ema_decay > 0.0:
            self.generator_ema = copy.deepcopy(self.generator).eval()
            self.generator_ema.requires_grad_(False)
        betas = (config.beta1, 0.999)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr, betas=betas)
        rule = linear_decay_lambda(config.epochs, config.decay_epochs)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, rule)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, rule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.gan_loss = nn.BCEWithLogitsLoss()
        self.l1_loss = nn.L1Loss()

    def autocast(self) -> torch.autocast:
        if self.device.type == "cpu" and self.config.cpu_bf16:
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, dtype=torch.float16,
                              enabled=self.use_amp)

    def _gan(self, logits: torch.Tensor, real: bool) -> torch.Tensor:
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        loss: torch.Tensor = self.gan_loss(logits.float(), target.float())
        return loss

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   l1_weight: torch.Tensor | None = None,
                   extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   hard_negatives: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> dict[str, float]:
        """One Pix2Pix iteration (D step, then G step); returns the losses.

        ``l1_weight`` (B, 1, H, W), if given, weighs the L1 term per pixel; the reported
        ``loss_G_L1`` stays the plain L1 so that runs compare. ``extra_loss``, if given,
        maps the generator output to a further term of the generator loss (already
        weighted), reported as ``loss_G_extra``. ``hard_negatives``, if given, maps the
        generator output (detached) to per-pixel L1 weights (1 where it finds nothing;
        :mod:`training.hard_negatives`), merged with ``l1_weight`` by the larger; the
        fraction of pixels it raised is reported as ``hard_negative_fraction``.
        """
        self.generator.train()
        self.discriminator.train()
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with self.autocast():
            fake = self.generator(x)
        # Discriminator: real pairs -> 1, generated pairs -> 0.
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            pred_fake = self.discriminator(torch.cat([x, fake.detach()], 1))
            pred_real = self.discriminator(torch.cat([x, y], 1))
            loss_d_fake = self._gan(pred_fake, real=False)
            loss_d_real = self._gan(pred_real, real=True)
            loss_d = 0.5 * (loss_d_fake + loss_d_real)
        self.scaler.scale(loss_d).backward()
        self.scaler.step(self.opt_d)
        # Generator: fool D, stay close to the target in L1.
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            pred = self.discriminator(torch.cat([x, fake], 1))
            loss_g_gan = self._gan(pred, real=True)
            residual = fake.float() - y.float()
            error = residual.abs()
            loss_g_l1 = error.mean()
            if self.config.recon_loss == "l2":
                error = residual.square() / L2_SCALE
            elif self.config.tumour_quantile != 0.5 and l1_weight is not None:
                error = tumour_pinball(residual, l1_weight.to(self.device) > 1.0,
                                       self.config.tumour_quantile)
            weight = None if l1_weight is None else l1_weight.to(self.device, non_blocking=True)
            hard_fraction = None
            if hard_negatives is not None:
                mined = hard_negatives(fake.detach().float())
                hard_fraction = float((mined > 1.0).float().mean())
                weight = mined if weight is None else torch.maximum(weight, mined)
            loss_l1_term = error.mean() if weight is None else (error * weight).mean()
            loss_g = loss_g_gan + self.config.lambda_l1 * loss_l1_term
            loss_extra = extra_loss(fake.float()) if extra_loss is not None else None
            if loss_extra is not None:
                loss_g = loss_g + loss_extra
        self.scaler.scale(loss_g).backward()
        self.scaler.step(self.opt_g)
        self.scaler.update()
        self._update_average()
        return {
            "loss_D": float(loss_d.detach()),
            "loss_D_real": float(loss_d_real.detach()),
            "loss_D_fake": float(loss_d_fake.detach()),
            "loss_G_GAN": float(loss_g_gan.detach()),
            "loss_G_L1": float(loss_g_l1.detach()),
            "loss_G_L1_weighted": float(loss_l1_term.detach()),
            **({"loss_G_extra": float(loss_extra.detach())} if loss_extra is not None else {}),
            **({"hard_negative_fraction": hard_fraction} if hard_fraction is not None else {}),
        }

    @property
    def inference_generator(self) -> UnetGenerator:
        """The generator to validate and export: the weight average when one is kept."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    def reset_average(self) -> None:
        """Start the weight average from the current generator (e.g. after loading one)."""
        if self.generator_ema is not None:
            self.generator_ema.load_state_dict(self.generator.state_dict())

    @torch.no_grad()
    def _update_average(self) -> None:
        if self.generator_ema is None:
            return
        weight = 1.0 - self.config.ema_decay
        for average, live in zip(self.generator_ema.parameters(), self.generator.parameters(),
                                 strict=True):
            average.lerp_(live.detach(), weight)
        for average_buffer, live_buffer in zip(self.generator_ema.buffers(),
                                               self.generator.buffers(), strict=True):
            average_buffer.copy_(live_buffer)

    def step_schedulers(self) -> None:
        self.sched_g.step()
        self.sched_d.step()

    @property
    def lr(self) -> float:
        return float(self.opt_g.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "scaler": self.scaler.state_dict(),
            **({"generator_ema": self.generator_ema.state_dict()}
               if self.generator_ema is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.generator_ema is not None:
            if "generator_ema" in state:
                self.generator_ema.load_state_dict(state["generator_ema"])
            else:
                self.reset_average()
