"""Parse infra/ with pycep-parser and resolve the few Bicep expressions the infra tests need.

No Bicep CLI can be installed here, so the tests read the pycep AST (the JSON form checkov also
uses). pycep gives a parameter, variable or resource reference and a string literal alike as a
Python ``str``; ``Scope.resolve`` tells them apart by the symbols the file declares, follows
parameters into the module call that sets them (or to their defaults), variables to their
values, and evaluates ``string()``, ``union()``, ``concat()``, ``[for x in items(<object>): ...]``,
``[for i in range(start, count): ...]`` (a resource loop too: ``Scope.instances``), integer
``+`` and ``-``, and ``${...}`` interpolation of known values. Anything else (a resource
property, ``guid(...)``) is returned as written; a symbol reference such as
``identity.outputs.clientId`` comes back as a ``Ref``.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pycep import BicepParser

from simulator import REPO_ROOT

INFRA = REPO_ROOT / "infra"
MAIN = INFRA / "main.bicep"
MAIN_PARAMS = INFRA / "main.bicepparam"

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_INTERPOLATION = re.compile(r"\$\{([^{}]+)\}")
_USING = re.compile(r"^using\s+'([^']+)'\s*$", re.MULTILINE)
_PARAM_ASSIGNMENT = re.compile(r"^param\s+([A-Za-z_][A-Za-z0-9_]*)\s*=", re.MULTILINE)


class Ref(str):
    """A reference to a symbol (resource, module, output) that the tests do not evaluate."""

    __slots__ = ()


def bicep_files() -> list[Path]:
    """Every .bicep file under infra/, main first."""
    return sorted(INFRA.rglob("*.bicep"), key=lambda path: (path != MAIN, str(path)))


@functools.cache
def parse(path: Path) -> dict[str, Any]:
    """The pycep AST of one .bicep file (raises on a syntax pycep cannot parse)."""
    return cast(dict[str, Any], BicepParser().parse(file_path=path))


@functools.cache
def parse_bicepparam(path: Path) -> tuple[str, dict[str, Any]]:
    """The ``using`` target and the parameter values of a .bicepparam file.

    pycep has no .bicepparam grammar. Each ``param NAME = VALUE`` has the grammar of an untyped
    ``var NAME = VALUE``, so the file is parsed as such once its ``using`` line is checked and
    removed; anything else in the file makes the parse fail.
    """
    text = path.read_text()
    using = _USING.findall(text)
    if len(using) != 1:
        raise ValueError(f"{path}: expected exactly one `using '<file>.bicep'` line")
    body = _PARAM_ASSIGNMENT.sub(lambda m: f"var {m.group(1)} =", _USING.sub("", text))
    ast_ = cast(dict[str, Any], BicepParser().parse(text=body))
    if set(ast_) - {"globals", "variables"}:
        raise ValueError(f"{path}: only `param NAME = VALUE` lines are expected")
    return using[0], {name: var["value"] for name, var in ast_.get("variables", {}).items()}


@dataclass(frozen=True)
class BicepFile:
    """One parsed .bicep file."""

    path: Path

    @property
    def ast(self) -> dict[str, Any]:
        return parse(self.path)

    @property
    def params(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.ast.get("parameters", {}))

    @property
    def variables(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.ast.get("variables", {}))

    @property
    def resources(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.ast.get("resources", {}))

    @property
    def modules(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.ast.get("modules", {}))

    @property
    def outputs(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.ast.get("outputs", {}))

    def declared(self) -> dict[str, Any]:
        """Resources this file declares (not ``existing`` references), by symbol."""
        return {sym: res for sym, res in self.resources.items() if not res["existing"]}

    def of_type(self, resource_type: str) -> dict[str, dict[str, Any]]:
        """The config of every declared resource of one type, by symbol."""
        return {sym: res["config"] for sym, res in self.declared().items()
                if res["type"].lower() == resource_type.lower()}

    def one(self, resource_type: str) -> dict[str, Any]:
        """The config of the single declared resource of a type."""
        found = self.of_type(resource_type)
        assert len(found) == 1, f"{self.path.name}: expected one {resource_type}, got {list(found)}"
        return next(iter(found.values()))

    def symbols(self) -> set[str]:
        return set(self.resources) | set(self.modules)


@dataclass(frozen=True)
class ModuleCall:
    """A ``module`` statement of a parent file: the file it deploys, its params, its condition."""

    symbol: str
    file: BicepFile
    params: dict[str, Any]
    condition: Any
    depends_on: list[str]


def module_calls(parent: BicepFile) -> list[ModuleCall]:
    """Every module statement of ``parent`` (local modules only: registry paths are refused)."""
    calls = []
    for symbol, module in parent.modules.items():
        assert module["type"] == "local", f"{symbol}: only local modules are used"
        config = module["config"]
        condition = None
        if "condition" in config and "params" not in config:  # `module x '...' = if (c) {...}`
            condition, config = config["condition"], config["config"]
        path = (parent.path.parent / module["detail"]["path"]).resolve()
        calls.append(ModuleCall(symbol, BicepFile(path), dict(config.get("params", {})), condition,
                                list(config.get("dependsOn", []))))
    return calls


@dataclass(frozen=True)
class Scope:
    """A file as deployed: its parameters set by the caller's arguments, else their defaults."""

    file: BicepFile
    args: Mapping[str, Any] = field(default_factory=dict)
    parent: Scope | None = None
    bound: Mapping[str, Any] = field(default_factory=dict)  # a loop's index, while it runs

    def module(self, relative_path: str) -> tuple[ModuleCall, Scope]:
        """The single call of a local module (by its path relative to this file) and its scope."""
        target = (self.file.path.parent / relative_path).resolve()
        calls = [call for call in module_calls(self.file) if call.file.path == target]
        assert len(calls) == 1, f"expected one call of {relative_path}, got {len(calls)}"
        return calls[0], Scope(calls[0].file, calls[0].params, self)

    def calls(self, relative_path: str) -> list[tuple[ModuleCall, Scope]]:
        """Every call of a local module and the scope each gives it."""
        target = (self.file.path.parent / relative_path).resolve()
        return [(call, Scope(call.file, call.params, self))
                for call in module_calls(self.file) if call.file.path == target]

    def param(self, name: str) -> Any:
        """The value of a parameter: the caller's argument (resolved), else the default."""
        assert name in self.file.params, f"{self.file.path.name}: no param {name}"
        if name in self.args:
            caller = self.parent if self.parent is not None else self
            return caller.resolve(self.args[name])
        assert "default" in self.file.params[name], f"{name} has neither argument nor default"
        return self.resolve(self.file.params[name]["default"])

    def resolve(self, expr: Any) -> Any:
        """Evaluate what can be evaluated offline (see the module docstring)."""
        if isinstance(expr, Ref):
            return expr
        if isinstance(expr, str):
            return self._resolve_text(expr)
        if isinstance(expr, list):
            return [self.resolve(item) for item in expr]
        if isinstance(expr, dict):
            if set(expr) == {"function"}:
                return self._resolve_function(expr["function"])
            if set(expr) >= {"loop_type", "config"}:
                return self._resolve_loop(expr)
            if set(expr) == {"operator"}:
                return self._resolve_operator(expr)
            return {key: self.resolve(value) for key, value in expr.items()}
        return expr

    def instances(self, resource: dict[str, Any]) -> list[dict[str, Any]]:
        """The configs a declared resource deploys: one, or one per pass of its range loop."""
        if set(resource) >= {"loop_type", "config"}:
            resolved = self._resolve_loop(resource)
            assert isinstance(resolved, list), f"cannot evaluate the loop {resource!r}"
            return resolved
        return [resource]

    def _resolve_operator(self, expr: dict[str, Any]) -> Any:
        """Integer ``+`` and ``-`` of known values, else the expression as is."""
        operator = expr["operator"]
        operands = [self.resolve(value) for value in operator.get("operands", {}).values()]
        if len(operands) == 2 and all(isinstance(o, int) for o in operands):
            if operator["type"] == "add":
                return operands[0] + operands[1]
            if operator["type"] == "substract":  # pycep's spelling
                return operands[0] - operands[1]
        return expr

    def _resolve_text(self, text: str) -> Any:
        if text in self.bound:
            return self.bound[text]
        if _IDENT.fullmatch(text):
            head = text.split(".")[0]
            if head == text and head in self.file.params:
                return self.param(head)
            if head == text and head in self.file.variables:
                return self.resolve(self.file.variables[head]["value"])
            if head in self.file.symbols():
                return Ref(text)
            return text
        return _INTERPOLATION.sub(lambda m: self._interpolated(m.group(1)), text)

    def _interpolated(self, inner: str) -> str:
        value = self.resolve(inner.strip()) if _IDENT.fullmatch(inner.strip()) else None
        if isinstance(value, Ref) or not isinstance(value, str | int):
            return "${" + inner + "}"
        return str(value)

    def _resolve_loop(self, loop: dict[str, Any]) -> Any:
        """``[for item in items(<object>): {...}]`` over a known object, or ``[for i in
        range(start, count): {...}]`` with known bounds; else the loop as is."""
        loop_type = loop["loop_type"]
        if loop_type["type"] == "range" and loop.get("condition") is None:
            return self._resolve_range(loop)
        if loop_type["type"] != "object" or loop.get("condition") is not None:
            return loop
        item = loop_type["detail"]["item_name"]
        source = loop_type["detail"]["object_name"]
        # pycep keeps a non-identifier loop source as the str() of its AST.
        source = self.resolve(ast.literal_eval(source) if source.startswith("{") else source)
        if not isinstance(source, dict) or not isinstance(loop["config"], dict):
            return loop
        accessors = {(item, "key"): 0, (item, "value"): 1}
        return [{name: pair[accessors[acc]] if (acc := _accessor(value)) in accessors
                 else self.resolve(value) for name, value in loop["config"].items()}
                for pair in source.items()]

    def _resolve_range(self, loop: dict[str, Any]) -> Any:
        detail = loop["loop_type"]["detail"]
        start, count = self.resolve(detail["start_index"]), self.resolve(detail["count"])
        index = detail.get("index_name") or detail.get("item_name")
        if not (isinstance(start, int) and isinstance(count, int) and index):
            return loop
        return [Scope(self.file, self.args, self.parent, {**self.bound, index: value})
                .resolve(loop["config"]) for value in range(start, start + count)]

    def _resolve_function(self, function: dict[str, Any]) -> Any:
        kind = function["type"]
        args = [self.resolve(arg) for arg in (function.get("parameters") or {}).values()
                if arg is not None]
        if kind == "string" and len(args) == 1 and isinstance(args[0], int | str):
            return str(args[0]).lower() if isinstance(args[0], bool) else str(args[0])
        if kind == "concat" and args and all(isinstance(arg, list) for arg in args):
            return [item for arg in args for item in arg]
        if kind == "union" and args and all(isinstance(arg, dict) for arg in args):
            merged: dict[str, Any] = {}
            for arg in args:
                merged.update(arg)
            return merged
        return {"function": {**function, "parameters": function.get("parameters")}}


