"""The package's structure rules, read from the source (docs/architecture.md, docs/api.md).

Dependencies point down only: ``common`` imports no capability and no demo; a capability or ``demos`` imports
``common`` and itself; only ``lightning_nt/__init__.py`` imports everything. And every name a package exports in
``__all__`` (its stable surface) is documented in the API reference.
"""

import ast
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "lightning_nt"
CAPABILITIES = ("gradinit", "averaging", "sharpness", "compression", "privacy", "similarity", "laziness", "stats")
LAYERS = ("common", "demos", *CAPABILITIES)
TOP = "lightning_nt"

# DP's per-example engines handle demos' StandardizedConv2d; it is moving to common/layers.py (issue 13)
KNOWN_UPWARD_IMPORTS: dict[str, set[str]] = {}


class KnownUpwardImport(AssertionError):
    """Raised for exactly the known upward edges, so that any other breach of the rule fails the test."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    """``lightning_nt`` for the top-level package, else the folder under it: ``common``, ``demos`` or a capability."""
    parts = module.split(".")
    return TOP if len(parts) == 1 else parts[1]


def _imports(module: str) -> set[str]:
    """Every ``lightning_nt`` module ``module`` imports, anywhere in its code (functions, ``TYPE_CHECKING`` too)."""
    path = MODULES[module]
    return _imports_in(path.read_text(), module if path.name == "__init__.py" else module.rpartition(".")[0])


def _imports_in(source: str, package: str) -> set[str]:
    """The ``lightning_nt`` modules ``source`` imports, relative imports resolved against ``package``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            found.add(".".join([*base, *([node.module] if node.module else [])]))
    return {name for name in found if name == TOP or name.startswith(f"{TOP}.")}


def _upward_imports(module: str) -> set[str]:
    """The imports that break the rule: outside ``common`` and the module's own layer (none for the top level)."""
    if module == TOP:
        return set()
    allowed = {"common", _layer(module)}
    return {name for name in _imports(module) if name == TOP or _layer(name) not in allowed}


def test_every_module_belongs_to_a_known_layer():
    """A new folder is a capability (or plumbing) and must be added to the rule above."""
    assert {_layer(module) for module in MODULES} == {TOP, *LAYERS}


def test_the_rule_reads_imports_of_every_form():
    source = """
import torch
import lightning_nt.stats as stats
from lightning_nt.common import loss
from .probe import ProbeSet
from .. import demos

def later():
    from ..sharpness.hvp import HessianOperator
"""
    assert _imports_in(source, "lightning_nt.common") == {
        "lightning_nt.stats",
        "lightning_nt.common",
        "lightning_nt.common.probe",
        "lightning_nt",  # importing the top level imports every capability
        "lightning_nt.sharpness.hvp",
    }
    assert _imports("lightning_nt") >= {"lightning_nt.averaging", "lightning_nt.privacy"}


def _module_case(module: str) -> object:
    if module not in KNOWN_UPWARD_IMPORTS:
        return module
    reason = f"{module} imports {sorted(KNOWN_UPWARD_IMPORTS[module])} (StandardizedConv2d moves to common/layers.py)"
    return pytest.param(module, marks=pytest.mark.xfail(raises=KnownUpwardImport, strict=True, reason=reason))


@pytest.mark.parametrize("module", [_module_case(module) for module in MODULES])
def test_dependencies_point_down_only(module):
    upward = _upward_imports(module)
    if upward and upward == KNOWN_UPWARD_IMPORTS.get(module):
        raise KnownUpwardImport(f"{module} imports {sorted(upward)}")
    assert not upward, f"{module} ({_layer(module)}) may import only lightning_nt.common and its own package"


# --- the public API ------------------------------------------------------------------------------------------

API_PAGE = ROOT / "docs" / "api.md"
PUBLIC_PACKAGES = (TOP, *(f"{TOP}.{layer}" for layer in (*CAPABILITIES, "demos", "common")))


def _directives(page: str) -> dict[str, object]:
    """``::: identifier`` lines of the page and the ``members`` option each renders (None: all exported names)."""
    directives, lines = {}, page.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("::: "):
            block = []
            for option in lines[index + 1 :]:
                if not option.startswith("    "):
                    break
                block.append(option)
            options = (yaml.safe_load(textwrap.dedent("\n".join(block))) or {}).get("options", {})
            directives[line[4:].strip()] = options.get("members")
    return directives


def _rendered(package, name: str, directives: dict[str, object]) -> bool:
    """Whether mkdocstrings shows ``package.name``: under a directive that renders it, with a docstring."""
    members = directives.get(package.path, False)
    listed = members is None or members is True or (isinstance(members, list) and name in members)
    shown = listed or f"{package.path}.{name}" in directives
    return shown and not name.startswith("_") and bool(package[name].docstring)


def test_every_exported_name_is_in_the_api_reference():
    griffe = pytest.importorskip("griffe")
    root = griffe.load(TOP, search_paths=[str(ROOT)], resolve_aliases=True, resolve_external=False)
    page = API_PAGE.read_text()
    directives = _directives(page)
    packages = [root, *(root[path.split(".", 1)[1]] for path in PUBLIC_PACKAGES[1:])]
    rendered = {
        package[name].final_target.path if package[name].is_alias else package[name].path
        for package in packages
        for name in package.exports
        if _rendered(package, name, directives)
    }
    missing = []
    for package in packages:
        for name in package.exports:
            target = package[name].final_target.path if package[name].is_alias else package[name].path
            if target not in rendered and f"`{package.path}.{name}`" not in page:
                missing.append(f"{package.path}.{name}")
    assert not missing, f"exported but not in docs/api.md (give it a docstring or describe it there): {missing}"


# --- one way to run the user's loss ----------------------------------------------------------------------------

LOSS_PATH = "lightning_nt.common.loss"
# the DP strategy runs the real training step (it logs and updates metrics): not a loss a capability reads
OWN_TRAINING_STEP = {"lightning_nt.privacy.step", "lightning_nt.privacy.virtual_steps"}
KNOWN_OTHER_LOSS_PATHS: set[str] = set()


class KnownLossPath(AssertionError):
    """Raised for exactly the known other loss path, so that any new one fails the test."""


def _loss_calls(module: str) -> list[str]:
    """Calls of ``<anything>.training_step(...)``, ``<anything>.loss_fn(...)`` or ``loss_fn(...)`` in ``module``."""
    calls = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name in ("training_step", "loss_fn"):
                calls.append(f"{name}() at line {node.lineno}")
    return calls


def _loss_case(module: str) -> object:
    if module not in KNOWN_OTHER_LOSS_PATHS:
        return module
    reason = f"{module} runs training_step itself instead of lightning_nt.common.training_loss"
    return pytest.param(module, marks=pytest.mark.xfail(raises=KnownLossPath, strict=True, reason=reason))


@pytest.mark.parametrize("module", [_loss_case(m) for m in MODULES if m not in (LOSS_PATH, *OWN_TRAINING_STEP)])
def test_the_users_loss_runs_only_through_common_loss(module):
    calls = _loss_calls(module)
    if calls and module in KNOWN_OTHER_LOSS_PATHS:
        raise KnownLossPath(f"{module}: {calls}")
    assert not calls, f"{module} calls the user's loss itself ({calls}); use training_loss or example_losses"


def test_the_loss_path_finds_calls():
    assert _loss_calls(LOSS_PATH) and _loss_calls("lightning_nt.privacy.virtual_steps")
