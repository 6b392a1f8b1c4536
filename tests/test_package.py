"""The package's front door: importing it is cheap, and every lazy export names a real class.

Quick tier: the check reads the modules' source (``ast``) instead of importing them, because
importing the trainer's module means importing easydel (~30 s).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dflash_gptoss

PKG = Path(dflash_gptoss.__file__).parent


def test_importing_the_package_imports_no_framework() -> None:
    probe = ("import sys, dflash_gptoss; "
             "print(sorted(m for m in ('torch', 'jax', 'easydel', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_every_lazy_export_is_defined_where_it_points() -> None:
    for name, module in dflash_gptoss._EXPORTS.items():
        tree = ast.parse((PKG / f"{module.replace('.', '/')}.py").read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef)}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        assert name in defined, f"dflash_gptoss.{name}: not defined in {module}.py"


def test_a_light_export_resolves_and_an_unknown_name_is_an_attribute_error() -> None:
    assert dflash_gptoss.DFlashTrainingSettings.__module__ == "dflash_gptoss.train_settings"
    try:
        dflash_gptoss.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("an unknown name resolved")
