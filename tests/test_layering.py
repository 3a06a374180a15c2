"""The package's layering, read from the source (every import statement, function-level ones included).

Bottom: `geometry` (numpy only), `config` (ml_collections only), `cli` (absl only), `topology` (pure Python) and
`paths` (etils.epath: local or gs:// files). Above them: the pure STTS
functions (`stts/` but its nnx scorer), then `model/` (+ the scorer) and, beside it, `data/`, which never imports
the model. `interop/` and `eval/` build on those and on `train/sharding.py` (the mesh); the rest of `train/` and
`estimate` sit above everything (the trainer runs in-loop evaluation and counts FLOPs). `launch/` and `configs/` sit
on top and the library never imports them.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PACKAGE = os.path.join(ROOT, "stts_jax")

# module (or package prefix; the longest match applies) -> the stts_jax modules (or prefixes) it may import
RULES = {
    "stts_jax.geometry": (),
    "stts_jax.config": (),
    "stts_jax.cli": (),  # absl flags of the entry points
    "stts_jax.paths": (),  # local or gs:// files (etils.epath)
    "stts_jax.topology": (),  # TPU slice shapes (pure Python; launch/tpu/jobset.py runs without jax)
    "stts_jax.stts.selection": ("stts_jax.geometry",),
    "stts_jax.stts.temporal": ("stts_jax.geometry", "stts_jax.stts.selection"),
    "stts_jax.stts.token_packing": ("stts_jax.geometry",),
    "stts_jax.stts.decide": ("stts_jax.geometry", "stts_jax.stts.selection", "stts_jax.stts.temporal"),
    "stts_jax.stts.scorer": ("stts_jax.geometry", "stts_jax.stts.temporal", "stts_jax.model.layers",
                             "stts_jax.model.vit"),
    "stts_jax.stts": ("stts_jax.geometry", "stts_jax.stts.selection", "stts_jax.stts.temporal",
                      "stts_jax.stts.token_packing"),  # any other STTS module: pure
    "stts_jax.model": ("stts_jax.model", "stts_jax.geometry", "stts_jax.config", "stts_jax.stts"),
    "stts_jax.data": ("stts_jax.data", "stts_jax.paths", "stts_jax.geometry", "stts_jax.config"),
    # train/sharding.py is the mesh layer (mesh, parameter shardings, to_global) that interop and eval build on
    "stts_jax.interop": ("stts_jax.interop", "stts_jax.model", "stts_jax.stts", "stts_jax.paths", "stts_jax.geometry",
                         "stts_jax.config", "stts_jax.train.sharding"),
    "stts_jax.eval": ("stts_jax.eval", "stts_jax.model", "stts_jax.stts", "stts_jax.data", "stts_jax.interop",
                      "stts_jax.paths", "stts_jax.geometry", "stts_jax.config", "stts_jax.train.sharding"),
    "stts_jax.train": ("stts_jax.train", "stts_jax.model", "stts_jax.stts", "stts_jax.data", "stts_jax.interop",
                       "stts_jax.eval", "stts_jax.estimate", "stts_jax.paths", "stts_jax.geometry", "stts_jax.config"),
    "stts_jax.estimate": ("stts_jax.train", "stts_jax.model", "stts_jax.stts", "stts_jax.data", "stts_jax.eval",
                          "stts_jax.paths", "stts_jax.geometry", "stts_jax.config"),
}
NEVER_IN_LIBRARY = ("launch", "configs")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path: str, text: str | None = None) -> set[str]:
    """Returns every module an import statement of `path` names (absolute; relative imports resolved)."""
    tree = ast.parse(open(path).read() if text is None else text, path)
    me = module_name(path).split(".")
    package = me if path.endswith("__init__.py") else me[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def library_files():
    for dirpath, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def rule_for(module: str):
    best = max((k for k in RULES if within(module, (k,))), key=len, default=None)
    return best, RULES.get(best)


def own_modules() -> set[str]:
    return {module_name(p) for p in library_files()}


def violations(extra: dict[str, str] | None = None) -> list[str]:
    """Returns the broken rules; `extra` maps further (path -> source) files to check as if they were in the tree."""
    extra = extra or {}
    known = own_modules()
    bad = []
    for path in [*library_files(), *extra]:
        me = module_name(path)
        key, allowed = rule_for(me)
        found = imports_of(path, extra.get(path))
        # `from pkg import module` names pkg too: count the module alone
        found = {n for n in found if not any(m.startswith(n + ".") and m in known for m in found)}
        for name in sorted(found):
            if within(name, NEVER_IN_LIBRARY):
                bad.append(f"{me} imports {name} (the library never imports launch/ or configs/)")
            if allowed is None or not within(name, ("stts_jax",)):
                continue
            if name == "stts_jax" or (name not in known and name.rsplit(".", 1)[0] in known):
                name = name if name in known else name.rsplit(".", 1)[0]  # `from module import function`
            if name == "stts_jax" or within(me, (name,)):  # the package itself, a parent's __init__
                continue
            if not within(name, allowed):
                bad.append(f"{me} imports {name}; {key} may import only {', '.join(allowed) or 'no stts_jax module'}")
    return bad


def test_layering_holds():
    assert violations() == []


def test_layering_check_catches_a_violation():
    """The checker is not vacuous: a model module importing the trainer, data importing the model (inside a
    function), a pure STTS module importing launch/, each is named."""
    extra = {"stts_jax/model/bad.py": "from stts_jax.train import trainer\n",
             "stts_jax/data/bad.py": "def f():\n    from stts_jax.model.vlm import Molmo2VLM\n",
             "stts_jax/stts/selection_bad.py": "import launch.demo\nfrom . import scorer\n"}
    bad = violations({os.path.join(ROOT, p): text for p, text in extra.items()})
    assert any("stts_jax.model.bad imports stts_jax.train" in b for b in bad), bad
    assert any("stts_jax.data.bad imports stts_jax.model.vlm" in b for b in bad), bad
    assert any("imports launch.demo" in b for b in bad), bad
    assert any("stts_jax.stts.selection_bad imports stts_jax.stts.scorer" in b for b in bad), bad


@pytest.mark.parametrize("prefix", ["stts_jax.model", "stts_jax.data", "stts_jax.stts.selection"])
def test_every_rule_names_real_modules(prefix):
    assert any(within(m, (prefix,)) for m in own_modules())
