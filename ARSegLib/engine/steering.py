"""Inference only: sampling a crop's N samples under prompts, by candidate filtering with a budget of extra draws.

Prompts are pixels: an include pixel every kept sample must mark, an exclude pixel none may mark. A crop's
candidates are drawn as the plain predictor draws them (round 0 uses the same random streams, so it is the
click's own candidate pool); a candidate satisfies the crop's prompts or not, on its decoded final mask. While
fewer than N distinct candidates satisfy all prompts, another pool is drawn from fresh streams, up to
`SteeringConfig.max_rounds` pools. The N samples are then kept by kernel herding among the satisfying candidates
only (repeated, each about as often as it represents them, when fewer than N satisfy); when none satisfies all
prompts, among those satisfying the most, and the counts say so: a prompt is never silently dropped.

A locked prefix keeps scales 1..k of one source sample per crop: every candidate of that crop is drawn on the
source's view with those token maps teacher-forced through the key/value cache, and only scales > k drawn.
Knows nothing of volumes or MRML; pipeline.py maps points to pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import SamplingConfig
from .consensus import ConsensusResult, SampleTokens, aggregate
from .heap import keep_freed_memory
from .predictor import ARSegPredictor, Cancelled, PhaseTimer
from .sampler import CropStreams, sample_tokens
from .selection import kernel_herding
from .views import N_VIEWS

Pixel = Tuple[int, int]


@dataclass(frozen=True)
class CropPrompts:
    """One crop's prompts, as (row, column) pixels of the crop."""

    include_rc: Tuple[Pixel, ...] = ()
    exclude_rc: Tuple[Pixel, ...] = ()

    @property
    def n_prompts(self) -> int:
        return len(self.include_rc) + len(self.exclude_rc)

    def satisfied_RQ(self, masks_Rhw: torch.Tensor) -> torch.Tensor:
        """(R, Q) bool: whether each mask satisfies each prompt (includes first, then excludes)."""
        cols = [masks_Rhw[:, r, c] > 0 for r, c in self.include_rc] + \
               [masks_Rhw[:, r, c] == 0 for r, c in self.exclude_rc]
        if not cols:
            return torch.ones(masks_Rhw.shape[0], 0, dtype=torch.bool, device=masks_Rhw.device)
        return torch.stack(cols, 1)


@dataclass
class LockedPrefix:
    """Scales 1..n_scales of one source sample per crop. idx_BL: their tokens (L = s_1^2 + .. + s_k^2); view_B:
    the view they were drawn on; drawn_B: False where the source is empty (that crop's samples stay empty)."""

    n_scales: int
    idx_BL: np.ndarray
    view_B: np.ndarray
    drawn_B: np.ndarray

    @classmethod
    def from_tokens(cls, tokens: SampleTokens, sample: int, n_scales: int, scales: Sequence[int]) -> LockedPrefix:
        """Sample `sample` (0-based slot) of every crop of `tokens`, its scales 1..n_scales."""
        length = sum(s * s for s in tuple(scales)[:n_scales])
        return cls(n_scales=n_scales, idx_BL=np.ascontiguousarray(tokens.idx_BNL[:, sample, :length]),
                   view_B=tokens.view_BN[:, sample].copy(), drawn_B=tokens.drawn_BN[:, sample].copy())


@dataclass
class SteeringConfig:
    # candidate pools (each n_samples x oversample) drawn per crop at most, until n_samples distinct candidates
    # satisfy its prompts: the first is the plain run's, each further one costs that crop's sampling again
    max_rounds: int = 4
    # True: among the satisfying candidates the drawn ones are kept (and counted towards the N satisfying) first,
    # the presence gate's empty ones only when no drawn one satisfies ("not this" is not "nothing here"); False:
    # an empty candidate is a candidate like any other. On val crops False ends higher after 3 corrections (0.761
    # against 0.725) but lower after 1 (0.646 against 0.727); in 3D False empties the plane of an exclude point
    # inside the nodule and splits it (lung1: Dice 0.905 -> 0.586 at the third point): True (BENCHMARKS.md)
    prefer_drawn: bool = True
    ROUND_SEED_STRIDE = 0x5DEECE66D  # later pools' seeds: far from the user's seed and from each other

    def check(self) -> SteeringConfig:
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int) or not 1 <= self.max_rounds <= 16:
            raise ValueError(f"max_rounds must be a whole number between 1 and 16, got {self.max_rounds!r}")
        return self


