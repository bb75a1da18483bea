"""Cut the bundled demo CT from LIDC-IDRI-0001 (../shared/data/ct/lung1): a slab around its nodule.

    python tools/make_demo.py [--data ../shared/data/ct/lung1] [--out Resources/Demo]

Writes, into --out:
- lung1-slab.nrrd: the voxels of image.nrrd in the index box below, unchanged (int16 Hounsfield units), with the
  scan's own spacing and orientation and the origin of the box's first voxel, so every voxel keeps its RAS
  position and a click at the nodule's centroid is the same click as on the whole scan;
- lung1-slab-label.nrrd: label.nrrd (the readers' 50 % consensus of the nodule) in the same box;
- lung1-slab.json: where the slab comes from (the box, the nodule's centroid in RAS), for tests and the README;
- SOURCE.md: origin, licence and citation (from ../shared/data/ct/SOURCE.md).

The box holds the click region of the shipped model (128 x 0.7 mm in-plane, +-20 mm in S around the nodule) with
a margin, and the voxels Testing/arseg_volumes.LUNG1_REGION uses, so tests that need only that region run on the
demo without ../shared. LIDC-IDRI-0001 is in no split of the training data (../shared/data/ct/SOURCE.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (k, j, i) index ranges [start, stop) of lung1's 133 x 512 x 512 grid; the nodule's bounding box is
# k 86..93, j 343..387, i 299..335 and a click at it reads k 81..98, j 303..431, i 252..380
SLAB_KJI = ((76, 104), (240, 470), (200, 440))
MAX_BYTES = 3_000_000


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cut(data: Path, out: Path) -> dict:
    import SimpleITK as sitk

    nodule = json.loads((data / "nodule.json").read_text())
    (k0, k1), (j0, j1), (i0, i1) = SLAB_KJI
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for source, target in (("image.nrrd", "lung1-slab.nrrd"), ("label.nrrd", "lung1-slab-label.nrrd")):
        image = sitk.ReadImage(str(data / source))
        slab = image[i0:i1, j0:j1, k0:k1]  # SimpleITK slices (i, j, k) and moves the origin with the box
        sitk.WriteImage(slab, str(out / target), True)
        written[target] = out / target
    info = {
        "name": "ARSeg lung nodule CT",
        "case": nodule["case"],
        "description": "A slab of LIDC-IDRI-0001's chest CT around its lung nodule (left lower lobe), Hounsfield "
                       "units as in the scan, the scan's own voxel grid",
        "source": "../shared/data/ct/lung1/image.nrrd and label.nrrd (see SOURCE.md)",
        "source_sha256": {"image.nrrd": sha256(data / "image.nrrd"), "label.nrrd": sha256(data / "label.nrrd")},
        "slab_index_kji": [list(r) for r in SLAB_KJI],
        "nodule_centroid_ras_mm": nodule["centroid_ras_mm"],
        "nodule_volume_mm3": nodule["volume_mm3"],
        "made_by": "tools/make_demo.py",
    }
    (out / "lung1-slab.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.copyfile(data.parent / "SOURCE.md", out / "SOURCE.md")
    with open(out / "SOURCE.md", "a") as f:
        f.write("\n## The demo slab in this folder\n\n"
                f"`lung1-slab.nrrd` and `lung1-slab-label.nrrd` are `lung1/image.nrrd` and `lung1/label.nrrd` cut "
                f"to the index box k {k0}..{k1 - 1}, j {j0}..{j1 - 1}, i {i0}..{i1 - 1} (numpy order [k, j, i]) by "
                "`tools/make_demo.py`; nothing else changed (same Hounsfield units, spacing and direction; the "
                "origin is the box's first voxel, so RAS positions are those of the whole scan). Licence: CC BY "
                "3.0, as above; cite the works listed above when you use it.\n")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    if size > MAX_BYTES:
        raise SystemExit(f"the demo is {size} bytes, more than {MAX_BYTES}: cut a smaller box")
    return {"bytes": size, **{k: str(v) for k, v in written.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ct" / "lung1"),
                    help="the lung1 folder (image.nrrd, label.nrrd, nodule.json; SOURCE.md one level up)")
    ap.add_argument("--out", default=str(ROOT / "Resources" / "Demo"), help="where the demo files go")
    args = ap.parse_args(argv)
    print(json.dumps(cut(Path(args.data), Path(args.out)), indent=2))


if __name__ == "__main__":
    main()
