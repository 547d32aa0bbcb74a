"""The packages of ``mm_omni`` ("rooms") import each other in one direction only.

Layers, lowest first; a module may import its own room and the rooms of lower layers, never a room of
its own layer or a higher one (so no two rooms can import each other):

1. ``platform``, ``megatron_compat``: the device and megatron-core version adapters;
2. ``lora``: adapter layers and target parsing (they know no model);
3. ``registry``: the model families' entries (their parts named by import path, loaded on use);
4. ``config``: the model.json / data.json schemas and the flags, with the checks made before any model
   or process group exists (the hetero layout's included);
5. ``checkpoint``, ``data``: checkpoint files and weight mapping; the data pipeline (templates,
   processor, collation). Data knows no model: M-RoPE positions come through the family's template;
6. ``models``: the stacks, their composition and the families. They hold no layout decision: what
   parallel code needs of an encoder is its item protocol (``models/common/encoder_api.py``), of the
   decoder its token layout (``models/text/layout.py``);
7. ``parallel``: how modules and tokens spread over ranks (hetero encoders, CP split, SP scatter);
8. ``training``: the loop, tasks, checkpointing;
9. ``train``, then ``cli``: the entry points.

Lazy imports (inside functions) count like top-level ones. One exception, named in ``ALLOWED``: the
registry lists the ``mm_omni.models`` folder to find the families' ``family.py`` files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mm_omni

LAYERS = (
    ("platform", "megatron_compat"),
    ("lora",),
    ("registry",),
    ("config",),
    ("checkpoint", "data"),
    ("models",),
    ("parallel",),
    ("training",),
    ("train",),
    ("cli",),
)
# (importing module, imported module) pairs outside the order, each with its reason
ALLOWED = {
    ("mm_omni.registry", "mm_omni.models"): "family discovery reads the package's folder (family.py files)",
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str) -> set[str]:
    """Every ``mm_omni`` module ``path`` (module ``name``) imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            if module == "mm_omni":  # from mm_omni import room
                found.update(f"mm_omni.{alias.name}" for alias in node.names)
            else:
                found.add(module)
    return {m for m in found if m.startswith("mm_omni.")}


def room(module: str) -> str:
    return module.split(".")[1]


def violations(root: Path) -> list[str]:
    """Backward or sideways imports between rooms, and rooms missing from :data:`LAYERS`."""
    layer = {r: i for i, rooms in enumerate(LAYERS) for r in rooms}
    bad = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        if name == "mm_omni":
            continue
        for target in sorted(imported_modules(path, name)):
            src, dst = room(name), room(target)
            if src == dst or (name, target) in ALLOWED:
                continue
            for r in (src, dst):
                if r not in layer:
                    bad.append(f"{name} -> {target}: room {r!r} has no layer; add it to LAYERS (and the docstring)")
            if src in layer and dst in layer and layer[dst] >= layer[src]:
                bad.append(f"{name} -> {target}: {src} (layer {layer[src] + 1}) may not import {dst} "
                           f"(layer {layer[dst] + 1})")
    return bad


def test_rooms_import_downwards_only():
    root = Path(mm_omni.__file__).parent
    assert not violations(root), "\n".join(violations(root))


def test_every_room_has_a_layer():
    root = Path(mm_omni.__file__).parent
    rooms = {p.stem for p in root.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in root.glob("*/__init__.py")}
    layered = {r for rooms_ in LAYERS for r in rooms_}
    assert rooms <= layered, f"rooms without a layer: {sorted(rooms - layered)}"


def test_a_backward_import_is_reported(tmp_path):
    """The checker itself: upward, sideways, relative and lazy imports are caught; downward ones pass."""
    pkg = tmp_path / "mm_omni"
    for rel, text in {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/omni.py": "def f():\n    from mm_omni.parallel import hetero\n",  # lazy, upward
        "models/text.py": "from ..training.loop import run\nfrom mm_omni.config import model\n",  # relative, upward
        "parallel/__init__.py": "",
        "parallel/hetero.py": "import mm_omni.models.omni\n",  # downward: fine
        "config/__init__.py": "",
        "config/model.py": "",
        "data/__init__.py": "from mm_omni import checkpoint\n",  # sideways (same layer)
        "training/__init__.py": "",
        "training/loop.py": "",
        "checkpoint/__init__.py": "",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    found = violations(pkg)
    assert found == [
        "mm_omni.data -> mm_omni.checkpoint: data (layer 5) may not import checkpoint (layer 5)",
        "mm_omni.models.omni -> mm_omni.parallel: models (layer 6) may not import parallel (layer 7)",
        "mm_omni.models.text -> mm_omni.training.loop: models (layer 6) may not import training (layer 8)",
    ], found
