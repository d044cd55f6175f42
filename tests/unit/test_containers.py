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


def run_steps() -> list[str]:
    return [args for op, args in dockerfile() if op == "RUN"]


def test_dockerfile_base_is_a_build_argument_without_its_own_cuda_and_entrypoint_is_shelltrain():
    steps = dockerfile()
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE=")
    # PyPI's torch brings its CUDA libraries as wheels: a CUDA base image would ship them twice
    assert "cuda" not in steps[0][1].lower()
    assert ("FROM", "${BASE}") in steps
    (entry,) = [args for op, args in steps if op == "ENTRYPOINT"]
    assert json.loads(entry) == ["shelltrain"]
    # an older driver or a CPU-only image: torch and torchvision from another index, both from the same one
    assert ("ARG", "TORCH_INDEX_URL") in steps
    assert any('--index-url "${TORCH_INDEX_URL}" torch torchvision' in args for args in run_steps())


def test_dockerfile_hides_no_failing_build_step():
    for args in run_steps():
        assert args.startswith("set -eu;"), args  # a failing command in a RUN fails the build
        assert "2>/dev/null" not in args and "|| true" not in args, args
        assert not re.search(r"\|\|\s*(useradd|usermod|groupmod|pip|apt-get|mkdir|chown|chmod)", args), args


def test_dockerfile_user_has_the_uid_it_is_asked_for_even_when_the_base_has_that_uid():
    steps = dockerfile()
    assert ("ARG", "USER_UID=1000") in steps
    (user_step,) = [args for args in run_steps() if "useradd" in args]
    assert '--uid "${USER_UID}"' in user_step
    # a base whose user already has the uid (Ubuntu's `ubuntu`, uid 1000) has that user renamed, not a second one
    assert 'getent passwd "${USER_UID}"' in user_step and "usermod --login shelltrain" in user_step
    assert 'test "$(id -u shelltrain)" = "${USER_UID}"' in user_step  # and the build checks the result
    # `docker run --user "$(id -u):$(id -g)"`: HOME (torch's and HF's caches) and the run roots are writable by any uid
    env = " ".join(args for op, args in steps if op == "ENV")
    assert "HOME=/home/shelltrain" in env
    chmod = re.search(r"chmod 1777 ([^;]+)", user_step)
    assert chmod and {"/outputs", "/multirun", "/home/shelltrain"} <= set(chmod.group(1).split())


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
    assert {"timm", "mlflow", "sweep"} <= set(default.split(",")) <= extras()
    for op, args in steps:
        if op == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
    assert any(op == "RUN" and 'pip install --no-cache-dir ".[${EXTRAS}]"' in args for op, args in steps)


def test_apptainer_definition_bootstraps_copies_and_runs_shelltrain():
    sections = definition()
    header = dict(line.split(":", 1) for line in sections["header"].splitlines() if ":" in line)
    assert header["Bootstrap"].strip() == "docker" and "cuda" not in header["From"].lower()
    for line in sections["files"].split("\n"):
        if line.strip():
            source, target = line.split()
            assert (ROOT / source).exists() and target.startswith("/src/"), line
    installed = re.search(r'pip install --no-cache-dir "/src\[([a-z,]+)\]"', sections["post"])
    assert installed and {"timm", "mlflow", "sweep"} <= set(installed.group(1).split(",")) <= extras()
    assert sections["runscript"].split() == ["exec", "shelltrain", '"$@"']
    assert "SHELLTRAIN_DATA_ROOT=/data" in sections["environment"]


def test_pip_settings_are_build_arguments_that_stay_out_of_the_image():
    steps = dockerfile()
    pip_args = {args for op, args in steps if op == "ARG" and args.startswith("PIP_")}
    # no defaults: pip's public index unless a build passes a mirror
    assert pip_args == {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT", "PIP_CONSTRAINT"}
    assert not any("PIP_" in args for op, args in steps if op == "ENV")


def test_smoke_script_is_generic_and_runs_as_the_docs_say():
    script = (ROOT / "docker/smoke.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "docker/smoke.sh")]).returncode == 0
    # every build argument comes from the caller's environment; nothing of one machine's pip setup is read
    names = re.search(r"for name in ([A-Z_ \\\n]+); do", script).group(1).replace("\\", " ").split()
    dockerfile_args = {args.split("=", 1)[0] for op, args in dockerfile() if op == "ARG"}
    assert set(names) == dockerfile_args - {"DEBIAN_FRONTEND"}
    assert "pip config" not in script and "/etc/xdg" not in script and "/opt/" not in script
    assert 'mkdir -p "$outputs"' in script and '--user "$run_as"' in script


def test_docs_run_the_image_as_the_user_into_an_outputs_folder_made_first():
    docs = (ROOT / "docs/containers.md").read_text()
    runs = [line for line in docs.splitlines() if re.match(r"\s*(docker|podman) run", line)]
    assert runs
    for line in runs:
        if "/outputs" in line:
            assert "--user" in line or "--userns=keep-id" in line, line
    first_run = docs.index("docker run")
    assert "mkdir -p outputs" in docs[:first_run]
    assert "--fakeroot" in docs  # apptainer build needs root or fakeroot
    assert "580" in docs  # the CUDA 13 driver floor, and how to build for an older one
    # user docs: nothing of one development machine (its mirrors, CA bundle, constraints, user names)
    for text in (docs, (ROOT / "docs/scaling-out.md").read_text()):
        for word in ("/opt/wheels", "/opt/pypi", "/etc/xdg", "pip-host-ca", "cloudsdk", "workplace"):
            assert word not in text, word
