"""The package's imports flow one way: no cycles, the paper's layers import nothing of the package,
nothing imports the CLI, and reading a latent file needs neither the model nor the kernel."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

PACKAGE = Path(__file__).resolve().parent.parent / "hybrid_codec"


def imports_of(path: Path) -> set[str]:
    """The package modules a file imports, at the top or inside functions, by their short names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("hybrid_codec."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("hybrid_codec."))
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    edges = {p.stem: imports_of(p) & modules for p in PACKAGE.glob("*.py")}
    return {name: targets - {name} for name, targets in edges.items()}


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_walker_sees_relative_and_absolute_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from .a import b\nfrom . import c\nimport hybrid_codec.d\ndef f():\n    from hybrid_codec.e import g\n"
    )
    assert imports_of(module) == {"a", "c", "d", "e"}


def test_no_import_cycles():
    edges = graph()
    cycles = sorted(name for name in edges if name != "__init__" and name in reachable(edges, name))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_layers_import_nothing_of_the_package():
    assert graph()["layers"] == set()


def test_nothing_imports_the_cli():
    entry_points = {"__main__", "sd_latents"}  # `python -m hybrid_codec[.sd_latents]`: the command itself
    importers = sorted(name for name, targets in graph().items() if "cli" in targets and name not in entry_points)
    assert not importers, f"{importers} import the CLI"


def test_reading_latent_files_needs_no_model_and_no_kernel():
    below = reachable(graph(), "bitstream")
    assert not below & {"models", "layers", "fast", "codec"}, below


def test_the_compact_reader_needs_no_torch(tmp_path):
    """A runtime with the exported ONNX decoder reads `.hyb` files with numpy and constriction alone."""
    import subprocess
    import sys

    assert reachable(graph(), "compact") <= {"entropy", "errors"}
    from hybrid_codec import load_codec

    codec = load_codec("photo", device="cpu")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (21, 35, 3), dtype=np.uint8)
    (tmp_path / "x.hyb").write_bytes(codec.compress(pixels, quality=3))
    np.save(tmp_path / "codes.npy", codec.encode(pixels, quality=3).codes.numpy())
    np.save(tmp_path / "tables.npy", codec.levels.tables[2].numpy())
    script = (
        "import sys, numpy as np\n"
        "from hybrid_codec import compact\n"
        "from hybrid_codec.entropy import EntropyCoder\n"
        "packed = compact.unpack(open('x.hyb', 'rb').read())\n"
        "codes = packed.codes(EntropyCoder(np.load('tables.npy')), channels=4)\n"
        "assert (codes == np.load('codes.npy')).all() and packed.level == 3\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
