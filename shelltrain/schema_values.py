"""The value tables of the config keys that take one of a few values (schema.py checks against them)."""

PRECISIONS = ("32", "bf16", "16-mixed")
LOSSES = ("cross_entropy", "mse", "bce")  # bce: multi-label (shelltrain.multilabel)
MONITORS = ("val_acc", "val_loss", "ema_val_acc", "ema_val_loss", "val_map", "val_f1_macro", "val_f1_micro")
MULTI_LABEL_MONITORS = ("val_map", "val_f1_macro", "val_f1_micro")  # trainer.loss=bce only
POS_WEIGHTS = (None, "balanced")  # trainer.pos_weight
POLICIES = ("full", "linear_probe", "freeze_backbone", "gradual")
DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "manifest", "synthetic")
CACHE_MODES = ("none", "memory", "disk")  # data.cache
CACHE_CHECKS = ("stat", "hash")  # data.cache_check
MANIFEST_ERRORS = ("error", "skip")  # data.manifest_errors
SPLITS = ("test", "val", "train")
EXPORT_FORMATS = ("onnx", "torchscript")


# prune.name -> the schedules it supports (the first is its default)
PRUNE_SCHEDULES = {
    "threshold": ("oneshot", "iterative", "hierarchical"),
    "magnitude": ("oneshot", "iterative", "hierarchical", "adaptive"),
    "random": ("oneshot", "iterative", "hierarchical", "adaptive"),
    "structured": ("oneshot", "iterative", "hierarchical", "adaptive"),
    "layer": ("oneshot", "iterative", "adaptive"),
    "quantize": ("oneshot",),
}
PRUNE_IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "fpgm", "random")
PRUNE_RAMPS = ("linear", "cubic")
QUANTIZE_MODES = ("auto", "static", "dynamic", "fake")
QUANTIZE_BACKENDS = ("x86", "fbgemm", "qnnpack")
ENSEMBLE_RULES = ("none", "average", "weighted", "vote")
DISTILL_METHODS = ("none", "logits")
TTA_MODES = ("none", "hflip", "five_crop")
AUDIT_RANKS = ("self_confidence", "normalized_margin")  # task=audit: how likely label errors are ordered
CALIBRATIONS = ("none", "temperature")
BALANCES = ("none", "sampler", "loss_weights")
