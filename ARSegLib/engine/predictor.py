"""Inference only: crops -> image encoder (once per crop and view) -> presence gate -> the candidates as one
batch -> (with oversampling: N of them kept by kernel herding) -> every scale of every kept sample decoded in one
batch -> consensus. Knows nothing of volumes or MRML."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from . import fused
from .autoencoder import MaskAutoencoder
from .config import ARSegConfig, SamplingConfig
from .consensus import MAX_SAMPLES, ConsensusResult, SampleTokens, aggregate, token_dtype
from .heap import keep_freed_memory
from .sampler import CropStreams, sample_tokens
from .segmentor import NextScaleSegmentor
from .selection import kernel_herding
from .views import dihedral, undo_dihedral


class Cancelled(Exception):
    """Raised inside a run when the caller's cancel callback returns True."""


def presence_gate(presence_B: torch.Tensor, n: int, u_B: torch.Tensor) -> torch.Tensor:
    """Which of the N samples of each crop are drawn (True) rather than empty: a fraction close to
    the predicted presence, by systematic sampling (offset u ~ U[0, 1), sample i kept iff (i + u) / N < p)."""
    i_N = torch.arange(n, device=presence_B.device, dtype=torch.float32)
    return (i_N[None] + u_B[:, None]) / n < presence_B[:, None]


class PhaseTimer:
    """Wall time per phase into a dict (for `arseg bench`); waits for the GPU so times are real."""

    def __init__(self, out: Optional[Dict[str, float]], device: torch.device):
        self.out, self.cuda = out, device.type == "cuda"

    @contextmanager
    def __call__(self, name: str):
        if self.out is None:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.out[name] = self.out.get(name, 0.0) + time.perf_counter() - t0


