"""Image quality metrics over 8-bit RGB, as people report them."""

from __future__ import annotations

import math

import torch


def to_8bit(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round()


def psnr(reference: torch.Tensor, decoded: torch.Tensor) -> float:
    """PSNR in dB over all pixels and channels of 8-bit images (tensors in [0, 1])."""
    mse = (to_8bit(reference) - to_8bit(decoded)).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ms_ssim(reference: torch.Tensor, decoded: torch.Tensor) -> float:
    """MS-SSIM of 8-bit images, with as many scales as the image size allows (at most 5)."""
    return float(ms_ssim_loss_value(to_8bit(reference) / 255, to_8bit(decoded) / 255, data_range=1.0))


def ms_ssim_loss_value(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Differentiable MS-SSIM (pytorch-msssim) that also works on crops too small for 5 scales."""
    from pytorch_msssim import ms_ssim as _ms_ssim
    from pytorch_msssim import ssim as _ssim

    side = min(a.shape[-2:])
    win = 11 if side > 160 else 7 if side > 96 else 3
    scales = 5
    while scales > 1 and side <= (win - 1) * 2 ** (scales - 1):
        scales -= 1
    if scales == 1 or side < win:
        return _ssim(a, b, data_range=data_range, win_size=min(win, side - (1 - side % 2)))
    weights = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:scales])
    weights = weights / weights.sum()
    if side > (win - 1) * 2**4:  # pytorch-msssim asserts this size whatever the number of scales
        return _ms_ssim(a, b, data_range=data_range, win_size=win, weights=weights.tolist())
    return _few_scales_ms_ssim(a, b, data_range, win, weights.to(a))


def _few_scales_ms_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float, win_size: int, weights: torch.Tensor):
    """pytorch-msssim's MS-SSIM loop, for images too small for its size check (e.g. 16-32 pixel sides)."""
    import torch.nn.functional as F
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    win = _fspecial_gauss_1d(win_size, 1.5).to(a).repeat([a.shape[1], 1, 1, 1])
    levels = []
    for level in range(len(weights)):
        ssim_per_channel, cs = _ssim(a, b, data_range=data_range, win=win, size_average=False)
        if level < len(weights) - 1:
            levels.append(torch.relu(cs))
            padding = [s % 2 for s in a.shape[2:]]
            a, b = F.avg_pool2d(a, 2, padding=padding), F.avg_pool2d(b, 2, padding=padding)
    levels.append(torch.relu(ssim_per_channel))
    return torch.prod(torch.stack(levels) ** weights.view(-1, 1, 1), dim=0).mean()
