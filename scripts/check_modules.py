#!/usr/bin/env python3
"""Checks the module structure of every crate in the repository.

Two rules:

1. No import cycle between modules, at any level of a crate's module tree. For each module with
   children, its children (each one with everything under it) and the module's own file are the
   nodes of a graph; an edge A -> B means a file in A names something of B (a `use` path or an
   expression path starting with `crate::`, `super::`, `self::` or a child module's name). That
   graph must have no cycle. Two files naming each other are a cycle at the level of their
   folder; `host/` and `conn/` naming each other (through any files) are a cycle at the level of
   the crate root: so the layers of a crate form a one-way order, and so do the files inside a
   layer. A module naming one of its ancestors (a child using its parent's items, `use
   super::*` in a test module) is no edge: a child is part of its parent, which may use it.
   A path through a re-export (`pub use other::Item` in a module file) counts as an edge to
   where the re-export points, not to the re-exporting module; a re-export of another crate's
   item is no edge. `mod x;` declarations are no edges. Inline modules (`mod tests { .. }`) are
   part of their file.
2. No folder with more than MAX_SIDE_BY_SIDE `.rs` modules side by side (a folder's `mod.rs` and
   a crate root do not count: the folder is that module).

Crates are found as the files no other file declares with `mod` (`src/lib.rs`, `src/main.rs`,
`tests/*.rs`, fuzz targets, ...), under every folder holding a `Cargo.toml`; `target/` folders are
skipped.

    scripts/check_modules.py [ROOT]     check the repository at ROOT (default: this one)
    scripts/check_modules.py --self-test

Exits 1 and names every cycle (with the lines that make its edges) and every folder too big.
"""

import os
import re
import sys
import tempfile

MAX_SIDE_BY_SIDE = 16

# Folders allowed more than MAX_SIDE_BY_SIDE modules. Each entry says why; keep it empty otherwise.
FOLDER_SIZE_EXCEPTIONS = set()

# Import cycles known and left for now: (crate root, level, the cycle's modules). Each entry is
# a problem to fix, listed so that no new one can join it; an entry that is no longer a cycle is
# itself reported, so the list only shrinks. Keep it empty.
KNOWN_CYCLES = set()

SKIP_DIRS = {"target", ".git", "corpus", "artifacts", "node_modules"}


# --- Tokenizer -----------------------------------------------------------------------------------

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def tokens(src):
    """Yields (kind, text, line) for identifiers ('id'), `::` and single punctuation ('p'), with
    comments, string and char literals and lifetimes skipped."""
    i, n, line = 0, len(src), 1
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += src[i] == "\n"
                    i += 1
        elif c in "rb" and re.match(r'(br|rb|r)#*"', src[i:i + 260]):
            m = re.match(r'(br|rb|r)(#*)"', src[i:])
            end = src.find('"' + m.group(2), i + m.end())
            end = n if end < 0 else end + 1 + len(m.group(2))
            line += src.count("\n", i, end)
            i = end
        elif c == '"' or (c == "b" and src.startswith('b"', i)):
            i += 1 if c == '"' else 2
            while i < n and src[i] != '"':
                if src[i] == "\\":
                    i += 1
                line += src[i] == "\n"
                i += 1
            i += 1
        elif c == "'" or (c == "b" and src.startswith("b'", i)):
            j = i + (1 if c == "'" else 2)
            if src.startswith("\\", j):  # escaped char literal
                k = src.find("'", j + 2)
                i = n if k < 0 else k + 1
            elif j + 1 < n and src[j + 1] == "'":  # plain char literal
                i = j + 2
            else:  # a lifetime or label
                i = j
        elif src.startswith("::", i):
            yield ("p", "::", line)
            i += 2
        elif c == "$" and src.startswith("$crate", i):
            yield ("id", "crate", line)
            i += 6
        elif IDENT.match(src, i):
            m = IDENT.match(src, i)
            if src.startswith("r#", i) and m.end() == i + 1:
                m = IDENT.match(src, i + 2)
            yield ("id", m.group(0).removeprefix("r#"), line)
            i = m.end()
        else:
            yield ("p", c, line)
            i += 1


# --- Parsing one file ----------------------------------------------------------------------------


class FileInfo:
    """What one file declares and names. Module paths are tuples of names below the crate root
    (inline modules included); `file_module` is the module the file itself is."""

    def __init__(self):
        self.children = []  # (inline module path, name) of `mod name;` declarations
        self.inline = set()  # module paths of inline `mod name { .. }`
        self.refs = []  # (module path the reference is in, segments, line, is_use)
        self.uses = {}  # module path -> {name: segments} from `use` (for re-exports)


