"""The TensorRT Python API as data: every class, enum, method signature and property of a real release.

TensorRT cannot be installed in this project's environments and the builder/runner code has never run
against it. Its Python bindings, though, are an ordinary wheel on PyPI (``tensorrt-cu13-bindings``, 1.3 MB);
only the libraries it links against (``libnvinfer.so.11`` and two more, in the ``tensorrt-cu13-libs`` wheel
that downloads from NVIDIA's own index) are out of reach. The bindings import against stand-in libraries
that define the few entry points they link to (the factories ``createInferBuilder_INTERNAL`` and friends,
returning null): nothing can be built or run that way, but the module's whole Python surface - pybind11's
classes, enum values, properties and the signatures in its docstrings - is the real one. This module records
that surface as JSON (``engine/data/trt_python_api_<version>.json``, for the oldest and the newest release this
project supports) so tests can check, on any machine, that every TensorRT call this project makes exists in
those releases and binds to one of their signatures (``tests/test_trt_api.py``).

Regenerate (needs a C compiler, ``nm`` and a wheel for this interpreter's Python version)::

    pip download --no-deps -d /tmp/trt tensorrt-cu13-bindings==11.4.0.106
    python -m megactor_rt.engine.trt_api --wheel /tmp/trt/tensorrt_cu13_bindings-*.whl \\
        --out engine/data/trt_python_api_11.4.0.106.json

or, on a machine with TensorRT installed, ``python -m megactor_rt.engine.trt_api --installed --out FILE``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from megactor_rt.engine.cache import write_atomic
from megactor_rt.errors import InputError

logger = logging.getLogger(__name__)

API_FILE = "trt_python_api_{version}.json"
_API_FILE = re.compile(r"trt_python_api_([\d.]+)\.json")
_PREFIX = re.compile(r"\b(?:tensorrt_bindings\.tensorrt|tensorrt_bindings|tensorrt)\.")
_SIG = re.compile(r"^(?:\d+\. )?(?P<name>\w+)\((?P<params>.*)\)(?: -> (?P<ret>.+))?$")
# symbols the bindings import from the C library and the dynamic loader, not from TensorRT
_SYSTEM_SYMBOLS = {"dlopen", "dlsym", "dlclose", "dlerror", "pthread_once", "__pthread_key_create"}


# -- describing an imported module ---------------------------------------------------------------------------
def _split_params(text: str) -> list[str]:
    """``a: T, b: dict[str, int] = {}`` -> its parameters (commas inside brackets or ``<...>`` reprs kept)."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_signatures(doc: str | None, name: str) -> list[dict[str, Any]]:
    """The overloads pybind11 wrote at the top of a docstring: ``[{"params": [[name, has_default, type]],
    "returns": type}]``, ``self`` left out; empty where the docstring has no signature line."""
    sigs = []
    for line in (doc or "").splitlines():
        m = _SIG.match(line.strip())
        if not m or m.group("name") != name or m.group("params") == "*args, **kwargs":
            continue
        params = []
        for p in _split_params(m.group("params")):
            pname, _, rest = p.partition(":")
            ptype, eq, _default = rest.partition("=")
            params.append([pname.strip(), bool(eq), _PREFIX.sub("", ptype.strip())])
        if params and params[0][0] == "self":
            params = params[1:]
        sigs.append({"params": params, "returns": _PREFIX.sub("", (m.group("ret") or "").strip())})
    return sigs


def _describe_member(name: str, value: Any) -> dict[str, Any] | None:
    if isinstance(value, property):
        sig = _SIG.match("fget" + ((value.fget.__doc__ or "").strip().splitlines() or [""])[0])
        return {"kind": "property", "settable": value.fset is not None,
                "type": _PREFIX.sub("", (sig.group("ret") or "").strip()) if sig else ""}
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if type(value).__name__ in ("instancemethod", "builtin_function_or_method", "function", "method"):
        return {"kind": "method", "overloads": parse_signatures(getattr(value, "__doc__", None), name)}
    if hasattr(type(value), "__members__") and hasattr(value, "value"):
        return {"kind": "constant", "type": type(value).__name__, "value": int(value.value)}
    if isinstance(value, type):
        return None  # nested classes are described at module level when exported there
    return {"kind": "attribute", "type": type(value).__name__}