def root_scope(with_param_file: bool = False) -> Scope:
    """main.bicep with its defaults, or with the values of main.bicepparam."""
    args: dict[str, Any] = {}
    if with_param_file:
        _, args = parse_bicepparam(MAIN_PARAMS)
    return Scope(BicepFile(MAIN), args)


def app_settings_of(scope: Scope, site: dict[str, Any]) -> dict[str, Any]:
    """The app settings a Microsoft.Web/sites resource gets from ``siteConfig.appSettings``.

    The property must resolve to a list of ``{name, value}`` (literal, ``concat()`` of lists, or a
    loop over ``items(<object>)``), with no name twice.
    """
    pairs = scope.resolve(site["properties"]["siteConfig"]["appSettings"])
    assert isinstance(pairs, list), f"appSettings do not resolve to a list: {pairs!r}"
    names = [pair["name"] for pair in pairs]
    assert len(names) == len(set(names)), f"an app setting is set twice: {sorted(names)}"
    return {pair["name"]: pair["value"] for pair in pairs}


def _accessor(expr: Any) -> tuple[str, str] | None:
    """``item.key`` as pycep 0.4 (a dotted string) or 0.5 (a property_accessor) writes it."""
    if isinstance(expr, str) and expr.count(".") == 1:
        head, tail = expr.split(".")
        return head, tail
    if isinstance(expr, dict) and expr.get("operator", {}).get("type") == "property_accessor":
        operands = expr["operator"]["operands"]
        return operands["operand_1"], operands["operand_2"]
    return None


def walk(node: Any) -> Iterator[Any]:
    """Every node of an AST, depth first."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def functions_in(node: Any) -> Iterator[dict[str, Any]]:
    """Every function call in an AST."""
    for item in walk(node):
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            yield item["function"]
