"""Every TensorRT name our code uses, checked against one release's API description.

Static analysis, no import of our code: in each file that imports tensorrt, names are typed
from what the real API says. `trt.Builder(...)` is a Builder; `builder.create_network(...)`
is whatever that release's pybind signature returns; a parameter or variable annotated
`trt.ICudaEngine` is one; `self.x = ...` types `self.x` in every method of the class;
`layer.__class__ = trt.IUnaryLayer` adds that class. Then every attribute read or written on a
typed value, every enum member and every keyword argument must exist in the release.

Only the path a release takes is checked: `if` tests over `Features` flags, `hasattr(trt...)`
and the facts that early `raise`/`return` establish are evaluated for the release (three
values: true, false, unknown = both branches), and functions marked `@requires(flag)` are
skipped where the flag is false. A new TensorRT call in our code is checked with no change here.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

MODULE = ("module",)
FEATURES = ("features",)


@dataclass
class Miss:
    file: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


@dataclass
class Report:
    checked: int = 0
    misses: list[Miss] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def shadow_module(api: dict) -> SimpleNamespace:
    """Enough of the module for `Features.of` to run on: names, class members, enum members."""
    mod = SimpleNamespace(__version__=api["__version__"])
    for name, cls in api["classes"].items():
        setattr(mod, name, SimpleNamespace(**{m: True for m in (*cls["members"], *cls["enum"])}))
    for name in api["module"]:
        if not hasattr(mod, name):
            setattr(mod, name, True)
    return mod


def files_using_tensorrt(roots: list[Path]) -> Iterator[Path]:
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if "trt_api" in path.parts:
                continue
            tree = ast.parse(path.read_text())
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) and any(
                    (a.name if isinstance(n, ast.Import) else n.module or "") == "tensorrt" for a in n.names)
                   for n in ast.walk(tree)):
                yield path


class Checker:
    def __init__(self, api: dict, features, rel_name: str):
        self.api, self.features, self.rel = api, features, rel_name
        self.classes = api["classes"]
        self.report = Report()

    # -- types ---------------------------------------------------------------------------
    def annotation_type(self, node) -> set:
        if node is None:
            return set()
        text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ast.unparse(node)
        text = text.strip("'\"")
        if text in ("tensorrt", "trt", "ModuleType"):  # the module itself, passed around
            return {MODULE}
        if text == "Features":
            return {FEATURES}
        m = re.fullmatch(r"(?:trt|tensorrt)\.(\w+)", text)
        if m:
            return {("inst", m.group(1))}
        if text in self.our_classes:
            return {("ours", text)}
        return set()

    def returns_of(self, cls: str, method: str) -> set:
        member = self.classes.get(cls, {}).get("members", {}).get(method)
        out = set()
        for sig in (member or {}).get("signatures", []):
            for name in re.findall(r"\w+", sig["returns"]):
                if name in self.classes:
                    out.add(("inst", name))
        return out

    def type_of(self, node, env: dict) -> set:
        if isinstance(node, ast.Name):
            return env.get(node.id, set())
        if isinstance(node, ast.Attribute):
            out = set()
            for t in self.type_of(node.value, env):
                if t == MODULE:
                    if node.attr in self.classes:
                        out.add(("class", node.attr))
                elif t[0] == "class":
                    cls = self.classes.get(t[1], {})
                    if node.attr in cls.get("enum", ()):
                        out.add(("inst", t[1]))
                    elif node.attr in cls.get("members", {}):
                        out.add(("method", t[1], node.attr))
                elif t[0] == "inst" and self.classes.get(t[1], {}).get("members", {}).get(node.attr, {}).get(
                        "kind") == "method":
                    out.add(("method", t[1], node.attr))
                elif t[0] == "ours":
                    out |= self.class_env.get(t[1], {}).get(node.attr, set())
            return out
        if isinstance(node, ast.Call):
            out = set()
            f = node.func
            for t in self.type_of(f, env):
                if t[0] == "class":
                    out.add(("inst", t[1]))
                elif t[0] == "method":
                    out |= self.returns_of(t[1], t[2])
            if isinstance(f, ast.Attribute) and f.attr == "of" and isinstance(f.value, ast.Name) \
                    and f.value.id == "Features":
                out.add(FEATURES)
            name = f.id if isinstance(f, ast.Name) else (f.attr if isinstance(f, ast.Attribute) else None)
            if name in self.func_returns and not out:
                ret = self.func_returns[name]
                out |= ret if isinstance(ret, set) else set()
            return out
        return set()

    # -- static values (True / False / None = unknown) ------------------------------------
    def value(self, node, env: dict, facts: dict):
        key = ast.unparse(node)
        if key in facts:
            return facts[key]
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self.static.get(node.id)
        if isinstance(node, ast.Attribute) and FEATURES in self.type_of(node.value, env):
            return getattr(self.features, node.attr, None)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr" \
                and len(node.args) == 2 and isinstance(node.args[1], ast.Constant):
            name = node.args[1].value
            for t in self.type_of(node.args[0], env):
                if t == MODULE:
                    return name in self.api["module"]
                if t[0] == "class":
                    cls = self.classes.get(t[1], {})
                    return name in cls.get("members", {}) or name in cls.get("enum", ())
            return None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            v = self.value(node.operand, env, facts)
            return None if v is None else not v
        if isinstance(node, ast.BoolOp):
            vals = [self.value(v, env, facts) for v in node.values]
            if isinstance(node.op, ast.And):
                return False if any(v is False for v in vals) else (True if all(v is True for v in vals) else None)
            return True if any(v is True for v in vals) else (False if all(v is False for v in vals) else None)
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            a, b = self.value(node.left, env, facts), self.value(node.comparators[0], env, facts)
            if a is None or b is None or isinstance(a, bool) != isinstance(b, bool):
                return None
            compare = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
                       ast.Eq: operator.eq, ast.NotEq: operator.ne}.get(type(node.ops[0]))
            try:
                return None if compare is None else compare(a, b)
            except TypeError:
                return None
        return None

    def learn_false(self, test, env: dict, facts: dict) -> None:
        """After `if test: <exits>`, test is false on the path that goes on."""
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
            unknown = [v for v in test.values if self.value(v, env, facts) is not True]
            if len(unknown) == 1:
                self.learn_false(unknown[0], env, facts)
            return
        facts[ast.unparse(test)] = False

    # -- walking ---------------------------------------------------------------------------
    def check_expr(self, node, env: dict, facts: dict, file: str) -> None:
        if isinstance(node, ast.IfExp):
            v = self.value(node.test, env, facts)
            self.check_expr(node.test, env, facts, file)
            if v is not False:
                self.check_expr(node.body, env, facts, file)
            if v is not True:
                self.check_expr(node.orelse, env, facts, file)
            return
        if isinstance(node, (ast.Lambda, ast.FunctionDef)):
            return
        if isinstance(node, ast.Attribute) and not node.attr.startswith("__"):
            self.check_attribute(node, env, file)
        if isinstance(node, ast.Call) and node.keywords:
            self.check_keywords(node, env, file)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            self.check_not_a_property(node, env, file)
        for child in ast.iter_child_nodes(node):
            self.check_expr(child, env, facts, file)

    def check_attribute(self, node: ast.Attribute, env: dict, file: str) -> None:
        found, typed = False, False
        for t in self.type_of(node.value, env):
            if t == MODULE:
                typed, found = True, found or node.attr in self.api["module"]
            elif t[0] in ("class", "inst") and t[1] in self.classes:
                cls = self.classes[t[1]]
                typed = True
                found = found or node.attr in cls["members"] or (t[0] == "class" and node.attr in cls["enum"])
        if typed:
            self.report.checked += 1
            if not found:
                base = ast.unparse(node.value)
                kinds = sorted({t[1] for t in self.type_of(node.value, env) if t != MODULE})
                self.report.misses.append(Miss(file, node.lineno, f"{base}.{node.attr}: no such name in TensorRT "
                                                                   f"{self.api['__version__']}"
                                                                   + (f" ({', '.join(kinds)})" if kinds else "")))

    def check_not_a_property(self, node: ast.Call, env: dict, file: str) -> None:
        """`engine.num_io_tensors()` where the release has a property: a TypeError on the device."""
        kinds = {self.classes.get(t[1], {}).get("members", {}).get(node.func.attr, {}).get("kind")
                 for t in self.type_of(node.func.value, env) if t[0] == "inst"}
        if kinds == {"property"}:
            self.report.misses.append(Miss(file, node.lineno, f"{ast.unparse(node.func)} is a property in TensorRT "
                                                              f"{self.api['__version__']}: read it, do not call it"))

    def check_keywords(self, node: ast.Call, env: dict, file: str) -> None:
        for t in self.type_of(node.func, env):
            if t[0] == "method":
                sigs = self.classes.get(t[1], {}).get("members", {}).get(t[2], {}).get("signatures", [])
            elif t[0] == "class":
                sigs = self.classes.get(t[1], {}).get("init", [])
            else:
                continue
            if not sigs or any(s["varkw"] for s in sigs):
                continue
            self.report.checked += 1
            names = {k.arg for k in node.keywords if k.arg}
            if not any(names <= set(s["params"]) for s in sigs):
                self.report.misses.append(Miss(file, node.lineno, f"{ast.unparse(node.func)}({', '.join(sorted(names))}=...)"
                                                                  f": keyword not taken by TensorRT {self.api['__version__']}"))

    def walk(self, body: list, env: dict, facts: dict, file: str) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(stmt, ast.If):
                self.check_expr(stmt.test, env, facts, file)
                v = self.value(stmt.test, env, facts)
                if v is not False:
                    self.walk(stmt.body, env, {**facts, ast.unparse(stmt.test): True}, file)
                if v is not True:
                    self.walk(stmt.orelse, env, {**facts, ast.unparse(stmt.test): False}, file)
                exits = bool(stmt.body) and isinstance(stmt.body[-1], (ast.Raise, ast.Return, ast.Continue))
                if exits and not stmt.orelse:
                    if v is True:
                        return  # this release always leaves here: the rest of the block is not its path
                    self.learn_false(stmt.test, env, facts)
                continue
            blocks = [getattr(stmt, name, None) for name in ("body", "orelse", "finalbody")]
            if any(isinstance(b, list) and b and isinstance(b[0], ast.stmt) for b in blocks):
                for name in ("test", "iter", "items", "target"):
                    part = getattr(stmt, name, None)
                    for p in part if isinstance(part, list) else ([part] if part is not None else []):
                        self.check_expr(p, env, facts, file)
                for b in blocks:
                    if isinstance(b, list):
                        self.walk(b, env, dict(facts), file)
                for h in getattr(stmt, "handlers", []):
                    self.walk(h.body, env, dict(facts), file)
                continue
            self.check_expr(stmt, env, facts, file)

    # -- per file ----------------------------------------------------------------------------
    def function_env(self, fn, cls: str | None) -> dict:
        env: dict[str, set] = {"trt": {MODULE}, "tensorrt": {MODULE}}
        if cls:
            env["self"] = {("ours", cls)}
        for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]:
            if a.arg in ("trt", "tensorrt"):
                env[a.arg] = {MODULE}
            env.setdefault(a.arg, set()).update(self.annotation_type(a.annotation))
        self.static = {}
        assigned: dict[str, int] = {}
        for _ in range(3):  # a few rounds: types flow through chains of assignments
            for node in ast.walk(fn):
                self.learn_assignment(node, env, cls, assigned)
        for name in ("trt", "tensorrt"):  # bound here to something else: a local, not the module
            rebound = [n for n in ast.walk(fn) if isinstance(n, ast.Assign) and any(
                isinstance(tg, ast.Name) and tg.id == name for tg in n.targets)]
            if rebound and not any(MODULE in self.type_of(n.value, env) for n in rebound):
                env[name] = env[name] - {MODULE}
        return env

    def learn_assignment(self, node, env: dict, cls: str | None, assigned: dict) -> None:
        if isinstance(node, ast.AnnAssign):
            targets, value, ann = [node.target], node.value, self.annotation_type(node.annotation)
        elif isinstance(node, ast.Assign):
            targets, value, ann = node.targets, node.value, set()
        else:
            return
        for target in targets:
            pairs = [(target, value)]
            if isinstance(target, ast.Tuple):
                ret = self.tuple_returns(value)
                pairs = list(zip(target.elts, value.elts if isinstance(value, ast.Tuple) else ret))
            for t, v in pairs:
                types = (self.type_of(v, env) if isinstance(v, ast.AST) else v if isinstance(v, set) else set()) | ann
                if isinstance(t, ast.Name):
                    env.setdefault(t.id, set()).update(types)
                    assigned[t.id] = assigned.get(t.id, 0) + 1
                    if isinstance(v, ast.AST):
                        val = self.value(v, env, {})
                        if val is not None and t.id not in self.static:
                            self.static[t.id] = val
                elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                    if t.attr == "__class__":
                        env.setdefault(t.value.id, set()).update({("inst", c[1]) for c in types if c[0] == "class"})
                    elif t.value.id == "self" and cls:
                        self.class_env.setdefault(cls, {}).setdefault(t.attr, set()).update(types)

    def tuple_returns(self, value) -> list[set]:
        if isinstance(value, ast.Call):
            f = value.func
            name = f.id if isinstance(f, ast.Name) else (f.attr if isinstance(f, ast.Attribute) else None)
            ret = self.tuple_func_returns.get(name)
            if ret:
                return ret
        return []

    def check_file(self, path: Path, display: str) -> None:
        tree = ast.parse(path.read_text())
        self.our_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        self.class_env: dict[str, dict[str, set]] = {}
        self.func_returns, self.tuple_func_returns = {}, {}
        functions = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node, None))
            elif isinstance(node, ast.ClassDef):
                functions += [(n, node.name) for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for fn, _ in functions:
            r = fn.returns
            if isinstance(r, ast.Subscript) and ast.unparse(r.value) == "tuple" and isinstance(r.slice, ast.Tuple):
                self.tuple_func_returns[fn.name] = [self.annotation_type(e) for e in r.slice.elts]
            elif r is not None:
                self.func_returns[fn.name] = self.annotation_type(r)
        for _ in range(2):  # `self.x` set in one method is read in another
            for fn, cls in functions:
                self.function_env(fn, cls)
        self.report.files.append(display)
        for fn, cls in functions:
            if any(self.gate_off(d) for d in fn.decorator_list):
                continue
            env = self.function_env(fn, cls)
            self.walk(fn.body, env, {}, display)

    def gate_off(self, decorator) -> bool:
        if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "requires" and decorator.args:
            return getattr(self.features, decorator.args[0].value) is False
        return False