def _has_buffer(cls: type) -> bool:
    """Whether instances export the buffer protocol (``memoryview(x)``, ``bytes(x)``): its C slot is set."""
    import ctypes

    get_slot = ctypes.pythonapi.PyType_GetSlot
    get_slot.restype, get_slot.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_int]
    return bool(get_slot(cls, 1))  # 1: Py_bf_getbuffer


def _describe_class(cls: type) -> dict[str, Any]:
    members = getattr(cls, "__members__", None)
    if isinstance(members, dict) and members and all(hasattr(v, "value") for v in members.values()):
        props = {k: _describe_member(k, v) for c in cls.__mro__ for k, v in vars(c).items()
                 if isinstance(v, property) and not k.startswith("_")}
        return {"kind": "enum", "members": {k: int(v.value) for k, v in members.items()}, "properties": props}
    out: dict[str, Any] = {"kind": "class", "bases": [b.__name__ for b in cls.__bases__ if b is not object
                                                          and b.__name__ != "pybind11_object"],
                           "buffer": _has_buffer(cls), "members": {}}
    for name in sorted(dir(cls)):
        if name.startswith("_") and name not in ("__init__", "__str__", "__len__", "__getitem__", "__iter__"):
            continue
        try:
            raw = next(c.__dict__[name] for c in cls.__mro__ if name in c.__dict__)
        except StopIteration:
            continue
        if name.startswith("__") and type(raw).__name__ == "wrapper_descriptor":
            continue  # object's (or pybind11_object's "No constructor defined") slot, not the class's own
        desc = _describe_member(name, raw)
        if desc is not None:
            out["members"][name] = desc
    return out


def describe(module: Any) -> dict[str, Any]:
    """Every public name of an imported ``tensorrt`` module: classes (their members), enums (their values),
    functions (their signatures), constants."""
    names: dict[str, Any] = {}
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        value = getattr(module, name)
        if isinstance(value, type):
            names[name] = _describe_class(value)
            for nested, inner in sorted(vars(value).items()):
                if isinstance(inner, type) and not nested.startswith("_"):
                    names[f"{name}.{nested}"] = _describe_class(inner)
        elif callable(value):
            names[name] = {"kind": "function", "overloads": parse_signatures(value.__doc__, name)}
        elif not isinstance(value, type(sys)):
            names[name] = _describe_member(name, value) or {"kind": "attribute"}
    return {"tensorrt_version": str(getattr(module, "__version__", "unknown")), "names": names}


# -- a released wheel, imported against stand-in libraries ------------------------------------------------------
def _needed_and_undefined(so: Path) -> tuple[list[str], list[str]]:
    dyn = subprocess.run(["readelf", "-d", str(so)], check=True, capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(libnv[^\]]+)\]", dyn)
    syms = subprocess.run(["nm", "-D", "--undefined-only", str(so)], check=True, capture_output=True,
                          text=True).stdout
    undefined = []
    for line in syms.splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[0] != "U" or "@" in parts[1]:
            continue
        sym = parts[1]
        if not sym.startswith(("Py", "_Py")) and sym not in _SYSTEM_SYMBOLS:
            undefined.append(sym)
    return needed, sorted(set(undefined))


def _stub_libraries(so: Path, out_dir: Path) -> list[str]:
    """Compile one library per ``libnv*`` the bindings need, each defining every TensorRT entry point they
    import as a function returning 0 / null. Returns the entry points."""
    needed, symbols = _needed_and_undefined(so)
    if not needed:
        raise InputError(f"{so}: links to no libnv* library - not TensorRT's bindings?")
    src = out_dir / "stub.c"
    src.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in symbols))
    for lib in needed:
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out_dir / lib), f"-Wl,-soname,{lib}", str(src)],
                       check=True)
    return symbols


