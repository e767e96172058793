// `tool-policy` written in JavaScript: the same configuration and behaviour as
// the Rust plugin in plugins/tool-policy (see its doc comment) and the Python
// one in plugins/python/tool-policy, built with componentize-js against the
// same WIT world (`gatehouse:plugin/plugin`).
//
// Rules: first match wins, then `default`. A rule matches when its `tool` /
// `server` globs match and, if it names an `argument`, the value satisfies
// `operator` against `value` (equal, notEqual, contains, notContains,
// startsWith, endsWith, regex).

const OPERATORS = new Set([
  "equal", "notEqual", "contains", "notContains", "startsWith", "endsWith", "regex",
]);
const RULE_FIELDS = new Set(["tool", "server", "argument", "operator", "value", "action", "reason"]);
const CONFIG_FIELDS = new Set(["rules", "default", "default_reason"]);
const ACTIONS = { allow: "allow", block: "block", deny: "block" };
const MISSING = Symbol("missing");
const UNREADABLE = Symbol("unreadable");

// Only `*` and `?` are special, as in the Rust SDK; `?` is one character (a
// code point, as a Rust `char`). Compiled once per rule into a matcher: the
// common shapes (`name`, `prefix*`, `*suffix`) are one string comparison;
// the rest run an iterative match with one backtrack point (never
// exponential). RegExp is avoided: in the component it costs microseconds.
function globMatcher(pattern) {
  const wild = /[*?]/;
  if (!wild.test(pattern)) return (text) => text === pattern;
  const body = pattern.slice(0, -1);
  if (pattern.endsWith("*") && !wild.test(body)) return (text) => text.startsWith(body);
  const tail = pattern.slice(1);
  if (pattern.startsWith("*") && !wild.test(tail)) return (text) => text.endsWith(tail);
  const p = Array.from(pattern);
  return (text) => globMatch(p, Array.from(text));
}

// A tool or prompt name matches as written, or as a lenient server may look
// it up (cut at a NUL, trimmed, in lower case) against the pattern in lower
// case: `FS_read` does not walk around a rule for `fs_*` (the Rust SDK's
// `matches_name`).
// Unicode's White_Space, what Rust's `str::trim` (the SDK, the gateway) takes off:
// `trim()` would also take U+FEFF and leave U+0085.
const EDGE_SPACE = /^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+|[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$/g;

function trimWhiteSpace(text) {
  return text.replace(EDGE_SPACE, "");
}

function nameMatcher(pattern) {
  const written = globMatcher(pattern);
  const lower = globMatcher(pattern.toLowerCase());
  return (name) => {
    if (written(name)) return true;
    const folded = trimWhiteSpace(name.split("\0")[0]).toLowerCase();
    if (folded === name && pattern === pattern.toLowerCase()) return false;
    return lower(folded);
  };
}

function globMatch(p, t) {
  let pi = 0, ti = 0, star = -1, mark = 0;
  while (ti < t.length) {
    if (pi < p.length && (p[pi] === "?" || p[pi] === t[ti])) {
      pi++;
      ti++;
    } else if (pi < p.length && p[pi] === "*") {
      star = pi++;
      mark = ti;
    } else if (star >= 0) {
      pi = star + 1;
      ti = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.length && p[pi] === "*") pi++;
  return pi === p.length;
}

// A number of the arguments, by its JSON text as the Rust and Python builds
// write it back: integers exactly (no rounding past 2^53), floats with their
// `.0` (`3.0` is not `3`). Comparisons only ever look at text.
class JsonNumber {
  constructor(value, source) {
    if (/[.eE]/.test(source)) {
      const text = String(value);
      this.text = Number.isInteger(value) && !/e/.test(text) ? `${text}.0` : text;
    } else {
      this.text = source.replace(/^-0$/, "0");
    }
  }
}

function parseArguments(text) {
  // Without numbers (the common case) a plain parse is the whole story.
  const plain = JSON.parse(text);
  if (!hasNumber(plain)) return plain;
  // Numbers past a double's range are arguments the Rust build (serde) cannot read: no build
  // reads them, so the three decide alike (rules that block apply).
  if (!allFinite(plain)) throw new Error("number out of range");
  // `context.source` is JSON.parse source text access (ES2025).
  return JSON.parse(text, (_key, value, context) =>
    typeof value === "number" ? new JsonNumber(value, context?.source ?? String(value)) : value,
  );
}

function allFinite(value) {
  if (typeof value === "number") return Number.isFinite(value);
  if (value === null || typeof value !== "object") return true;
  return Object.values(value).every(allFinite);
}

function hasNumber(value) {
  if (typeof value === "number") return true;
  if (value === null || typeof value !== "object") return false;
  return Object.values(value).some(hasNumber);
}

function jsonText(value) {
  if (value instanceof JsonNumber) return value.text;
  if (Array.isArray(value)) return `[${value.map(jsonText).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const members = Object.keys(value).map((k) => `${JSON.stringify(k)}:${jsonText(value[k])}`);
    return `{${members.join(",")}}`;
  }
  return JSON.stringify(value);
}

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value) && !(value instanceof JsonNumber);
}

function textOf(value) {
  return typeof value === "string" ? value : jsonText(value);
}

function splitPath(path) {
  if (path.startsWith("/")) {
    return path.slice(1).split("/").map((p) => p.replaceAll("~1", "/").replaceAll("~0", "~"));
  }
  return path.split(".");
}

function lookup(value, path) {
  for (const key of path) {
    if (value instanceof JsonNumber) return MISSING;
    if (Array.isArray(value)) {
      if (!/^[0-9]+$/.test(key) || Number(key) >= value.length) return MISSING;
      value = value[Number(key)];
    } else if (value !== null && typeof value === "object") {
      if (!Object.prototype.hasOwnProperty.call(value, key)) return MISSING;
      value = value[key];
    } else {
      return MISSING;
    }
  }
  return value;
}

class Rule {
  constructor(i, spec) {
    if (!isObject(spec)) {
      throw new Error(`rules[${i}]: expected an object`);
    }
    const unknown = Object.keys(spec).filter((k) => !RULE_FIELDS.has(k)).sort();
    if (unknown.length) throw new Error(`rules[${i}]: unknown field '${unknown[0]}'`);
    if (!Object.prototype.hasOwnProperty.call(ACTIONS, spec.action)) {
      throw new Error(`rules[${i}]: \`action\` must be allow or block`);
    }
    for (const field of ["tool", "server", "argument", "reason"]) {
      if (spec[field] != null && typeof spec[field] !== "string") {
        throw new Error(`rules[${i}].${field}: expected a string`);
      }
    }
    // A rule that blocks matches a name as a lenient server may look it up; one that
    // allows only the name as written.
    const block = ACTIONS[spec.action] === "block";
    this.tool = spec.tool == null ? null : block ? nameMatcher(spec.tool) : globMatcher(spec.tool);
    this.server = spec.server == null ? null : globMatcher(spec.server);
    this.action = ACTIONS[spec.action];
    this.reason = spec.reason || `blocked by tool-policy rule ${i}`;
    this.path = null;
    const argument = spec.argument ?? null;
    const operator = spec.operator ?? null;
    if ((argument === null) !== (operator === null)) {
      throw new Error(`rules[${i}]: \`argument\` and \`operator\` go together`);
    }
    if (argument !== null) {
      if (!OPERATORS.has(operator)) throw new Error(`rules[${i}]: unknown operator '${operator}'`);
      if (spec.value == null) throw new Error(`rules[${i}]: \`value\` is required with \`operator\``);
      this.path = splitPath(argument);
      this.operator = operator;
      this.value = textOf(spec.value);
      if (operator === "regex") {
        try {
          this.regex = new RegExp(this.value, "u");
        } catch (e) {
          throw new Error(`rules[${i}].value: ${e.message}`);
        }
      }
    }
  }

  // `target` holds the call's name and server, read once from the gateway's call-context.
  targets(target) {
    if (this.tool !== null && (target.name == null || !this.tool(target.name))) return false;
    return this.server === null || this.server(target.server);
  }

  holds(args) {
    const actual = lookup(args, this.path);
    if (actual === MISSING) return false;
    const text = textOf(actual);
    const expected = this.value;
    switch (this.operator) {
      case "regex":
        return this.regex.test(text);
      case "contains":
      case "notContains": {
        const found = Array.isArray(actual)
          ? actual.some((item) => textOf(item) === expected)
          : text.includes(expected);
        return this.operator === "contains" ? found : !found;
      }
      case "equal":
        return text === expected;
      case "notEqual":
        return text !== expected;
      case "startsWith":
        return text.startsWith(expected);
      default:
        return text.endsWith(expected);
    }
  }
}

