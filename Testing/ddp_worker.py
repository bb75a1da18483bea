"""Run under torchrun by test_training.py: two training steps of each trainer on synthetic data,
then every rank writes its weights so the test can compare them."""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ARSegLib.engine import tiny_config
from ARSegLib.training.trainer import AutoencoderTrainer, SegmentorTrainer, TrainConfig, TrainData


def main(out: Path):
    rng = np.random.default_rng(0)
    masks = np.zeros((16, 4, 32, 32), np.uint8)
    masks[:, :, 8:20, 10:24] = 1
    masks[::3, 1] = 0
    data = TrainData(rng.random((16, 1, 32, 32)).astype(np.float32), masks)
    cfg = tiny_config(crop_size=32)
    tc = TrainConfig(out_dir=str(out), device="cpu", steps=3, batch=4, ae_plain_steps=1, unet_pretrain_steps=1,
                     eval_every=10 ** 9, save_every=10 ** 9, log_every=1)
    ae = AutoencoderTrainer(cfg, data, None, tc)
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    if rank == 0:
        torch.save(ae.ae.state_dict(), out / "autoencoder-start.pt")
    ae.fit()
    torch.save(ae.ae.state_dict(), out / f"autoencoder-rank{rank}.pt")
    seg = SegmentorTrainer(cfg, data, None, tc, str(out / "autoencoder.pt"))
    if rank == 0:
        torch.save(seg.seg.state_dict(), out / "segmentor-start.pt")
    seg.fit()
    torch.save(seg.seg.state_dict(), out / f"segmentor-rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