def describe_wheel(wheel: Path) -> dict[str, Any]:
    """:func:`describe` of a ``tensorrt-cu*-bindings`` wheel, imported in a subprocess against stand-in
    libraries (signatures only: nothing can be built with them)."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if f"-{tag}-" not in wheel.name:
        raise InputError(f"{wheel}: not a wheel for this Python ({tag}); download the one for {tag}")
    with tempfile.TemporaryDirectory(prefix="trt-api-") as tmp:
        root = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(root / "site")
        sos = sorted((root / "site").glob("tensorrt_bindings/tensorrt*.so"))
        if not sos:
            raise InputError(f"{wheel}: no tensorrt_bindings/tensorrt*.so inside")
        (root / "lib").mkdir()
        try:
            symbols = _stub_libraries(sos[0], root / "lib")
        except FileNotFoundError as exc:  # no cc / nm / readelf
            raise InputError(f"recording {wheel.name} needs a C compiler (cc), nm and readelf: {exc}") from exc
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import tensorrt_bindings as trt; "
                "from megactor_rt.engine.trt_api import describe; json.dump(describe(trt), sys.stdout)")
        env = dict(os.environ, LD_LIBRARY_PATH=str(root / "lib"))
        run = subprocess.run([sys.executable, "-c", code, str(root / "site")], capture_output=True, text=True,
                             env=env)
        if run.returncode != 0:
            raise InputError(f"{wheel}: importing the bindings against stand-in libraries failed:\n{run.stderr}")
        api = json.loads(run.stdout)
    api["source"] = {"wheel": wheel.name, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
                     "stubbed_entry_points": symbols}
    return api


# -- reading the recorded surface --------------------------------------------------------------------------
@dataclass(frozen=True)
class TrtApi:
    """A recorded TensorRT Python API (:func:`describe`'s JSON)."""

    version: str
    names: dict[str, Any]

    def member(self, owner: str, name: str) -> dict[str, Any] | None:
        """``owner.name``'s description (inherited members included; ``owner`` "" is the module), or None."""
        if not owner:
            return self.names.get(name)
        cls = self.names.get(owner)
        if cls is None:
            return None
        if cls["kind"] == "enum":  # on the enum: its members; on a member: name, value, ...
            if name in cls["members"]:
                return {"kind": "constant", "type": owner, "value": cls["members"][name]}
            return cls.get("properties", {}).get(name)
        if name in cls["members"]:
            return cls["members"][name]
        for base in cls.get("bases", []):
            found = self.member(base, name)
            if found is not None:
                return found
        return self.names.get(f"{owner}.{name}")

    def call_error(self, owner: str, name: str, positional: int, keywords: list[str]) -> str | None:
        """None when a call of ``owner.name`` with ``positional`` arguments and these keyword names binds to
        one of its overloads (``name`` ``__init__``: constructing ``owner``); else what is wrong."""
        member = self.member(owner, name)
        if member is None:
            return f"{owner or 'tensorrt'}.{name} does not exist in TensorRT {self.version}"
        if member["kind"] not in ("method", "function"):
            return f"{owner or 'tensorrt'}.{name} is a {member['kind']}, not callable, in TensorRT {self.version}"
        tried = []
        for sig in member["overloads"]:
            params = sig["params"]
            names = [p[0] for p in params]
            if positional > len(params) or any(k not in names[positional:] for k in keywords):
                tried.append(names)
                continue
            given = set(names[:positional]) | set(keywords)
            if all(p[1] or p[0] in given for p in params):
                return None
            tried.append(names)
        if not member["overloads"]:
            return None  # no signature recorded (a pure-Python helper): existence is all that can be checked
        return (f"{owner or 'tensorrt'}.{name}({positional} positional, keywords {keywords}) binds to none of "
                f"TensorRT {self.version}'s signatures {tried}")


# -- checking source code against the recorded surface ---------------------------------------------------------
@dataclass
class SourceCheck:
    """What :func:`check_source` found: ``checked`` uses (``file:line: Owner.name``) and ``problems``."""

    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


_MODULE = "module"


def _getattr_call(node: ast.Call) -> tuple[ast.expr, str] | None:
    """``getattr(obj, "name"[, default])`` -> (obj, "name"); None for any other call."""
    f, args = node.func, node.args
    if isinstance(f, ast.Name) and f.id == "getattr" and len(args) >= 2 and isinstance(args[1], ast.Constant) \
            and isinstance(args[1].value, str):
        return args[0], args[1].value
    return None


class _Types:
    """Flow-insensitive types of the expressions of one function: ``module`` (tensorrt), ``class:X`` (the
    class or enum X itself), ``X`` (an instance of X), from seeds, ``trt.X(...)`` constructors, method return
    types and property types of the recorded API."""

    def __init__(self, api: TrtApi, env: dict[str, str]) -> None:
        self.api, self.env = api, env

    def of(self, node: ast.AST) -> str | None:
        key = ast.unparse(node)
        if key in self.env:
            return self.env[key]
        if isinstance(node, ast.Attribute):
            return self._attr(self.of(node.value), node.attr)
        if isinstance(node, ast.Call):
            f = node.func
            if (named := _getattr_call(node)) is not None:
                return self._attr(self.of(named[0]), named[1])
            ft = self.of(f)
            if ft is not None and ft.startswith("class:"):
                return ft[6:]
            if isinstance(f, ast.Attribute):
                rt = self.of(f.value)
                member = self.api.member(rt, f.attr) if rt and not rt.startswith("class:") and rt != _MODULE else None
                if member and member["kind"] == "method" and member["overloads"]:
                    ret = member["overloads"][0]["returns"]
                    return ret if ret in self.api.names else None
        return None

    def _attr(self, rt: str | None, attr: str) -> str | None:
        if rt is None:
            return None
        if rt == _MODULE:
            entry = self.api.names.get(attr)
            if entry is None:
                return None
            return f"class:{attr}" if entry["kind"] in ("class", "enum") else entry.get("type")
        if rt.startswith("class:"):
            owner = rt[6:]
            if f"{owner}.{attr}" in self.api.names:
                return f"class:{owner}.{attr}"
            member = self.api.member(owner, attr)
            return member.get("type") if member and member["kind"] == "constant" else None
        member = self.api.member(rt, attr)
        if member and member["kind"] == "property" and member.get("type") in self.api.names:
            return str(member["type"])
        return None


def _assignments(body: ast.AST) -> list[tuple[str, ast.expr]]:
    out = []
    for node in ast.walk(body):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            out.append((ast.unparse(node.targets[0]), node.value))
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            out.append((ast.unparse(node.target), node.value))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "tensorrt":
                    out.append((alias.asname or "tensorrt", ast.Name("tensorrt")))
    return out


def check_source(api: TrtApi, path: str | Path, seeds: dict[str, str] | None = None) -> SourceCheck:
    """Every use of the TensorRT API in the Python file ``path`` whose receiver's type is known, checked
    against ``api``: attributes and enum members exist, calls bind to a signature (positional count and
    keyword names), assigned properties are settable, methods of a subclass of a TensorRT class override
    real ones with the same parameters.

    Types come from ``seeds`` (expression text -> ``module`` / ``class:X`` / ``X``, for values that reach a
    function through a parameter or a container, e.g. ``{"state.context": "IExecutionContext"}``; a key
    ``"func:expr"`` applies inside functions named ``func`` only, nested ones included), the name
    ``trt`` (seeded as the module), ``import tensorrt``, ``trt.X(...)`` constructors, the recorded return
    types of methods and types of properties, and ``self.x = ...`` anywhere in the class.
    """
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    seeds = dict(seeds or {})
    base_env = {"trt": _MODULE, "tensorrt": _MODULE} | {k: v for k, v in seeds.items() if ":" not in k}

    def scoped(fn: ast.FunctionDef | ast.AsyncFunctionDef, env: dict[str, str]) -> dict[str, str]:
        return env | {k.split(":", 1)[1]: v for k, v in seeds.items() if k.split(":", 1)[0] == fn.name}
    result = SourceCheck()
    name = Path(path).name

    def infer(func: ast.AST, env: dict[str, str]) -> dict[str, str]:
        env = dict(env)
        for _ in range(3):  # a few rounds: later assignments may feed earlier-listed ones
            types = _Types(api, env)
            for target, value in _assignments(func):
                t = _MODULE if isinstance(value, ast.Name) and value.id == "tensorrt" else types.of(value)
                if t is not None:
                    env.setdefault(target, t)
        return env

    # self.x types across each class, then each function with its class's
    scopes: list[tuple[ast.AST, dict[str, str]]] = []
    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef):
            env = dict(base_env)
            for _ in range(2):
                for fn in cls.body:
                    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        env |= {k: v for k, v in infer(fn, scoped(fn, env)).items() if k.startswith("self.")}
            scopes += [(fn, scoped(fn, env)) for fn in cls.body
                       if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))]
    in_class = {id(fn) for fn, _ in scopes}
    scopes += [(fn, scoped(fn, base_env)) for fn in ast.walk(tree)
               if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and id(fn) not in in_class]

    seen: set[tuple[int, int, str]] = set()

    def note(node: ast.AST, what: str, problem: str | None) -> None:
        key = (getattr(node, "lineno", 0), getattr(node, "col_offset", 0), what)
        if key in seen:
            return
        seen.add(key)
        where = f"{name}:{key[0]}"
        result.checked.append(f"{where}: {what}")
        if problem:
            result.problems.append(f"{where}: {problem}")

    def label(rt: str, attr: str) -> str:
        return f"{'tensorrt' if rt == _MODULE else rt.removeprefix('class:')}.{attr}"

    def attribute(node: ast.AST, rt: str, attr: str) -> None:
        """``attr`` read from a value of type ``rt`` (the module, a class or enum, an instance) must exist."""
        if rt == _MODULE:
            found = attr in api.names or (attr.startswith("__") and attr.endswith("__"))  # __version__, __file__
        else:  # (member() also finds nested classes such as ILogger.Severity)
            found = api.member(rt.removeprefix("class:"), attr) is not None
        note(node, label(rt, attr), None if found else f"{label(rt, attr)} does not exist in TensorRT {api.version}")

    def subclass(node: ast.ClassDef, types: _Types) -> None:
        """Methods of a Python subclass of a TensorRT class (TensorRT calls them) against the real ones."""
        for base in node.bases:
            bt = types.of(base)
            if bt is None or not bt.startswith("class:"):
                continue
            owner = bt[6:]
            for meth in node.body:
                if not isinstance(meth, ast.FunctionDef) or meth.name.startswith("_"):
                    continue
                real = api.member(owner, meth.name)
                mine = [a.arg for a in meth.args.args[1:]]
                what = f"{node.name}.{meth.name} overrides {owner}.{meth.name}"
                if real is None or real["kind"] != "method":
                    note(meth, what, f"{owner}.{meth.name} is not a method of TensorRT {api.version}")
                elif not any([p[0] for p in o["params"]] == mine for o in real["overloads"]):
                    note(meth, what, f"{node.name}.{meth.name}{tuple(mine)} differs from TensorRT "
                         f"{api.version}'s {[[p[0] for p in o['params']] for o in real['overloads']]}")
                else:
                    note(meth, what, None)

    for scope, scope_env in scopes:
        types = _Types(api, infer(scope, scope_env))
        for node in ast.walk(scope):
            if isinstance(node, ast.Attribute):
                rt = types.of(node.value)
                if rt is not None and ast.unparse(node) not in types.env:
                    attribute(node, rt, node.attr)
                if rt is not None and rt != _MODULE and not rt.startswith("class:") and \
                        isinstance(getattr(node, "ctx", None), ast.Store):
                    member = api.member(rt, node.attr)
                    if member is not None:
                        note(node, f"set {label(rt, node.attr)}", None if member["kind"] == "property" and
                             member["settable"] else f"{label(rt, node.attr)} cannot be assigned in TensorRT "
                             f"{api.version} (a {member['kind']}, not a settable property)")
            elif isinstance(node, ast.Call):
                if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                    continue
                kws = [str(k.arg) for k in node.keywords]
                f = node.func
                if (named := _getattr_call(node)) is not None:
                    rt = types.of(named[0])
                    if rt is not None:
                        attribute(node, rt, named[1])
                    continue
                if isinstance(f, ast.Name) and f.id in ("memoryview", "bytes", "bytearray") and len(node.args) == 1:
                    at = types.of(node.args[0])
                    if at is not None and at in api.names and api.names[at]["kind"] == "class":
                        note(node, f"{f.id}({at})", None if api.names[at].get("buffer")
                             else f"{at} does not export the buffer protocol in TensorRT {api.version}")
                ft = types.of(f)
                if ft is not None and ft.startswith("class:"):
                    made = ft[6:]
                    if api.names.get(made, {}).get("kind") == "class":
                        note(node, f"{made}(...)", api.call_error(made, "__init__", len(node.args), kws))
                elif isinstance(f, ast.Attribute):
                    rt = types.of(f.value)
                    if rt is not None and rt != _MODULE and not rt.startswith("class:") and \
                            api.member(rt, f.attr) is not None:  # (a missing one is flagged as an attribute)
                        note(node, f"{label(rt, f.attr)}(...)", api.call_error(rt, f.attr, len(node.args), kws))
            elif isinstance(node, ast.ClassDef):
                subclass(node, types)
    for top in ast.iter_child_nodes(tree):  # classes at module level
        if isinstance(top, ast.ClassDef):
            subclass(top, _Types(api, base_env))
    return result


