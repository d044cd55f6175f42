"""The group schemas: every packaged option composes against its dataclass and validates, a key no option sets is
one line naming it, and the checks beside the fields give their one-line messages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from shelltrain.errors import UserError
from shelltrain.schema import SCHEMAS, PruneConfig, TrainerConfig, check_data, defaults, packaged, to_schema, validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__"))
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONFIGS / group).glob("*.yaml"))]
# What an option needs besides itself to validate ({root} is a folder holding train/).
NEEDS = {
    ("model", "torchvision"): ["model.name=regnet_y_400mf"],
    ("model", "timm"): ["model.name=convnext_atto"],
    ("ensemble", "average"): ["ensemble.members=2"],
    ("ensemble", "weighted"): ["ensemble.members=2"],
    ("ensemble", "vote"): ["ensemble.members=2"],
    ("distill", "logits"): ["distill.teacher=outputs/teacher"],
    ("logger", "tensorboard"): [],
    ("data", "shards"): [f"data.shards.{s}=x.tar" for s in ("train", "val", "test")],
    ("data", "hf"): ["data.hf.path=ds"],
}
ROOTED = {
    "cifar10",
    "cifar100",
    "mnist",
    "fashion_mnist",
    "imagefolder",
    "finetune_imagefolder",
    "cifar10_resnet18",
    "seed_finetune_cifar10",
}


def _option_overrides(group: str, option: str, root: Path) -> list[str]:
    choice = f"{group}=[{option}]" if group == "logger" else f"{group}={option}"
    extra = list(NEEDS.get((group, option), []))
    if option in ROOTED:
        extra.append(f"data.root={root}")
    return [choice, *extra]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_against_its_schema_and_validates(group, option, tmp_path):
    if group == "hparams_search" and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        pytest.skip("the Optuna sweeper plugin is not installed")
    (tmp_path / "train").mkdir()
    cfg = compose_config(*_option_overrides(group, option, tmp_path))
    validate(cfg)
    for key, schema in SCHEMAS.items():  # typed while composing, whichever option filled it
        if cfg[key] is not None and not (
            key == "model" and cfg.model.name == "regnet_y_400mf"
        ):  # model=torchvision stays free-form
            assert issubclass(OmegaConf.get_type(cfg[key]), schema), key


def test_a_key_no_option_sets_is_one_line_naming_it_and_the_fix():
    data = OmegaConf.to_container(packaged("data"))
    del data["cache"]  # a --config-dir data option that leaves the key out (and names no schema)
    with pytest.raises(UserError, match=r"^data.cache has no value: the data option leaves it out; set it, e.g. data"):
        check_data(OmegaConf.create(data))


def test_prune_options_share_the_base_and_set_their_own_values():
    structured = compose_config("prune=structured").prune
    assert structured["global"] is False and structured.finetune_epochs == 3 and structured.latency_repeats == 10
    assert compose_config("prune=magnitude").prune["global"] is True
    assert getattr(to_schema(structured, PruneConfig, "prune"), "global") is False


def test_misspelled_key_fails_while_composing_and_a_plus_key_is_added():
    with pytest.raises(ConfigCompositionException, match="Could not override 'trainer.epoch'"):
        compose_config("trainer.epoch=3")
    assert compose_config("+model.foo=1").model.foo == 1  # an argument for a user's _target_ model


@pytest.mark.parametrize(
    "config, message",
    [
        (defaults("trainer", device="tpu"), "trainer.device='tpu' is invalid; use auto, cpu, cuda or cuda:N"),
        (defaults("trainer", epochs=-1), "trainer.epochs=-1 is out of range; it must be >= 0"),
        (defaults("trainer", patience=-1), "trainer.patience=-1 is out of range; it must be >= 0"),
        (defaults("trainer", host_memory_cache_mib=4096), "trainer.host_memory_cache_mib=4096 is out of range"),
        (
            defaults("trainer", compile=True, sync_batchnorm=True),
            "trainer.compile=true with trainer.sync_batchnorm=true is not supported",
        ),
        (
            defaults("trainer", loss="mse", label_smoothing=0.1),
            "trainer.label_smoothing=0.1 applies to trainer.loss=cross_entropy only",
        ),
        (defaults("data", val_fraction=0.5, test_fraction=0.5), "data.val_fraction + data.test_fraction = 1 leaves"),
        (
            defaults("data", mean=[0.5], std=None),
            "data.mean and data.std must both be null or lists of the same length",
        ),
        (defaults("data", name="imagenet"), "data.name='imagenet' is invalid; choose one of digits,"),
        (defaults("prune", name="threshold", schedule="adaptive"), "'adaptive' is not available for prune=threshold"),
        (defaults("prune", name="magnitude", amount=1.5), "prune.amount=1.5 is out of range; the sparsity must be in"),
        (defaults("prune", name="quantize", bits=16), "prune.bits=16 is out of range; use 2 to 8"),
        (defaults("ensemble", name="average", top_k=2), "ensemble.top_k picks jobs of a sweep"),
        (defaults("ensemble", name="vote", weights=[1.0, 2.0]), "ensemble.weights is used by ensemble=weighted"),
    ],
)
def test_checks_beside_the_fields_give_one_line(config, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("+", r"\+")):
        config.check()


def test_a_data_source_frees_the_name_and_skips_the_root_check():
    node = OmegaConf.merge(
        packaged("data"), {"name": "my_scans", "source": {"_target_": "my.Dataset"}, "root": "/nowhere"}
    )
    check_data(node)  # no UserError: the source reads its own files
    with pytest.raises(UserError, match="data.name='my_scans' is invalid"):
        check_data(OmegaConf.merge(packaged("data"), {"name": "my_scans"}))


def test_wrong_type_and_unknown_key_name_the_full_key():
    with pytest.raises(UserError, match="trainer.epochs='abc' has the wrong type"):
        to_schema(OmegaConf.create({"epochs": "abc"}), TrainerConfig, "trainer")
    with pytest.raises(UserError, match="unknown key 'trainer.epoch'; valid keys of trainer: epochs,"):
        to_schema(OmegaConf.create({"epoch": 3}), TrainerConfig, "trainer")


def test_a_bad_wandb_mode_is_one_line_naming_the_key_and_its_choices():
    with pytest.raises(UserError) as caught:
        validate(compose_config("logger=[wandb]", "logger.wandb.mode=bogus"))
    message = str(caught.value)
    assert message.startswith("logger.wandb.mode='bogus'") and "online, offline, disabled" in message
    for mode in ("offline", "null"):
        validate(compose_config("logger=[wandb]", f"logger.wandb.mode={mode}"))
