#!/usr/bin/env python3
"""The import circles of src/: which files reach each other through `crate::` paths.

Every `crate::a::b::...` path in a file (in `use` lines and inline) is an edge from that file
to the file that defines the longest matching module (`src/a/b.rs` or `src/a/b/mod.rs`). A
circle is a strongly connected set of two or more files. Prints each circle, smallest first,
and their count; `--max N` exits 1 when there are more than N (a ratchet for CI)."""
import argparse
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
PATH = re.compile(r"\bcrate((?:::[a-z_][a-z0-9_]*)+)")
USE_GROUP = re.compile(r"use\s+crate::\{([^;]*)\};", re.S)
SUPER = re.compile(r"\bsuper((?:::[a-z_][a-z0-9_]*)*)")


def module_of(path):
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int)
    args = ap.parse_args()
    files = sorted(SRC.rglob("*.rs"))
    modules = {module_of(f): f for f in files}

    def resolve(parts):
        for n in range(len(parts), 0, -1):
            if tuple(parts[:n]) in modules:
                return modules[tuple(parts[:n])]
        return None

    edges = {f: set() for f in files}
    for f in files:
        text = f.read_text(encoding="utf-8")
        # Test code may reach anywhere: only the code that ships counts.
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
        # Comments (doc links among them) are no imports.
        text = re.sub(r"//[^\n]*", "", text)
        me = module_of(f)
        paths = [m.group(1).split("::")[1:] for m in PATH.finditer(text)]
        for g in USE_GROUP.finditer(text):
            for item in re.split(r",\s*(?![^{]*\})", g.group(1)):
                head = item.strip().split("::")
                if head and head[0] and head[0] != "self":
                    paths.append([p for p in head if re.match(r"^[a-z_][a-z0-9_]*$", p)])
        # `super` is the parent of this file's module (for `a/b.rs` and `a/b/mod.rs`: `a`).
        for m in SUPER.finditer(text):
            paths.append(list(me[:-1]) + m.group(1).split("::")[1:])
        for p in paths:
            t = resolve(p)
            if t is not None and t != f:
                edges[f].add(t)
    # Tarjan's strongly connected components.
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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

    for v in files:
        if v not in index:
            visit(v)
    sccs.sort(key=len)
    for c in sccs:
        print(f"{len(c)} files: " + " <-> ".join(str(p.relative_to(SRC)) for p in c))
    print(f"import circles: {len(sccs)}")
    if args.max is not None and len(sccs) > args.max:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