def recorded_versions() -> list[str]:
    """The TensorRT releases whose API is recorded in ``engine/data`` (oldest first): the oldest and the
    newest this project supports."""
    files = resources.files("megactor_rt.engine").joinpath("data").iterdir()
    found = [m.group(1) for f in files if (m := _API_FILE.fullmatch(f.name))]
    return sorted(found, key=lambda v: tuple(int(x) for x in re.findall(r"\d+", v)))


def load_api(path: str | Path | None = None, version: str | None = None) -> TrtApi:
    """A recorded API: the file ``path``, or the one of ``version`` in ``engine/data`` (default: the newest).

    Raises:
        InputError: no API is recorded for ``version``.
    """
    if path is None:
        versions = recorded_versions()
        version = version or versions[-1]
        if version not in versions:
            raise InputError(f"no TensorRT Python API recorded for {version} (recorded: {versions})")
        text = resources.files("megactor_rt.engine").joinpath("data", API_FILE.format(version=version)).read_text()
    else:
        text = Path(path).read_text()
    data = json.loads(text)
    return TrtApi(data["tensorrt_version"], data["names"])


def dumps(api: dict[str, Any]) -> str:
    """The recorded API as JSON with one line per name (readable diffs between releases)."""
    names = api["names"]
    head = {k: v for k, v in api.items() if k != "names"}
    lines = [f" {json.dumps(n)}: {json.dumps(names[n], sort_keys=True)}" for n in sorted(names)]
    return json.dumps(head, indent=1, sort_keys=True)[:-2] + ',\n "names": {\n' + ",\n".join(lines) + "\n }\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megactor_rt.engine.trt_api", description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", type=Path, help="a tensorrt-cu*-bindings wheel for this Python version")
    src.add_argument("--installed", action="store_true", help="the tensorrt module installed here")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.wheel:
            api = describe_wheel(args.wheel)
        else:
            import tensorrt

            api = describe(tensorrt) | {"source": {"installed": str(Path(tensorrt.__file__).parent)}}
    except InputError as exc:
        logger.error("%s", exc)
        return 2
    write_atomic(args.out, dumps(api).encode())
    logger.info("TensorRT %s: %d names -> %s", api["tensorrt_version"], len(api["names"]), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
