"""Refuse a ``.pt2`` archive whose loading could run code from the file.

``torch.export.load`` is not a safe loader. Besides the JSON graph and raw tensor payloads, an
archive may hold

- pickles: sample inputs, legacy state-dict and constant files, payloads marked
  ``use_pickle``; torch loads several of them with ``weights_only=False``, and
  ``deserialize_torch_artifact`` falls back to unrestricted unpickling when the restricted
  unpickler refuses one, so a crafted pickle runs whatever it names;
- ``custom_obj_*`` / ``opaque_obj_*`` constants (TorchScript objects, ``pickle.loads``);
- AOTInductor entries (``data/aotinductor/``): compiled shared libraries that are loaded;
- graph nodes whose ``target`` is resolved by ``getattr`` from the ``torch`` module (so
  ``torch.os.system`` resolves to :func:`os.system`, called when the program runs);
- symbolic expressions handed to ``sympy.sympify``, which evaluates Python.

:func:`check_pt2_archive` inspects all of these *before* torch sees the file, and refuses the
archive naming the first offending entry: every pickle must load with ``weights_only=True``
(the restricted unpickler that allows tensors and plain containers only); custom objects and
compiled code are refused; call targets must be ATen/prims/higher-order operators
(``torch.ops.*``), ``operator`` arithmetic, ``math`` functions or torch's ``sym_*`` helpers;
every expression must parse as arithmetic over symbols. :func:`restricted_unpickling` then
forces ``weights_only=True`` for every ``torch.load`` during the load itself, so a pickle that
the inspection did not anticipate still cannot run code. Loading with ``allow_pickle=True``
skips neither: a user who trusts a file can load it with ``torch.export.load`` directly.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnfold.errors import BadInputError

__all__ = ["check_pt2_archive", "restricted_unpickling"]

#: Small text entries of the archive format that torch reads as strings, never unpickles.
_TEXT_ENTRIES = frozenset(
    {"archive_format", "archive_version", "byteorder", "version", ".data/version",
     ".data/serialization_id"}
)  # fmt: skip

#: ``operator`` functions a graph may call: arithmetic, comparison and indexing only
#: (``methodcaller``, ``attrgetter`` or ``call`` would let a graph reach any attribute).
_OPERATOR_TARGETS = frozenset(
    [
        "getitem",
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "neg",
        "pos",
        "abs",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "xor",
        "not_",
        "invert",
        "inv",
        "lshift",
        "rshift",
        "matmul",
        "truth",
    ]
)
#: Folders of compiled artifacts (AOTInductor, ExecuTorch, MTIA) that a loader may execute.
_COMPILED_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia")
_SYM_TARGET = re.compile(r"_?sym_[a-z_]+\Z")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
#: Functions a serialized symbolic expression may call (sympy's and torch's sympy functions).
_SYMPY_CALLS = frozenset(
    [
        "Max",
        "Min",
        "Abs",
        "Mod",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ITE",
        "floor",
        "ceiling",
        "sqrt",
        "Integer",
        "Rational",
        "Float",
        "Symbol",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
        "OpaqueUnaryFn_sqrt",
        "OpaqueUnaryFn_exp",
        "OpaqueUnaryFn_log",
        "BitwiseFn_bitwise_and",
        "BitwiseFn_bitwise_or",
        "Add",
        "Mul",
        "Pow",
        "log",
        "exp",
        "Trunc",
        "Dummy",
    ]
)
#: Constructors whose string arguments are a symbol's name or a number's digits.
_STRING_CONSTRUCTORS = frozenset({"Symbol", "Dummy", "Integer", "Float", "Rational"})
_LITERAL = re.compile(r"[A-Za-z0-9_.+-]{1,64}\Z")
_EXPR_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.Name,
    ast.Load, ast.Constant, ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
)  # fmt: skip


def check_pt2_archive(path: str | os.PathLike[str]) -> None:
    """Raise :class:`BadInputError` unless loading ``path`` can only build tensors and a graph.

    Args:
        path: a zip archive written by ``torch.export.save``.

    Raises:
        BadInputError: naming the entry that would run code, or the unreadable archive.
    """
    src = Path(path)
    try:
        with zipfile.ZipFile(src) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
            root = _root(names)
            raw_payloads = _raw_payloads(archive, names, root)
            for name in names:
                _check_entry(src, archive, name, name[len(root) :], raw_payloads)
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as e:
        raise BadInputError(f"cannot read ExportedProgram {src}: {e}".splitlines()[0]) from e


@contextlib.contextmanager
def restricted_unpickling() -> Iterator[None]:
    """Force ``weights_only=True`` for every ``torch.load`` made inside the block.

    torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` on each call, so this reaches the loads that
    ``torch.export.load`` makes with ``weights_only=False``. The variable is process-wide
    while the block runs.
    """
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                             "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}  # fmt: skip
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _refuse(src: Path, entry: str, why: str) -> BadInputError:
    return BadInputError(
        f"{src} is refused: its entry {entry} {why}; loading it could run code from the file. "
        "Re-save the model with torch.export.save from a trusted environment"
    )


def _root(names: list[str]) -> str:
    """The folder every record sits in (``torch.export.save`` names it after the file).

    A legacy archive (PyTorch 2.7 and older) keeps its records at the top level.
    """
    heads = {name.partition("/")[0] for name in names}
    if len(heads) == 1 and all("/" in name for name in names):
        return heads.pop() + "/"
    return ""


def _raw_payloads(archive: zipfile.ZipFile, names: list[str], root: str) -> set[str]:
    """Entries that payload configs declare as raw tensor bytes (read by ``frombuffer``).

    An entry that some config marks ``use_pickle`` is unpickled, whatever other configs say.
    """
    raw: set[str] = set()
    pickled: set[str] = set()
    for name in names:
        inner = name[len(root) :]
        if not (inner.startswith("data/") and inner.endswith("_config.json")):
            continue
        folder = name.rsplit("/", 1)[0]
        config = _json(archive, name).get("config", {})
        for meta in config.values() if isinstance(config, dict) else ():
            if isinstance(meta, dict) and isinstance(meta.get("path_name"), str):
                entry = f"{folder}/{meta['path_name']}"
                (pickled if meta.get("use_pickle") else raw).add(entry)
    return raw - pickled


def _check_entry(src: Path, archive: zipfile.ZipFile, name: str, inner: str, raw: set[str]) -> None:
    base = inner.rsplit("/", 1)[-1]
    if inner.startswith(_COMPILED_DIRS) or base.endswith((".so", ".dll", ".dylib")):
        raise _refuse(src, name, "is compiled code, which torch loads and runs")
    if base.startswith(("custom_obj", "opaque_obj")):
        raise _refuse(src, name, "is a custom object that torch unpickles without restriction")
    if name in raw or inner in _TEXT_ENTRIES or inner.startswith(("extra_files/", "extra/")):
        return
    if base.endswith(".json"):
        if inner.startswith("models/") or base == "serialized_exported_program.json":
            _check_program(src, name, _json(archive, name))
        return
    _check_pickle(src, name, archive.read(name))


def _json(archive: zipfile.ZipFile, name: str) -> dict[str, Any]:
    try:
        value = json.loads(archive.read(name))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read entry {name}: not valid JSON ({e})") from e
    return value if isinstance(value, dict) else {}


def _check_pickle(src: Path, name: str, data: bytes) -> None:
    """Every other entry may reach ``torch.load``: it must pass the restricted unpickler."""
    import torch

    if not data:
        return
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler raises UnpicklingError, RuntimeError...
        raise _refuse(src, name, f"is not a weights-only pickle ({_why(e)})") from None


def _why(error: Exception) -> str:
    """The restricted unpickler's own reason (e.g. ``unsupported GLOBAL posix.system``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "WeightsUnpickler" in line:
            return line.rstrip(".")[:120]
    return (lines[-1] if lines else type(error).__name__)[:120]


def _check_program(src: Path, name: str, program: Any) -> None:
    """Walk the serialized program: call targets and symbolic expressions."""
    for node in _walk(program):
        target = node.get("target")
        is_node = "inputs" in node and "outputs" in node
        if isinstance(target, str) and is_node and not _safe_target(target):
            raise _refuse(src, name, f"calls {target!r}, which is not a torch operator")
        expr = node.get("expr_str")
        if isinstance(expr, str) and not _safe_expression(expr):
            raise _refuse(src, name, f"has the expression {expr[:80]!r}, which is not arithmetic")
    ranges = program.get("range_constraints") if isinstance(program, dict) else None
    for key in ranges or ():
        if not _safe_expression(str(key)):
            raise _refuse(src, name, f"constrains {str(key)[:80]!r}, which is not a symbol")


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _safe_target(target: str) -> bool:
    head, _, rest = target.partition(".")
    if head == "torch":
        return rest.startswith("ops.") or bool(_SYM_TARGET.match(rest))
    if head == "_operator":
        return rest in _OPERATOR_TARGETS
    if head == "math":
        return bool(_NAME.match(rest))
    # Anything else stays a plain string in the graph (torch resolves only these prefixes),
    # except extension operators ("#..."), which a registered handler resolves.
    return not target.startswith("#")


def _safe_expression(expr: str) -> bool:
    """Arithmetic, comparisons and known sympy calls over symbols and numbers.

    torch writes expressions as ``srepr`` (``Add(Symbol('s0', integer=True), Integer(-2))``),
    so strings are allowed as the arguments of constructors like ``Symbol`` (which only name
    a symbol), and keywords only with number or bool values.
    """
    try:
        tree = ast.parse(expr.replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError):
        return False
    named: set[int] = set()  # string constants that name a symbol or spell a number
    for node in ast.walk(tree):
        if not isinstance(node, (*_EXPR_NODES, ast.keyword)):
            return False
        if isinstance(node, ast.Name) and (node.id.startswith("_") or not _NAME.match(node.id)):
            return False
        if isinstance(node, ast.keyword) and not (
            node.arg
            and _NAME.match(node.arg)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, (int, float, bool))
        ):
            return False
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
                return False
            if node.func.id in _STRING_CONSTRUCTORS:
                named.update(id(arg) for arg in node.args if isinstance(arg, ast.Constant))
        if (
            isinstance(node, ast.Constant)
            and not isinstance(node.value, (int, float, bool))
            and not (
                isinstance(node.value, str) and id(node) in named and _LITERAL.match(node.value)
            )
        ):
            return False
    return True