class ARSegPredictor:
    def __init__(self, config: ARSegConfig, autoencoder: MaskAutoencoder, segmentor: NextScaleSegmentor,
                 device: str = "cpu"):
        self.config, self.device = config, torch.device(device)
        self.autoencoder = autoencoder.to(self.device).eval()
        self.segmentor = segmentor.to(self.device).eval()

    @property
    def n_classes(self) -> int:
        return self.config.autoencoder.n_classes

    @property
    def crop_size(self) -> int:
        return self.config.autoencoder.crop_size

    def _images_tensor(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if x.ndim == 3:
            x = x[:, None]
        cin, cs = self.config.segmentor.in_channels, self.crop_size
        if x.ndim != 4 or x.shape[1] != cin or x.shape[-2:] != (cs, cs):
            raise ValueError(f"expected crops of shape (B, {cs}, {cs}) or (B, {cin}, {cs}, {cs}), "
                             f"got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("the crops contain NaN or infinite values")
        return x.to(self.device)

    def decode_all_scales(self, idx_list, partial_sums) -> torch.Tensor:
        """Every scale of every sequence decoded (K, R, h, w), in one batch. Sequences that share their tokens
        up to scale k share F_hat_k, so each distinct prefix is decoded once (samples often agree on the
        coarse scales; scale 1 has a single token)."""
        R = idx_list[0].shape[0]
        picks, inverses, prefix = [], [], None
        for si, idx_Bl in enumerate(idx_list):
            prefix = idx_Bl if prefix is None else torch.cat([prefix, idx_Bl], 1)
            _, inverse = torch.unique(prefix, dim=0, return_inverse=True)
            first = torch.full((int(inverse.max()) + 1,), R, dtype=torch.long, device=inverse.device)
            first.scatter_reduce_(0, inverse, torch.arange(R, device=inverse.device), reduce="amin")
            picks.append(partial_sums[si][first])
            inverses.append(inverse)
        masks = self.autoencoder.decode_masks(torch.cat(picks))
        out, b = [], 0
        for pick, inverse in zip(picks, inverses):
            out.append(masks[b:b + pick.shape[0]][inverse])
            b += pick.shape[0]
        return torch.stack(out)

    @staticmethod
    def _unviewed(masks_Rhw: torch.Tensor, view_R: torch.Tensor, n_views: int) -> torch.Tensor:
        """Masks drawn on views of their crops (any leading dims before R, h, w) mapped back onto the crops, in
        place (the caller's freshly decoded masks; indexing by a mask reads a copy first)."""
        for k in range(1, n_views):
            sel = view_R == k
            if sel.any():
                masks_Rhw[..., sel, :, :] = undo_dihedral(masks_Rhw[..., sel, :, :], k)
        return masks_Rhw

    def encode_views(self, x_BChw: torch.Tensor, s: SamplingConfig, streams: CropStreams, phase):
        """The image features of every (view, crop), view-major, and the presence gate: presence_B (the views'
        mean) and drawn_BP, which of a crop's s.n_candidates candidates are drawn at all (the rest are empty).
        Shared by segment and steering's sample_under_prompts, so both draw the same candidates."""
        B, V, P = x_BChw.shape[0], int(s.views), s.n_candidates
        with phase("image_encoder"):
            x_VBChw = x_BChw if V == 1 else torch.cat([dihedral(x_BChw, k) for k in range(V)])
            encoder = fused.channels_last(self.segmentor.image_encoder)
            if encoder is not self.segmentor.image_encoder:
                x_VBChw = x_VBChw.contiguous(memory_format=torch.channels_last)
            feats = encoder(x_VBChw)
        if self.config.segmentor.presence_gate:
            presence_B = torch.sigmoid(feats.presence_logit_B + s.presence_logit_shift).view(V, B).mean(0)
            drawn_BP = presence_gate(presence_B, P, streams.uniform([1] * B + [0] * (B * V - B), 1)[:, 0])
        else:
            presence_B = torch.ones(B, device=self.device)
            drawn_BP = torch.ones(B, P, dtype=torch.bool, device=self.device)
        return feats, presence_B, drawn_BP

    @torch.inference_mode()
    def segment(self, images, sampling: Optional[SamplingConfig] = None, use_cache: bool = True,
                progress: Optional[Callable[[int, int], None]] = None,
                cancel: Optional[Callable[[], bool]] = None,
                timings: Optional[Dict[str, float]] = None,
                crop_ids: Optional[Sequence[int]] = None, keep_tokens: bool = False) -> ConsensusResult:
        """images: (B, H, W) or (B, C, H, W) float32 crops, prepared as the model card says.

        crop_ids: one non-negative id per crop (default 0..B-1); a crop's samples depend on its image, the seed
        and its id only, so callers that split work into chunks pass ids that do not depend on the chunking.
        timings, when given, receives the seconds spent in each phase (image_encoder, transformer,
        selection (with oversampling), decoding, consensus). keep_tokens: the result carries the kept samples'
        token maps (result.tokens), which steering.py needs to lock a sample's coarse scales later."""
        if self.device.type == "cpu":
            keep_freed_memory()  # large activations reuse freed blocks instead of fresh pages (see heap.py)
        phase = PhaseTimer(timings, self.device)
        s = sampling or self.config.sampling
        s.check()
        x_BChw = self._images_tensor(images)
        B, N, K = x_BChw.shape[0], s.n_samples, len(self.config.autoencoder.scales)
        V, P = int(s.views), s.n_candidates  # views of each crop; candidates drawn per crop, N of them kept
        if not 1 <= N <= MAX_SAMPLES:
            raise ValueError(f"n_samples must be between 1 and {MAX_SAMPLES}, got {N}")
        crop_ids = list(range(B)) if crop_ids is None else [int(c) for c in crop_ids]
        if len(crop_ids) != B:
            raise ValueError(f"{len(crop_ids)} crop ids for {B} crops")
        streams = CropStreams(int(s.seed), crop_ids, self.device, views=V)  # view-major, one per (view, crop)
        feats, presence_B, drawn_BP = self.encode_views(x_BChw, s, streams, phase)
        crop_R, cand_R = drawn_BP.nonzero(as_tuple=True)  # the drawn candidates, grouped by crop
        # candidate i of a crop is drawn on view i mod V; sequences are grouped by (view, crop), as the streams
        order = torch.argsort((cand_R % V) * B + crop_R, stable=True)
        crop_R, cand_R = crop_R[order], cand_R[order]
        view_R = cand_R % V
        hw = (self.crop_size, self.crop_size)
        scale_masks_KBNhw = torch.zeros(K, B, N, *hw, dtype=torch.uint8, device=self.device)
        tokens = self.empty_tokens(B, N) if keep_tokens else None

        def on_scale(si):
            if progress is not None:
                progress(si + 1, K)
            if cancel is not None and cancel():
                raise Cancelled()

        if crop_R.numel():
            rows = torch.arange(crop_R.numel(), device=self.device)
            slot_R = cand_R
            selected = {}
            # herding at selection_scale (1-based; 0: the last): before the last, inside the sampler, and only the kept
            # candidates draw the finer scales
            select_si = (int(s.selection_scale) or K) - 1
            if select_si >= K:
                raise ValueError(f"selection_scale {s.selection_scale}: the model has {K} scales")
            early = P > N and select_si < K - 1

            def herd(idx_so_far, partial_sums_so_far) -> torch.Tensor:
                """Kernel herding over the drawn candidates' masks at the selection scale: the rows kept (ascending
                when the sampler goes on with them, else in herding's order), their slots in selected["slot_R"]."""
                t0 = time.perf_counter()
                final_BPhw = torch.zeros(B, P, *hw, dtype=torch.uint8, device=self.device)
                final_BPhw[crop_R, cand_R] = self._unviewed(
                    self.autoencoder.decode_masks(partial_sums_so_far[-1]), view_R, V)
                kept_BN = kernel_herding(final_BPhw, N)
                row_of_BP = torch.full((B, P), -1, dtype=torch.long, device=self.device)
                row_of_BP[crop_R, cand_R] = torch.arange(crop_R.numel(), device=self.device)
                row_BN = row_of_BP.gather(1, kept_BN)  # -1: an empty (undrawn) candidate was kept
                keep = row_BN.flatten() >= 0
                kept_R, slot_R = row_BN.flatten()[keep], torch.arange(N, device=self.device).repeat(B)[keep]
                if early:  # the sampler goes on with the kept rows in ascending order
                    order_R = torch.argsort(kept_R)
                    kept_R, slot_R = kept_R[order_R], slot_R[order_R]
                selected.update(rows=kept_R, slot_R=slot_R, seconds=time.perf_counter() - t0)
                return kept_R

            with phase("transformer"):
                idx_list, partial_sums = sample_tokens(self.segmentor, self.autoencoder.quantizer, feats,
                                                       s.temperatures(K), s.top_k, s.top_p, streams, use_cache,
                                                       on_scale, crop_of_row=view_R * B + crop_R,
                                                       select=(select_si, herd) if early else None)
            if early:  # herding ran inside the transformer's phase: count it as selection
                if timings is not None and "seconds" in selected:
                    timings["transformer"] -= selected["seconds"]
                    timings["selection"] = timings.get("selection", 0.0) + selected["seconds"]
                rows, slot_R = selected["rows"], selected["slot_R"]
                crop_R, view_R = crop_R[rows], view_R[rows]
                rows = torch.arange(rows.numel(), device=self.device)  # the sampler returned the kept rows only
            elif P > N:
                with phase("selection"):
                    herd(idx_list[:select_si + 1], partial_sums[:select_si + 1])
                rows, slot_R = selected["rows"], selected["slot_R"]
            with phase("decoding"):
                if rows.numel() < idx_list[0].shape[0]:
                    idx_list, partial_sums = [t[rows] for t in idx_list], [f[rows] for f in partial_sums]
                if rows.numel():  # herding may keep only empty candidates (one drawn of many)
                    masks_KRhw = self.decode_all_scales(idx_list, partial_sums)
                    scale_masks_KBNhw[:, crop_R[rows], slot_R] = self._unviewed(masks_KRhw, view_R[rows], V)
                    if tokens is not None:
                        self.store_tokens(tokens, crop_R[rows], slot_R, view_R[rows], idx_list)
        elif progress is not None:
            progress(K, K)
        with phase("consensus"):
            result = aggregate(scale_masks_KBNhw, presence_B, self.n_classes)
        result.tokens = tokens
        return result

    def empty_tokens(self, B: int, N: int) -> SampleTokens:
        L = sum(s * s for s in self.config.autoencoder.scales)
        return SampleTokens(idx_BNL=np.zeros((B, N, L), dtype=token_dtype(self.config.autoencoder.vocab_size)),
                            view_BN=np.zeros((B, N), dtype=np.int8), drawn_BN=np.zeros((B, N), dtype=bool))

    @staticmethod
    def store_tokens(tokens: SampleTokens, crop_R, slot_R, view_R, idx_list) -> None:
        """The kept rows' token maps into their (crop, slot) of tokens, as numpy (results pickle without torch)."""
        b, n = crop_R.cpu().numpy(), slot_R.cpu().numpy()
        tokens.idx_BNL[b, n] = torch.cat(list(idx_list), 1).cpu().numpy().astype(tokens.idx_BNL.dtype)
        tokens.view_BN[b, n] = view_R.cpu().numpy()
        tokens.drawn_BN[b, n] = True