def parse_use_tree(toks, i):
    """Parses a use tree from toks[i]; returns (list of (segments, alias or None), next index)."""
    out = []
    prefix = []
    while i < len(toks):
        kind, text, _ = toks[i]
        if kind == "id" and text != "as":
            prefix.append(text)
            i += 1
            if i < len(toks) and toks[i][1] == "::":
                i += 1
                continue
            alias = None
            if i + 1 < len(toks) and toks[i][1] == "as":
                alias = toks[i + 1][1]
                i += 2
            out.append((prefix, alias))
            return out, i
        if text == "*":
            out.append((prefix + ["*"], None))
            return out, i + 1
        if text == "{":
            i += 1
            while i < len(toks) and toks[i][1] != "}":
                if toks[i][1] == ",":
                    i += 1
                    continue
                sub, i = parse_use_tree(toks, i)
                out.extend((prefix + s, a) for s, a in sub)
            return out, i + 1
        if text == "::":  # a leading `::` (2015-style absolute path)
            i += 1
            continue
        return out, i
    return out, i


def parse_file(src, file_module):
    info = FileInfo()
    toks = list(tokens(src))
    stack = [(tuple(file_module), -1)]  # (module path, brace depth its block opened at)
    depth = 0
    i = 0
    n = len(toks)
    while i < n:
        kind, text, line = toks[i]
        cur = stack[-1][0]
        prev = toks[i - 1][1] if i else ""
        if text == "{":
            depth += 1
        elif text == "}":
            depth -= 1
            if len(stack) > 1 and depth == stack[-1][1]:
                stack.pop()
        elif kind == "id" and text == "mod" and i + 2 < n and toks[i + 1][0] == "id":
            name = toks[i + 1][1]
            if toks[i + 2][1] == ";":
                info.children.append((cur, name))
                i += 3
                continue
            if toks[i + 2][1] == "{":
                info.inline.add(cur + (name,))
                stack.append((cur + (name,), depth))
                depth += 1
                i += 3
                continue
        elif kind == "id" and text == "use" and prev not in ("::", "."):
            trees, j = parse_use_tree(toks, i + 1)
            for segs, alias in trees:
                if not segs:
                    continue
                info.refs.append((cur, segs, line, True))
                name = alias or segs[-1]
                if name == "self" and len(segs) > 1:
                    name = alias or segs[-2]
                if name not in ("*", "_"):
                    target = segs[:-1] if segs[-1] == "self" else segs
                    info.uses.setdefault(cur, {})[name] = target
            i = j
            continue
        elif kind == "id" and text == "in" and prev == "(" and i >= 2 and toks[i - 2][1] == "pub":
            # `pub(in path)`: a visibility, not a use; skip the path.
            while i < n and toks[i][1] != ")":
                i += 1
            continue
        elif kind == "id" and prev not in ("::", ".") and i + 1 < n and toks[i + 1][1] == "::":
            segs = [text]
            j = i + 1
            while j + 1 < n and toks[j][1] == "::" and toks[j + 1][0] == "id":
                segs.append(toks[j + 1][1])
                j += 2
            info.refs.append((cur, segs, line, False))
            i = j
            continue
        i += 1
    return info


# --- A crate's module tree -----------------------------------------------------------------------


def child_file(parent_file, parent_is_dir_module, name):
    """The file of `mod name;` declared in parent_file, or None."""
    d = os.path.dirname(parent_file)
    if not parent_is_dir_module:
        d = os.path.join(d, os.path.splitext(os.path.basename(parent_file))[0])
    for cand in (os.path.join(d, name + ".rs"), os.path.join(d, name, "mod.rs")):
        if os.path.isfile(cand):
            return cand
    return None


def is_dir_module(path, is_root):
    return is_root or os.path.basename(path) == "mod.rs"


