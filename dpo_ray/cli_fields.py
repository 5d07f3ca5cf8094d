"""The config dataclasses as the command line sees them: every field's dotted name, type, default
and doc comment (for ``--help``), and TRL-style ``--beta 0.1`` flags turned into ``key=value``
overrides. The dataclasses in ``dpo_ray/config.py`` stay the one source of truth: nothing here
lists a field by hand.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from functools import cache

# Annotation aliases of config.py, as a reader of --help wants them spelled.
_TYPE_NAMES = {
    "PositiveInt": "int >= 1", "NonNegativeInt": "int >= 0", "Positive": "float > 0",
    "NonNegative": "float >= 0", "Fraction": "float in [0, 1)", "Probability": "float in (0, 1)",
    "ModelRef": "folder or hub id", "Format": "auto|explicit|implicit|conversational",
    "Tracker": "mlflow|tensorboard|wandb",
}


_OPS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


@dataclass(frozen=True)
class FieldInfo:
    name: str  # dotted, e.g. train.beta
    type: str
    default: str  # "required" when there is none
    doc: str
    is_bool: bool
    is_list: bool


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _type_text(node: ast.expr) -> str:
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        if node.value.id == "Literal":
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return "|".join(str(ast.literal_eval(item)) for item in items)
        if node.value.id == "Annotated":  # Annotated[float, Field(ge=0, lt=1)] -> float, >= 0, < 1
            bounds = [f"{_OPS[k.arg]} {ast.unparse(k.value)}" for call in node.slice.elts[1:]
                      if isinstance(call, ast.Call) for k in call.keywords if k.arg in _OPS]
            return ", ".join([_type_text(node.slice.elts[0]), *bounds])
        if node.value.id in ("list", "dict"):
            return f"{node.value.id}[{_type_text(node.slice) if node.value.id == 'list' else 'str: value'}]"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return f"{_type_text(node.left)} or {_type_text(node.right)}"
    if isinstance(node, ast.Name):
        return _TYPE_NAMES.get(node.id, node.id)
    if isinstance(node, ast.Constant) and node.value is None:
        return "null"
    return ast.unparse(node)


@cache
def _class_docs(cls: type) -> dict[str, tuple[str, str]]:
    """Field name -> (type text, doc comment), read from the class's source: the comment lines
    right above a field and the comment at the end of its line."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines, comments = source.splitlines(), _comments(source)
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments
                    and not lines[n - 1].strip().startswith("#")]
        out[node.target.id] = (_type_text(node.annotation), " ".join(above + trailing))
    return out


def _nested(tp) -> tuple[type | None, bool]:
    """The config dataclass inside an annotation (``X``, ``X | None``, ``list[X]``), and whether
    it is a list of them."""
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return tp, False
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in args:
            if dataclasses.is_dataclass(arg):
                return arg, False
    return None, False


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "required"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def fields(cls: type, prefix: str = "") -> list[FieldInfo]:
    """Every leaf field of ``cls`` and its sub-configs, depth first, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = _class_docs(cls)
    out = []
    for field in dataclasses.fields(cls):
        name = f"{prefix}{field.name}"
        inner, is_list = _nested(hints[field.name])
        if inner is not None:
            out += fields(inner, f"{name}[]." if is_list else f"{name}.")
            continue
        type_text, doc = docs.get(field.name, ("", ""))
        plain = typing.get_args(hints[field.name]) or (hints[field.name],)
        out.append(FieldInfo(name, type_text, _default(field), doc,
                             is_bool=hints[field.name] is bool or bool in plain,
                             is_list=typing.get_origin(hints[field.name]) is list))
    return out


def help_text(cls: type, section: str | None = None) -> str:
    """The fields block of ``--help``: name, type, default, then the doc comment indented."""
    lines = ["config fields (YAML keys; on the command line key=value or --key value):"]
    for info in fields(cls, f"{section}." if section else ""):
        lines.append(f"  {info.name}: {info.type} = {info.default}")
        if info.doc:
            lines += textwrap.wrap(info.doc, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


class FlagError(ValueError):
    pass


def _resolve(flag: str, infos: list[FieldInfo], aliases: dict[str, str], prefix: str
             ) -> FieldInfo | str:
    """``beta`` / ``train.beta`` / ``per-device-train-batch-size`` -> the field it names. A bare
    name matching fields at several depths takes the shallowest (``seed`` = ``train.seed``, not
    ``eval.generation.seed``); two at the same depth are ambiguous."""
    name = flag.replace("-", "_")
    by_name = {info.name: info for info in infos}
    for dotted in (name, prefix + name):  # in a one-section command the section may be left out
        if dotted in by_name:
            return by_name[dotted]
    if name in aliases:
        return by_name.get(aliases[name], aliases[name])
    matches = [info for info in infos if info.name.rsplit(".", 1)[-1] == name and "[]" not in info.name]
    if not matches:
        raise FlagError(f"--{flag}: no such config field (see --help for the list)")
    depth = min(info.name.count(".") for info in matches)
    shallowest = [info for info in matches if info.name.count(".") == depth]
    if len(shallowest) > 1:
        raise FlagError(f"--{flag} is ambiguous: use one of "
                        + ", ".join(f"--{info.name}" for info in shallowest))
    return shallowest[0]


_BOOL_WORDS = {"true", "false", "yes", "no", "1", "0"}


def flags_to_overrides(argv: list[str], cls: type, section: str | None = None,
                       known: set[str] = frozenset(), aliases: dict[str, str] | None = None
                       ) -> tuple[list[str], list[str]]:
    """Split a subcommand's arguments into (what argparse parses, overrides from config flags).

    Every ``--name`` that is not one of the ``known`` options names a config field:
    ``--beta 0.1`` and ``--train.beta=0.1`` become ``train.beta=0.1``; a bool alone is true
    (``--bf16``); a list takes the values up to the next flag or ``key=value``
    (``--report_to mlflow tensorboard``). ``aliases`` maps accepted TRL names to a dotted key.
    """
    prefix = f"{section}." if section else ""
    infos = fields(cls, prefix)
    kept, out, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        flag, has_value, value = token[2:].partition("=")
        if not token.startswith("--") or token == "--" or f"--{flag}" in known:
            kept.append(token)
            continue
        target = _resolve(flag, infos, aliases or {}, prefix)
        key, info = (target, None) if isinstance(target, str) else (target.name, target)
        if not has_value:
            values = []
            if info is not None and info.is_bool:
                if i < len(argv) and argv[i].lower() in _BOOL_WORDS:
                    values.append(argv[i])
                    i += 1
            elif info is not None and info.is_list:
                while i < len(argv) and not argv[i].startswith("--") and "=" not in argv[i]:
                    values.append(argv[i])
                    i += 1
            elif i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            if not values and not (info is not None and info.is_bool):
                raise FlagError(f"--{flag} needs a value" + (f" ({info.type})" if info else ""))
            value = ("[" + ", ".join(values) + "]" if info is not None and info.is_list
                     else values[0] if values else "true")
        out.append(f"{key}={value}")
    return kept, out
