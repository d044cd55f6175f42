"""A bare Hydra app: the reference for `shelltrain --help` (benchmarks/everyday_speed.py).

One @hydra.main over a small config file, as the Hydra tutorial writes it: what any Hydra command pays to start.
"""

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg))


if __name__ == "__main__":
    main()