function verdict(action, reason) {
  return action === "allow" ? { tag: "allow" } : { tag: "deny", val: { code: undefined, message: reason } };
}

// One configuration per instance: the gateway calls `init` once, then hooks.
let policy = null;

function parseConfig(config) {
  // Numbers as in the arguments, so a rule value `3.0` means `3.0`.
  let cfg = config.trim() ? parseArguments(config) : null;
  if (cfg === null) cfg = {};
  if (!isObject(cfg)) throw new Error("expected an object");
  const unknown = Object.keys(cfg).filter((k) => !CONFIG_FIELDS.has(k)).sort();
  if (unknown.length) throw new Error(`unknown field '${unknown[0]}'`);
  const specs = cfg.rules ?? [];
  if (!Array.isArray(specs)) throw new Error("rules: expected a list");
  const rules = specs.map((spec, i) => new Rule(i, spec));
  if (cfg.default_reason != null && typeof cfg.default_reason !== "string") {
    throw new Error("default_reason: expected a string");
  }
  const defaultAction = cfg.default ?? "allow";
  if (!Object.prototype.hasOwnProperty.call(ACTIONS, defaultAction)) {
    throw new Error("`default` must be allow or block");
  }
  return {
    rules,
    default: ACTIONS[defaultAction],
    defaultReason: cfg.default_reason || "not allowed by tool-policy",
  };
}

export const hooks = {
  init(config) {
    try {
      policy = parseConfig(config);
    } catch (e) {
      // A thrown value becomes the `err` of `result<hook-set, string>`.
      throw `invalid configuration: ${e.message}`;
    }
    return { onRequest: true, onResponse: false, filterList: false };
  },

  onRequest(ctx) {
    let parsed = MISSING;
    // Each method of the call-context asks the gateway: read the two fields rules use once.
    const target = { name: ctx.name(), server: ctx.server() };
    for (const rule of policy.rules) {
      if (!rule.targets(target)) continue;
      if (rule.path !== null) {
        if (parsed === MISSING) {
          try {
            // Copied in only now: a call no argument rule applies to never pays for it.
            parsed = parseArguments(ctx.payload());
          } catch {
            parsed = UNREADABLE;
          }
        }
        if (parsed === UNREADABLE) {
          // Arguments this policy cannot read: a rule that blocks on them applies, one that
          // allows on them does not (fail closed).
          if (rule.action === "block") return verdict(rule.action, rule.reason);
          continue;
        }
        if (!rule.holds(parsed)) continue;
      }
      return verdict(rule.action, rule.reason);
    }
    return verdict(policy.default, policy.defaultReason);
  },

  onResponse(_ctx) {
    return { tag: "allow" };
  },

  filterList(_ctx, entries) {
    return entries.map(() => true);
  },
};
