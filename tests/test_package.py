"""The package's shape: the public contract importable from its face, imports that flow one way,
no function-local imports of the package, no pass-through *args/**kwargs in public functions."""

import ast
import inspect
import pathlib

import minilora

PACKAGE = pathlib.Path(minilora.__file__).parent
# ../shared/DESIGN.md's public contract (the names that exist today; later issues add the rest)
CONTRACT = ["GPT", "GPTConfig", "LoraConfig", "apply_lora", "print_trainable_parameters", "save_adapter", "load_adapter",
            "set_adapter", "disable_adapter", "delete_adapter", "add_weighted_adapter", "merge", "unmerge",
            "merge_and_unload", "generate", "stream_generate", "get_tokenizer", "MiniloraError"]


def imports():
    """module -> the package modules it imports (at any depth of its code) -> [(line, at top level?)]."""
    out = {}
    for f in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(f.read_text())
        top = {id(n) for n in tree.body}
        found = {}
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("minilora"):
                targets = [n.module.split(".")[1]] if "." in n.module else [a.name for a in n.names]
                for t in targets:
                    found.setdefault(t, []).append((n.lineno, id(n) in top))
        out[f.stem] = found
    return out


def test_public_contract_is_importable_from_the_face():
    missing = [n for n in CONTRACT if not hasattr(minilora, n)]
    assert not missing and set(CONTRACT) <= set(minilora.__all__), missing


def test_imports_form_no_cycle_and_none_hide_inside_functions():
    graph = imports()
    local = [(m, t, line) for m, found in graph.items() for t, where in found.items() for line, top in where if not top]
    assert not local, f"function-local imports of the package: {local}"
    state = {}

    def visit(m, path):
        state[m] = "open"
        for t in graph.get(m, {}):
            assert state.get(t) != "open", f"import cycle: {' -> '.join(path + [t])}"
            if t in graph and t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in graph:
        if m not in state and m != "__init__":
            visit(m, [m])


def test_public_functions_spell_out_their_parameters():
    passthrough = []
    for name in minilora.__all__:
        obj = getattr(minilora, name)
        if inspect.isfunction(obj):
            kinds = {p.kind for p in inspect.signature(obj).parameters.values()}
            if kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
                passthrough.append(name)
    assert not passthrough