@dataclass
class SteeredResult:
    """The crops' kept samples under their prompts, and how well the budget met each prompt."""

    result: ConsensusResult  # with tokens
    candidates_B: np.ndarray  # candidates drawn per crop (empty ones of the presence gate included)
    rounds_B: np.ndarray  # candidate pools drawn per crop
    satisfying_B: List[List[int]] = field(default_factory=list)  # per crop, per prompt: candidates satisfying it
    satisfying_all_B: np.ndarray = None  # candidates satisfying every prompt of the crop
    kept_satisfy_B: np.ndarray = None  # bool: every kept sample satisfies every prompt
    distinct_kept_B: np.ndarray = None  # distinct candidates among the N kept


def round_seed(seed: int, r: int) -> int:
    return (int(seed) + r * SteeringConfig.ROUND_SEED_STRIDE) % (1 << 63) if r else int(seed)


@torch.inference_mode()
def sample_under_prompts(predictor: ARSegPredictor, images, sampling: Optional[SamplingConfig] = None,
                         prompts: Optional[Sequence[Optional[CropPrompts]]] = None,
                         prefix: Optional[LockedPrefix] = None, steering: Optional[SteeringConfig] = None,
                         crop_ids: Optional[Sequence[int]] = None,
                         progress: Optional[Callable[[int, int], None]] = None,
                         cancel: Optional[Callable[[], bool]] = None,
                         timings: Optional[Dict[str, float]] = None) -> SteeredResult:
    """N samples per crop, each satisfying its crop's prompts where the budget allows; see the module's docstring."""
    if predictor.device.type == "cpu":
        keep_freed_memory()
    phase = PhaseTimer(timings, predictor.device)
    s = sampling or predictor.config.sampling
    s.check()
    steering = (steering or SteeringConfig()).check()
    x_BChw = predictor._images_tensor(images)
    dev = predictor.device
    B, N = x_BChw.shape[0], s.n_samples
    scales = tuple(predictor.config.autoencoder.scales)
    K, V, P = len(scales), int(s.views), s.n_candidates
    prompts = list(prompts) if prompts is not None else [None] * B
    prompts = [p if p is not None else CropPrompts() for p in prompts]
    crop_ids = list(range(B)) if crop_ids is None else [int(c) for c in crop_ids]
    if len(prompts) != B or len(crop_ids) != B:
        raise ValueError(f"{len(prompts)} prompt sets and {len(crop_ids)} crop ids for {B} crops")
    if prefix is not None and (prefix.idx_BL.shape[0] != B or not 1 <= prefix.n_scales < K):
        raise ValueError(f"a locked prefix needs one source per crop and 1..{K - 1} scales")
    hw = (predictor.crop_size, predictor.crop_size)
    for p in prompts:
        for r, c in p.include_rc + p.exclude_rc:
            if not (0 <= r < hw[0] and 0 <= c < hw[1]):
                raise ValueError(f"prompt pixel ({r}, {c}) lies outside the {hw[0]} x {hw[1]} crop")

    streams = CropStreams(int(s.seed), crop_ids, dev, views=V)
    feats, presence_B, drawn_BP = predictor.encode_views(x_BChw, s, streams, phase)
    for b, p in enumerate(prompts):
        if p.include_rc:  # an include point says the object is there: no candidate of this crop is drawn empty
            drawn_BP[b] = True
    if prefix is not None:  # the source's coarse scales on every candidate, or (where it is empty) nothing
        drawn_BP = torch.as_tensor(prefix.drawn_B, device=dev)[:, None].expand(B, P).clone()
    cand_view_BP = torch.arange(P, device=dev)[None].expand(B, P) % V
    if prefix is not None:
        cand_view_BP = torch.as_tensor(prefix.view_B, device=dev, dtype=torch.long)[:, None].expand(B, P)

    # every candidate of every crop: its final mask, its tokens (None: empty), its view, per prompt satisfied
    pool_masks: List[List[torch.Tensor]] = [[] for _ in range(B)]
    pool_idx: List[List[Optional[torch.Tensor]]] = [[] for _ in range(B)]
    pool_view: List[List[int]] = [[] for _ in range(B)]
    pool_sat: List[List[torch.Tensor]] = [[] for _ in range(B)]
    rounds_B = np.zeros(B, dtype=np.int64)

    def on_scale(si):
        if progress is not None and rounds_B.max() <= 1:  # the plain pool's scales; further pools are extra
            progress(si + 1, K)
        if cancel is not None and cancel():
            raise Cancelled()

    # two stages: the plain pool, then (for crops still short of N satisfying candidates) every further pool of the
    # budget in one call: small batches cost a CPU nearly as much as large ones, so one call beats several
    for stage, pools in enumerate((1, steering.max_rounds - 1)):
        if stage:
            short = [b for b in range(B) if prompts[b].n_prompts
                     and _distinct_satisfying(pool_sat[b], pool_idx[b] if steering.prefer_drawn else None) < N]
            if not short or not pools:
                break
            streams = CropStreams(round_seed(s.seed, 1), crop_ids, dev, views=V)
            active = torch.zeros(B, dtype=torch.bool, device=dev)
            active[short] = True
        else:
            active = torch.ones(B, dtype=torch.bool, device=dev)
        rounds_B[active.cpu().numpy()] += pools
        Pm = P * pools  # candidate j of this stage: pool j // P, drawn like candidate j % P of the plain pool
        stage_drawn = drawn_BP.repeat(1, pools) & active[:, None]
        stage_view = cand_view_BP.repeat(1, pools) if prefix is not None else \
            (torch.arange(Pm, device=dev)[None].expand(B, Pm) % V)
        crop_R, cand_R = stage_drawn.nonzero(as_tuple=True)
        view_R = stage_view[crop_R, cand_R]
        order = torch.argsort(view_R * B + crop_R, stable=True)
        crop_R, cand_R, view_R = crop_R[order], cand_R[order], view_R[order]
        masks_Rhw = torch.zeros(0, *hw, dtype=torch.uint8, device=dev)
        idx_RL = None
        if crop_R.numel():
            forced = []
            if prefix is not None:
                flat = torch.as_tensor(prefix.idx_BL.astype(np.int64), device=dev)[crop_R]
                b0 = 0
                for pn in scales[:prefix.n_scales]:
                    forced.append(flat[:, b0:b0 + pn * pn])
                    b0 += pn * pn
            with phase("transformer"):
                idx_list, partial_sums = sample_tokens(predictor.segmentor, predictor.autoencoder.quantizer, feats,
                                                       s.temperatures(K), s.top_k, s.top_p, streams, True,
                                                       on_scale, crop_of_row=view_R * B + crop_R, prefix_idx=forced)
            with phase("selection"):
                masks_Rhw = predictor._unviewed(predictor.autoencoder.decode_masks(partial_sums[-1]), view_R, V)
            idx_RL = torch.cat(idx_list, 1)
        crop_np, cand_np = crop_R.cpu().numpy(), cand_R.cpu().numpy()
        for b in np.flatnonzero(active.cpu().numpy()):
            # the pool in candidate order, the presence gate's empty candidates in their places (a sample of the
            # model's distribution too): round 0 is then exactly the plain run's pool, herded the same way
            rows = np.flatnonzero(crop_np == b)
            masks_Phw = torch.zeros(Pm, *hw, dtype=torch.uint8, device=dev)
            idx_P: List[Optional[torch.Tensor]] = [None] * Pm
            view_P = [0] * Pm
            if len(rows):
                masks_Phw[cand_np[rows]] = masks_Rhw[rows]
                for row, cand, idx in zip(rows.tolist(), cand_np[rows].tolist(), idx_RL[rows].unbind(0)):
                    idx_P[cand], view_P[cand] = idx, int(view_R[row])
            pool_masks[b].append(masks_Phw)
            pool_idx[b].extend(idx_P)
            pool_view[b].extend(view_P)
            pool_sat[b].append(prompts[b].satisfied_RQ(masks_Phw))

    with phase("selection"):
        tokens = predictor.empty_tokens(B, N)
        kept_rows: List[Tuple[int, int, torch.Tensor, int]] = []  # (crop, slot, tokens, view)
        satisfying, sat_all = [], np.zeros(B, dtype=np.int64)
        kept_ok, distinct = np.zeros(B, dtype=bool), np.zeros(B, dtype=np.int64)
        candidates = np.array([sum(len(m) for m in pool_masks[b]) for b in range(B)], dtype=np.int64)
        for b in range(B):
            masks = torch.cat(pool_masks[b])
            sat_RQ = torch.cat(pool_sat[b])
            satisfying.append(sat_RQ.sum(0).tolist())
            all_R = sat_RQ.all(1)
            sat_all[b] = int(all_R.sum())
            drawn_R = torch.tensor([i is not None for i in pool_idx[b]], device=dev)
            if steering.prefer_drawn and (all_R & drawn_R).any():
                pool = all_R & drawn_R
            else:
                pool = all_R if all_R.any() else sat_RQ.sum(1) == sat_RQ.sum(1).max()
            members = torch.nonzero(pool).flatten()
            picks = kernel_herding(masks[members][None], N, repeat=len(members) < N)[0]
            chosen = members[picks].tolist()
            kept_ok[b] = bool(all_R[chosen].all())
            distinct[b] = len(set(chosen))
            for slot, j in enumerate(chosen):
                if pool_idx[b][j] is not None:
                    kept_rows.append((b, slot, pool_idx[b][j], pool_view[b][j]))
    scale_masks_KBNhw = torch.zeros(K, B, N, *hw, dtype=torch.uint8, device=dev)
    if kept_rows:
        with phase("decoding"):
            crop_k = torch.tensor([r[0] for r in kept_rows], device=dev)
            slot_k = torch.tensor([r[1] for r in kept_rows], device=dev)
            view_k = torch.tensor([r[3] for r in kept_rows], device=dev)
            idx_kL = torch.stack([r[2] for r in kept_rows])
            idx_list, b0 = [], 0
            for pn in scales:
                idx_list.append(idx_kL[:, b0:b0 + pn * pn])
                b0 += pn * pn
            partial_sums = predictor.autoencoder.quantizer.idx_to_partial_sums(idx_list)
            scale_masks_KBNhw[:, crop_k, slot_k] = predictor._unviewed(
                predictor.decode_all_scales(idx_list, partial_sums), view_k, V)
            predictor.store_tokens(tokens, crop_k, slot_k, view_k, idx_list)
    with phase("consensus"):
        result = aggregate(scale_masks_KBNhw, presence_B, predictor.n_classes)
    result.tokens = tokens
    return SteeredResult(result=result, candidates_B=candidates, rounds_B=rounds_B, satisfying_B=satisfying,
                         satisfying_all_B=sat_all, kept_satisfy_B=kept_ok, distinct_kept_B=distinct)


