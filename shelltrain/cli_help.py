"""`shelltrain --help`, rendered from the same template (hydra.help in configs/train.yaml) as Hydra renders it.

Why not Hydra's own: it lists the config groups by asking its config loader, which deep-copies its whole config
repository (the ConfigStore's schemas included) for every question, some 60 times for shelltrain's groups and
again for Hydra's: twice the start-up of a bare Hydra app. Here the config sources are read directly, once per
group. Anything beyond plain overrides (--config-dir, --hydra-help, --resolve, a mistake in
an override) goes to Hydra as before.
"""

from __future__ import annotations

import string
import sys
from typing import Any

from omegaconf import OmegaConf, open_dict

HELP_FLAGS = ("--help", "-h")


def print_help(args: list[str]) -> bool:
    """Print the help for `shelltrain [overrides] --help`; False (nothing printed) when Hydra must answer."""
    if not any(arg in HELP_FLAGS for arg in args):
        return False
    overrides = [arg for arg in args if arg not in HELP_FLAGS]
    if any(arg.startswith("-") for arg in overrides):
        return False
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    try:
        with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            sources = GlobalHydra.instance().config_loader().get_sources()
    except Exception:  # a mistake in an override: Hydra reports it (one line, through cli's reporter)
        return False
    template = string.Template(cfg.hydra.help.template)
    if "$FLAGS_HELP" in template.template or "$HYDRA_CONFIG_GROUPS" in template.template:
        return False  # a template asking for Hydra's own parts
    groups = _groups(sources)
    with open_dict(cfg):
        del cfg["hydra"]
    listing = "".join(f"{group}: {', '.join(sorted(options))}\n" for group, options in sorted(groups.items()))
    sys.stdout.write(template.substitute(APP_CONFIG_GROUPS=listing, CONFIG=OmegaConf.to_yaml(cfg)) + "\n")
    return True


def _groups(sources: list[Any], parent: str = "") -> dict[str, list[str]]:
    """Every config group under `parent` (Hydra's own aside) with its options, read from the config sources
    themselves: Hydra's loader answers each such question with a fresh deep copy of its whole repository."""
    from hydra.core.object_type import ObjectType

    found = {}
    for group in _listed(sources, parent, ObjectType.GROUP):
        name = f"{parent}/{group}" if parent else group
        if name == "hydra":
            continue
        options = _listed(sources, name, ObjectType.CONFIG)
        if options:
            found[name] = options
        found.update(_groups(sources, name))
    return found


def _listed(sources: list[Any], path: str, kind: Any) -> list[str]:
    """What every source holds at `path` (sub-groups or configs), merged as Hydra's repository merges them."""
    return sorted({item for source in sources if source.is_group(path) for item in source.list(path, kind)})
