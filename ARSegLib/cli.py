"""The `arseg` command: train, eval, segment, batch, bench."""

from __future__ import annotations

import argparse
import csv
import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .command_args import CommandError, config_from_args, eval_data, hardware, parse_point, train_config
from .models import DEFAULT_MODEL
from .task import lung_task_block

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
    # trained and validated on crops centred on a nodule only: whole-volume tiling marks structures everywhere
    "modes": ["click"],
    "training": {"data": "LIDC-IDRI-slices in ../shared/data/lidc (both tars, 803 patients), split train "
                         "of splits.json (695 patients, 12503 crops, 4 readers each); checkpoints and "
                         "sampling settings chosen on val"},
}
LIDC_CARD["task"] = lung_task_block(LIDC_CARD)  # one CT input, one region "Nodule" (ARSegLib/task.py)


def _add_common_train(p):
    p.add_argument("--data", required=True, nargs="+", metavar="DATA",
                   help="LIDC tars, crop directories or a folder of tars (splits.json beside them)")
    p.add_argument("--out", default="checkpoints/lidc", help="folder for checkpoints and CSV logs")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the stage's own)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this much training time")
    p.add_argument("--batch", type=int, default=None, help="crops per step (default: the stage's own)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the stage's own)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--config", default=None, help="JSON file of ARSegConfig fields (default: the LIDC model)")
    p.add_argument("--tiny", action="store_true", help="tiny configuration (tests, smoke runs)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training crops")
    p.add_argument("--eval-every", type=int, default=None, help="validate every this many steps")
    p.add_argument("--eval-images", type=int, default=None, help="val crops used for each validation")
    p.add_argument("--source", choices=["lidc", "brats"], default="lidc",
                   help="lidc: LIDC-IDRI crops (--data: tars); brats: BraTS cases (--data: the folder of case "
                        "folders; split by patient as ARSegLib/data/brats.SPLIT; the brats-glioma configuration)")


def _engine_config(args):
    from .engine import ARSegConfig, tiny_config

    if getattr(args, "source", "lidc") == "brats" and not (args.tiny or args.config):
        from .data.brats import brats_config

        return brats_config()
    return config_from_args(args, ARSegConfig, tiny_config)


def _train_val(args):
    """The training and validation data of --source: LIDC crops (splits.json) or BraTS planes (data/brats.SPLIT)."""
    if getattr(args, "source", "lidc") != "brats":
        return _lidc_train_val(args)
    from .training.trainer import TrainData

    train = TrainData.from_brats(args.data[0], "train")
    if args.limit:
        train = TrainData(train.images_NChw[:args.limit], train.masks_NRhw[:args.limit])
    return train, TrainData.from_brats(args.data[0], "val")


def _task_card(args) -> dict:
    """The card fields of --source besides the weights and the configuration."""
    if getattr(args, "source", "lidc") == "brats":
        from .data.brats import brats_card

        return brats_card()
    return json.loads(json.dumps(LIDC_CARD))


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


def cmd_train(args):
    from .training.trainer import AutoencoderTrainer, SegmentorTrainer

    if args.stage == "prob-unet":
        from .baselines.commands import train_prob_unet

        return train_prob_unet(args, *_train_val(args))
    if args.stage == "segmentor" and args.init_model:  # the model and its --config changes, before the data loads
        changes = json.loads(Path(args.config).read_text()) if args.config else {}
        card = json.loads(json.dumps(LIDC_CARD))
        cfg, ae_ckpt, init, fresh = _init_from_model(args.init_model, Path(args.out), card, changes)
    else:
        cfg = _engine_config(args)
    train, val = _train_val(args)
    if getattr(args, "source", "lidc") == "brats":  # z-scored MRI: no [0, 1] intensity windowing
        from .data.augment import AugmentConfig

        brats_augment = AugmentConfig(intensity_prob=0.0)
    if args.stage == "autoencoder":
        tc = train_config(args, steps=2500, batch=64, lr=2e-3, eval_every=250, save_every=250)
        AutoencoderTrainer(cfg, train, val, tc).fit()
    elif args.stage == "decoder":
        _train_decoder(args, cfg, train, val)
    else:
        tc = train_config(args, steps=4000, batch=32, lr=1e-3, eval_every=400, save_every=100)
        if getattr(args, "source", "lidc") == "brats":  # 400 planes, a budget of about a thousand steps
            tc.augment, tc.unet_pretrain_steps = brats_augment, 200
        if not args.init_model:
            card, init = _task_card(args), None
            ae_ckpt = args.autoencoder or str(Path(args.out) / "autoencoder.pt")
        elif not any(k.startswith("image_encoder.") for k in fresh):
            tc.unet_pretrain_steps = 0  # a trained image encoder needs no U-Net-only warm-up; a fresh one gets it
        card["training"]["hardware"] = hardware()
        SegmentorTrainer(cfg, train, val, tc, ae_ckpt, export_to=args.export, card_extra=card,
                         init_segmentor=init).fit()


def _init_from_model(name, out: Path, card: dict, changes: Optional[dict] = None):
    """Fine-tuning a shipped model: its autoencoder (frozen) as OUT/autoencoder.pt and its segmentor's
    weights as the starting point (a resumed run keeps its own checkpoint instead).

    `changes` ({"segmentor": {...}}, the --config file) change the segmentor's configuration (e.g. a wider image
    encoder): every weight whose name and shape still fit is taken over, the others start fresh. The autoencoder
    is the model's own (frozen), so nothing else may change. Returns (config, autoencoder checkpoint,
    initial segmentor state, names of the fresh weights)."""
    import torch

    from .engine import ARSegConfig, build_arseg
    from .models import load_model
    from .training.checkpoint import save_checkpoint

    changes = changes or {}
    if set(changes) - {"segmentor"}:
        raise SystemExit(f"arseg train: with --init-model, --config may change only \"segmentor\" fields (the "
                         f"autoencoder and sampling come from {name}); found {sorted(set(changes) - {'segmentor'})}")
    segmentor_fields = changes.get("segmentor", {})
    predictor, base = load_model(name, "cpu")
    config, old = predictor.config, predictor.segmentor.state_dict()
    if segmentor_fields:
        as_dict = config.to_dict()
        try:
            config = ARSegConfig.from_dict({**as_dict, "segmentor": {**as_dict["segmentor"], **segmentor_fields}})
        except ValueError as e:
            raise SystemExit(f"arseg train: unknown segmentor fields in --config ({e})") from None
    ae_ckpt = out / "autoencoder.pt"
    if not ae_ckpt.exists():
        save_checkpoint(ae_ckpt, {"kind": "autoencoder", "models": {"autoencoder": predictor.autoencoder.state_dict()}})
    card["training"]["initialised_from"] = {"model": base.name, "sha256": base.data["sha256"]}
    if not segmentor_fields:
        return config, str(ae_ckpt), old, []
    state = build_arseg(config)[1].state_dict()
    fresh = [k for k, v in state.items() if k not in old or old[k].shape != v.shape]
    state.update({k: v for k, v in old.items() if k in state and k not in fresh})
    # a transformer block added on top starts as the identity (its attention and MLP outputs zero), so the deeper
    # model starts as the model it grows from
    for k in fresh:
        if k.startswith("blocks.") and (".attn.proj." in k or ".mlp.2." in k):
            state[k] = torch.zeros_like(state[k])
    where = f" ({', '.join(sorted({k.split('.')[0] for k in fresh}))})" if fresh else ""
    print(f"arseg train: {len(state) - len(fresh)} tensors from {base.name}, {len(fresh)} fresh{where}", flush=True)
    card["training"]["initialised_from"]["fresh"] = sorted({".".join(k.split(".")[:2]) for k in fresh})
    return config, str(ae_ckpt), state, fresh