def _distinct_satisfying(sat_parts: List[torch.Tensor], idx: Optional[List] = None) -> int:
    """Candidates satisfying every prompt (with idx: drawn ones only)."""
    if not sat_parts:
        return 0
    ok = torch.cat(sat_parts).all(1)
    if idx is not None:
        ok &= torch.tensor([i is not None for i in idx], device=ok.device)
    return int(ok.sum())


@torch.inference_mode()
def samples_from_tokens(predictor: ARSegPredictor, tokens: SampleTokens) -> ConsensusResult:
    """The samples kept as token maps, decoded again on their views (no transformer): what a refinement keeps on
    the planes it does not redraw. Empty (undrawn) samples stay empty; presence is not known here (zeros)."""
    B, N = tokens.drawn_BN.shape
    scales = tuple(predictor.config.autoencoder.scales)
    hw = (predictor.crop_size, predictor.crop_size)
    dev = predictor.device
    scale_masks_KBNhw = torch.zeros(len(scales), B, N, *hw, dtype=torch.uint8, device=dev)
    crop_k, slot_k = (torch.as_tensor(a, device=dev) for a in np.nonzero(tokens.drawn_BN))
    if crop_k.numel():
        idx_kL = torch.as_tensor(tokens.idx_BNL[crop_k.cpu().numpy(), slot_k.cpu().numpy()].astype(np.int64),
                                 device=dev)
        view_k = torch.as_tensor(tokens.view_BN[crop_k.cpu().numpy(), slot_k.cpu().numpy()].astype(np.int64),
                                 device=dev)
        idx_list, b0 = [], 0
        for pn in scales:
            idx_list.append(idx_kL[:, b0:b0 + pn * pn])
            b0 += pn * pn
        partial_sums = predictor.autoencoder.quantizer.idx_to_partial_sums(idx_list)
        scale_masks_KBNhw[:, crop_k, slot_k] = predictor._unviewed(predictor.decode_all_scales(idx_list, partial_sums),
                                                                   view_k, N_VIEWS)
    result = aggregate(scale_masks_KBNhw, torch.zeros(B, device=dev), predictor.n_classes)
    result.tokens = tokens
    return result
