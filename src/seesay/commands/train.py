"""`seesay train`: train a captioner on a prepared dataset (see docs/training.md)."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "train a captioner on a prepared dataset (single GPU/CPU, or DDP under torchrun)"

# flag dest -> (config section, field)
_FLAGS: dict[str, tuple[str, str]] = {
    "data_weights": ("data", "data_weights"),
    "coco_dir": ("data", "coco_dir"),
    "workers": ("data", "workers"),
    "val_max_images": ("data", "val_max_images"),
    "encoder": ("encoder", "name"),
    "encoder_weights": ("encoder", "weights"),
    "fine_tune_encoder": ("encoder", "fine_tune"),
    "encoder_lr": ("encoder", "lr"),
    "decoder": ("decoder", "name"),
    "decoder_lr": ("decoder", "lr"),
    "alpha_c": ("decoder", "alpha_c"),  # not a DecoderConfig field: goes to decoder.options
    "output": ("train", "output"),
    "epochs": ("train", "epochs"),
    "num_steps": ("train", "num_steps"),
    "batch_size": ("train", "batch_size"),
    "grad_accum": ("train", "grad_accum"),
    "grad_clip": ("train", "grad_clip"),
    "optimizer": ("train", "optimizer"),
    "weight_decay": ("train", "weight_decay"),
    "label_smoothing": ("train", "label_smoothing"),
    "objective": ("train", "objective"),
    "init": ("train", "init"),
    "scst_samples": ("train", "scst_samples"),
    "scst_baseline": ("train", "scst_baseline"),
    "scst_bleu_weight": ("train", "scst_bleu_weight"),
    "lr_scheduler": ("train", "lr_scheduler"),
    "warmup_steps": ("train", "warmup_steps"),
    "val_interval": ("train", "val_interval"),
    "save_interval": ("train", "save_interval"),
    "patience": ("train", "patience"),
    "lr_decay_patience": ("train", "lr_decay_patience"),
    "lr_decay": ("train", "lr_decay"),
    "select_metric": ("train", "select_metric"),
    "val_beam_size": ("train", "val_beam_size"),
    "seed": ("train", "seed"),
    "amp": ("train", "amp"),
    "save_every_steps": ("train", "save_every_steps"),
    "save_every_minutes": ("train", "save_every_minutes"),
    "amp_dtype": ("train", "amp_dtype"),
    "device": ("train", "device"),
    "wandb": ("train", "wandb"),
    "resume": ("train", "resume"),
    "cache_features": ("train", "cache_features"),
    "batch_by": ("train", "batch_by"),
    "feature_cache_dir": ("train", "feature_cache_dir"),
    "max_steps_per_epoch": ("train", "max_steps_per_epoch"),
    "max_minutes": ("train", "max_minutes"),
    "progress": ("train", "progress"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from seesay.config import Config

    d = Config()
    S = argparse.SUPPRESS  # only flags given on the command line override the recipe

    def default(section: str, key: str) -> str:
        return f" (default: {getattr(getattr(d, section), key)})"

    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DATA_DIR", action="append", default=S,
                   help="a prepared dataset (`seesay prepare`); repeat it to train on several, mixed (validation "
                        "on the first; see docs/vlm.md)")
    g.add_argument("--data-weights", metavar="W1,W2", default=S,
                   help="with several --data: mixing weights, one per dataset (default: by size)")
    g.add_argument("--coco-dir", metavar="DIR", default=S,
                   help="raw COCO directory: prepared into RUN_DIR/data when needed (DIR is only read), "
                        "then used as --data; other runs can pass --data RUN_DIR/data")
    g.add_argument("--workers", type=int, default=S, help="DataLoader worker processes" + default("data", "workers"))
    g.add_argument("--val-max-images", type=int, default=S, help="validate on the first N val images only (default: all)")
    g = p.add_argument_group("model")
    g.add_argument("--encoder", default=S, help="encoder name (see docs/encoders.md)" + default("encoder", "name"))
    g.add_argument("--encoder-weights", default=S, help="imagenet | pretrained | none | PATH (encoder's default if unset)")
    g.add_argument("--fine-tune-encoder", action="store_true", default=S,
                   help="train the encoder too (its later blocks for pretrained CNNs); default: auto, i.e. encoders "
                        "without pretrained weights train, pretrained ones stay frozen and their features are "
                        "computed once per image and cached")
    g.add_argument("--freeze-encoder", dest="fine_tune_encoder", action="store_false", default=S,
                   help="keep the encoder frozen even without pretrained weights")
    g.add_argument("--encoder-lr", type=float, default=S, help="encoder learning rate" + default("encoder", "lr"))
    g.add_argument("--decoder", default=S, help="decoder name (see docs/models.md)" + default("decoder", "name"))
    g.add_argument("--decoder-lr", "--lr", dest="decoder_lr", type=float, default=S,
                   help="decoder learning rate" + default("decoder", "lr"))
    g.add_argument("--alpha-c", type=float, default=S,
                   help="doubly-stochastic attention regularisation weight, for decoders that take it "
                        "(default 0; Xu et al. used 1.0 on 14x14 grids)")
    g = p.add_argument_group("training")
    g.add_argument("--output", "--output-dir", dest="output", metavar="RUN_DIR", default=S,
                   help="run directory: best/, last/, metrics.jsonl, tb/" + default("train", "output"))
    g.add_argument("--epochs", type=int, default=S,
                   help="maximum epochs (default: 30; none with --num-steps unless given: then the first limit reached)")
    g.add_argument("--num-steps", type=int, default=S,
                   help="train for N optimizer steps, stopping inside an epoch if need be (default: off)")
    g.add_argument("--batch-size", type=int, default=S,
                   help="captions per step and process (with --fine-tune-encoder a batch holds "
                        "batch_size // captions_per_image images with all their captions)" + default("train", "batch_size"))
    g.add_argument("--grad-accum", "--accumulation-steps", dest="grad_accum", type=int, default=S,
                   help="micro-batches per optimizer step" + default("train", "grad_accum"))
    g.add_argument("--grad-clip", type=float, default=S, help="clip the gradient norm (0: off)" + default("train", "grad_clip"))
    g.add_argument("--optimizer", choices=["adam", "adamw"], default=S,
                   help="adam (--weight-decay as L2 on the gradient) or adamw (decoupled weight decay)"
                        + default("train", "optimizer"))
    g.add_argument("--weight-decay", type=float, default=S, help="weight decay" + default("train", "weight_decay"))
    g.add_argument("--label-smoothing", type=float, default=S,
                   help="cross-entropy label smoothing: the target keeps 1 - eps, eps is spread over the vocabulary"
                        + default("train", "label_smoothing"))
    g.add_argument("--objective", choices=["xe", "scst"], default=S,
                   help="xe: teacher-forced cross-entropy; scst: self-critical training on CIDEr-D, usually after "
                        "xe with --init RUN/best and a small constant rate, see docs/training.md"
                        + default("train", "objective"))
    g.add_argument("--init", metavar="CHECKPOINT", default=S,
                   help="start from this checkpoint's weights (e.g. RUN/best of a cross-entropy run; same model "
                        "spec and tokenizer), with a fresh optimizer and schedule (default: none)")
    g.add_argument("--scst-samples", type=int, default=S,
                   help="scst: captions sampled per image (a batch holds batch_size // N images)"
                        + default("train", "scst_samples"))
    g.add_argument("--scst-baseline", choices=["mean", "greedy"], default=S,
                   help="scst: mean = the mean reward of the image's other samples (Luo 2020); greedy = the "
                        "reward of its greedy caption (Rennie et al. 2017)" + default("train", "scst_baseline"))
    g.add_argument("--scst-bleu-weight", type=float, default=S,
                   help="scst: reward = CIDEr-D + W x BLEU-4" + default("train", "scst_bleu_weight"))
    g.add_argument("--lr-scheduler", choices=["none", "plateau", "linear", "cosine"], default=S,
                   help="plateau: x --lr-decay after --lr-decay-patience validations without improvement; "
                        "linear / cosine: decay to 0 at the last step" + default("train", "lr_scheduler"))
    g.add_argument("--warmup-steps", type=int, default=S,
                   help="raise every learning rate linearly from 0 over N optimizer steps (any scheduler)"
                        + default("train", "warmup_steps"))
    g.add_argument("--val-interval", type=int, default=S,
                   help="validate every N optimizer steps (default: after every epoch)")
    g.add_argument("--save-interval", type=int, default=S,
                   help="also write a checkpoint RUN_DIR/step-N every N optimizer steps (default: off)")
    g.add_argument("--patience", type=int, default=S,
                   help="stop after this many validations without improvement" + default("train", "patience"))
    g.add_argument("--lr-decay-patience", type=int, default=S,
                   help="plateau: decay learning rates after this many validations without improvement"
                        + default("train", "lr_decay_patience"))
    g.add_argument("--lr-decay", type=float, default=S,
                   help="plateau: learning-rate decay factor" + default("train", "lr_decay"))
    g.add_argument("--select-metric", default=S,
                   help="validation metric for best checkpoint, decay and early stop (Bleu_4, CIDEr, ROUGE_L, ...)"
                        + default("train", "select_metric"))
    g.add_argument("--val-beam-size", type=int, default=S,
                   help="beam size of validation decoding (1: greedy)" + default("train", "val_beam_size"))
    g.add_argument("--seed", type=int, default=S, help="random seed" + default("train", "seed"))
    g.add_argument("--device", default=S, help="auto | cpu | cuda | cuda:N | mps" + default("train", "device"))
    g.add_argument("--amp", action="store_true", default=S,
                   help="mixed precision: float16 + GradScaler or bfloat16 on CUDA, bfloat16 on the CPU "
                        "(with --amp-dtype bfloat16)")
    g.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default=S,
                   help="autocast dtype with --amp" + default("train", "amp_dtype"))
    g.add_argument("--wandb", action="store_true", default=S, help="also log to Weights & Biases (pip install wandb)")
    g.add_argument("--resume", action="store_true", default=S,
                   help="continue exactly from RUN_DIR/last (an epoch's end, or inside an epoch when saved there)")
    g.add_argument("--save-every-steps", type=int, default=S,
                   help="also write RUN_DIR/last every N optimizer steps inside an epoch (0: only at epoch ends)"
                   + default("train", "save_every_steps"))
    g.add_argument("--save-every-minutes", type=float, default=S,
                   help="also write RUN_DIR/last every M minutes inside an epoch (default: off); "
                        "Ctrl-C or SIGTERM always saves it before stopping")
    g.add_argument("--no-cache-features", dest="cache_features", action="store_false", default=S,
                   help="frozen encoder: run it in the loop instead of caching its features")
    g.add_argument("--batch-by", choices=("caption", "image"), default=S,
                   help="cached features: random caption batches, or batches of whole images with all their "
                        "captions (per-image work once per image: faster, docs/performance.md)"
                        + default("train", "batch_by"))
    g.add_argument("--feature-cache-dir", default=S, help="where cached features go (default: RUN_DIR/features)")
    g.add_argument("--max-steps-per-epoch", type=int, default=S, help="cut epochs short (smoke tests)")
    g.add_argument("--max-minutes", type=float, default=S,
                   help="wall-clock budget: start no epoch that would end past it (default: none)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    g = p.add_argument_group("configuration")
    g.add_argument("--config", metavar="RECIPE", default=None,
                   help="YAML recipe (see configs/), or a Titans-style pairs config.json "
                        "(image_dir, annotations_file) that is prepared into RUN_DIR/data")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.epochs=3 --set decoder.embed_dim=256 (repeatable)")


def build_config(args: argparse.Namespace) -> Any:
    """Defaults < the recipe < --set < flags. A family changed on the command line (--encoder,
    --decoder, --set encoder.name=...) loses the recipe's options its builder does not take."""
    import copy

    from seesay.config import (
        Config,
        apply_overrides,
        drop_foreign_options,
        is_pairs_config,
        load_yaml,
        merge_into,
        override_option_keys,
    )

    cfg = Config()
    if args.config:
        recipe = load_yaml(args.config)
        if is_pairs_config(recipe):
            cfg.data.pairs_config = args.config
            for key, (section, field) in {"epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"),
                                          "learning_rate": ("decoder", "lr"), "lr": ("decoder", "lr"),
                                          "seed": ("train", "seed"), "text_ratio": ("data", "text_ratio")}.items():
                if key in recipe:
                    merge_into(cfg, {section: {field: recipe[key]}}, source=args.config)
        else:
            merge_into(cfg, recipe, source=args.config)
    recipe_cfg = copy.deepcopy(cfg)
    apply_overrides(cfg, args.overrides)
    if hasattr(args, "data"):  # one --data trains alone (replacing a recipe's datasets); several mix
        paths = args.data if isinstance(args.data, list) else [args.data]
        merge_into(cfg, {"data": {"path": paths[0], "datasets": paths if len(paths) > 1 else []}}, source="--data")
    for dest, (section, field) in _FLAGS.items():
        if hasattr(args, dest):
            merge_into(cfg, {section: {field: getattr(args, dest)}}, source=f"--{dest.replace('_', '-')}")
    explicit = {kind: override_option_keys(args.overrides, kind) for kind in ("encoder", "decoder")}
    if hasattr(args, "alpha_c"):
        explicit["decoder"].add("alpha_c")
    drop_foreign_options(cfg, recipe_cfg, explicit)
    if cfg.train.grad_clip is not None and cfg.train.grad_clip <= 0:
        cfg.train.grad_clip = None
    return cfg


def run(args: argparse.Namespace) -> int:
    from seesay.train.caption_task import train_captioner

    state = train_captioner(build_config(args))
    return 130 if getattr(state, "stopped_by_signal", False) else 0  # 130: the shell's code for Ctrl-C
