"""The package's imports point down its layers, no module imports another's private
name, and nothing imports `jax._src`. `python tests/test_layering.py` prints the
import graph."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "implicitdiff"

# Top to bottom. A module may import from its own layer or any layer below.
LAYERS = (
    ("public API", ("implicitdiff", "conditions", "projections", "prox")),
    ("ready-made problems", ("_argmin", "_conditions", "_projections", "_prox")),
    ("implicit rule", ("_implicit_function", "_linear_solve")),
    ("solve mechanism, user code", ("_solve", "_calling", "_user_code", "_validation")),
    ("solvers, representations", ("_solvers", "_sparse", "_representation", "_host")),
    (
        "diagnostics, policies",
        ("_solve_log", "_solve_record", "_solve_clock", "_failure"),
    ),
    ("helpers", ("_misc", "_dependence")),
)


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    first = module.split(".")[1] if "." in module else module
    for index, (_, members) in enumerate(LAYERS):
        if first in members:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def is_module(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(path: pathlib.Path):
    """`(imported module, imported name or None)` for each import of the package's
    own modules, and the absolute modules imported."""
    module = module_name(path)
    package = (
        module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    )
    own, external = [], []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            external += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            external.append(node.module)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if is_module(submodule):
                    own.append((submodule, None))
                else:
                    own.append((target, alias.name))
    return own, external


def graph() -> dict[str, list[str]]:
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        own, _ = imports(path)
        edges[module_name(path)] = sorted({target for target, _ in own})
    return edges


def test_imports_point_down_the_layers():
    upward = [
        f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} "
        f"({LAYERS[layer_of(target)][0]})"
        for source, targets in graph().items()
        for target in targets
        if layer_of(target) < layer_of(source)
    ]
    assert not upward, "\n".join(upward)


def test_no_private_names_across_modules_and_no_jax_internals():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own, external = imports(path)
        found += [
            f"{module_name(path)} imports {name} from {target}"
            for target, name in own
            if name is not None and name.startswith("_")
        ]
        found += [
            f"{module_name(path)} imports {module}"
            for module in external
            if module and (module == "jax._src" or module.startswith("jax._src."))
        ]
    assert not found, "\n".join(found)


if __name__ == "__main__":
    for source, targets in graph().items():
        short = [t.removeprefix("implicitdiff.") for t in targets]
        print(f"{source} -> {', '.join(short) or '(nothing)'}")
