"""The shipped model on the real chest CT: a click at lung1's labelled nodule gives Dice >= 0.85 with its label
(0.881 measured), through the same path as the CLI's main command, on the whole scan (../shared) and on the
bundled demo slab (always: the README's main command)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from arseg_volumes import read_nrrd_ras
from conftest import SHIPPED

from ARSegLib import pipeline
from ARSegLib.metrics import dice

ROOT = Path(__file__).resolve().parents[1]


def test_click_at_lung1_nodule_matches_its_label(shipped, lung1_dir):
    predictor, card = shipped
    array, m = read_nrrd_ras(lung1_dir / "image.nrrd")
    label, _ = read_nrrd_ras(lung1_dir / "label.nrrd")
    nodule = json.loads((lung1_dir / "nodule.json").read_text())
    result = pipeline.segment_click(array, m, nodule["centroid_ras_mm"], predictor, card,
                                    pipeline.SegmentSettings(n_samples=16, seed=0))
    consensus = result.full(result.consensus)
    score = dice(consensus, label)
    assert score >= 0.85, (f"Dice {score:.3f} with label.nrrd; consensus {result.consensus_volume_mm3:.0f} mm3, "
                          f"label {nodule['volume_mm3']} mm3")
    assert np.isfinite(result.sample_iou).all()


def test_main_command_writes_seg_png_and_report(shipped, lung1_dir, tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    from ARSegLib import mrml
    from ARSegLib.cli import main

    nodule = json.loads((lung1_dir / "nodule.json").read_text())["centroid_ras_mm"]
    out = tmp_path / "lung1.seg.nrrd"
    assert main(["segment", str(lung1_dir / "image.nrrd"), "--point=" + ",".join(map(str, nodule)),
                 "--out", str(out), "--png", str(tmp_path / "scales.png"),
                 "--report", str(tmp_path / "report.json")]) == 0
    seg = mrml.load_segmentation(slicer.vtkMRMLScene(), out)
    label, _ = read_nrrd_ras(lung1_dir / "label.nrrd")
    m, shape = mrml.reference_geometry_of(seg)
    assert dice(mrml.segment_array(seg, "Nodule_1", shape, m), label) >= 0.85
    assert (tmp_path / "scales.png").stat().st_size > 10000
    assert json.loads((tmp_path / "report.json").read_text())["model"] == "lidc-nodule"


def test_readme_main_command_on_the_bundled_demo(shipped, tmp_path, capsys):
    """The README's main command, as a fresh clone without ../shared runs it: the demo slab, the nodule's centroid
    written with a space after --point; the same consensus as on the whole scan (the slab holds the click's
    region), Dice >= 0.85 with the readers' label, the figure and the report."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    import shlex

    from ARSegLib import mrml
    from ARSegLib.cli import main

    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.strip().startswith("arseg segment Resources/Demo"))
    argv = shlex.split(command.strip().rstrip("\\"))[1:]
    follow = readme.split(command, 1)[1].splitlines()[1]  # the command's second line: its outputs
    argv += shlex.split(follow.strip())
    argv = [str(tmp_path / a) if a.startswith("out/") else str(ROOT / a) if a.startswith("Resources/") else a
            for a in argv]
    assert main(argv) == 0
    out = {a.split("/")[-1].split(".")[-1]: a for a in argv if str(tmp_path) in a}
    seg = mrml.load_segmentation(slicer.vtkMRMLScene(), tmp_path / "out" / "lung1.seg.nrrd")
    label, m_label = read_nrrd_ras(ROOT / "Resources" / "Demo" / "lung1-slab-label.nrrd")
    m, shape = mrml.reference_geometry_of(seg)
    np.testing.assert_allclose(m, m_label, atol=1e-4)
    consensus = mrml.segment_array(seg, "Nodule_1", shape, m)
    assert dice(consensus, label) >= 0.85
    report = json.loads(Path(out["json"]).read_text())
    assert report["nodules"][0]["consensus_volume_mm3"] == pytest.approx(6722.4, abs=1.0)
    assert Path(out["png"]).stat().st_size > 50000
    assert "Nodule 1" in capsys.readouterr().out


