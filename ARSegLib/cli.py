"""The `arseg` command: train, eval, segment, batch, bench."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

LIDC_CARD = {
    "description": "AR-Seg lung-nodule model: 2D 128 x 128 axial crops around a nodule, 16 samples, "
                   "consensus and disagreement.",
    "crop_size": 128,
    # LIDC crops are at each scan's native in-plane spacing (about 0.55-0.9 mm); the volume pipeline
    # resamples a click's region to this nominal spacing.
    "pixel_spacing_mm": 0.7,
    "intensity": {"method": "minmax_per_crop",
                  "description": "each 128 x 128 crop's own HU range mapped linearly to [0, 1] "
                                 "(as the LIDC-IDRI-slices PNGs: 255 * (HU - min) / (max - min))"},
    "labels": {"1": "Lung nodule"},
    "training": {"data": "LIDC-IDRI-slices in ../shared/data/lidc (both tars, 803 patients), split train "
                         "of splits.json (695 patients, 12503 crops, 4 readers each); checkpoints and "
                         "sampling settings chosen on val"},
}


def _add_common_train(p):
    p.add_argument("--data", required=True, nargs="+", metavar="DATA",
                   help="LIDC tars, crop directories or a folder of tars (splits.json beside them)")
    p.add_argument("--out", default="checkpoints/lidc", help="folder for checkpoints and CSV logs")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None, help="stop after this much training time")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--config", default=None, help="JSON file of ARSegConfig fields (default: the LIDC model)")
    p.add_argument("--tiny", action="store_true", help="tiny configuration (tests, smoke runs)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training crops")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-images", type=int, default=None)


def _train_config(args, **defaults):
    from .training.trainer import TrainConfig

    tc = TrainConfig(out_dir=args.out, device=args.device, threads=args.threads, **defaults)
    for name in ("steps", "minutes", "batch", "lr", "eval_every", "eval_images"):
        v = getattr(args, name, None)
        if v is not None:
            setattr(tc, name, v)
    return tc


def _engine_config(args):
    from .engine import ARSegConfig, tiny_config

    if args.tiny:
        return tiny_config(crop_size=128)
    if args.config:
        return ARSegConfig.from_dict(json.loads(Path(args.config).read_text()))
    return ARSegConfig()


def _lidc_train_val(args):
    from .data.lidc import load_lidc
    from .training.trainer import TrainData

    train = load_lidc(args.data, "train")
    if args.limit:
        train = train.subset(range(min(args.limit, len(train))))
    try:
        val = TrainData.from_lidc(load_lidc(args.data, "val"))
    except FileNotFoundError:
        val = None
    return TrainData.from_lidc(train), val


def hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    import os

    return f"{cpu}, {os.cpu_count()} logical cores{gpu}, torch {torch.__version__}"


def cmd_train(args):
    from .training.trainer import AutoencoderTrainer, SegmentorTrainer

    cfg = _engine_config(args)
    train, val = _lidc_train_val(args)
    if args.stage == "autoencoder":
        tc = _train_config(args, steps=2500, batch=64, lr=2e-3, eval_every=250, save_every=250)
        AutoencoderTrainer(cfg, train, val, tc).fit()
    elif args.stage == "decoder":
        _train_decoder(args, cfg, train, val)
    else:
        tc = _train_config(args, steps=4000, batch=32, lr=1e-3, eval_every=400, save_every=100)
        card = json.loads(json.dumps(LIDC_CARD))
        card["training"]["hardware"] = hardware()
        ae_ckpt = args.autoencoder or str(Path(args.out) / "autoencoder.pt")
        init = None
        if args.init_model:
            cfg, ae_ckpt, init = _init_from_model(args.init_model, Path(args.out), card)
            tc.unet_pretrain_steps = 0  # its image encoder is trained already
        SegmentorTrainer(cfg, train, val, tc, ae_ckpt, export_to=args.export, card_extra=card,
                         init_segmentor=init).fit()


def _init_from_model(name, out: Path, card: dict):
    """Fine-tuning a shipped model: its autoencoder (frozen) as OUT/autoencoder.pt and its segmentor's
    weights as the starting point (a resumed run keeps its own checkpoint instead)."""
    from .models import load_model
    from .training.checkpoint import save_checkpoint

    predictor, base = load_model(name, "cpu")
    ae_ckpt = out / "autoencoder.pt"
    if not ae_ckpt.exists():
        save_checkpoint(ae_ckpt, {"kind": "autoencoder", "models": {"autoencoder": predictor.autoencoder.state_dict()}})
    card["training"]["initialised_from"] = {"model": base.name, "sha256": base.data["sha256"]}
    return predictor.config, str(ae_ckpt), predictor.segmentor.state_dict()


def _train_decoder(args, cfg, train, val):
    """A new decoder behind the trained encoder + quantizer; with --model/--export, put it into that model."""
    import dataclasses

    from .models import export_model, load_model
    from .training.trainer import DecoderTrainer

    if args.decoder_channels:
        cfg = dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder,
                                                                       decoder_channels=args.decoder_channels))
    tc = _train_config(args, steps=1000, batch=64, lr=2e-3, eval_every=250, save_every=250, ae_plain_steps=0)
    ae_ckpt = args.autoencoder or str(Path(args.out) / "autoencoder.pt")
    trainer = DecoderTrainer(cfg, train, val, tc, ae_ckpt)
    trainer.fit()
    if args.model and args.export:
        predictor, card = load_model(args.model, "cpu")
        config = dataclasses.replace(predictor.config, autoencoder=cfg.autoencoder)
        extra = card.extra()
        extra.setdefault("training", {})["decoder"] = {"steps": trainer.step, "minutes": round(trainer.elapsed / 60, 1),
                                                       "val": trainer.best}
        print(f"wrote {export_model(args.export, config, trainer.ae.cpu(), predictor.segmentor, extra)}")


def cmd_eval(args):
    import dataclasses

    import numpy as np
    from tqdm import tqdm

    from .data.lidc import load_lidc, read_split_file
    from .evaluation import evaluate
    from .models import load_model
    from .training.distributed import resolve_device

    predictor, card = load_model(args.model, resolve_device(args.device))
    split = args.split
    if split != "all" and read_split_file(args.data) is None:
        print(f"arseg eval: no splits.json beside {' '.join(args.data)}: evaluating every crop (--split all)",
              file=sys.stderr)
        split = "all"
    data = load_lidc(args.data, split)
    if args.limit:
        data = data.subset(range(min(args.limit, len(data))))
    s = predictor.config.sampling
    over = {"n_samples": args.samples, "seed": args.seed}
    if args.temperature is not None:
        over["temperature"] = args.temperature
    if args.top_k is not None:
        over["top_k"] = args.top_k
    s = dataclasses.replace(s, **over)
    images = (data.images_Nhw[:, None] / 255.0).astype(np.float32)
    if args.baseline == "unet":
        from .evaluation import dense_baseline_masks, evaluate_deterministic

        res = evaluate_deterministic(dense_baseline_masks(predictor, images), data.masks_NRhw, args.samples)
        res["baseline"] = "unet: the model's image encoder dense head, deterministic (16 identical samples)"
    elif args.baseline == "unet-levels":
        from .evaluation import evaluate_dense_levels

        res = evaluate_dense_levels(predictor, images, data.masks_NRhw, args.samples)
        res["baseline"] = ("unet-levels: the dense head's soft map thresholded at N evenly spaced levels "
                           "(a probabilistic baseline; the samples' mean is the soft map)")
    else:
        with tqdm(total=len(data), desc=f"eval {card.name} on {args.split}") as bar:
            res = evaluate(predictor, images, data.masks_NRhw, s, progress=bar.update)
    res.update({"model": card.name, "split": split, "samples": args.samples, "seed": args.seed,
                "temperature": s.temperature, "top_k": s.top_k, "data": " ".join(args.data)})
    print(json.dumps({k: res[k] for k in ("ged", "hm_iou", "soft_dice", "n_images")}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


# ------------------------------------------------------------------------------------ segment / batch

class CommandError(Exception):
    """A user-facing failure of `arseg segment` / `arseg batch`: printed as one line, exit status 2."""


def _fail(command: str, message: str):
    print(f"arseg {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_point(text) -> tuple:
    """'R,A,S' (or three separate values) in millimetres -> (R, A, S)."""
    tokens = [t for part in (text if isinstance(text, (list, tuple)) else [text]) for t in str(part).split(",") if t]
    try:
        values = tuple(float(t) for t in tokens)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(v == v and abs(v) != float("inf") for v in values):
        raise CommandError(f"--point takes three numbers R,A,S in millimetres (e.g. --point=-56.4,-86.3,-116.0), "
                           f"got {' '.join(map(str, text if isinstance(text, (list, tuple)) else [text]))!r}")
    return values


def _segment_settings(args):
    from .pipeline import SegmentSettings

    return SegmentSettings(n_samples=args.samples, temperature=args.temperature, seed=args.seed,
                           half_height_mm=args.half_height)


def _user_errors():
    """The exceptions that mean bad input, not a bug: shown as one line."""
    from .models import ModelError
    from .mrml import ResultError
    from .pipeline import VolumeError

    return (CommandError, ModelError, VolumeError, ResultError, FileNotFoundError, ValueError, RuntimeError)


def _load_predictor(model: str, device: str):
    from .models import load_model
    from .training.distributed import resolve_device

    return load_model(model, resolve_device(device))


def write_preview_png(result, path, title: str = ""):
    """Image, the consensus after each scale, the consensus and the disagreement through the click's plane."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    p = result.preview
    k = p.scale_consensus.shape[0]
    panels = [("image", p.image, "gray", None)]
    panels += [(f"scale {s + 1}/{k}", p.scale_consensus[s], None, p.image) for s in range(k)]
    panels += [("consensus", p.consensus, None, p.image), ("disagreement", p.disagreement, "hot", None)]
    cols = min(len(panels), 6)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, data, cmap, under) in zip(axes.flat, panels):
        if under is not None:  # a mask drawn over the image
            ax.imshow(under, cmap="gray", vmin=0, vmax=1)
            ax.imshow(np.ma.masked_where(data == 0, data), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
        else:
            ax.imshow(data, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title or f"{result.model_name}: {p.title}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def cmd_segment(args):
    from tqdm import tqdm

    try:
        point = parse_point(args.point) if args.point is not None else None
        out = Path(args.out)
        if not out.name.lower().endswith(".seg.nrrd"):
            raise CommandError(f"--out must end in .seg.nrrd (what Slicer reads as a segmentation), got {out.name}")
        if not Path(args.volume).is_file():
            raise CommandError(f"volume file not found: {args.volume}")
        from .mrml import OutputOptions, segment_file

        predictor, card = _load_predictor(args.model, args.device)
        bars = []  # made on the first progress call: input errors print their one line with no bar before it

        def progress(done, total):
            if not bars:
                bars.append(tqdm(total=total, desc=f"arseg segment {Path(args.volume).name}", unit="scale",
                                 leave=False))
            bars[0].n = done
            bars[0].refresh()

        try:
            result, nodes = segment_file(args.volume, out, predictor, card, point, _segment_settings(args),
                                         OutputOptions(include_samples=args.include_samples),
                                         report_path=args.report, progress=progress)
        finally:
            for bar in bars:
                bar.close()
        if args.png:
            write_preview_png(result, args.png)
    except _user_errors() as e:
        _fail("segment", str(e))
    r = nodes.report
    print(f"{out}: consensus {r['consensus_volume_mm3']:.1f} mm3, samples {r['sample_volume_mm3']['min']:.1f}-"
          f"{r['sample_volume_mm3']['max']:.1f} mm3 ({card.name}, {r['n_samples']} samples, "
          f"{result.timings_s.get('total', 0):.1f} s)")


def find_cases(input_dir: Path, pattern: str):
    """Image files under input_dir matching pattern, segmentations excluded, in a stable order."""
    if not input_dir.is_dir():
        raise CommandError(f"input folder not found: {input_dir}")
    return sorted(p for p in input_dir.glob(pattern) if p.is_file() and not p.name.lower().endswith(".seg.nrrd"))


def _case_outputs(case: Path, input_dir: Path, output_dir: Path):
    from .mrml import volume_stem

    rel = case.relative_to(input_dir)
    base = output_dir / rel.parent / volume_stem(case)
    return rel, base.with_name(base.name + ".seg.nrrd"), base.with_name(base.name + ".report.json")


def cmd_batch(args):
    import time

    import torch.distributed as dist
    from tqdm import tqdm

    from .training.distributed import init_distributed, is_main, resolve_device

    input_dir, output_dir = Path(args.input_dir), Path(args.output_dir)
    try:
        cases = find_cases(input_dir, args.pattern)
        if not cases:
            raise CommandError(f"no files match {args.pattern!r} in {input_dir}")
        points = {}
        if args.points:
            points = json.loads(Path(args.points).read_text())
            if not isinstance(points, dict):
                raise CommandError("--points must be a JSON object {\"relative/path\": [R, A, S]}")
        device = resolve_device(args.device)
        rank, world = init_distributed(device)
        device = resolve_device(args.device)  # under torchrun, each rank takes its own GPU
        from .models import load_model
        from .mrml import OutputOptions, segment_file

        predictor, card = load_model(args.model, device)
    except _user_errors() as e:
        _fail("batch", str(e))

    mine = cases[rank::world]  # ranks take every world-th case: no scheduler, no shared state
    records = []
    for case in tqdm(mine, desc=f"arseg batch rank {rank}/{world}", disable=not args.progress and not is_main()):
        rel, seg_path, report_path = _case_outputs(case, input_dir, output_dir)
        record = {"case": str(rel), "rank": rank, "segmentation": str(seg_path), "report": str(report_path)}
        t0 = time.perf_counter()
        try:
            point = parse_point(points[str(rel)]) if str(rel) in points else None
            _, nodes = segment_file(case, seg_path, predictor, card, point, _segment_settings(args),
                                    OutputOptions(include_samples=args.include_samples), report_path=report_path)
            record.update(status="ok", mode=nodes.report["mode"],
                          consensus_volume_mm3=nodes.report["consensus_volume_mm3"])
        except _user_errors() as e:
            record.update(status="error", error=str(e))
            print(f"arseg batch: {rel}: error: {e}", file=sys.stderr)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        records.append(record)

    everyone = [records]
    if dist.is_initialized():
        everyone = [None] * world
        dist.all_gather_object(everyone, records)
    all_records = sorted((r for part in everyone for r in part), key=lambda r: r["case"])
    failed = [r for r in all_records if r["status"] != "ok"]
    if is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        summary = {"model": card.name, "world_size": world, "cases": all_records,
                   "n_ok": len(all_records) - len(failed), "n_failed": len(failed)}
        (output_dir / "batch.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"arseg batch: {len(all_records) - len(failed)} of {len(all_records)} cases segmented "
              f"on {world} rank(s); summary in {output_dir / 'batch.json'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


def _add_sampling_args(p):
    p.add_argument("--model", default="lidc-nodule", help="model name or card path (default: the shipped lidc-nodule)")
    p.add_argument("--samples", type=int, default=16, help="samples per crop (default 16)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model card's)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same result")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--half-height", type=float, default=20.0,
                   help="click mode: millimetres above and below the click to segment (default 20)")
    p.add_argument("--include-samples", action="store_true", help="also write every sample as a hidden segment")


def cmd_calibrate_presence(args):
    from .data.lidc import load_lidc
    from .models import export_model, load_model
    from .training.presence import fit_presence_head
    from .training.trainer import TrainData

    predictor, card = load_model(args.model, "cpu")
    train = TrainData.from_lidc(load_lidc(args.data, "train"))
    val = TrainData.from_lidc(load_lidc(args.data, "val"))
    scores = fit_presence_head(predictor.segmentor.image_encoder, train, val, epochs=args.epochs, flips=args.flips)
    print(json.dumps(scores, indent=2))
    if scores["val_bce_after"] >= scores["val_bce_before"]:
        print("no improvement on val: model left as it was")
        return
    extra = card.extra()
    extra.setdefault("training", {})["presence_calibration"] = {**scores, "epochs": args.epochs, "flips": args.flips}
    out = Path(args.out) if args.out else card.path.with_suffix("")
    export_model(out, predictor.config, predictor.autoencoder, predictor.segmentor, extra)
    print(f"wrote {out}.safetensors and {out}.json")


def cmd_bench(args):
    from .bench import main_bench

    main_bench(args.json, model=args.model, device=args.device, runs=args.runs, threads=args.threads,
               volume_slices=args.volume_slices, lung1=not args.no_lung1)


def cmd_view(args):
    """The review page (ARSegLib.web): needs the `web` extra; input errors are one line, as for segment."""
    try:
        from .web.serve import ViewOptions, serve
    except ImportError as e:
        _fail("view", f"the review page needs trame-slicer: pip install -e \".[web]\" ({e})")
    from .web.catalog import CatalogError

    options = ViewOptions(volumes=args.volumes, data_dirs=args.data_dir, host=args.host, port=args.port,
                          model=args.model, device=args.device, n_samples=args.samples)
    try:
        serve(options)
    except (CatalogError, *_user_errors()) as e:
        _fail("view", str(e))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="arseg", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the mask autoencoder or the segmentor")
    p.add_argument("stage", choices=["autoencoder", "segmentor", "decoder"],
                   help="decoder: a new (e.g. lighter) decoder behind a trained encoder and quantizer")
    _add_common_train(p)
    p.add_argument("--autoencoder", default=None, help="autoencoder checkpoint (default OUT/autoencoder.pt)")
    p.add_argument("--export", default=None, help="write the best model as EXPORT.safetensors + EXPORT.json")
    p.add_argument("--decoder-channels", type=int, default=0, help="decoder stage: the new decoder's width")
    p.add_argument("--model", default=None, help="decoder stage: the model whose decoder is replaced on --export")
    p.add_argument("--init-model", default=None,
                   help="segmentor stage: fine-tune this model (name or card): its configuration, frozen "
                        "autoencoder and segmentor weights are the start")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="GED, HM-IoU, Soft-Dice of a model on LIDC crops")
    p.add_argument("--model", default="lidc-nodule", help="model name or card path")
    p.add_argument("--data", required=True, nargs="+", metavar="DATA",
                   help="LIDC tars, crop directories or a folder of tars (splits.json beside them)")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--baseline", choices=["unet", "unet-levels"], default=None,
                   help="evaluate a baseline instead: unet (the model's dense head, deterministic) or unet-levels "
                        "(its soft map thresholded at N levels, probabilistic)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate-presence", help="refit the presence head on frozen features; kept if val improves")
    p.add_argument("--model", default="lidc-nodule")
    p.add_argument("--data", required=True, nargs="+", metavar="DATA", help="LIDC tars or a folder of tars")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--flips", action="store_true", help="fit on the 8 flips/rotations of each crop too")
    p.add_argument("--out", default=None, help="output base path (default: overwrite the model in place)")
    p.set_defaults(func=cmd_calibrate_presence)

    p = sub.add_parser("bench", help="inference speed: per crop (cached vs no-cache), split, lung1 click")
    p.add_argument("--model", default="lidc-nodule")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--runs", type=int, default=10, help="timed runs per measurement (medians)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--volume-slices", type=int, default=4, help="lung1 slices timed in whole-volume mode")
    p.add_argument("--no-lung1", action="store_true", help="skip the lung1 click and volume timings")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("segment", help="segment a volume file at a point (or whole) into a .seg.nrrd",
                       description="Segment VOLUME with an AR-Seg model: at --point (click mode: the 3D component "
                                   "through the point) or, without it, every axial slice. Writes what Slicer "
                                   "writes for a segmentation node.")
    p.add_argument("volume", help="image file (NRRD, NIfTI, MHA, ...)")
    p.add_argument("--point", nargs="+", default=None, metavar="R,A,S",
                   help="RAS point in mm, as --point=R,A,S or --point R A S (negative first value: use '=')")
    p.add_argument("--out", required=True, help="output segmentation, OUT.seg.nrrd")
    p.add_argument("--png", default=None, help="picture: image, each scale, consensus, disagreement")
    p.add_argument("--report", default=None, help="report JSON: volumes, per-sample IoU, settings")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("batch", help="segment every matching file of a folder; shards across torchrun ranks",
                       description="Segment each file of INPUT_DIR matching --pattern into OUTPUT_DIR (same "
                                   "relative paths, .seg.nrrd + .report.json, batch.json summary). Under "
                                   "torchrun, rank r takes every world-th case.")
    p.add_argument("input_dir")
    p.add_argument("output_dir")
    p.add_argument("--pattern", default="*.nrrd", help="glob under INPUT_DIR (default *.nrrd; **/ recurses)")
    p.add_argument("--points", default=None,
                   help="JSON {\"relative/path\": [R, A, S]}: click mode for those cases, whole volume for others")
    p.add_argument("--progress", action="store_true", help="progress bars on every rank, not only rank 0")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("view", help="the review page in a browser: Slicer's views, click to segment",
                       description="Serve a web page (trame-slicer) that shows the given volumes in Slicer's slice "
                                   "and 3D views; a click on a nodule segments it. Only the files and folders "
                                   "given here can be opened; the page listens on 127.0.0.1 unless --host says "
                                   "otherwise.")
    p.add_argument("volumes", nargs="*", metavar="CT", help="volume files the page may open")
    p.add_argument("--data-dir", action="append", default=[], metavar="DIR",
                   help="a folder whose volume files (recursively) the page may open; repeatable")
    p.add_argument("--host", default=None,
                   help="address to listen on (default 127.0.0.1, this machine only; anything else is reachable "
                        "by others: no login, no encryption)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    p.add_argument("--model", default="lidc-nodule", help="model name or card path (default: the shipped lidc-nodule)")
    p.add_argument("--samples", type=int, default=16, help="samples per crop (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_view)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
