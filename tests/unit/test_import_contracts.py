"""The import-linter contracts in pyproject.toml stay complete as the code grows.

`lint-imports` (run by .ci/run) checks the contracts; this checks that the domain's list of
forbidden modules names every other module of the package and every runtime dependency,
so that a new module cannot slip past the rule "the domain imports nothing outside itself".
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# A distribution's import name where it differs from its name on PyPI.
IMPORT_NAMES = {"psycopg[binary]": "psycopg", "prometheus-client": "prometheus_client"}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _domain_contract() -> dict[str, Any]:
    contracts = _pyproject()["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c.get("source_modules") == ["tracker.domain"]]
    return dict(contract)


def _top_level_modules() -> set[str]:
    package = ROOT / "tracker"
    names = {p.stem for p in package.glob("*.py") if p.stem not in {"__init__", "__main__"}}
    names |= {p.parent.name for p in package.glob("*/__init__.py")}
    return {f"tracker.{name}" for name in names - {"domain"}}


def _dependencies() -> set[str]:
    names = set()
    for requirement in _pyproject()["project"]["dependencies"]:
        name = re.split(r"[<>=!~ ;]", requirement, maxsplit=1)[0]
        names.add(IMPORT_NAMES.get(name, name.replace("-", "_")))
    return names


def test_the_domain_contract_forbids_every_other_module_of_the_package() -> None:
    forbidden = set(_domain_contract()["forbidden_modules"])
    assert _top_level_modules() - forbidden == set()


def test_the_domain_contract_forbids_every_runtime_dependency() -> None:
    forbidden = set(_domain_contract()["forbidden_modules"])
    assert _dependencies() - forbidden == set()


def test_every_module_the_contracts_name_exists() -> None:
    # A renamed module must not leave a contract guarding nothing.
    known = _top_level_modules() | {"tracker.domain"}
    for contract in _pyproject()["tool"]["importlinter"]["contracts"]:
        for key in ("source_modules", "forbidden_modules"):
            named = {m for m in contract.get(key, []) if m.startswith("tracker.")}
            assert named - known == set(), contract["name"]
