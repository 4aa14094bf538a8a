"""The deployment image's requirements resolve for its Python and platform (pip dry runs against PyPI).

The failing case is the setup this check was written for: the same pins inside NVIDIA's 24.10 image
with that image's own Python 3.10, where pip finds no transformers 5.24.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.image_requirements import (
    REQUIREMENTS,
    ImageRequirementsError,
    ImageTarget,
    check_image,
    dockerfile_args,
    image_target,
)


def pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {name.lower(): version for name, version in (line.split("==") for line in lines if "==" in line)}


def test_the_chosen_image_installs_every_pin_with_its_dependencies() -> None:
    target = image_target()
    resolved = check_image(target)
    assert pins(REQUIREMENTS).items() <= resolved.items()
    assert len(resolved) > len(pins(REQUIREMENTS))  # dependencies were resolved too, not only the pins


def test_the_pins_fail_for_the_24_10_images_own_python(tmp_path: Path) -> None:
    old = tmp_path / "requirements-triton.txt"  # the file as the 24.10 entry point pip-installed it
    old.write_text(REQUIREMENTS.read_text())
    with pytest.raises(ImageRequirementsError, match=r"(?s)CPython 3\.10 / glibc 2\.35.*transformers==5\.24\.0"):
        check_image(ImageTarget("24.10", "3.10", image_target().pytriton_version), old)


def test_a_pin_with_only_an_sdist_for_the_images_python_fails(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pyyaml==6.0.4\nnumpy==1.22.4\n")  # numpy 1.22 has no CPython 3.11 wheel
    with pytest.raises(ImageRequirementsError, match=r"numpy==1\.22\.4"):
        check_image(image_target(), requirements)


def test_platform_tags_stop_at_the_images_glibc() -> None:
    platforms = ImageTarget("24.10", "3.11", "0.7.0").platforms()
    assert platforms[0] == "manylinux_2_35_x86_64" and "manylinux_2_28_x86_64" in platforms
    assert "manylinux_2_36_x86_64" not in platforms and "manylinux2014_x86_64" in platforms
    with pytest.raises(ImageRequirementsError, match=r"unknown Triton release '99\.01'"):
        ImageTarget("99.01", "3.11", "0.7.0").platforms()


def test_the_dockerfile_declares_the_targets_the_project_pins(tmp_path: Path) -> None:
    args = dockerfile_args()
    project = pins(REQUIREMENTS.parents[1] / "requirements.txt")
    assert args["TORCH_VERSION"] == project["torch"] == pins(REQUIREMENTS)["torch"]
    assert args["PYTRITON_VERSION"] == project["nvidia-pytriton"]
    broken = tmp_path / "Dockerfile"
    broken.write_text("ARG TRITON_RELEASE=24.10\nFROM scratch\n")
    with pytest.raises(ImageRequirementsError, match="no default for ARG PYTHON_VERSION, PYTRITON_VERSION"):
        image_target(broken)