class Crate:
    def __init__(self, root_file):
        self.root = root_file
        self.files = {}  # file -> module path (tuple)
        self.infos = {}  # file -> FileInfo
        self.module_file = {}  # module path (file or inline) -> file
        self.file_children = {}  # module path of a file -> [module paths of child files]
        self._load(root_file, (), True)

    def _load(self, path, module, is_root):
        if path in self.files:  # a file declared twice (shared test support): load once
            return
        with open(path, encoding="utf-8") as f:
            src = f.read()
        info = parse_file(src, module)
        self.files[path] = module
        self.infos[path] = info
        self.module_file[module] = path
        self.file_children.setdefault(module, [])
        for m in info.inline:
            self.module_file[m] = path
        for parent, name in info.children:
            if parent != module:  # `mod x;` inside an inline module: rare, resolve naively
                continue
            cf = child_file(path, is_dir_module(path, is_root), name)
            if cf:
                self.file_children[module].append(module + (name,))
                self._load(cf, module + (name,), False)

    def child_names(self, module):
        """Names of the modules declared directly in `module` (file or inline)."""
        names = set()
        f = self.module_file.get(module)
        if f is None:
            return names
        info = self.infos[f]
        names.update(n for p, n in info.children if p == module)
        names.update(m[-1] for m in info.inline if m[:-1] == module)
        return names

    def resolve(self, cur, segs, hops=0):
        """The file-level module a path names, from module `cur`; None if outside the crate."""
        segs = list(segs)
        if segs[0] == "crate":
            base, rest = (), segs[1:]
        elif segs[0] in ("self", "super"):
            base = cur
            while segs and segs[0] in ("self", "super"):
                if segs[0] == "super":
                    if not base:
                        return None
                    base = base[:-1]
                segs = segs[1:]
            rest = segs
        elif segs[0] in self.child_names(cur):
            base, rest = cur, segs
        else:
            return None
        mod = base
        while rest and (mod + (rest[0],)) in self.module_file:
            mod = mod + (rest[0],)
            rest = rest[1:]
        if rest and rest[0] not in ("*", "self") and hops < 8:
            alias = self.infos[self.module_file[mod]].uses.get(mod, {}).get(rest[0])
            if alias is not None:
                return self.resolve(mod, alias + rest[1:], hops + 1)
        return self.files[self.module_file[mod]]

    def file_module_of(self, module):
        """The module of the file holding `module` (strips inline modules)."""
        return self.files[self.module_file[module]]

    def edges(self):
        """{(from file module, to file module): [(file, line)]}, without self-edges."""
        out = {}
        for path, info in self.infos.items():
            src_mod = self.files[path]
            for cur, segs, line, _ in info.refs:
                dst = self.resolve(cur, segs)
                if dst is None or dst == src_mod or src_mod[: len(dst)] == dst:
                    continue  # outside the crate, the file itself, or an ancestor
                out.setdefault((src_mod, dst), []).append((path, line))
        return out


def find_cycles(nodes, edges):
    """Strongly connected components of more than one node (Tarjan), each as a sorted list."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(comp, edges):
    """One cycle through the component's first node, as a list of nodes."""
    start = comp[0]
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges.get(v, ())):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w in comp and w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def crate_cycles(crate, rel, known_cycles, known_seen):
    """Cycles at every level of the crate's tree, as printable messages (those in
    KNOWN_CYCLES are left out and added to `known_seen`)."""
    file_edges = crate.edges()
    problems = []
    for parent, kids in sorted(crate.file_children.items()):
        if not kids:
            continue
        here = "::".join(parent) or "crate"

        def node(m):
            if m == parent or m[: len(parent)] != parent:
                return None
            return m[: len(parent) + 1]

        nodes = set(kids) | {parent}
        graph, why = {}, {}
        for (a, b), lines in file_edges.items():
            na = node(a) if a != parent else parent
            nb = node(b) if b != parent else parent
            if na is None or nb is None or na == nb:
                continue
            graph.setdefault(na, set()).add(nb)
            why.setdefault((na, nb), []).extend(lines)

        def name(m):
            return "(" + here + " itself)" if m == parent else "::".join(m)

        for comp in find_cycles(nodes, graph):
            key = (rel(crate.root), here, tuple(name(m) for m in comp))
            if key in known_cycles:
                known_seen.add(key)
                continue
            cyc = shortest_cycle(comp, graph)
            msg = [
                "import cycle in %s (%s): %s"
                % (rel(crate.root), here, " -> ".join(name(m) for m in cyc))
            ]
            if len(comp) > len(cyc) - 1:
                msg.append("    (all of: %s)" % ", ".join(name(m) for m in comp))
            for a, b in zip(cyc, cyc[1:]):
                for path, line in sorted(set(why[(a, b)]))[:3]:
                    msg.append("    %s -> %s: %s:%d" % (name(a), name(b), rel(path), line))
            problems.append("\n".join(msg))
    return problems


# --- The repository ------------------------------------------------------------------------------


def rust_files(root):
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
        for f in sorted(files):
            if f.endswith(".rs"):
                yield os.path.join(d, f)


def package_dirs(root):
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
        if "Cargo.toml" in files:
            yield d