def _train_decoder(args, cfg, train, val):
    """A new decoder behind the trained encoder + quantizer; with --model/--export, put it into that model."""
    import dataclasses

    from .models import export_model, load_model
    from .training.trainer import DecoderTrainer

    if args.decoder_channels:
        cfg = dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder,
                                                                       decoder_channels=args.decoder_channels))
    tc = train_config(args, steps=1000, batch=64, lr=2e-3, eval_every=250, save_every=250, ae_plain_steps=0)
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

    from .evaluation import evaluate
    from .models import ModelError, load_model, read_card
    from .pipeline import SegmentSettings
    from .training.distributed import resolve_device

    if args.baseline == "prob-unet":
        from .baselines.commands import eval_prob_unet

        return eval_prob_unet(args)
    try:  # the sampling limits are SegmentSettings' (one place); the engine's check knows no temperature range
        check_settings(SegmentSettings(temperature=args.temperature, top_k=args.top_k, views=args.views,
                                       oversample=args.oversample, selection_scale=args.selection_scale,
                                       presence_logit_shift=args.presence_shift, seed=args.seed))
        model_notice(read_card(args.model), "eval")
    except (CommandError, ModelError) as e:
        _fail("eval", str(e))
    predictor, card = load_model(args.model, resolve_device(args.device))
    s = predictor.config.sampling
    over = {"n_samples": args.samples, "seed": args.seed}
    if args.temperature is not None:
        over["temperature"] = args.temperature
    for name, value in (("top_k", args.top_k), ("views", args.views), ("oversample", args.oversample),
                        ("selection_scale", args.selection_scale), ("presence_logit_shift", args.presence_shift)):
        if value is not None:
            over[name] = value
    s = dataclasses.replace(s, **over)
    try:
        s.check()
    except ValueError as e:
        raise SystemExit(f"arseg eval: error: {e}") from None
    split, data = eval_data(args)
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
                "temperature": s.temperature, "top_k": s.top_k, "views": s.views, "oversample": s.oversample,
                "selection_scale": s.selection_scale, "presence_logit_shift": s.presence_logit_shift,
                "data": " ".join(args.data)})
    print(json.dumps({k: res[k] for k in ("ged", "hm_iou", "soft_dice_strict", "soft_dice", "n_images")}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


# ------------------------------------------------------------------------------------ segment / batch

def _fail(command: str, message: str):
    print(f"arseg {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


POINT_OPTIONS = ("--point", "--include", "--exclude")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity)"
_NUMBERS = re.compile(rf"^(?:{_NUMBER})(?:,(?:{_NUMBER}))*,?$", re.IGNORECASE)


def join_point_arguments(argv: Sequence[str]) -> List[str]:
    """`--point -56.4,-86.34,-115.96` and `--point -56.4 -86.34 -115.96` as `--point=-56.4,-86.34,-115.96` (and
    so for --include and --exclude).

    argparse takes a word starting with '-' for an option, and in RAS the first coordinate is negative on the
    patient's left half: half of all clicks. The numbers after --point (up to three) are joined to it."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in POINT_OPTIONS:
            values: List[str] = []
            j = i + 1
            while j < len(argv) and len(values) < 3 and _NUMBERS.match(argv[j]):
                values += [v for v in argv[j].split(",") if v]
                j += 1
            if values:
                out.append(f"{word}=" + ",".join(values))
                i = j
                continue
        out.append(word)
        i += 1
    return out


DEVICES = ("auto", "cpu", "cuda")


def check_device(device: str) -> str:
    if device in DEVICES or re.fullmatch(r"cuda:\d+", device or ""):
        return device
    raise CommandError(f"unknown --device {device!r}: choose one of {', '.join(DEVICES)} (or cuda:N for GPU N; "
                       f"'cuda' is any NVIDIA GPU torch sees)")


def check_settings(settings):
    """settings.check(), its message naming the command-line option instead of the field (CommandError)."""
    from .pipeline import SettingsError

    option = {"n_samples": "--samples", "temperature": "--temperature", "seed": "--seed",
              "half_height_mm": "--half-height", "views": "--views", "oversample": "--oversample",
              "selection_scale": "--selection-scale", "presence_logit_shift": "--presence-shift", "top_k": "--top-k"}
    try:
        return settings.check()
    except SettingsError as e:
        message = str(e)
        for name, flag in option.items():
            if message.startswith(name + " "):
                message = flag + message[len(name):]
        raise CommandError(message) from None


def _segment_settings(args):
    from .limits import DEFAULT_HALF_HEIGHT_MM
    from .pipeline import SegmentSettings

    half_height = DEFAULT_HALF_HEIGHT_MM if args.half_height is None else args.half_height  # None: not given
    return check_settings(SegmentSettings(n_samples=args.samples, temperature=args.temperature, seed=args.seed,
                                          half_height_mm=half_height, views=args.views,
                                          oversample=args.oversample, selection_scale=args.selection_scale,
                                          presence_logit_shift=args.presence_shift))


def model_notice(card, command: str) -> None:
    """Which folder the model came from, when cards of the same name were passed over (models.locate_card)."""
    notice = card.notice()
    if notice:
        print(f"arseg {command}: note: {notice}", file=sys.stderr)


# the options that refine the nodule of the --point before them, and the Refinement field each sets
REFINE_OPTIONS = {"include": "--include", "exclude": "--exclude", "lock_scales": "--lock-scales",
                  "from_sample": "--from-sample", "use_sample": "--use-sample"}
PROMPT_KINDS = ("point", "include", "exclude")  # arseg batch's CSV column: a nodule's click, or a refinement point
# the CSV's kinds that refine the nodule of the point row before them with a number, not a point: `lock-scales:K`
# etc., spelled as the option of `arseg segment` that does the same, each -> the Refinement field it sets
NUMBER_KINDS = {"lock-scales": "lock_scales", "from-sample": "from_sample", "use-sample": "use_sample"}
CSV_KINDS = PROMPT_KINDS + tuple(f"{k}:{'K' if k == 'lock-scales' else 'I'}" for k in NUMBER_KINDS)


def _refinement_error(e: Exception, where: str = "") -> CommandError:
    message = str(e)
    for name, flag in REFINE_OPTIONS.items():
        message = message.replace(name, flag)
    return CommandError(f"{where}{message}")


def nodule_steps(steps: Sequence[Tuple[str, object]], command: str, where: str = "") -> list:
    """[(kind, value)] in the order given, kind "point" (a nodule's click) or a REFINE_OPTIONS field (its value
    a point or a whole number) -> runs.NoduleSteps: each point's click and the one refinement its options make.
    A point given again is segmented once (said), its refinements gathered. CommandError for an option before any
    point or a refinement that cannot be (checked again against the model and the volume before any work)."""
    from .prompts import EXCLUDE, INCLUDE, Prompt, PromptError, Refinement
    from .runs import NoduleSteps

    order: List[tuple] = []
    given: Dict[tuple, dict] = {}
    current = None
    def point(value, kind):
        try:
            return parse_point(value)
        except CommandError as e:
            raise CommandError(f"{where}{str(e).replace('--point', '--' + kind)}") from None

    for kind, value in steps:
        if kind in ("point", "include", "exclude"):
            value = point(value, kind)
        if kind == "point":
            current = tuple(value)
            if current not in given:
                order.append(current)
                given[current] = {"prompts": [], "times": 0}
            given[current]["times"] += 1
            continue
        if current is None:
            raise CommandError(f"{where}{REFINE_OPTIONS[kind]} refines the object of the --point before it: give "
                               f"a --point first")
        fields = given[current]
        if kind in ("include", "exclude"):
            fields["prompts"].append(Prompt(INCLUDE if kind == "include" else EXCLUDE, tuple(value)))
        elif kind in fields:
            raise CommandError(f"{where}{REFINE_OPTIONS[kind]} given twice for the point "
                               f"{','.join(f'{v:g}' for v in current)}")
        else:
            fields[kind] = value
    out = []
    for point in order:
        fields = dict(given[point])
        times = fields.pop("times")
        if times > 1:
            print(f"arseg {command}: note: {where}point {','.join(f'{v:g}' for v in point)} given {times} times: "
                  f"segmented once", file=sys.stderr)
        prompts = tuple(fields.pop("prompts"))
        try:
            refinement = Refinement(prompts=prompts, lock_scales=int(fields.pop("lock_scales", 0)), **fields)
        except PromptError as e:
            raise _refinement_error(e, where) from None
        out.append(NoduleSteps(Prompt(INCLUDE, point), () if refinement.empty else (refinement,)))
    return out


def check_refinements(nodules, card, settings, where: str = "") -> None:
    """Each refinement against the model's scales and the samples its click will have, before any work."""
    from .prompts import PromptError
    from .runs import card_scales

    scales = card_scales(card)
    for steps in nodules:
        for refinement in steps.refinements:
            try:
                refinement.check_against(scales or 1 << 30, settings.n_samples)
            except PromptError as e:
                raise _refinement_error(e, where) from None


class _InOrder(argparse.Action):
    """--point and the options that refine its nodule, kept in the order given (args.steps: [(kind, value)])."""

    def __call__(self, parser, namespace, values, option_string=None):
        steps = list(getattr(namespace, "steps", None) or [])
        namespace.steps = steps + [(self.dest, values)]
        setattr(namespace, self.dest, (getattr(namespace, self.dest, None) or []) + [values])


_TEMPORARY_NAME = re.compile(r"\.arseg-tmp-\d+-")  # mrml._temporary_name: the user knows only the final names


def failure_message(e: BaseException, outputs: Sequence[Path] = ()) -> str:
    """One line for a failure. A full disk says so and where (the raw error names a temporary file, or no file);
    temporary names are shown as the final names they stand for."""
    message = _TEMPORARY_NAME.sub("", str(e).replace("\n", " "))
    folders = []
    for path in outputs:
        if path is not None and Path(path).parent not in folders:
            folders.append(Path(path).parent)
    full = [d for d in folders if _free_bytes(d) is not None and _free_bytes(d) < (1 << 20)]
    no_space = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if no_space or (full and "could not write" in message):
        where = ", ".join(str(d) for d in (full or folders)) or "the output folder"
        return (f"the disk is full: no space left in {where} to write the results ({message}); nothing was written; "
                f"free some space and run again")
    return message


def _free_bytes(folder: Path) -> Optional[int]:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return None
    return stat.f_bavail * stat.f_frsize


def _user_errors():
    """The exceptions that mean bad input, not a bug: shown as one line."""
    from .models import ModelError
    from .mrml import ResultError
    from .pipeline import VolumeError

    return (CommandError, ModelError, VolumeError, ResultError, FileNotFoundError, ValueError, RuntimeError, OSError)


def _load_predictor(model: str, device: str):
    from .models import load_model
    from .training.distributed import resolve_device

    return load_model(model, resolve_device(device))


def check_output(path, option: str, suffixes: Tuple[str, ...], inputs: Sequence[Path] = ()) -> Path:
    """An output path that can be written: the right suffix, not a folder, not an input, its folder writable (or
    creatable). Checked before any work, so a run never fails at its end for a reason known at its start."""
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"{option} {path} is a folder; give a file name")
    if not path.name.lower().endswith(suffixes):
        raise CommandError(f"{option} must end in {' or '.join(suffixes)}, got {path.name}")
    if any(path.resolve() == Path(p).resolve() for p in inputs):
        raise CommandError(f"{option} {path} is an input file; choose another name")
    parent = path.parent.resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"{option}: cannot write into {parent} (no permission or not a folder)")
    return path


