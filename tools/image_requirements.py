"""Can the deployment image install its requirements? Resolved for the image's Python and platform, without Docker.

``python -m tools.image_requirements`` reads the image's targets from the ``Dockerfile`` (the Triton release,
the engine's Python version, the ``nvidia-pytriton`` release whose Python-backend stub the image uses) and
asks pip to resolve, as a dry run against PyPI only:

- ``deploy/requirements-triton.txt`` with every dependency, for CPython ``PYTHON_VERSION`` on the image's
  glibc (manylinux tags up to it), wheels only, as ``pip install`` inside ``docker build`` will;
- ``nvidia-pytriton`` (where the image's Python-backend stub comes from), without its dependencies.

pip's ``fast-deps`` reads each wheel's metadata with HTTP range requests: nothing large is downloaded
(the index answers without PEP 658 metadata files, so without it pip fetches every wheel: several GB for
torch's CUDA libraries). That needs pip 26 (``make test`` installs it); older pips download anyway.
The machine's own pip configuration (local wheel folders, constraints) is ignored: only PyPI counts.

What this does not check: the CUDA variant of torch (the image installs ``torch==X+cuNNN`` from
PyTorch's index, which CI cannot reach; the same release and Python tags are resolved here from PyPI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
REQUIREMENTS = REPO_ROOT / "deploy" / "requirements-triton.txt"
PYPI = "https://pypi.org/simple"
MIN_PIP = Version("26.0")
# NVIDIA's Triton release -> the glibc of its Ubuntu base (from NVIDIA's release notes): wheels built for a
# newer manylinux than this do not run in the image.
TRITON_RELEASE_GLIBC = {"24.10": (2, 35), "24.12": (2, 39)}


class ImageRequirementsError(RuntimeError):
    """The image's requirements do not resolve for its Python and platform; the message carries pip's reason."""


@dataclass(frozen=True)
class ImageTarget:
    """What ``docker build`` installs for: the engine's Python version on the image's glibc."""

    triton_release: str
    python_version: str
    pytriton_version: str
    arch: str = "x86_64"

    @property
    def glibc(self) -> tuple[int, int]:
        try:
            return TRITON_RELEASE_GLIBC[self.triton_release]
        except KeyError:
            raise ImageRequirementsError(
                f"unknown Triton release {self.triton_release!r}: add its glibc to TRITON_RELEASE_GLIBC "
                f"(known: {sorted(TRITON_RELEASE_GLIBC)})"
            ) from None

    def platforms(self) -> list[str]:
        """Every manylinux tag the image's glibc runs: pip does not expand ``manylinux_2_35`` by itself."""
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_{self.arch}" for m in range(minor, 4, -1)]
        return [*tags, f"manylinux2014_{self.arch}", f"manylinux2010_{self.arch}", f"manylinux1_{self.arch}"]


def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """The ``ARG NAME=default`` values of the Dockerfile (the image's targets are declared there, once)."""
    return dict(re.findall(r"^ARG\s+([A-Z_]+)=(\S+)", path.read_text(), re.M))


def image_target(path: Path = DOCKERFILE) -> ImageTarget:
    args = dockerfile_args(path)
    missing = {"TRITON_RELEASE", "PYTHON_VERSION", "PYTRITON_VERSION"} - set(args)
    if missing:
        raise ImageRequirementsError(f"{path} declares no default for ARG {', '.join(sorted(missing))}")
    return ImageTarget(args["TRITON_RELEASE"], args["PYTHON_VERSION"], args["PYTRITON_VERSION"])


def resolve(
    requirements: list[str], *, python_version: str, platforms: list[str], with_dependencies: bool = True
) -> dict[str, str]:
    """Resolve ``requirements`` (pip arguments: ``-r FILE`` or specifiers) for another interpreter and platform.

    Returns {name: version} of everything pip would install; raises ImageRequirementsError with pip's
    reason when they do not resolve. A dry run: nothing is installed, and large wheels are not downloaded.
    """
    import pip

    if Version(pip.__version__) < MIN_PIP:
        raise ImageRequirementsError(
            f"pip {pip.__version__} downloads every wheel (several GB) to resolve another platform: "
            f"install pip>={MIN_PIP} into this environment first (make test does)"
        )
    platform_args = [arg for tag in platforms for arg in ("--platform", tag)]
    # Only PyPI: drop the machine's pip settings (local wheel folders and constraints would answer instead).
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    with tempfile.TemporaryDirectory(prefix="image-requirements-") as scratch:
        report = Path(scratch) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--use-feature=fast-deps", "--only-binary=:all:", "--implementation=cp",
            f"--python-version={python_version}", *platform_args,
            f"--target={Path(scratch) / 'never-written'}", f"--report={report}", f"--index-url={PYPI}",
            *([] if with_dependencies else ["--no-deps"]), *requirements,
        ]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "fast-deps" not in line and line.strip()]
            raise ImageRequirementsError("\n".join(errors[-15:]) or f"pip exited with status {result.returncode}")
        installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}


def check_image(target: ImageTarget, requirements: Path = REQUIREMENTS) -> dict[str, str]:
    """Resolve what ``docker build`` installs for ``target``; returns the engine environment's {name: version}."""
    try:
        engine = resolve(["-r", str(requirements)], python_version=target.python_version, platforms=target.platforms())
    except ImageRequirementsError as exc:
        raise ImageRequirementsError(
            f"{requirements} does not install on CPython {target.python_version} / glibc "
            f"{'.'.join(map(str, target.glibc))} (Triton {target.triton_release} image):\n{exc}"
        ) from exc
    try:
        resolve(
            [f"nvidia-pytriton=={target.pytriton_version}"],
            python_version=target.python_version,
            platforms=target.platforms(),
            with_dependencies=False,
        )
    except ImageRequirementsError as exc:
        raise ImageRequirementsError(
            f"nvidia-pytriton=={target.pytriton_version} (the Python-backend stub) does not install for "
            f"CPython {target.python_version} on the image:\n{exc}"
        ) from exc
    return engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dockerfile", type=Path, default=DOCKERFILE)
    parser.add_argument("--requirements", type=Path, default=REQUIREMENTS)
    args = parser.parse_args(argv)
    try:
        target = image_target(args.dockerfile)
        resolved = check_image(target, args.requirements)
    except ImageRequirementsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.requirements} resolves for CPython {target.python_version} on the Triton {target.triton_release} "
        f"image ({len(resolved)} packages: torch {resolved.get('torch')}, transformers {resolved.get('transformers')})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
