"""The package's imports only go down: every `import diffbody_jax...` (top-level or function-local) is an
edge; the module graph must have no cycle, and models/ must import nothing from the rooms above it.
Run from the project root: python tools/import_layers.py . (a copy of the team's ../shared/tools checker)"""
import ast
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".") / "diffbody_jax"
ABOVE_MODELS = ("training", "pipelines", "cli", "diffusion", "data", "conditioning", "evaluation", "parallel")


def modname(path):
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


mods = {modname(p): p for p in root.rglob("*.py")}
edges = {m: set() for m in mods}
for m, p in mods.items():
    pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
    for node in ast.walk(ast.parse(p.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")
                up = up[: len(up) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != m and t.startswith("diffbody_jax") and t != "diffbody_jax":
                edges[m].add(t)

# cycles (Tarjan)
index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def strong(v):
    index[v] = low[v] = n[0]
    n[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
        if w not in index:
            strong(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for v in mods:
    if v not in index:
        strong(v)
upward = sorted(f"{m} -> {t}" for m, ts in edges.items() if m.startswith("diffbody_jax.models")
                for t in ts if t.split(".")[1] in ABOVE_MODELS)
nedges = sum(len(t) for t in edges.values())
if sccs or upward:
    print(f"{len(sccs)} import cycle(s): {sccs[:3]}; {len(upward)} upward import(s) from models/: {upward[:4]}")
    sys.exit(1)
print(f"{len(mods)} modules, {nedges} internal imports: no cycle, nothing above models/ imported by models/")
