"""docker/Dockerfile and docker/shelltrain.def, parsed (the images are not built in the tests: docs/containers.md)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker/Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def definition() -> dict[str, str]:
    """The header (before the first %section) and each %section's body."""
    sections, name = {"header": ""}, "header"
    for line in (ROOT / "docker/shelltrain.def").read_text().splitlines():
        if line.startswith("%"):
            name = line[1:].strip()
            sections[name] = ""
        elif not line.lstrip().startswith("#"):
            sections[name] += line + "\n"
    return sections


def extras() -> set[str]:
    """The names of pyproject.toml's optional-dependencies (no tomllib: Python 3.10 is supported)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([a-z]+) = \[", section, flags=re.M))


def test_dockerfile_base_is_a_build_argument_and_entrypoint_is_shelltrain():
    steps = dockerfile()
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE=nvidia/cuda:")
    assert ("FROM", "${BASE}") in steps
    (entry,) = [args for op, args in steps if op == "ENTRYPOINT"]
    assert json.loads(entry) == ["shelltrain"]


def test_dockerfile_runs_as_a_non_root_user_with_outputs_and_data_volumes():
    steps = dockerfile()
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    (volume,) = [json.loads(args) for op, args in steps if op == "VOLUME"]
    assert {"/outputs", "/data"} <= set(volume)
    assert [args for op, args in steps if op == "WORKDIR"][-1] == "/"  # the run root outputs/ is the volume
    env = " ".join(args for op, args in steps if op == "ENV")
    assert "SHELLTRAIN_DATA_ROOT=/data" in env and "HYDRA_FULL_ERROR" not in env  # the caller's passes through


def test_dockerfile_installs_the_project_with_existing_extras_from_existing_paths():
    steps = dockerfile()
    (default,) = [args.split("=", 1)[1] for op, args in steps if op == "ARG" and args.startswith("EXTRAS=")]
    assert {"timm", "mlflow"} <= set(default.split(",")) <= extras()
    for op, args in steps:
        if op == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
    assert any(op == "RUN" and 'pip install --no-cache-dir ".[${EXTRAS}]"' in args for op, args in steps)


def test_apptainer_definition_bootstraps_copies_and_runs_shelltrain():
    sections = definition()
    header = dict(line.split(":", 1) for line in sections["header"].splitlines() if ":" in line)
    assert header["Bootstrap"].strip() == "docker" and header["From"].strip().startswith("nvidia/cuda:")
    for line in sections["files"].split("\n"):
        if line.strip():
            source, target = line.split()
            assert (ROOT / source).exists() and target.startswith("/src/"), line
    installed = re.search(r'pip install --no-cache-dir "/src\[([a-z,]+)\]"', sections["post"])
    assert installed and set(installed.group(1).split(",")) <= extras()
    assert sections["runscript"].split() == ["exec", "shelltrain", '"$@"']
    assert "SHELLTRAIN_DATA_ROOT=/data" in sections["environment"]


def test_pip_settings_are_build_arguments_that_stay_out_of_the_image():
    steps = dockerfile()
    pip_args = {args for op, args in steps if op == "ARG" and args.startswith("PIP_")}
    # no defaults: pip's public index unless a build passes a mirror (docker/build_local.sh passes this machine's)
    assert pip_args == {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT", "PIP_CONSTRAINT"}
    assert not any("PIP_" in args for op, args in steps if op == "ENV")
    script = (ROOT / "docker/build_local.sh").read_text()
    assert all(
        f"--build-arg {name}=" in script or f'--build-arg "{name}=' in script for name in pip_args - {"PIP_INDEX_URL"}
    )
    assert subprocess.run(["bash", "-n", str(ROOT / "docker/build_local.sh")]).returncode == 0
