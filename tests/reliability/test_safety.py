"""Safety of data handling: no pickle or eval of data anywhere in the package, weights loaded
as tensors only, YAML loaded safely, no remote code unless the user asks."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "curate"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = (
                f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            )
            yield node, owner, name


def test_no_pickle_eval_or_unsafe_loaders():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(
                    n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve")
                    for n in names
                ):
                    problems.append(f"{path}:{node.lineno}: imports a pickle-like module")
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
            if name in ("eval", "exec") and not owner:
                problems.append(f"{where}: {name}()")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                problems.append(f"{where}: yaml.{name} (use safe_load)")
            if owner == "torch" and name == "load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value
                ):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("read_pickle", "from_pickle"):
                problems.append(f"{where}: {name}")
            for k in node.keywords:
                if (
                    k.arg == "trust_remote_code"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value
                ):
                    problems.append(f"{where}: trust_remote_code=True hard-coded")
                if k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value:
                    problems.append(f"{where}: subprocess with shell=True")
    assert problems == []