def check(root, known_cycles=None, folder_exceptions=None):
    """Every problem of the crates under `root`, as printable messages."""
    known_cycles = KNOWN_CYCLES if known_cycles is None else known_cycles
    folder_exceptions = FOLDER_SIZE_EXCEPTIONS if folder_exceptions is None else folder_exceptions
    root = os.path.abspath(root)

    def rel(p):
        return os.path.relpath(p, root)

    problems = []
    declared = set()  # files some other file declares with `mod`
    all_files = []
    for pkg in package_dirs(root):
        for f in rust_files(pkg):
            if f in all_files:
                continue
            all_files.append(f)
    # A file is a module when a file beside or above it declares it; the rest are crate roots.
    infos = {}
    for f in all_files:
        with open(f, encoding="utf-8") as fh:
            infos[f] = parse_file(fh.read(), ())
    for f, info in infos.items():
        base = os.path.basename(f)
        dir_mod = base in ("mod.rs", "lib.rs", "main.rs")
        for parent, name in info.children:
            if parent != ():
                continue
            cf = child_file(f, dir_mod, name)
            if cf is None and not dir_mod:  # a crate root such as tests/x.rs: children beside it
                cf = child_file(f, True, name)
            if cf:
                declared.add(cf)
    roots = [f for f in all_files if f not in declared]
    modules = set()
    known_seen = set()
    for r in roots:
        crate = Crate(r)
        modules.update(f for f in crate.files if f != r)
        problems.extend(crate_cycles(crate, rel, known_cycles, known_seen))
    for key in sorted(set(known_cycles) - known_seen):
        problems.append(
            "%s (%s): %s is no cycle any more: remove it from KNOWN_CYCLES"
            % (key[0], key[1], " -> ".join(key[2]))
        )
    # Rule 2: modules side by side.
    per_dir = {}
    for f in modules:
        if os.path.basename(f) == "mod.rs":
            continue
        per_dir.setdefault(os.path.dirname(f), []).append(f)
    for d, fs in sorted(per_dir.items()):
        if len(fs) > MAX_SIDE_BY_SIDE and rel(d) not in folder_exceptions:
            problems.append(
                "%s: %d modules side by side (at most %d: group them in subfolders)"
                % (rel(d), len(fs), MAX_SIDE_BY_SIDE)
            )
    for d in sorted(folder_exceptions):
        n = len(per_dir.get(os.path.join(root, d), []))
        if n <= MAX_SIDE_BY_SIDE:
            problems.append(
                "%s: %d modules: remove it from FOLDER_SIZE_EXCEPTIONS" % (d, n)
            )
    # Deduplicate (a file shared by several test crates reports its cycles once per crate).
    seen, out = set(), []
    for p in problems:
        key = p.split(":", 1)[1] if p.startswith("import cycle in") else p
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


# --- Self-test -----------------------------------------------------------------------------------


