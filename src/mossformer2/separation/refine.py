"""Inference-time refinements of a model's separated sources: the polarity ensemble, the Wiener filter and mixture
consistency.

All work on any separation model (ours, the official one, an ONNX or TorchScript export) and are opt-in per
``Separator``; a checkpoint may recommend them (``"separation"`` entry, see ``Separator``). ``model_fn`` is a
callable ``([B, L], lengths [B] | None) -> [B, S, L]`` on float32 NumPy arrays (no torch needed).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.signal import istft, stft

from mossformer2.separation.stitching import match_sources

ModelFnWithLengths = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]

WIENER_FFT_SIZE = 4096  # 256 ms at 16 kHz: chosen on validation mixtures among 256-8192 (model card)
WIENER_POWER = 2.0
# Up to this many input samples (65 s at 16 kHz) the ensemble's two halves run as one batch; beyond, one after the
# other: the network's activation memory grows with the batch's samples (a 10-minute file in one pass took
# 9.8 GiB on the CPU with both halves at once).
ENSEMBLE_BATCH_SAMPLES = 1 << 20


def polarity_ensemble(model_fn: ModelFnWithLengths, batch: np.ndarray,
                      lengths: np.ndarray | None = None) -> np.ndarray:
    """Mean of the sources the model finds in ``x`` and (negated back) in ``-x``: ``[B, L] -> [B, S, L]``.

    MossFormer2's encoder is a convolution followed by a ReLU, so ``-x`` shows the network the other half-wave of
    every filter response: a second, different view of the same mixture, and the two estimates form a
    two-member ensemble at twice the cost. Both halves run as one batch of ``2B`` (up to
    ``ENSEMBLE_BATCH_SAMPLES`` input samples; one after the other beyond). Each item's second estimate is put in
    the first's speaker order and polarity (over its true length) before averaging.
    """
    size = batch.shape[0]
    if batch.size <= ENSEMBLE_BATCH_SAMPLES:
        both = model_fn(np.concatenate([batch, -batch]),
                        None if lengths is None else np.concatenate([lengths, lengths]))
        direct, flipped = both[:size], -both[size:]
    else:
        direct = model_fn(batch, lengths)
        flipped = -model_fn(-batch, lengths)
    for b in range(size):
        n = batch.shape[-1] if lengths is None else int(lengths[b])
        order, signs = match_sources(flipped[b, :, :n], direct[b, :, :n])
        flipped[b] = flipped[b, order] * signs[:, None]
    return ((direct + flipped) / 2).astype(np.float32, copy=False)


def mixture_consistency(sources: np.ndarray, mixture: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """Sources ``[B, S, L]`` that sum exactly to ``mixture`` ``[B, L]``: each gets an equal share of the residual.

    This is the unweighted projection of Wisdom et al. (2019, "Differentiable consistency constraints for improved
    deep speech enhancement"). An SI-SDR-trained model leaves each source's polarity free, so a source that
    correlates negatively with the mixture is negated first (the residual would otherwise hold twice that
    source). The sources must be at the level of the mixture's components (a calibrated model: the built-in one
    has its output gain folded into the decoder, ``training.calibration``); on arbitrarily scaled outputs the
    residual is mostly level error.
    """
    if lengths is not None:
        valid = np.arange(mixture.shape[-1])[None, :] < np.asarray(lengths)[:, None]  # [B, L]
        sources = sources * valid[:, None, :]
        mixture = mixture * valid
    agreement = np.einsum("bsl,bl->bs", sources, mixture, dtype=np.float64)
    sources = sources * np.where(agreement >= 0, 1.0, -1.0).astype(sources.dtype)[..., None]
    residual = mixture - sources.sum(1)
    return (sources + residual[:, None, :] / sources.shape[1]).astype(np.float32, copy=False)


def wiener_filter(sources: np.ndarray, mixture: np.ndarray, lengths: np.ndarray | None = None,
                  fft_size: int = WIENER_FFT_SIZE, power: float = WIENER_POWER) -> np.ndarray:
    """Sources ``[B, S, L]`` re-estimated from ``mixture`` ``[B, L]`` by soft masks: ``[B, S, L]``.

    In the STFT domain (Hann window of ``fft_size`` samples, 75 % overlap) source j becomes
    ``X * |S_j|^p / sum_k |S_k|^p``: the mixture's own coefficients, shared out in proportion to the estimated
    source powers (the single-channel Wiener filter for ``p = 2``). The outputs sum to the mixture. It keeps the
    model's decision of which source owns each time-frequency region and drops what the model got wrong inside
    it; long windows (finer frequency resolution than the model's millisecond encoder frames) carry the gain.
    Whether it helps depends on the model (measured per checkpoint: model card). Each item is filtered over its
    true length (``lengths``); padding stays zero. Items shorter than ``fft_size`` use a window of their length.
    """
    out = np.zeros_like(sources, dtype=np.float32)
    for b in range(sources.shape[0]):
        n = sources.shape[-1] if lengths is None else int(lengths[b])
        window = min(int(fft_size), n)
        if window < 4:  # too short for an STFT: keep the estimates
            out[b, :, :n] = sources[b, :, :n]
            continue
        overlap = window * 3 // 4
        _, _, mix_spec = stft(mixture[b, :n], nperseg=window, noverlap=overlap)
        _, _, src_spec = stft(sources[b, :, :n], nperseg=window, noverlap=overlap)
        weight = np.abs(src_spec) ** power
        total = weight.sum(0, keepdims=True)
        # Bins no source claims are shared equally, so the outputs still sum to the mixture.
        masks = np.divide(weight, total, out=np.full_like(weight, 1.0 / weight.shape[0]), where=total > 0)
        _, filtered = istft(masks * mix_spec[None], nperseg=window, noverlap=overlap)
        out[b, :, :n] = filtered[:, :n]
    return out
