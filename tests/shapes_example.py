"""The scripts of examples/shapes, imported as modules (they are not a package)."""

import importlib.util
from pathlib import Path
from types import ModuleType

SHAPES_DIR = Path(__file__).resolve().parent.parent / "examples" / "shapes"


def import_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"shapes_{name}", SHAPES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