def self_test():
    def tree(files):
        d = tempfile.mkdtemp(prefix="check_modules.")
        for path, text in files.items():
            p = os.path.join(d, path)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)
        return d

    cargo = {"Cargo.toml": "[package]\n"}
    cases = [
        # (name, files, substrings every problem list must contain; [] = clean)
        ("clean layers", {
            "src/lib.rs": "pub mod a;\npub mod b;\n",
            "src/a/mod.rs": "pub mod x;\n",
            "src/a/x.rs": "use crate::b::y::Thing;\nuse super::super::b;\n",
            "src/b/mod.rs": "pub mod y;\n",
            "src/b/y.rs": "pub struct Thing;\n#[cfg(test)]\nmod tests { use super::*; }\n",
        }, []),
        ("two files naming each other", {
            "src/lib.rs": "mod a;\nmod b;\n",
            "src/a.rs": "use crate::b::B;\npub struct A;\n",
            "src/b.rs": "pub struct B;\nfn f() { let _ = super::a::A; }\n",
        }, ["(crate): a -> b -> a", "src/a.rs:1", "src/b.rs:2"]),
        ("folders naming each other through different files", {
            "src/lib.rs": "mod host;\nmod conn;\n",
            "src/host/mod.rs": "mod h1;\nmod h2;\n",
            "src/host/h1.rs": "use crate::conn::c1::C;\n",
            "src/host/h2.rs": "pub struct H;\n",
            "src/conn/mod.rs": "mod c1;\nmod c2;\n",
            "src/conn/c1.rs": "pub struct C;\n",
            "src/conn/c2.rs": "use crate::host::h2::H;\n",
        }, ["(crate): conn -> host -> conn"]),
        ("a child naming its parent's item while the parent uses the child", {
            "src/lib.rs": "mod p;\n",
            "src/p/mod.rs": "mod c;\npub struct Args;\npub fn run() { c::go() }\n",
            "src/p/c.rs": "use super::Args;\npub fn go() {}\n",
        }, []),
        ("a module naming the crate root's item while the root uses a sibling of it", {
            "src/lib.rs": "mod a;\nmod b;\npub struct Args;\npub fn run() { b::go() }\n",
            "src/a.rs": "pub fn f() {}\n",
            "src/b.rs": "use crate::a::f;\npub fn go() { let _ = crate::Args; }\n",
        }, []),
        ("a cycle through a parent's own file", {
            "src/lib.rs": "mod p;\nmod q;\n",
            "src/p/mod.rs": "mod c;\nuse crate::q::Q;\npub struct P;\n",
            "src/p/c.rs": "pub struct C;\n",
            "src/q.rs": "pub struct Q;\nfn f() { let _ = crate::p::P; }\n",
        }, ["(crate): p -> q -> p", "src/p/mod.rs:2", "src/q.rs:2"]),
        ("a re-export of another crate is no edge", {
            "src/lib.rs": "mod p;\n",
            "src/p/mod.rs": "mod c;\npub use other::wire;\npub fn run() { c::go() }\n",
            "src/p/c.rs": "use super::wire::{self, X};\npub fn go() {}\n",
        }, []),
        ("a re-export leads to its source", {
            "src/lib.rs": "mod a;\nmod b;\npub use a::A;\n",
            "src/a.rs": "pub struct A;\n",
            "src/b.rs": "use crate::A;\n",
        }, []),
        ("comments, strings and lifetimes are not paths", {
            "src/lib.rs": "mod a;\nmod b;\n",
            "src/a.rs": "// use crate::b::X;\nconst S: &str = \"crate::b::X\";\n"
                        "fn f<'a>(x: &'a str) -> char { let _ = r#\"super::b\"#; 'x' }\n"
                        "/* crate::b /* nested */ crate::b */\npub struct A;\n",
            "src/b.rs": "use crate::a::A;\n",
        }, []),
        ("a folder of 17 modules", dict(
            {"src/lib.rs": "".join("mod m%d;\n" % k for k in range(17))},
            **{"src/m%d.rs" % k: "" for k in range(17)},
        ), ["src: 17 modules side by side"]),
        ("16 modules and a mod.rs are fine", dict(
            {"src/lib.rs": "mod f;\n", "src/f/mod.rs": "".join("mod m%d;\n" % k for k in range(16))},
            **{"src/f/m%d.rs" % k: "" for k in range(16)},
        ), []),
        ("test crates share a support module", {
            "src/lib.rs": "",
            "tests/t1.rs": "mod support;\nuse support::go;\n",
            "tests/t2.rs": "mod support;\n",
            "tests/support/mod.rs": "pub fn go() {}\n",
        }, []),
    ]
    # The lists of known problems: a listed cycle is left out, a stale entry is reported.
    listed = [
        ("a listed cycle", {
            "src/lib.rs": "mod a;\nmod b;\n",
            "src/a.rs": "use crate::b::B;\npub struct A;\n",
            "src/b.rs": "use crate::a::A;\npub struct B;\n",
        }, {("src/lib.rs", "crate", ("a", "b"))}, set(), []),
        ("a listed cycle that is gone, and a listed folder that is small", {
            "src/lib.rs": "mod a;\nmod b;\n",
            "src/a.rs": "use crate::b::B;\n",
            "src/b.rs": "pub struct B;\n",
        }, {("src/lib.rs", "crate", ("a", "b"))}, {"src"},
            ["a -> b is no cycle any more", "src: 2 modules: remove it"]),
    ]
    failed = 0
    for name, files, cycles, folders, expect in listed:
        got = check(tree(dict(cargo, **files)), known_cycles=cycles, folder_exceptions=folders)
        text = "\n".join(got)
        ok = (not got) if not expect else all(e in text for e in expect)
        if not ok:
            failed += 1
            print("self-test FAILED: %s\n  expected: %s\n  got:\n%s" % (name, expect or "clean", text))
    for name, files, expect in cases:
        d = tree(dict(cargo, **files))
        got = check(d, known_cycles=set(), folder_exceptions=set())
        text = "\n".join(got)
        ok = (not got) if not expect else all(s in text for s in expect)
        if not ok:
            failed += 1
            print("self-test FAILED: %s\n  expected: %s\n  got:\n%s" % (name, expect or "clean", text))
    total = len(cases) + len(listed)
    print("check_modules self-test: %d passed, %d failed" % (total - failed, failed))
    return failed == 0


def main(argv):
    if argv[1:] == ["--self-test"]:
        return 0 if self_test() else 1
    root = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
    problems = check(root)
    for p in problems:
        print(p)
    if problems:
        print("check_modules: %d problem(s)" % len(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