def _check_model_mode(model: str, mode: str):
    from .models import read_card
    from .pipeline import MODE_VOLUME, check_mode

    card = read_card(model)  # no torch: a refused mode costs no model loading
    try:
        check_mode(card, mode)
    except Exception as e:
        if mode == MODE_VOLUME:
            raise CommandError(f"{e} Without --point, `arseg segment` segments the whole volume.") from None
        raise CommandError(str(e)) from None
    return card


def _progress_bar(desc: str):
    """A bar in scales (each point's K scales in turn), made on the first call: input errors print their one
    line with no bar before it."""
    from tqdm import tqdm

    bars = []

    def progress(done, total):
        if not bars:
            bars.append(tqdm(total=total, desc=desc, leave=False,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| scale {n}/{total} [{elapsed}<{remaining}]"))
        if (bars[0].n, bars[0].total) == (done, total):
            return  # polled ten times a second: redraw only when a scale is done (a log gets a line per scale)
        bars[0].total = total  # a click off the nodule's centre runs again, re-centred: more scales to go
        bars[0].n = done
        bars[0].refresh()

    return progress, bars


def _nodule_line(entry) -> str:
    point = entry.get("point_ras_mm")
    where = f" at R,A,S {', '.join(f'{v:.1f}' for v in point)}" if point else ""
    vols = entry["sample_volume_mm3"]
    marking = f"{entry.get('samples_marking', entry['n_samples'])} of {entry['n_samples']} samples mark it"
    if entry["consensus_volume_mm3"] > 0:
        d = entry.get("diameters_mm")
        axes = (f", axial {d['long']:.1f} x {d['short']:.1f} mm (mean {d['mean']:.1f}, samples "
                f"{d['samples']['mean']['min']:.1f}-{d['samples']['mean']['max']:.1f})") if d else ""
        return (f"{entry['name']}{where}: consensus {entry['consensus_volume_mm3']:.1f} mm3, samples "
                f"{vols['min']:.1f}-{vols['max']:.1f} mm3 ({marking}){axes}")
    return (f"{entry['name']}{where}: consensus empty; {marking}, {entry.get('if_present_volume_mm3', 0):.1f} mm3 "
            f"if present")


def cmd_segment(args):
    from .pipeline import MODE_CLICK, MODE_VOLUME

    if args.input:
        return segment_inputs(args)
    if args.volume is None:
        _fail("segment", "give the volume file (or, for a model with several inputs, --input NAME=PATH for each)")
    try:
        settings = _segment_settings(args)
        check_device(args.device)
        nodules = nodule_steps(getattr(args, "steps", None) or [], "segment")
        volume = Path(args.volume)
        if not volume.is_file() and not volume.is_dir():  # a folder: a DICOM series (mrml.check_image_file)
            raise CommandError(f"volume file not found: {volume}")
        from .mrml import OutputOptions, check_image_file
        from .runs import LocalBackend, RunService

        check_image_file(volume)
        out = check_output(args.out, "--out", (".seg.nrrd",), [volume])
        png = check_output(args.png, "--png", (".png",), [volume]) if args.png else None
        report = check_output(args.report, "--report", (".json",), [volume]) if args.report else None
        chosen = [p for p in (out, png, report) if p is not None]
        if len({p.resolve() for p in chosen}) < len(chosen):
            raise CommandError("--out, --png and --report must be different files")
        read = _check_model_mode(args.model, MODE_CLICK if nodules else MODE_VOLUME)
        from .volume_regions import uses_regions_path

        if uses_regions_path(read):  # refused before the model loads
            needed = " ".join(f"--input {i.name}=PATH" for i in read.task.inputs)
            raise CommandError(f"model {read.name!r} takes several inputs: give them as {needed} instead of VOLUME")
        model_notice(read, "segment")
        check_refinements(nodules, read, settings)
        predictor, card = _load_predictor(args.model, args.device)
        progress, bars = _progress_bar(f"arseg segment {volume.name}")
        try:
            nodes = RunService(LocalBackend(predictor, card)).segment_file(
                volume, out, nodules, settings, OutputOptions(include_samples=args.include_samples),
                report_path=report, png_path=png, progress=progress)
        finally:
            for bar in bars:
                bar.close()
    except _user_errors() as e:
        _fail("segment", failure_message(e, [args.out, args.png, args.report]))
    warning = _small_input_warning(nodes, card)
    if warning:
        print(f"arseg segment: warning: {volume.name}: {warning}", file=sys.stderr)
    seconds = sum(r.timings_s.get("total", 0) for r in nodes.results)
    print(f"{out}: {len(nodes.report['nodules'])} {object_word(card)}(s) ({card.name}, {seconds:.1f} s)")
    for entry in nodes.report["nodules"]:
        print("  " + _nodule_line(entry))
    for notice in nodes.notices:  # a later point inside an earlier nodule redoes it, or keeps it if it found nothing
        print("  note: " + notice)
    for path in (png, report):
        if path is not None:
            print(f"  wrote {path}")


def object_word(card) -> str:
    """What a one-input model segments, as a count printed at run time names it: its card's one region in lower
    case (the lung model's "nodule"), else "object"."""
    task = getattr(card, "task", None)
    regions = task.region_names if task is not None else ()
    return regions[0].lower() if len(regions) == 1 else "object"


def parse_inputs(texts: Sequence[str]) -> Dict[str, Path]:
    """--input NAME=PATH, repeated -> {name: path}, in the order given; each name once, each file (or DICOM series
    folder: checked by mrml.check_image_file before any work, as VOLUME is) present."""
    inputs: Dict[str, Path] = {}
    for text in texts:
        name, sep, path = str(text).partition("=")
        name = name.strip().lower()
        if not sep or not name or not path:
            raise CommandError(f"--input takes NAME=PATH (e.g. --input flair=case_flair.nii.gz), got {text!r}")
        if name in inputs:
            raise CommandError(f"--input {name} is given twice")
        if not Path(path).is_file() and not Path(path).is_dir():  # a folder: a DICOM series
            raise CommandError(f"--input {name}: file not found: {path}")
        inputs[name] = Path(path)
    return inputs


def check_input_names(card, names: Sequence[str]) -> None:
    """CommandError unless the --input names are exactly the card's inputs (parse_inputs refused a name given
    twice), saying which is not one of them and which is missing."""
    needed = list(card.task.input_names)
    unknown, missing = card.task.unknown_and_missing(names)
    if not unknown and not missing:
        return
    why = []
    if unknown:
        why.append(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not one of its inputs")
    if missing:
        why.append(f"no {', '.join(missing)} given")
    raise CommandError(f"model {card.name!r} takes {' '.join(f'--input {n}=PATH' for n in needed)}: "
                       f"{'; '.join(why)}")


def check_input_volumes(inputs: Dict[str, Path]) -> None:
    """Each --input readable as a 3D single-component volume (a DICOM folder: one series), before any work; the
    error names the input."""
    from .mrml import ResultError, check_image_file

    for name, path in inputs.items():
        try:
            check_image_file(path)
        except ResultError as e:
            raise CommandError(f"--input {name}: {e}") from None


# the options of `arseg segment` that only a click uses (its refinements, the slab around it, its samples written as
# segments), each -> its flag: refused with --input (several inputs, whole volume) rather than silently ignored
CLICK_ONLY_OPTIONS = dict(REFINE_OPTIONS, half_height="--half-height", include_samples="--include-samples")


def click_only_options_given(args) -> List[str]:
    """The CLICK_ONLY_OPTIONS given on the command line (their defaults are None or False), in CLICK_ONLY_OPTIONS's
    order."""
    return [flag for dest, flag in CLICK_ONLY_OPTIONS.items() if getattr(args, dest, None) not in (None, False)]


def segment_inputs(args):
    """`arseg segment --input NAME=PATH ...`: a model whose card's task names several inputs, whole volume
    (runs.RunService.segment_input_files: inputs on another grid are resampled onto the first's, which the output
    and the report's settings say); a segment per region per lesion, the report per region."""
    from .pipeline import MODE_CLICK, MODE_VOLUME

    try:
        if args.volume is not None:
            raise CommandError(f"give the inputs either as VOLUME or as --input NAME=PATH, not both ({args.volume})")
        settings = _segment_settings(args)
        check_device(args.device)
        inputs = parse_inputs(args.input)
        from .mrml import region_summary
        from .runs import LocalBackend, RunService

        check_input_volumes(inputs)  # a DICOM folder with several series, or none, is refused here
        given = list(inputs.values())
        out = check_output(args.out, "--out", (".seg.nrrd",), given)
        png = check_output(args.png, "--png", (".png",), given) if args.png else None
        report = check_output(args.report, "--report", (".json",), given) if args.report else None
        chosen = [p for p in (out, png, report) if p is not None]
        if len({p.resolve() for p in chosen}) < len(chosen):
            raise CommandError("--out, --png and --report must be different files")
        # a point asks for click mode: refused here when the card lists whole volume only (brats-glioma: its
        # modes_note says why), else because a click on several inputs is not implemented
        card = _check_model_mode(args.model, MODE_CLICK if args.point else MODE_VOLUME)
        if args.point:
            raise CommandError("--point with --input: a click on several inputs is not supported; segment the whole "
                               "volume (drop --point)")
        unused = click_only_options_given(args)
        if unused:
            raise CommandError(f"{', '.join(unused)} with --input: {'they apply' if len(unused) > 1 else 'it applies'}"
                               f" to a click (--point), and several inputs are segmented as a whole volume; drop "
                               f"{'them' if len(unused) > 1 else 'it'}")
        model_notice(card, "segment")
        check_input_names(card, list(inputs))
        needed = list(card.task.input_names)
        predictor, card = _load_predictor(args.model, args.device)
        progress, bars = _progress_bar(f"arseg segment {given[0].name}")
        try:
            nodes = RunService(LocalBackend(predictor, card)).segment_input_files(
                {n: inputs[n] for n in needed}, out, settings, report, png, progress=progress)
        finally:
            for bar in bars:
                bar.close()
    except _user_errors() as e:
        _fail("segment", failure_message(e, [args.out, args.png, args.report]))
    lesions, *regions = region_summary(nodes.report).splitlines()
    print(f"{out}: {lesions} ({card.name}, {nodes.result.timings_s.get('total', 0):.1f} s)")
    for line in regions:
        print("  " + line)
    for notice in nodes.notices:  # an input resampled onto the first's grid
        print("  note: " + notice)
    for path in (png, report):
        if path is not None:
            print(f"  wrote {path}")


def _small_input_warning(nodes, card) -> Optional[str]:
    from .pipeline import small_input_warning

    result = nodes.results[-1] if getattr(nodes, "results", None) else None
    if result is None or not card.pixel_spacing_mm:
        return None
    return small_input_warning(result.volume_shape, result.ijk_to_ras, card.crop_size, card.pixel_spacing_mm)


# ------------------------------------------------------------------------------------ batch: which points

def find_cases(input_dir: Path, pattern: str):
    """Image files under input_dir matching pattern, segmentations and markups excluded, in a stable order."""
    if not input_dir.is_dir():
        raise CommandError(f"input folder not found: {input_dir}")
    from .mrml import is_dicom_folder

    skip = (".seg.nrrd", ".mrk.json", ".json", ".csv")
    return sorted(p for p in input_dir.glob(pattern)
                  if (p.is_file() and not p.name.lower().endswith(skip)) or (p.is_dir() and is_dicom_folder(p)))


def read_markups_points(path: Path) -> List[Tuple[float, float, float]]:
    """The control points of a Slicer markups file (.mrk.json) in RAS (Slicer writes LPS by default)."""
    try:
        data = json.loads(Path(path).read_text())
        points = []
        for markup in data["markups"]:
            lps = str(markup.get("coordinateSystem", "LPS")).upper() == "LPS"
            for cp in markup.get("controlPoints", []):
                x, y, z = (float(v) for v in cp["position"])
                points.append((-x, -y, z) if lps else (x, y, z))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CommandError(f"{path} is not a Slicer markups file with control points ({e})") from None
    for p in points:
        parse_point(list(p))
    return points


def _csv_number_kind(kind: str, where: str):
    """A CSV kind `lock-scales:K`, `from-sample:I` or `use-sample:I` -> (Refinement field, whole number >= 1);
    None for any other kind; CommandError (naming the line) for a bad number."""
    name, sep, value = kind.partition(":")
    if name not in NUMBER_KINDS:
        return None
    if not sep or not value.isdigit() or int(value) < 1:
        what = "scales kept, K" if name == "lock-scales" else "sample, I (counted from 1)"
        raise CommandError(f"{where}{name}:N takes a whole number from 1 (the {what}), got {kind!r}")
    return NUMBER_KINDS[name], int(value)


def _check_csv_refinement(fields: Dict[str, Any], where: str) -> None:
    """The refinement a case's point row has gathered so far, as the Refinement type checks it (a from-sample
    without lock-scales, use-sample with points or locked scales): said at the row that makes it wrong."""
    from .prompts import PromptError, Refinement

    prompts = tuple(fields.get("prompts", ()))
    if "from_sample" in fields and "lock_scales" not in fields:
        return  # a lock-scales row may still follow for the same point
    try:
        Refinement(prompts=prompts, **{k: v for k, v in fields.items() if k != "prompts"})
    except PromptError as e:
        message = str(e)
        for kind, name in NUMBER_KINDS.items():
            message = message.replace(name, kind)
        raise CommandError(f"{where}{message}") from None


def read_points_file(path: Path) -> Dict[str, List[Tuple[str, object]]]:
    """--points: a CSV `case,R,A,S[,kind]` (a header line optional, several rows per case) or a JSON object
    {case: [R, A, S] or [[R, A, S], ...]}. A case is a path relative to INPUT_DIR, a file name or a stem. kind
    (CSV_KINDS): point (the default: a nodule's click), include or exclude (a point that refines the nodule of
    the case's point row before it), or lock-scales:K, from-sample:I, use-sample:I (R, A, S left empty: they
    refine that nodule as the `arseg segment` options of those names do). Checked whole, line by line, before any
    work. Returns {case: [(kind, (R, A, S)) or (Refinement field, number)]} in file order."""
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"--points file not found: {path}")
    from .prompts import Prompt

    out: Dict[str, List[Tuple[str, object]]] = {}
    refining: Dict[str, Dict[tuple, Dict[str, Any]]] = {}  # case -> point -> the refinement its rows gather
    current: Dict[str, Dict[str, Any]] = {}  # case -> the fields of the nodule its last point row made
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise CommandError(f"--points {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise CommandError("--points JSON must be an object {\"case\": [R, A, S] or [[R, A, S], ...]}")
        for case, value in data.items():
            rows = value if value and isinstance(value[0], (list, tuple)) else [value]
            out[str(case)] = [("point", parse_point(list(r))) for r in rows]
        return out
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if n == 1 and cells[0].lower() == "case":
                continue  # header
            where = f"--points {path} line {n}: "
            if len(cells) not in (4, 5):
                raise CommandError(f"{where}expected case,R,A,S or case,R,A,S,kind, got {','.join(cells)!r}")
            kind = (cells[4] if len(cells) == 5 else "") .lower() or "point"
            number = _csv_number_kind(kind, where)
            if number is None and kind not in PROMPT_KINDS:
                raise CommandError(f"{where}the kind is one of {', '.join(CSV_KINDS)}, got {cells[4]!r}")
            if number is not None:
                if any(cells[1:4]):
                    raise CommandError(f"{where}a {kind.partition(':')[0]} row refines the object of the point "
                                       f"row before it and takes no point: leave R, A, S empty "
                                       f"(case,,,,{kind})")
                value: object = number[1]
                kind = number[0]
            else:
                try:
                    value = parse_point(cells[1:4])
                except CommandError:
                    raise CommandError(f"{where}R, A, S must be finite numbers in mm, got "
                                       f"{','.join(cells[1:4])!r}") from None
            rows = out.setdefault(cells[0], [])
            if kind == "point":
                nodules = refining.setdefault(cells[0], {})
                current[cells[0]] = nodules.setdefault(tuple(value), {})  # a point again: the same nodule's
            else:
                fields = current.get(cells[0])
                if fields is None:
                    what = f"an {kind} point" if kind in PROMPT_KINDS else f"a {cells[4].lower()} row"
                    raise CommandError(f"{where}{what} refines the object of a point row of case {cells[0]!r} "
                                       f"before it; there is none")
                if kind in PROMPT_KINDS:
                    fields.setdefault("prompts", []).append(Prompt(kind, tuple(value)))
                elif kind in fields:
                    raise CommandError(f"{where}{cells[4].lower().partition(':')[0]} given twice for the object "
                                       f"of the point row before it")
                else:
                    fields[kind] = value
                _check_csv_refinement(fields, where)
            rows.append((kind, value))
    for case, nodules in refining.items():  # what only the whole file can tell
        for point, fields in nodules.items():
            if "from_sample" in fields and "lock_scales" not in fields:
                raise CommandError(f"--points {path}: case {case!r}, the object of the point "
                                   f"{','.join(f'{v:g}' for v in point)}: from-sample:I names the sample whose "
                                   f"coarse scales are kept; give a lock-scales:K row too")
    return out


def points_for_cases(cases: Sequence[Path], input_dir: Path, table: Dict[str, list]) -> Dict[Path, list]:
    """Each case's [(kind, point)]: from the table (by relative path, file name or stem) and from NAME.mrk.json
    beside it (clicks).
    A table row that names no case, or more than one, is an error: better refused than guessed."""
    from .mrml import volume_stem

    keys: Dict[str, List[Path]] = {}
    for case in cases:
        for key in {case.relative_to(input_dir).as_posix(), case.name, volume_stem(case)}:
            keys.setdefault(key, []).append(case)
    points: Dict[Path, list] = {case: [] for case in cases}
    for key, rows in table.items():
        matches = keys.get(Path(key).as_posix(), [])
        if not matches:
            raise CommandError(f"--points names case {key!r}, which is not among the {len(cases)} files found")
        if len(matches) > 1:
            raise CommandError(f"--points case {key!r} matches {len(matches)} files; give its path relative to the "
                               f"input folder")
        points[matches[0]] += rows
    for case in cases:
        markups = case.with_name(volume_stem(case) + ".mrk.json")
        if markups.is_file():
            points[case] += [("point", p) for p in read_markups_points(markups)]
    return points


def _case_outputs(case: Path, input_dir: Path, output_dir: Path):
    from .mrml import volume_stem

    rel = case.relative_to(input_dir)
    base = output_dir / rel.parent / volume_stem(case)
    return (rel, base.with_name(base.name + ".seg.nrrd"), base.with_name(base.name + ".report.json"),
            base.with_name(base.name + ".png"))


def check_case_outputs(cases: Sequence[Path], input_dir: Path, output_dir: Path, png: bool) -> None:
    """CommandError, before any work, when two cases would write the same output (a.nrrd, a.nii.gz and a.mha all
    make a.seg.nrrd: two results would be silently overwritten) or an output would overwrite an input."""
    writers: Dict[Path, List[Path]] = {}
    for case in cases:
        rel, seg, report, figure = _case_outputs(case, input_dir, output_dir)
        for path in (seg, report, figure) if png else (seg, report):
            writers.setdefault(path.resolve(), []).append(rel)
    clashes = {path: rels for path, rels in writers.items() if len(rels) > 1}
    if clashes:
        path, rels = next(iter(clashes.items()))
        raise CommandError(f"{' and '.join(map(str, rels))} would all be written to {path.name} "
                           f"({len(clashes)} output name(s) shared by several scans): rename them, or choose one "
                           f"with --pattern; nothing was segmented")
    overwritten = sorted(set(writers) & {case.resolve() for case in cases})
    if overwritten:
        raise CommandError(f"an output would overwrite the scan {overwritten[0]}: choose another OUTPUT_DIR")


def _interruptible():
    """SIGTERM as Ctrl-C while cases run, so that a stopped batch still writes what finished (restored after)."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave SIGTERM alone
        return None


def cmd_batch(args):
    import signal
    import time

    import torch.distributed as dist
    from tqdm import tqdm

    from .pipeline import MODE_CLICK, MODE_VOLUME
    from .training.distributed import init_distributed, is_main, resolve_device

    input_dir, output_dir = Path(args.input_dir), Path(args.output_dir)
    try:
        settings = _segment_settings(args)
        check_device(args.device)
        cases = find_cases(input_dir, args.pattern)
        if not cases:
            raise CommandError(f"no files match {args.pattern!r} in {input_dir}")
        check_case_outputs(cases, input_dir, output_dir, args.png)
        points = points_for_cases(cases, input_dir, read_points_file(Path(args.points)) if args.points else {})
        nodules = {case: nodule_steps(p, "batch", f"{case.relative_to(input_dir)}: ") for case, p in points.items()}
        read = _check_model_mode(args.model, MODE_CLICK)
        model_notice(read, "batch")
        for case, steps in nodules.items():
            check_refinements(steps, read, settings, f"{case.relative_to(input_dir)}: ")
        if args.whole_volume:
            _check_model_mode(args.model, MODE_VOLUME)
        check_output(output_dir / "batch.json", "OUTPUT_DIR", (".json",))
        rank, world = init_distributed(resolve_device(args.device))
        from .mrml import OutputOptions
        from .runs import LocalBackend, RunService

        predictor, card = _load_predictor(args.model, args.device)  # under torchrun, each rank takes its own GPU
        service = RunService(LocalBackend(predictor, card))
    except _user_errors() as e:
        _fail("batch", str(e).replace("\n", " "))

    mine = cases[rank::world]  # ranks take every world-th case: no scheduler, no shared state
    records = []
    previous_sigterm = _interruptible()
    interrupted = False
    t_start = time.perf_counter()
    try:
        for case in tqdm(mine, desc=f"arseg batch rank {rank}/{world}", unit="case",
                         disable=not args.progress and not is_main()):
            rel, seg_path, report_path, png_path = _case_outputs(case, input_dir, output_dir)
            # which file made which output: the source, and every file written for it
            record = {"case": str(rel), "source": str(case), "rank": rank, "segmentation": str(seg_path),
                      "report": str(report_path),
                      "points_ras_mm": [list(steps.click.point_ras) for steps in nodules[case]]}
            if any(steps.refinements for steps in nodules[case]):
                record["refinements"] = [[r.to_dict() for r in steps.refinements] for steps in nodules[case]]
            if args.png:
                record["png"] = str(png_path)
            t0 = time.perf_counter()
            if not nodules[case] and not args.whole_volume:
                record.update(status="no-points", error="no points for this case: not segmented (give them in "
                                                        "--points or a .mrk.json beside the scan)")
                print(f"arseg batch: {rel}: no points: not segmented", file=sys.stderr)
                records.append(record)
                continue
            records.append(record)
            record["status"] = "interrupted"  # until it finishes: a stop now leaves none of its files
            try:
                nodes = service.segment_file(case, seg_path, nodules[case], settings,
                                             OutputOptions(include_samples=args.include_samples),
                                             report_path=report_path, png_path=png_path if args.png else None)
                record.update(status="ok", mode=nodes.report["mode"], n_nodules=len(nodes.report["nodules"]),
                              consensus_volume_mm3=[n["consensus_volume_mm3"] for n in nodes.report["nodules"]])
                warning = _small_input_warning(nodes, card)
                if warning:
                    record["warning"] = warning
                    print(f"arseg batch: {rel}: warning: {warning}", file=sys.stderr)
            except _user_errors() as e:
                outputs = [seg_path, report_path, png_path if args.png else None]
                record.update(status="error", error=failure_message(e, outputs))
                print(f"arseg batch: {rel}: error: {record['error']}", file=sys.stderr)
            service.memory.forget()  # each case's nodules are its own
            record["seconds"] = round(time.perf_counter() - t0, 3)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)

    if interrupted:  # no collective: the other ranks may be stopping too; each rank writes what it finished
        done = {r["case"] for r in records}
        records += [{"case": str(case.relative_to(input_dir)), "source": str(case), "rank": rank,
                     "status": "not-started"} for case in mine if str(case.relative_to(input_dir)) not in done]
        summary_path = output_dir / ("batch.json" if world == 1 else f"batch.rank{rank}-of-{world}.json")
        _write_batch_summary(summary_path, card, world, records, time.perf_counter() - t_start, interrupted=True)
        print(f"arseg batch: interrupted; what finished is in {summary_path}", file=sys.stderr)
        raise KeyboardInterrupt
    everyone = [(records, time.perf_counter() - t_start)]
    if dist.is_initialized():
        everyone = [None] * world
        dist.all_gather_object(everyone, (records, time.perf_counter() - t_start))
    all_records = sorted((r for part, _ in everyone for r in part), key=lambda r: r["case"])
    seconds = max(s for _, s in everyone)  # the ranks run side by side: the batch took its slowest rank's time
    failed = [r for r in all_records if r["status"] == "error"]
    unpointed = [r for r in all_records if r["status"] == "no-points"]
    n_ok = len(all_records) - len(failed) - len(unpointed)
    if is_main():
        summary = _write_batch_summary(output_dir / "batch.json", card, world, all_records, seconds)
        print(f"arseg batch: {n_ok} of {len(all_records)} cases segmented on {world} rank(s) in {seconds:.1f} s "
              f"({summary['cases_per_minute']:.2f} cases per minute); {len(failed)} failed, {len(unpointed)} without "
              f"points; summary in {output_dir / 'batch.json'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    if failed or unpointed:
        raise SystemExit(1)


def _write_batch_summary(path: Path, card, world: int, records: List[dict], seconds: float,
                         interrupted: bool = False) -> dict:
    """batch.json; with the throughput: the cases segmented per minute of the batch's wall time (model loading not
    counted; each case's own time is in its record)."""
    from .mrml import write_files_atomically

    count = {status: sum(r["status"] == status for r in records)
             for status in ("ok", "error", "no-points", "interrupted", "not-started")}
    summary = {"model": card.name, "model_card": str(card.path), "card_sha256": card.data.get("card_sha256"),
               "world_size": world, "cases": sorted(records, key=lambda r: r["case"]), "n_ok": count["ok"],
               "n_failed": count["error"], "n_without_points": count["no-points"], "seconds": round(seconds, 3),
               "cases_per_minute": round(60.0 * count["ok"] / seconds, 3) if seconds > 0 else 0.0}
    if interrupted:
        summary.update(interrupted=True, n_interrupted=count["interrupted"], n_not_started=count["not-started"])
    write_files_atomically({path: lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n")})
    return summary


def _add_sampling_args(p):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name or card path (default: the shipped {DEFAULT_MODEL})")
    p.add_argument("--samples", type=int, default=16, help="samples per crop, 1 to 64 (default 16)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, above 0 and at most 5 (default: the model card's)")
    p.add_argument("--seed", type=int, default=0, help="random seed >= 0: the same seed gives the same result")
    p.add_argument("--views", type=int, default=None,
                   help="draw the samples from this many of each crop's 8 rotated/mirrored views, 1 to 8 "
                        "(default: the model card's)")
    p.add_argument("--oversample", type=int, default=None,
                   help="draw this many candidates per sample and keep the most representative, 1 to 8 "
                        "(default: the model card's; 1 with --views 1 is the fastest)")
    p.add_argument("--selection-scale", type=int, default=None,
                   help="with --oversample above 1: compare the candidates at this scale and draw only the kept "
                        "ones to the finest (0: compare finished candidates; default: the model card's)")
    p.add_argument("--presence-shift", type=float, default=None,
                   help="added to the presence head's logit, -5 to 5 (default: the model card's; 0: the head as "
                        "trained)")
    p.add_argument("--device", default="auto", help="auto (a GPU if torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--half-height", type=float, default=None,
                   help="millimetres above and below each click to segment, 0 to 200 (default 20)")
    p.add_argument("--include-samples", action="store_true",
                   help="also write every sample of each object (each click's) as a hidden segment")


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
               volume_slices=args.volume_slices, lung1=not args.no_lung1, isa=args.isa)


def cmd_view(args):
    """The review page (ARSegLib.web): needs the `web` extra; input errors are one line, as for segment."""
    from .web.serve import ViewOptions, prepare_rendering, serve  # no trame yet

    try:
        # what the page imports only when it starts (web/serve.py, web/app.py): a missing one is the hint, not a
        # traceback from inside the server; rendering is set up first, as serve() does before these imports
        prepare_rendering()
        import trame.app  # noqa: F401
        import trame.widgets.vuetify3  # noqa: F401
        import trame_slicer.core  # noqa: F401
    except ImportError as e:
        _fail("view", f"the review page needs trame-slicer: pip install -e \".[web]\" ({e})")
    from .models import ModelError, read_card
    from .web.catalog import CatalogError

    try:
        card = read_card(args.model)  # a bad card is one line before the server starts
    except ModelError as e:
        _fail("view", str(e))
    try:
        cases = [view_case(args, card)] if args.input else []
    except _user_errors() as e:
        _fail("view", str(e))
    model_notice(card, "view")

    options = ViewOptions(volumes=args.volumes, data_dirs=args.data_dir, cases=cases, host=args.host,
                          port=args.port, model=args.model, device=args.device, n_samples=args.samples)
    try:
        serve(options)
    except (CatalogError, *_user_errors()) as e:
        _fail("view", str(e))


def view_case(args, card) -> Dict[str, str]:
    """`arseg view --input NAME=PATH ...`: one case of a model of several inputs, {input name: path} in the card's
    order (ViewOptions.cases), checked before the server starts: NAME=PATH each, every input of the card once and
    no other, each a file or DICOM series folder readable as a volume. Refused with VOLUME arguments (a case is
    given one way) and for a one-input model; --data-dir may add cases to the list."""
    if args.volumes:
        raise CommandError(f"give a case either as VOLUME (its folder or files) or as --input NAME=PATH, not both "
                           f"({args.volumes[0]})")
    task = getattr(card, "task", None)
    if task is None or len(task.inputs) < 2:
        raise CommandError(f"--input is for a model of several inputs; model {card.name!r} takes one volume: give "
                           f"it as VOLUME")
    inputs = parse_inputs(args.input)
    check_input_names(card, list(inputs))
    from .web.catalog import VOLUME_SUFFIXES, is_volume_file

    for name, path in inputs.items():  # what the page's catalog lists (segment reads any image ITK reads)
        if path.is_file() and not is_volume_file(path):
            raise CommandError(f"--input {name}: {path} is not a volume file the page reads "
                               f"({', '.join(VOLUME_SUFFIXES)}, or a DICOM series folder)")
    check_input_volumes(inputs)
    return {name: str(inputs[name]) for name in task.input_names}


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as package_version

        return package_version("arseg")
    except (ImportError, PackageNotFoundError):  # a source tree that was not pip-installed
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
        return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="arseg", description=__doc__)
    ap.add_argument("--version", action="version", version=f"arseg {version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the mask autoencoder or the segmentor")
    p.add_argument("stage", choices=["autoencoder", "segmentor", "decoder", "prob-unet"],
                   help="decoder: a new (e.g. lighter) decoder behind a trained encoder and quantizer; prob-unet: "
                        "the Probabilistic U-Net baseline (ARSegLib/baselines), best val weights in "
                        "OUT/prob_unet_best.pt")
    _add_common_train(p)
    p.add_argument("--autoencoder", default=None, help="autoencoder checkpoint (default OUT/autoencoder.pt)")
    p.add_argument("--export", default=None, help="write the best model as EXPORT.safetensors + EXPORT.json")
    p.add_argument("--decoder-channels", type=int, default=0, help="decoder stage: the new decoder's width")
    p.add_argument("--model", default=None, help="decoder stage: the model whose decoder is replaced on --export")
    p.add_argument("--init-model", default=None,
                   help="segmentor stage: fine-tune this model (name or card): its configuration, frozen "
                        "autoencoder and segmentor weights are the start; with --config, its \"segmentor\" "
                        "fields change the architecture (e.g. a wider unet_channels): weights that still fit "
                        "are taken over, the rest start fresh")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="GED, HM-IoU, Soft-Dice of a model on LIDC crops")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or card path")
    p.add_argument("--data", required=True, nargs="+", metavar="DATA",
                   help="LIDC tars, crop directories or a folder of tars (splits.json beside them)")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"],
                   help="split of splits.json to evaluate (default val; all: every crop)")
    p.add_argument("--samples", type=int, default=16, help="samples per crop (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the card's)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (0: off)")
    p.add_argument("--views", type=int, default=None,
                   help="draw the candidates from this many of each crop's 8 symmetric views (default: the card's)")
    p.add_argument("--oversample", type=int, default=None,
                   help="draw this many times --samples candidates, keep --samples by kernel herding "
                        "(default: the card's)")
    p.add_argument("--selection-scale", type=int, default=None,
                   help="herding compares the candidates at this scale, only the kept draw the finer ones "
                        "(0: the last scale; default: the card's)")
    p.add_argument("--presence-shift", type=float, default=None,
                   help="added to the presence head's logit (default: the card's)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N crops (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", default=None, help="write every metric to this JSON file")
    p.add_argument("--baseline", choices=["unet", "unet-levels", "prob-unet"], default=None,
                   help="evaluate a baseline instead: unet (the model's dense head, deterministic), unet-levels "
                        "(its soft map thresholded at N levels, probabilistic) or prob-unet (the Probabilistic "
                        "U-Net of --checkpoint; --temperature scales its prior's standard deviation)")
    p.add_argument("--checkpoint", default=None,
                   help="--baseline prob-unet: its weights (e.g. checkpoints/prob-unet/prob_unet_best.pt)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate-presence", help="refit the presence head on frozen features; kept if val improves")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or card path")
    p.add_argument("--data", required=True, nargs="+", metavar="DATA", help="LIDC tars or a folder of tars")
    p.add_argument("--epochs", type=int, default=200, help="passes over the training crops' features")
    p.add_argument("--flips", action="store_true", help="fit on the 8 flips/rotations of each crop too")
    p.add_argument("--out", default=None, help="output base path (default: overwrite the model in place)")
    p.set_defaults(func=cmd_calibrate_presence)

    p = sub.add_parser("bench", help="inference speed: per crop (cached vs no-cache), split, lung1 click")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or card path")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--runs", type=int, default=10, help="timed runs per measurement (medians)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--volume-slices", type=int, default=4, help="lung1 slices timed in whole-volume mode")
    p.add_argument("--no-lung1", action="store_true", help="skip the lung1 click and volume timings")
    p.add_argument("--isa", choices=["both", "native", "avx2"], default="both",
                   help="both (default): every figure natively and again with AVX-512 off (a child process capped "
                        "at AVX2, checked; under \"avx2\" in the JSON); native or avx2: one of them only")
    p.add_argument("--json", default=None, help="write the measurements to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("segment", help="segment the objects at given points of a volume file (or the whole volume) "
                                       "into a .seg.nrrd",
                       description="Segment VOLUME with an AR-Seg model at each --point (click mode: the 3D component "
                                   "through the point; one object per point, all in one .seg.nrrd) or, for models "
                                   "whose card allows it, without --point, every axial slice. Writes what Slicer "
                                   "writes for a segmentation node; all outputs appear together at the end or not "
                                   "at all.")
    p.add_argument("volume", nargs="?", default=None,
                   help="image file (NRRD, NIfTI, MHA, ...) or a folder holding one DICOM series: a 3D "
                        "single-component volume (or --input NAME=PATH)")
    p.add_argument("--input", action="append", default=None, metavar="NAME=PATH",
                   help="one input of a model that takes several (its card's task names them, e.g. --input "
                        "flair=F.nii.gz --input t1ce=T.nii.gz for brats-glioma); on one grid")
    p.add_argument("--point", action=_InOrder, default=None, metavar="R,A,S",
                   help="an object's RAS point in mm (Slicer's coordinates), e.g. --point -56.4,-86.34,-115.96; "
                        "repeat for several objects")
    p.add_argument("--include", action=_InOrder, default=None, metavar="R,A,S",
                   help="refine the object of the --point before it: its samples must all mark this point "
                        "(repeatable)")
    p.add_argument("--exclude", action=_InOrder, default=None, metavar="R,A,S",
                   help="refine the object of the --point before it: its samples must not mark this point "
                        "(repeatable)")
    p.add_argument("--lock-scales", action=_InOrder, type=int, default=None, metavar="K",
                   help="refine the object of the --point before it: keep scales 1..K of a sample (--from-sample, "
                        "else the most typical one) and draw only the finer scales again")
    p.add_argument("--from-sample", action=_InOrder, type=int, default=None, metavar="I",
                   help="with --lock-scales: the sample (1-based) whose coarse scales are kept")
    p.add_argument("--use-sample", action=_InOrder, type=int, default=None, metavar="I",
                   help="refine the object of the --point before it: its sample I (1-based) becomes the result")
    p.add_argument("--out", required=True,
                   help="output segmentation, OUT.seg.nrrd (every object; with --input, a segment per region per "
                        "lesion)")
    p.add_argument("--png", default=None,
                   help="figure (.png): each object's axial plane through the click (whole volume: the plane with "
                        "most consensus), the scales, the consensus and the disagreement over the image")
    p.add_argument("--report", default=None,
                   help="report (.json): a row per object (with --input, per region) with volumes, samples marking "
                        "it, per-sample IoU, settings")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("batch", help="segment the objects of many scans, points from a CSV or markups files; "
                                     "shards across torchrun ranks",
                       description="Segment each file of INPUT_DIR matching --pattern into OUTPUT_DIR (same "
                                   "relative paths, .seg.nrrd + .report.json, batch.json summary) at its points: "
                                   "rows of --points (CSV case,R,A,S, several rows per case) and/or the control "
                                   "points of NAME.mrk.json beside the scan. Cases without points are reported, "
                                   "not segmented. Under torchrun, rank r takes every world-th case.")
    p.add_argument("input_dir", help="folder of scans")
    p.add_argument("output_dir", help="folder for the results (made if missing)")
    p.add_argument("--pattern", default="*.nrrd", help="glob under INPUT_DIR (default *.nrrd; **/ recurses); a "
                                                         "folder it matches that holds a DICOM series is a scan too")
    p.add_argument("--points", default=None,
                   help="CSV case,R,A,S[,kind] (mm, RAS; a header line allowed; several rows per case; kind: point, "
                        "the default, an object's click; include or exclude, a point that refines the object of the "
                        "case's point row before it; lock-scales:K, from-sample:I or use-sample:I with R, A, S left "
                        "empty, as arseg segment's options of those names for that object) or JSON "
                        "{\"case\": [[R, A, S], ...]}; case = path relative to INPUT_DIR, file name or stem")
    p.add_argument("--whole-volume", action="store_true",
                   help="segment cases without points as whole volumes (only models whose card lists that mode)")
    p.add_argument("--png", action="store_true", help="also write each case's figure, NAME.png")
    p.add_argument("--progress", action="store_true", help="progress bars on every rank, not only rank 0")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("view", help="the review page in a browser: Slicer's views, click to segment",
                       description="Serve a web page (trame-slicer) that shows the given volumes in Slicer's slice "
                                   "and 3D views; a click on an object segments it. Only the files and folders "
                                   "given here can be opened; the page listens on 127.0.0.1 unless --host says "
                                   "otherwise.")
    p.add_argument("volumes", nargs="*", metavar="VOLUME", help="volume files (or DICOM series folders) the page may "
                                                              "open")
    p.add_argument("--data-dir", action="append", default=[], metavar="DIR",
                   help="a folder whose volume files (recursively) the page may open; repeatable")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                   help="one case of a model of several inputs, input by input (a file or DICOM series folder; "
                        "e.g. --input flair=a.nii.gz --input t1ce=b.nii.gz): each of the card's inputs once; not "
                        "with VOLUME")
    p.add_argument("--host", default=None,
                   help="address to listen on (default 127.0.0.1, this machine only; anything else is reachable "
                        "by others: no login, no encryption)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name or card path (default: the shipped {DEFAULT_MODEL})")
    p.add_argument("--samples", type=int, default=16, help="samples per crop (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_view)
    return ap


def main(argv=None):
    args = build_parser().parse_args(join_point_arguments(sys.argv[1:] if argv is None else list(argv)))
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
