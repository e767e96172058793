"""`tool-policy` written in Python: the same configuration and behaviour as the
Rust plugin in plugins/tool-policy (see its doc comment), built with
componentize-py against the same WIT world (`gatehouse:plugin/plugin`).

Rules: first match wins, then `default`. A rule matches when its `tool` /
`server` globs match and, if it names an `argument`, the value satisfies
`operator` against `value` (equal, notEqual, contains, notContains,
startsWith, endsWith, regex).
"""
import json
import math
import re
from fnmatch import fnmatchcase

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types

OPERATORS = {"equal", "notEqual", "contains", "notContains", "startsWith", "endsWith", "regex"}
RULE_FIELDS = {"tool", "server", "argument", "operator", "value", "action", "reason"}
CONFIG_FIELDS = {"rules", "default", "default_reason"}
ACTIONS = {"allow": "allow", "block": "block", "deny": "block"}


def glob(pattern, text):
    # Only `*` and `?` are special, as in the Rust SDK: escape `[`.
    return fnmatchcase(text, pattern.replace("[", "[[]"))


# Unicode's White_Space, what Rust's `str::trim` (the SDK, the gateway) takes off: `strip()`
# alone would also take U+001C..U+001F, and JavaScript's `trim()` U+FEFF.
WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
               "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def name_glob(pattern, name):
    # As written, or as a lenient server may look the name up (cut at a NUL,
    # trimmed, in lower case) against the pattern in lower case: `FS_read`
    # does not walk around a rule for `fs_*` (the Rust SDK's `matches_name`).
    if glob(pattern, name):
        return True
    folded = name.split("\0")[0].strip(WHITE_SPACE).lower()
    if folded == name and pattern == pattern.lower():
        return False
    return glob(pattern.lower(), folded)


def text_of(value):
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def split_path(path):
    if path.startswith("/"):
        return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]
    return path.split(".")


_MISSING = object()
_UNREADABLE = object()


# Numbers past a double's range are arguments the Rust build (serde) cannot read: no build
# reads them, so the three decide alike (rules that block apply).
def _finite_float(text):
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _finite_int(text):
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise ValueError("number out of range") from None
    return value


def lookup(value, path):
    for key in path:
        if isinstance(value, dict):
            if key not in value:
                return _MISSING
            value = value[key]
        elif isinstance(value, list):
            if not key.isdigit() or int(key) >= len(value):
                return _MISSING
            value = value[int(key)]
        else:
            return _MISSING
    return value


class Rule:
    def __init__(self, i, spec):
        if not isinstance(spec, dict):
            raise ValueError(f"rules[{i}]: expected an object")
        unknown = set(spec) - RULE_FIELDS
        if unknown:
            raise ValueError(f"rules[{i}]: unknown field {sorted(unknown)[0]!r}")
        if spec.get("action") not in ACTIONS:
            raise ValueError(f"rules[{i}]: `action` must be allow or block")
        self.tool = spec.get("tool")
        self.server = spec.get("server")
        self.action = ACTIONS[spec["action"]]
        self.reason = spec.get("reason") or f"blocked by tool-policy rule {i}"
        argument, operator = spec.get("argument"), spec.get("operator")
        self.path = None
        if (argument is None) != (operator is None):
            raise ValueError(f"rules[{i}]: `argument` and `operator` go together")
        if argument is not None:
            if operator not in OPERATORS:
                raise ValueError(f"rules[{i}]: unknown operator {operator!r}")
            if spec.get("value") is None:
                raise ValueError(f"rules[{i}]: `value` is required with `operator`")
            self.path = split_path(argument)
            self.operator = operator
            self.value = text_of(spec["value"])
            if operator == "regex":
                try:
                    self.regex = re.compile(self.value)
                except re.error as e:
                    raise ValueError(f"rules[{i}].value: {e}")

    def targets(self, name, server):
        # A rule that blocks matches a name as a lenient server may look it up; one that
        # allows only the name as written.
        matches = name_glob if self.action == "block" else glob
        if self.tool is not None and (name is None or not matches(self.tool, name)):
            return False
        return self.server is None or glob(self.server, server)

    def holds(self, args):
        actual = lookup(args, self.path)
        if actual is _MISSING:
            return False
        text, op, expected = text_of(actual), self.operator, self.value
        if op == "regex":
            return self.regex.search(text) is not None
        if op in ("contains", "notContains"):
            if isinstance(actual, list):
                found = any(text_of(item) == expected for item in actual)
            else:
                found = expected in text
            return found if op == "contains" else not found
        if op == "equal":
            return text == expected
        if op == "notEqual":
            return text != expected
        if op == "startsWith":
            return text.startswith(expected)
        return text.endswith(expected)


def verdict(action, reason):
    if action == "allow":
        return types.Decision_Allow()
    return types.Decision_Deny(types.Denial(code=None, message=reason))


class Policy:
    """The parsed configuration; one per instance (module state)."""

    def __init__(self, rules, default, default_reason):
        self.rules = rules
        self.default = default
        self.default_reason = default_reason


# componentize-py makes a new `Hooks` object for every call: keep the
# instance's state at module level.
_policy = None


class Hooks(exports.Hooks):
    def init(self, config):
        global _policy
        try:
            cfg = json.loads(config) if config.strip() else None
            cfg = {} if cfg is None else cfg
            if not isinstance(cfg, dict):
                raise ValueError("expected an object")
            unknown = set(cfg) - CONFIG_FIELDS
            if unknown:
                raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
            rules = [Rule(i, r) for i, r in enumerate(cfg.get("rules", []))]
            default = cfg.get("default", "allow")
            if default not in ACTIONS:
                raise ValueError("`default` must be allow or block")
            reason = cfg.get("default_reason") or "not allowed by tool-policy"
            _policy = Policy(rules, ACTIONS[default], reason)
        except (ValueError, TypeError) as e:
            raise Err(f"invalid configuration: {e}")
        return types.HookSet.ON_REQUEST

    def on_request(self, ctx):
        policy = _policy
        parsed = _MISSING
        # Each method of the call-context asks the gateway: read the two fields rules use once.
        name, server = ctx.name(), ctx.server()
        for rule in policy.rules:
            if not rule.targets(name, server):
                continue
            if rule.path is not None:
                if parsed is _MISSING:
                    try:
                        # Copied in only now: a call no argument rule applies to never pays for it.
                        parsed = json.loads(
                            ctx.payload(), parse_float=_finite_float, parse_int=_finite_int
                        )
                    except ValueError:
                        parsed = _UNREADABLE
                if parsed is _UNREADABLE:
                    # Arguments this policy cannot read: a rule that blocks on them applies, one
                    # that allows on them does not (fail closed).
                    if rule.action == "block":
                        return verdict(rule.action, rule.reason)
                    continue
                if not rule.holds(parsed):
                    continue
            return verdict(rule.action, rule.reason)
        return verdict(policy.default, policy.default_reason)

    def on_response(self, ctx):
        return types.Decision_Allow()

    def filter_list(self, ctx, entries):
        return [True] * len(entries)
