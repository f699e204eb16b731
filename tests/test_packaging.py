"""The Dockerfile, setup.cfg and requirements/*.txt describe one dependency set; these tests keep them agreeing.

No Docker engine runs in CI, so the Dockerfile is checked statically: its pip pins against setup.cfg and
requirements/gpu.txt, install order, the files it copies, its user and entrypoint, and hadolint.
"""
from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO
from requires import tool

# Shipped in the image but not in setup.cfg: fla's tilelang backend for Hopper with torch 2.11's Triton 3.6
# (fla #640); the Dockerfile says why. Anything else the image installs must come from setup.cfg/requirements.
IMAGE_ONLY = {"tilelang", "apache-tvm-ffi", "torch-c-dlpack-ext", "z3-solver"}


def _requirements(lines) -> dict[str, Requirement]:
    reqs = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith(("-", ".")):
            req = Requirement(line)
            reqs[canonicalize_name(req.name)] = req
    return reqs


@pytest.fixture(scope="module")
def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _extra(cfg: configparser.ConfigParser, name: str) -> dict[str, Requirement]:
    return _requirements(cfg["options.extras_require"][name].splitlines())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pip_installs() -> list[list[Requirement]]:
    """The requirement specifiers of each `pip install` in the Dockerfile's RUN lines, in order."""
    installs = []
    for word, args in _dockerfile_instructions():
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            tokens = shlex.split(command)
            if tokens[:2] == ["pip", "install"]:
                installs.append([Requirement(t) for t in tokens[2:] if not t.startswith("-") and t != "."])
    return installs


def _image_pins() -> dict[str, Requirement]:
    pins = {}
    for install in _pip_installs():
        for req in install:
            name = canonicalize_name(req.name)
            assert name not in pins, f"Dockerfile installs {name} twice"
            pins[name] = req
    return pins


def test_image_pins_match_setup_cfg_and_gpu_requirements(setup_cfg):
    image = _image_pins()
    gpu_txt = _requirements((REPO / "requirements" / "gpu.txt").read_text().splitlines())
    wanted = {**_requirements(setup_cfg["options"]["install_requires"].splitlines()),
              **_extra(setup_cfg, "gpu"), **gpu_txt}
    for name, req in wanted.items():
        assert name in image, f"Dockerfile does not install {req} (setup.cfg / requirements/gpu.txt)"
        assert image[name].specifier == req.specifier, \
            f"Dockerfile pins {image[name]}, setup.cfg / requirements/gpu.txt say {req}"
    extra = set(image) - set(wanted)
    assert extra == IMAGE_ONLY, f"image-only packages {sorted(extra)}; expected {sorted(IMAGE_ONLY)}"
    for name in IMAGE_ONLY:
        assert str(image[name].specifier).startswith("=="), f"{image[name]} must be pinned exactly"


def test_torch_is_installed_alone_and_first_and_brings_its_own_triton():
    """Anything installed before or with torch may resolve another torch build (a multi-GB CUDA wheel) or a
    triton other than the one torch's CUDA build pins (docs/environment.md)."""
    installs = _pip_installs()
    assert [canonicalize_name(r.name) for r in installs[0]] == ["torch"], installs[0]
    assert "triton" not in _image_pins(), "triton comes with torch's CUDA build; pinning it again can break it"


def test_gpu_extra_is_train_plus_kernels_without_triton(setup_cfg):
    """The CPU set (train + kernels, with triton pinned because the CPU torch wheel has none) and the GPU set
    must not drift apart."""
    gpu = _extra(setup_cfg, "gpu")
    cpu = {**_extra(setup_cfg, "train"), **_extra(setup_cfg, "kernels")}
    cpu.pop("triton")
    assert {n: str(r) for n, r in gpu.items()} == {n: str(r) for n, r in cpu.items()}


def test_cpu_requirements_agree_with_setup_cfg(setup_cfg):
    cpu_txt = _requirements((REPO / "requirements" / "cpu.txt").read_text().splitlines())
    extras = {**_extra(setup_cfg, "train"), **_extra(setup_cfg, "kernels")}
    for name in set(cpu_txt) & set(extras):
        assert cpu_txt[name].specifier == extras[name].specifier, f"cpu.txt {cpu_txt[name]} vs setup.cfg {extras[name]}"


def test_dockerfile_copies_existing_paths_runs_unprivileged_with_crossdna_entrypoint(setup_cfg):
    instructions = _dockerfile_instructions()
    for word, args in instructions:
        if word == "COPY":
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (REPO / src).exists(), f"Dockerfile: COPY {src}: no such file in the repository"
    user = [args for word, args in instructions if word == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0"), f"the image runs as {user}"
    entrypoint = [args for word, args in instructions if word == "ENTRYPOINT"][-1]
    assert json.loads(entrypoint) == ["crossdna"]
    assert "crossdna = crossdna.cli:main" in setup_cfg["options.entry_points"]["console_scripts"]


def test_hadolint_passes():
    hadolint = tool("hadolint")
    proc = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
