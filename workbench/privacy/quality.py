"""How good a reconstruction is, measured against the client's real samples: PSNR and SSIM of images, the
feature error of tabular rows, label accuracy, the assignment of reconstructions to real samples, and the
level an attacker reaches without the update (every sample = the mean input)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

if TYPE_CHECKING:
    from workbench.privacy.reconstruction import Reconstruction

#: The PSNR of an exact match (MSE 0), and the most any sample scores: a finite number keeps means finite,
#: and at 100 dB the error is 1e-10 of the range squared, float32 rounding for [0, 1] images.
MAX_PSNR = 100.0


def _array(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _pair(reconstructed, real) -> tuple[np.ndarray, np.ndarray]:
    a, b = _array(reconstructed, "reconstructed"), _array(real, "real")
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"reconstructed and real must have the same shape (num_samples, *input_shape), got "
                         f"{a.shape} and {b.shape} (align a batch with match() first)")
    return a, b


def _check_range(data_range: float) -> None:
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0 (high - low of the inputs' values; 1.0 for images in [0, 1]), "
                         f"got {data_range!r}")


def sample_mse(reconstructed, real) -> np.ndarray:
    """Mean squared error of each sample over all its values, (num_samples,)."""
    a, b = _pair(reconstructed, real)
    return ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)


def psnr(reconstructed, real, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB, the mean over samples of 10 log10(data_range^2 / MSE_i), each sample
    capped at `MAX_PSNR` (an exact match has MSE 0)."""
    _check_range(data_range)
    mse = sample_mse(reconstructed, real)
    with np.errstate(divide="ignore"):
        values = 10 * np.log10(data_range ** 2 / mse)
    return float(np.minimum(values, MAX_PSNR).mean())


def ssim_window(height: int, width: int) -> int:
    """The SSIM window side: the largest odd number <= min(7, height, width) (7 is skimage's default; 8x8
    digits take it whole), at least 3."""
    side = min(7, height, width)
    if side < 3:
        raise ValueError(f"ssim needs images of at least 3x3 pixels, got {height}x{width}")
    return side if side % 2 else side - 1


def ssim(reconstructed, real, data_range: float) -> float:
    """Structural similarity (Wang et al., IEEE TIP 2004), skimage's `structural_similarity` per image of
    shape (C, H, W) with a uniform window of `ssim_window` (C > 1: per channel, averaged, channel_axis=0),
    the mean over samples. 1 for identical images."""
    _check_range(data_range)
    a, b = _pair(reconstructed, real)
    if a.ndim != 4:
        raise ValueError(f"ssim needs images (num_samples, C, H, W), got shape {a.shape}")
    win = ssim_window(a.shape[2], a.shape[3])
    values = []
    for x, y in zip(a, b):
        if x.shape[0] == 1:
            values.append(structural_similarity(x[0], y[0], data_range=data_range, win_size=win))
        else:
            values.append(structural_similarity(x, y, data_range=data_range, win_size=win, channel_axis=0))
    return float(np.mean(values))


def feature_errors(reconstructed, real) -> np.ndarray:
    """Mean absolute error of each feature over the samples, (num_features,), in the data's own units
    (standard deviations for standardized rows)."""
    a, b = _pair(reconstructed, real)
    return np.abs(a - b).reshape(len(a), -1).mean(axis=0)


def feature_error(reconstructed, real) -> float:
    """Mean absolute error over every feature of every sample (the mean of `feature_errors`)."""
    return float(feature_errors(reconstructed, real).mean())


def label_accuracy(recovered, real) -> float:
    """The fraction of samples whose label is recovered, as multisets (a batch's order is unknown):
    sum over classes of min(count recovered, count real) / n."""
    a = np.asarray(_array(recovered, "recovered"), dtype=np.int64).reshape(-1)
    b = np.asarray(_array(real, "real"), dtype=np.int64).reshape(-1)
    if len(a) != len(b) or len(b) == 0:
        raise ValueError(f"label_accuracy needs as many recovered labels as real ones (>= 1), got {len(a)} and "
                         f"{len(b)}")
    if min(a.min(), b.min()) < 0:
        raise ValueError("label_accuracy: labels must be class indices >= 0")
    size = int(max(a.max(), b.max())) + 1
    return float(np.minimum(np.bincount(a, minlength=size), np.bincount(b, minlength=size)).sum() / len(b))


def match(reconstructed, real) -> np.ndarray:
    """order, with reconstructed[order[j]] the reconstruction assigned to real[j]: the assignment of least
    total per-sample MSE (Hungarian algorithm, scipy's `linear_sum_assignment`). With more reconstructions
    than real samples, each real sample gets its own best one and the rest are left out."""
    a, b = _array(reconstructed, "reconstructed"), _array(real, "real")
    if a.shape[1:] != b.shape[1:] or len(a) < len(b):
        raise ValueError(f"match needs at least as many reconstructions as real samples, of one shape: got "
                         f"{a.shape} and {b.shape}")
    flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    cost = ((flat_b[:, None, :] - flat_a[None, :, :]) ** 2).mean(axis=2)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def reconstruction_quality(reconstruction: Reconstruction, real_x, real_y, *, is_image: bool,
                           data_range: float = 1.0) -> dict[str, float]:
    """A reconstruction scored against the real samples after `match`: psnr and ssim (images) or
    feature_mae (tabular rows), and label_accuracy (the matched reconstructions' labels, as a multiset).
    Fewer real samples than reconstructions (one client's sample against a cohort's reconstruction):
    scored on the reconstructions matched to them."""
    return matched_quality(reconstruction, match(reconstruction.inputs, real_x), real_x, real_y,
                           is_image=is_image, data_range=data_range)


def matched_quality(reconstruction: Reconstruction, order: np.ndarray, real_x, real_y, *, is_image: bool,
                    data_range: float = 1.0) -> dict[str, float]:
    """`reconstruction_quality` for a `match` already computed: `reconstruction.inputs[order[j]]` is scored
    against `real_x[j]` (a caller that also shows the matched reconstructions matches once)."""
    inputs = _array(reconstruction.inputs, "reconstruction.inputs")[order]
    labels = _array(reconstruction.labels, "reconstruction.labels")[order]
    scores = _input_scores(inputs, _array(real_x, "real_x"), is_image, data_range)
    scores["label_accuracy"] = label_accuracy(labels, real_y)
    return scores


def mean_input_quality(real_x, reference_inputs, *, is_image: bool, data_range: float = 1.0) -> dict[str, float]:
    """The scores (psnr and ssim, or feature_mae) of the trivial reconstruction that sets every sample to
    the mean of `reference_inputs` (the training set's mean image): the level an attacker reaches without
    looking at any update. No label_accuracy: it recovers no labels."""
    real = _array(real_x, "real_x")
    mean = _array(reference_inputs, "reference_inputs").mean(axis=0)
    if mean.shape != real.shape[1:]:
        raise ValueError(f"reference_inputs' samples must have the shape of real_x's, got {mean.shape} and "
                         f"{real.shape[1:]}")
    return _input_scores(np.broadcast_to(mean, real.shape).copy(), real, is_image, data_range)


def _input_scores(inputs: np.ndarray, real: np.ndarray, is_image: bool, data_range: float) -> dict[str, float]:
    if is_image:
        return {"psnr": psnr(inputs, real, data_range), "ssim": ssim(inputs, real, data_range)}
    return {"feature_mae": feature_error(inputs, real)}