def test_shipped_weights_match_the_card_and_segment_real_test_crops(shipped, lidc_tar):
    """A broken or swapped weight file is caught: the sha256 in the card, and real accuracy on LIDC test crops
    that all four readers marked (Dice of the consensus with the readers' majority)."""
    from ARSegLib.data.lidc import load_lidc
    from ARSegLib.models import read_card, sha256_file

    predictor, card = shipped
    assert sha256_file(read_card(SHIPPED).weights_path) == card.data["sha256"]
    test = load_lidc(lidc_tar, "test")
    marked = test.masks_NRhw.reshape(len(test), 4, -1).max(2).min(1) > 0
    pick = np.flatnonzero(marked)[::40][:12]
    images = (test.images_Nhw[pick][:, None] / 255.0).astype(np.float32)
    res = predictor.segment(images)
    majority = (test.masks_NRhw[pick].mean(1) >= 0.5).astype(np.uint8)
    scores = [dice(res.consensus_Bhw[i], majority[i]) for i in range(len(pick))]
    assert np.mean(scores) >= 0.5, scores  # an untrained or swapped model scores near 0
    assert (res.presence_B > 0.5).mean() >= 0.75  # the model sees that these crops are marked


def test_fast_inference_paths_match_the_reference_on_real_crops(shipped, lidc_tar, monkeypatch):
    """The inference speed-ups that change float round-off (grid resizes as matrix products, channels-last
    decoding with the decision before the pixel shuffle, oneDNN linear layers with the GELU fused) against the
    plain operations they replace, on real LIDC test crops, N = 16: nearly every sample identical, and the
    consensus the same (Dice >= 0.99)."""
    import torch.nn.functional as F

    from ARSegLib.data.lidc import load_lidc
    from ARSegLib.engine import fused, quantizer, segmentor
    from ARSegLib.engine.autoencoder import MaskDecoder

    predictor, card = shipped
    test = load_lidc(lidc_tar, "test")
    pick = np.arange(len(test))[::40][:24]
    images = (test.images_Nhw[pick][:, None] / 255.0).astype(np.float32)
    fast = predictor.segment(images, crop_ids=pick.tolist())

    def plain_resize(x, size, mode):
        return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode=mode)

    def plain_labels(self, f):
        return predictor.autoencoder.logits_to_mask(self.forward(f))

    monkeypatch.setattr(quantizer, "resize_grid", plain_resize)
    monkeypatch.setattr(segmentor, "resize_grid", plain_resize)
    monkeypatch.setattr(MaskDecoder, "labels", plain_labels)
    monkeypatch.setattr(fused, "_usable", False)
    plain = predictor.segment(images, crop_ids=pick.tolist())
    same = (fast.samples_BNhw == plain.samples_BNhw).reshape(*fast.samples_BNhw.shape[:2], -1).all(-1)
    assert same.mean() >= 0.97, same.mean()
    drawn = fast.consensus_Bhw.any((1, 2)) | plain.consensus_Bhw.any((1, 2))
    scores = [dice(fast.consensus_Bhw[i], plain.consensus_Bhw[i]) for i in np.flatnonzero(drawn)]
    assert len(scores) >= 8 and np.mean(scores) >= 0.99, scores


def test_channels_last_encoder_matches_the_shipped_encoder_on_the_demo_planes(shipped):
    """The speed-up of fused.channels_last on the shipped encoder and real CT planes (the demo slab, 4 views):
    features within float round-off of the NCHW module's, the presence the same to 1e-4."""
    import torch

    from ARSegLib.engine import fused
    from ARSegLib.engine.views import dihedral

    predictor, _ = shipped
    array, _ = read_nrrd_ras(ROOT / "Resources" / "Demo" / "lung1-slab.nrrd")
    planes = array[::4, 56:184, 56:184].astype(np.float32)
    planes = (planes - planes.min((1, 2), keepdims=True)) / np.ptp(planes, (1, 2), keepdims=True)
    x = torch.from_numpy(planes)[:, None]
    x = torch.cat([dihedral(x, k) for k in range(4)])
    enc = predictor.segmentor.image_encoder
    with torch.inference_mode():
        ref = enc(x)
        got = fused.channels_last(enc)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got.feat_BDhw, ref.feat_BDhw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.cond_BD, ref.cond_BD, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.sigmoid(got.presence_logit_B), torch.sigmoid(ref.presence_logit_B), atol=1e-4,
                               rtol=0)
