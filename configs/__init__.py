"""The packaged configs (Hydra's pkg://shelltrain.configs). Importing this package, which Hydra does before it
composes from it, stores the group schemas its YAML files name in their defaults lists (`/trainer_schema@_here_`)."""

from shelltrain.schema import register

register()
