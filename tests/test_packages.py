"""The packages whose public names load on first use (``dermcir._lazy``), and what they let load without torch."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("package_name", ["dermcir.index", "dermcir.models", "dermcir.training",
                                          "dermcir.baselines"])
def test_the_package_names_load_on_first_use_and_each_resolves(package_name):
    # a name left out of, or misspelt in, a package's table would fail only when first used
    package = importlib.import_module(package_name)
    assert sorted(package.__all__) == sorted(package._DEFINED_IN)
    for name in package.__all__:
        assert getattr(package, name) is getattr(importlib.import_module(package._DEFINED_IN[name]), name)
        assert name in dir(package)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        package.no_such_name  # noqa: B018


def test_the_builtin_encoder_names_are_the_ones_their_modules_register():
    # configs check a backbone's name against the registry's list without importing the backbones; the list must
    # be what importing them registers
    from dermcir.models import backbones, registry, text_encoders

    assert set(registry._BACKBONES) == set(registry.BUILTIN_BACKBONES)
    assert set(registry._TEXT_ENCODERS) == set(registry.BUILTIN_TEXT_ENCODERS)
    assert {backbones.__name__} == set(registry.BUILTIN_BACKBONES.values())
    assert {text_encoders.__name__} == set(registry.BUILTIN_TEXT_ENCODERS.values())


def test_the_builtin_baselines_are_the_ones_their_modules_register():
    # the command line checks a baseline's settings against configs.py without importing the method; the tables
    # there must be what importing the methods registers, and each method must run on its listed profiles
    import dermcir.baselines
    from dermcir.baselines import _base, configs

    assert dermcir.baselines.list_baselines() == sorted(configs.BASELINE_NAMES)
    assert set(configs.METHOD_MODULES) == set(configs.METHOD_PROFILES)
    for name, module in configs.METHOD_MODULES.items():
        importlib.import_module(module)
        cls = _base._REGISTRY[name]
        assert cls.__module__ == module and cls.profiles is configs.METHOD_PROFILES[name]
        assert set(cls.profiles) == set(configs.PROFILES)
        assert all(type(config) is cls.config_class for config in cls.profiles.values())
    assert set(_base._REGISTRY) == set(configs.METHOD_MODULES)


def test_configs_profiles_and_folder_checks_load_without_torch():
    # what the command line runs before torch loads (so that a mistake costs a fraction of a second)
    code = (
        "import sys\n"
        "from dermcir.training.profiles import get_profile\n"
        "from dermcir.checkpoint_folder import require_checkpoint, check_checkpoint_target\n"
        "from dermcir.index.case_index import refuse_existing_index\n"
        "from dermcir.evaluation.results import check_run_folder\n"
        "from dermcir.baselines.configs import baseline_config\n"
        "assert baseline_config('dahnet', 'gpu', bits=32).train_backbone\n"
        "model_cfg, train_cfg, views = get_profile('gpu', epochs=3)\n"
        "assert model_cfg.companion and train_cfg.epochs == 3\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False"], (done.stdout, done.stderr)


def test_the_version_has_one_source_and_the_command_says_it():
    """pyproject.toml and dermcir.__version__ each spelt the version; `dermcir --version` did not exist."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    import dermcir

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dermcir.__version__"}
    assert version("dermcir") == dermcir.__version__  # the installed metadata took it from there
    out = subprocess.run([sys.executable, "-m", "dermcir", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"dermcir {dermcir.__version__}"


def test_every_third_party_package_the_code_imports_is_declared():
    """starlette and pydantic were imported directly but came only through fastapi. The tests and the scripts are
    read too, against the dependencies and the test extra: pandas was a runtime dependency that only they used."""
    import ast
    import tomllib
    from importlib.metadata import packages_distributions
    from pathlib import Path

    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    runtime = {line.split("==")[0].lower().replace("_", "-") for line in project["dependencies"]}
    testing = runtime | {line.split("==")[0].lower().replace("_", "-")
                         for line in project["optional-dependencies"]["test"]}
    owners = packages_distributions()

    def undeclared(paths, declared):
        imported = set()
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
        third_party = {name for name in imported if name in owners and name not in sys.stdlib_module_names
                       and name != "dermcir"}
        return {name: owners[name] for name in third_party
                if not {d.lower().replace("_", "-") for d in owners[name]} & declared}

    missing = undeclared((root / "src").rglob("*.py"), runtime)
    missing |= undeclared([*(root / "tests").rglob("*.py"), *(root / "scripts").glob("*.py")], testing)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
