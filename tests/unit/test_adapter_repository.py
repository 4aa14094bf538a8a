from pathlib import Path

import pytest

from peftserve.adapter_repository import AdapterRepository
from peftserve.errors import AdapterLoadError, AdapterNotFoundError, InvalidRequestError


def make_version(root: Path, adapter_id: str, version: str, *, config: bool = True) -> Path:
    path = root / adapter_id / version
    path.mkdir(parents=True)
    if config:
        (path / "adapter_config.json").write_text("{}")
    return path


def test_highest_numeric_version_with_a_config_serves(tmp_path: Path) -> None:
    for version in ["1", "2", "10"]:
        make_version(tmp_path, "alpha", version)
    make_version(tmp_path, "alpha", "11", config=False)  # half-written: no config yet
    make_version(tmp_path, "alpha", "staging")
    latest = AdapterRepository(tmp_path).latest("alpha")
    assert (latest.version, latest.label) == (10, "alpha@10")
    assert latest.path == (tmp_path / "alpha" / "10").resolve()


def test_unknown_adapter_names_itself_and_the_available_ones(tmp_path: Path) -> None:
    make_version(tmp_path, "alpha", "1")
    make_version(tmp_path, "beta", "1")
    make_version(tmp_path, "empty", "1", config=False)
    with pytest.raises(AdapterNotFoundError, match=r"unknown adapter 'gamma'; available adapters: alpha, beta$"):
        AdapterRepository(tmp_path).latest("gamma")


def test_many_adapters_are_listed_with_a_count(tmp_path: Path) -> None:
    for index in range(25):
        make_version(tmp_path, f"a{index:02d}", "1")
    with pytest.raises(AdapterNotFoundError, match="and 5 more"):
        AdapterRepository(tmp_path).latest("zzz")


@pytest.mark.parametrize(
    "adapter_id",
    ["../x", "/etc", "a/b", "..", "a..b", ".hidden", "-flag", "a" * 65, "tab\tid", "nul\x00", "ünïcode", "a b"],
)
def test_ids_that_are_not_plain_names_are_invalid(tmp_path: Path, adapter_id: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid adapter_id"):
        AdapterRepository(tmp_path).latest(adapter_id)


def test_symlink_out_of_the_repository_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_version(outside, "evil", "1")
    root = tmp_path / "repo"
    root.mkdir()
    (root / "evil").symlink_to(outside / "evil")
    with pytest.raises(AdapterLoadError, match="outside the adapter repository"):
        AdapterRepository(root).latest("evil")
