"""Metrics against hand-computed values, empty masks included."""

from __future__ import annotations

import numpy as np
import pytest

from ARSegLib.metrics import MetricAccumulator, dice, ged, hm_iou, iou, pairwise_iou, soft_dice


def m(*rows):
    return np.array(rows, dtype=np.uint8)


A = m([1, 1, 0, 0])  # 2 pixels
B = m([0, 1, 1, 0])  # overlaps A in 1 pixel: IoU 1/3
E = m([0, 0, 0, 0])  # empty


def test_iou_and_dice_with_empty_masks():
    assert iou(A, A) == 1.0
    assert iou(A, B) == pytest.approx(1 / 3)
    assert iou(E, E) == 1.0  # the protocol: IoU(empty, empty) = 1
    assert iou(A, E) == 0.0
    assert dice(A, B) == pytest.approx(0.5)
    assert dice(E, E) == 1.0
    assert dice(E, A) == 0.0


def test_ged_by_hand():
    # samples {A, E}, readers {A, B}. d = 1 - IoU.
    # d(S, Y): A-A 0, A-B 2/3, E-A 1, E-B 1 -> mean 2/3 * ... = (0 + 2/3 + 1 + 1) / 4 = 2/3
    # d(S, S): A-A 0, A-E 1, E-A 1, E-E 0 -> 1/2 ; d(Y, Y): 0, 2/3, 2/3, 0 -> 1/3
    assert ged(np.stack([A, E]), np.stack([A, B])) == pytest.approx(2 * 2 / 3 - 1 / 2 - 1 / 3)
    # identical sets of empty masks: distance 0
    assert ged(np.stack([E, E]), np.stack([E, E])) == pytest.approx(0.0)
    # a perfect copy of the readers scores 0 too
    assert ged(np.stack([A, B]), np.stack([A, B])) == pytest.approx(0.0)


def test_hm_iou_by_hand():
    # samples (A, E, B, A), readers (B, A) repeated to (B, A, B, A): both A take an A, B the first
    # B, and E is left the second B (IoU 0) -> (1 + 1 + 1 + 0) / 4
    s = np.stack([A, E, B, A])
    assert hm_iou(s, np.stack([B, A])) == pytest.approx(0.75)
    # samples (A, A, A, E) against (B, A, B, A): one A gets A, another A the other A, the third A a B
    # (1/3), E the last B (0) -> (1 + 1 + 1/3 + 0) / 4
    assert hm_iou(np.stack([A, A, A, E]), np.stack([B, A])) == pytest.approx((2 + 1 / 3) / 4)
    # all empty matches all empty perfectly
    assert hm_iou(np.stack([E] * 4), np.stack([E] * 4)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        hm_iou(np.stack([A] * 3), np.stack([A, B]))


def test_soft_dice_by_hand():
    # samples: P = mean of (A, A, E, E) = [0.5, 0.5, 0, 0]; readers G = mean(A, B) = [0.5, 1, 0.5, 0]
    # t=0.1: P {0,1} G {0,1,2} dice 2*2/5 = 0.8; t=0.3 same 0.8; t=0.5: same 0.8;
    # t=0.7: P {} G {1} -> 0 ; t=0.9: P {} G {1} -> 0
    s = np.stack([A, A, E, E])
    assert soft_dice(s, np.stack([A, B])) == pytest.approx((0.8 * 3) / 5)
    assert soft_dice(np.stack([E, E]), np.stack([E, E])) == 1.0
    # strict (the AR-Seg authors' P > t, G > t): only t = 0.5 differs: P > 0.5 is empty, G > 0.5 is {1} -> 0
    assert soft_dice(s, np.stack([A, B]), strict=True) == pytest.approx((0.8 * 2) / 5)
    assert soft_dice(np.stack([E, E]), np.stack([E, E]), strict=True) == 1.0
    from ARSegLib.metrics import multi_reader_metrics

    both = multi_reader_metrics(np.stack([A, A, E, E]), np.stack([A, B, A, B]))
    assert both["soft_dice_strict"] < both["soft_dice"]


def test_pairwise_iou_shape_and_accumulator():
    assert pairwise_iou(np.stack([A, B, E]), np.stack([A, E])).shape == (3, 2)
    acc = MetricAccumulator()
    acc.add({"ged": 0.2})
    acc.add({"ged": 0.4})
    assert acc.result() == {"ged": pytest.approx(0.3), "n_images": 2}
