//! What installing a catalog entry runs: a `server.json` package and the installer's values,
//! turned into a server definition for the orchestrator (a pure function; the admin API
//! applies it).
//!
//! - npm packages run with `npx -y {identifier}@{version}`, PyPI packages with
//!   `uvx {identifier}=={version}`, each in the operator's image for that runtime on
//!   Kubernetes; OCI packages are the pod's image.
//! - `packageArguments` follow; `runtimeArguments` (flags of npx, uvx or docker) are not
//!   passed: the gateway decides how a server runs.
//! - Environment variables take the installer's value, else their default; a required one
//!   without either refuses the install; `isSecret` ones become secrets (kept in the
//!   orchestrator's secret store, never in the definition's plain environment); `choices`
//!   are enforced.
//! - npm and PyPI packages' servers also get the operator's `registry.runner_env` (a private
//!   index, a proxy's CA, a `PATH` that finds `npx` and `uvx` without a cluster).
//! - A streamable-http package's URL template (`http://localhost:{PORT}/mcp`) gives the port
//!   and path.
//! - A remote (`remotes[]`: the entry's server runs elsewhere) becomes a remote definition:
//!   nothing runs, the gateway reaches its URL (its `{variables}` filled in, each a plain URL
//!   part) with its headers (secret ones stay secret).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::orchestrator::spec::{
    EnvVarSpec, HeaderSpec, McpServerSpec, RegistrySource, RemoteKind, RemoteSpec, ServerDef,
    TransportKind, TransportSpec,
};

/// An install refused: `field` names what is at fault (`values.API_KEY`, `$.packages[0]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InstallError {
    /// What is at fault.
    pub field: String,
    /// Why.
    pub message: String,
}

fn refuse(field: impl Into<String>, message: impl Into<String>) -> InstallError {
    InstallError {
        field: field.into(),
        message: message.into(),
    }
}

/// Images that run a package manager's packages on Kubernetes.
#[derive(Debug, Clone)]
pub struct Runners {
    /// Image with Node.js and npx.
    pub npm_image: String,
    /// Image with uv and uvx.
    pub pypi_image: String,
    /// Environment of every npm and PyPI package's server (the operator's `runner_env`).
    pub env: BTreeMap<String, String>,
}

impl Runners {
    /// The images the operator configured.
    pub fn of(config: &crate::config::RegistryConfig) -> Self {
        Runners {
            npm_image: config.npm_image.clone(),
            pypi_image: config.pypi_image.clone(),
            env: config.runner_env.clone(),
        }
    }
}

/// What the installer asks for.
#[derive(Debug, Default, Clone)]
pub struct Request {
    /// The server's name behind the gateway (a DNS label; default: from the entry's name).
    pub name: Option<String>,
    /// Which package of the entry (default: the first one the gateway can run).
    pub package: Option<usize>,
    /// Which remote of the entry, instead of a package (default: the first, when the entry
    /// has no package the gateway can run).
    pub remote: Option<usize>,
    /// Values of the package's environment variables, by name.
    pub values: BTreeMap<String, String>,
}

/// The server name an entry gets by default: the part after the `/`, lowercased, with
/// anything but letters, digits and `-` turned into `-` (`io.github.x/server-fetch` →
/// `server-fetch`).
pub fn default_name(entry_name: &str) -> String {
    let tail = entry_name.rsplit('/').next().unwrap_or(entry_name);
    let mut out: String = tail
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    out = out.trim_matches('-').to_string();
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert_str(0, "mcp-");
    }
    out.truncate(crate::orchestrator::spec::MAX_NAME_LEN);
    out.trim_end_matches('-').to_string()
}

fn runnable(pkg: &Value) -> bool {
    matches!(pkg["registryType"].as_str(), Some("npm" | "pypi" | "oci"))
}

/// The definition that installs `server` (a validated `server.json`) as `request` asks.
pub fn plan(
    server: &Value,
    request: &Request,
    runners: &Runners,
) -> Result<ServerDef, InstallError> {
    let packages = server["packages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let has_remotes = server["remotes"].as_array().is_some_and(|r| !r.is_empty());
    let index = match (request.package, request.remote) {
        (Some(_), Some(_)) => {
            return Err(refuse("remote", "give a package or a remote, not both"));
        }
        (None, Some(i)) => return plan_remote(server, request, i),
        (Some(i), None) if i < packages.len() => i,
        (Some(i), None) => return Err(refuse("package", format!("the entry has no package {i}"))),
        (None, None) => match packages.iter().position(runnable) {
            Some(i) => i,
            None if has_remotes => return plan_remote(server, request, 0),
            None => {
                return Err(refuse(
                    "package",
                    "the entry has no npm, PyPI or OCI package, and no remote",
                ));
            }
        },
    };
    let path = format!("$.packages[{index}]");
    let pkg = &packages[index];
    let identifier = pkg["identifier"].as_str().unwrap_or_default();
    let version = pkg["version"].as_str();
    // These become arguments of npx or uvx (or the image): a document from elsewhere (a
    // page of the public registry) must not slip a flag of theirs in.
    package_ref(pkg["registryType"].as_str(), identifier)
        .map_err(|m| refuse(format!("{path}.identifier"), m))?;
    if let Some(v) = version {
        version_ref(v).map_err(|m| refuse(format!("{path}.version"), m))?;
    }
    let (image, command, mut args) = match pkg["registryType"].as_str() {
        Some("npm") => (
            Some(runners.npm_image.clone()),
            Some("npx".to_string()),
            vec![
                "-y".to_string(),
                match version {
                    Some(v) => format!("{identifier}@{v}"),
                    None => identifier.to_string(),
                },
            ],
        ),
        Some("pypi") => (
            Some(runners.pypi_image.clone()),
            Some("uvx".to_string()),
            vec![match version {
                Some(v) => format!("{identifier}=={v}"),
                None => identifier.to_string(),
            }],
        ),
        Some("oci") => (
            Some(match version {
                Some(v) if !identifier.contains('@') && !tag_of(identifier) => {
                    format!("{identifier}:{v}")
                }
                _ => identifier.to_string(),
            }),
            None,
            Vec::new(),
        ),
        other => {
            return Err(refuse(
                format!("{path}.registryType"),
                format!("{other:?} packages cannot be installed (npm, pypi and oci can)"),
            ));
        }
    };

    // Environment: the installer's values, else the defaults; what is secret stays secret.
    let declared = pkg["environmentVariables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for name in request.values.keys() {
        if !declared.iter().any(|e| e["name"] == name.as_str()) {
            return Err(refuse(
                format!("values.{name}"),
                "the package declares no such variable",
            ));
        }
    }
    let mut env = Vec::new();
    // Values templates may use: never a secret's (arguments and URLs are not secret).
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    let mut secrets = Vec::new();
    // How npx and uvx fetch the package is the operator's: `registry.runner_env` wins over
    // what the entry declares (an imported document must not replace the operator's proxy or
    // CA), and an installer may not set those names either.
    let runner_env = if command.is_some() {
        &runners.env
    } else {
        &BTreeMap::new()
    };
    for (j, var) in declared.iter().enumerate() {
        let name = var["name"].as_str().unwrap_or_default();
        env_name(name).map_err(|m| refuse(format!("{path}.environmentVariables[{j}].name"), m))?;
        if let Some(operators) = runner_env.get(name) {
            if request.values.contains_key(name) {
                return Err(refuse(
                    format!("values.{name}"),
                    "is set by the operator (registry.runner_env)",
                ));
            }
            // The package's own variable, with the operator's value: its arguments may name
            // it (runner values are plain, like every argument).
            known.insert(name.to_string(), operators.clone());
            continue;
        }
        let Some(value) = input_value(request.values.get(name), var) else {
            if var["isRequired"] == true {
                return Err(refuse(format!("values.{name}"), "is required"));
            }
            continue;
        };
        chosen(name, var, &value)?;
        if value.contains('\0') {
            return Err(refuse(
                format!("values.{name}"),
                "must not contain a NUL byte",
            ));
        }
        let secret = var["isSecret"] == true;
        if secret {
            secrets.push(name.to_string());
        } else {
            // Kubernetes expands `$(NAME)` in a variable's value from those before it: a
            // plain one would carry a secret's value where it is logged or sent.
            no_expansion(&value).map_err(|m| refuse(format!("values.{name}"), m))?;
            known.insert(name.to_string(), value.clone());
        }
        env.push(EnvVarSpec {
            name: name.to_string(),
            value: (!secret).then(|| value.clone()),
            secret_value: secret.then_some(value),
            ..EnvVarSpec::default()
        });
    }

    env.extend(runner_env.iter().map(|(name, value)| EnvVarSpec {
        name: name.clone(),
        value: Some(value.clone()),
        ..EnvVarSpec::default()
    }));

    // Arguments: fixed values, or the installer's values of variables they name.
    for (j, arg) in pkg["packageArguments"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let apath = format!("{path}.packageArguments[{j}]");
        no_secret_in(arg["value"].as_str(), &secrets).map_err(|m| refuse(&apath, m))?;
        let value = arg["value"]
            .as_str()
            .map(|v| substitute(v, &known))
            .or_else(|| arg["default"].as_str().map(str::to_string));
        // Kubernetes expands `$(NAME)` in a container's arguments from its environment, where
        // the secrets are: such an argument would put one on the command line.
        for v in [value.as_deref(), arg["name"].as_str()]
            .into_iter()
            .flatten()
        {
            no_expansion(v).map_err(|m| refuse(&apath, m))?;
        }
        match (arg["type"].as_str(), value) {
            (Some("named"), Some(v)) => {
                args.push(arg["name"].as_str().unwrap_or_default().to_string());
                args.push(v);
            }
            (Some("named"), None) if arg["isRequired"] != true => {
                args.push(arg["name"].as_str().unwrap_or_default().to_string());
            }
            (_, Some(v)) => args.push(v),
            (_, None) if arg["isRequired"] == true => {
                return Err(refuse(apath, "a required argument has no value"));
            }
            (_, None) => {}
        }
    }

    let transport = match pkg["transport"]["type"].as_str() {
        Some("streamable-http") => {
            let template = pkg["transport"]["url"].as_str().unwrap_or_default();
            no_secret_in(Some(template), &secrets)
                .map_err(|m| refuse(format!("{path}.transport.url"), m))?;
            let url = substitute(template, &known);
            // The template, not the URL it made: what the error echoes is the document's.
            let (port, http_path) = port_and_path(&url).ok_or_else(|| {
                refuse(
                    format!("{path}.transport.url"),
                    format!("{template:?} does not name a local port the server listens on"),
                )
            })?;
            TransportSpec {
                kind: TransportKind::StreamableHttp,
                port: Some(port),
                path: Some(http_path),
            }
        }
        Some("stdio") | None => TransportSpec::default(),
        Some(other) => {
            return Err(refuse(
                format!("{path}.transport.type"),
                format!("{other:?}: the gateway runs stdio and streamable-http servers"),
            ));
        }
    };

    let name = match &request.name {
        Some(n) => n.clone(),
        None => default_name(server["name"].as_str().unwrap_or_default()),
    };
    Ok(ServerDef {
        name,
        spec: McpServerSpec {
            image,
            command,
            args,
            transport,
            env,
            registry: Some(RegistrySource {
                entry: server["name"].as_str().unwrap_or_default().to_string(),
                version: server["version"].as_str().unwrap_or_default().to_string(),
                package: index,
                runner_env: runner_env.keys().cloned().collect(),
                remote: None,
                values: BTreeMap::new(),
            }),
            ..McpServerSpec::default()
        },
    })
}

/// Longest value of a remote's URL variable or header.
const MAX_REMOTE_VALUE: usize = 4096;

/// The definition that reaches remote `index` of `server` with the installer's values: of
/// its URL's variables, of its headers (by header name), and of the variables its headers'
/// values name.
fn plan_remote(server: &Value, request: &Request, index: usize) -> Result<ServerDef, InstallError> {
    let remote = server["remotes"]
        .as_array()
        .and_then(|r| r.get(index))
        .ok_or_else(|| refuse("remote", format!("the entry has no remote {index}")))?;
    let path = format!("$.remotes[{index}]");
    let kind = match remote["type"].as_str() {
        Some("streamable-http") => RemoteKind::StreamableHttp,
        Some("sse") => RemoteKind::Sse,
        other => {
            return Err(refuse(
                format!("{path}.type"),
                format!("{other:?} is not streamable-http or sse"),
            ));
        }
    };
    let empty = serde_json::Map::new();
    let url_vars = remote["variables"].as_object().unwrap_or(&empty);
    let headers = remote["headers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let header_vars = |h: &Value| h["variables"].as_object().cloned().unwrap_or_default();
    for name in request.values.keys() {
        let declared = url_vars.contains_key(name)
            || headers
                .iter()
                .any(|h| h["name"] == name.as_str() || header_vars(h).contains_key(name));
        if !declared {
            return Err(refuse(
                format!("values.{name}"),
                "the remote declares no such variable or header",
            ));
        }
    }
    // The names of secrets: a secret header's, a secret variable's. One installer value per
    // name goes wherever the name is used, so wherever it is used it is kept secret (and
    // never in the URL).
    let secret_names: std::collections::BTreeSet<&str> = headers
        .iter()
        .filter(|h| h["isSecret"] == true)
        .filter_map(|h| h["name"].as_str())
        .chain(headers.iter().flat_map(|h| {
            h["variables"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| v["isSecret"] == true)
                .map(|(k, _)| k.as_str())
        }))
        .collect();
    // An input's value: the installer's, else the document's fixed value, else its default
    // (`None`: none, or a required one missing); `choices` enforced.
    let input = |name: &str, var: &Value| -> Result<Option<String>, InstallError> {
        let Some(value) = input_value(request.values.get(name), var) else {
            return Ok(None);
        };
        chosen(name, var, &value)?;
        if value.len() > MAX_REMOTE_VALUE {
            return Err(refuse(
                format!("values.{name}"),
                format!("is longer than {MAX_REMOTE_VALUE} bytes"),
            ));
        }
        Ok(Some(value))
    };

    // The URL: each variable one plain part of it, so that no value moves it to another
    // host, path or query than the document's.
    let mut known = BTreeMap::new();
    for (name, var) in url_vars {
        // What the installer gives for a header is kept secret: not in the URL either.
        let a_headers = headers
            .iter()
            .any(|h| h["name"] == name.as_str() || header_vars(h).contains_key(name));
        if a_headers && request.values.contains_key(name) {
            return Err(refuse(
                format!("{path}.variables.{name}"),
                "a header uses it too, and what is given for a header is kept secret: a URL cannot keep it",
            ));
        }
        if var["isSecret"] == true || secret_names.contains(name.as_str()) {
            return Err(refuse(
                format!("{path}.variables.{name}"),
                "a URL cannot keep a secret (give it as a secret header)",
            ));
        }
        let Some(value) = input(name, var)? else {
            if var["isRequired"] == true {
                return Err(refuse(format!("values.{name}"), "is required"));
            }
            continue;
        };
        let plain_part = value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
            && value.chars().any(|c| c != '.');
        if !plain_part {
            return Err(refuse(
                format!("values.{name}"),
                "goes into the URL: letters, digits and -._~ only (and not only dots)",
            ));
        }
        known.insert(name.clone(), value);
    }
    let template = remote["url"].as_str().unwrap_or_default();
    let url = fill(template, &known).ok_or_else(|| {
        refuse(
            format!("{path}.url"),
            format!("{template:?} names a variable that has no value"),
        )
    })?;
    crate::orchestrator::spec::remote_url(&url).map_err(|m| refuse(format!("{path}.url"), m))?;

    let mut specs = Vec::with_capacity(headers.len());
    for (j, h) in headers.iter().enumerate() {
        let hpath = format!("{path}.headers[{j}]");
        let name = h["name"].as_str().unwrap_or_default();
        crate::orchestrator::spec::remote_header_name(name)
            .map_err(|m| refuse(format!("{hpath}.name"), m))?;
        // The header's own variables fill its value's template (`Bearer {token}`).
        let declared_vars = header_vars(h);
        // What the installer gives for a header (an API key, whatever the document calls
        // it) is kept as a secret; only the document's own values are plain.
        // (A value chosen among the document's `choices` is the document's: plain.)
        let given = |k: &str| request.values.contains_key(k) && h["choices"].as_array().is_none();
        let secret = secret_names.contains(name)
            || given(name)
            || declared_vars
                .keys()
                .any(|k| secret_names.contains(k.as_str()) || given(k));
        let required = h["isRequired"] == true;
        let value = match request.values.get(name) {
            Some(given) => Some(given.clone()),
            None => {
                let mut vars = BTreeMap::new();
                let mut missing = None;
                for (var, decl) in &declared_vars {
                    match input(var, decl)? {
                        Some(v) => {
                            vars.insert(var.clone(), v);
                        }
                        None if decl["isRequired"] == true => missing = Some(var.clone()),
                        None => {}
                    }
                }
                match (missing, h["value"].as_str()) {
                    // An optional header whose variable is not given is not sent.
                    (Some(var), _) if required => {
                        return Err(refuse(format!("values.{var}"), "is required"));
                    }
                    (Some(_), _) => None,
                    (None, Some(template)) => {
                        fill(template, &vars).or_else(|| h["default"].as_str().map(str::to_string))
                    }
                    (None, None) => h["default"].as_str().map(str::to_string),
                }
            }
        };
        let Some(value) = value else {
            if required {
                return Err(refuse(format!("values.{name}"), "is required"));
            }
            continue;
        };
        chosen(name, h, &value)?;
        crate::orchestrator::spec::remote_header_value(&value)
            .map_err(|m| refuse(format!("values.{name}"), m))?;
        specs.push(HeaderSpec {
            name: name.to_string(),
            value: (!secret).then(|| value.clone()),
            secret_value: secret.then_some(value),
            stored_secret: false,
        });
    }

    // The installer's values that stayed plain, for an upgrade: the URL's, and a header's
    // whose value went out plain (one of the document's choices).
    let plain: BTreeMap<String, String> = request
        .values
        .iter()
        .filter(|(k, _)| {
            url_vars.contains_key(k.as_str())
                || specs.iter().any(|s| s.name == **k && s.value.is_some())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let name = match &request.name {
        Some(n) => n.clone(),
        None => default_name(server["name"].as_str().unwrap_or_default()),
    };
    Ok(ServerDef {
        name,
        spec: McpServerSpec {
            remote: Some(RemoteSpec {
                kind,
                url,
                headers: specs,
            }),
            registry: Some(RegistrySource {
                entry: server["name"].as_str().unwrap_or_default().to_string(),
                version: server["version"].as_str().unwrap_or_default().to_string(),
                package: 0,
                runner_env: Vec::new(),
                remote: Some(index),
                values: plain,
            }),
            ..McpServerSpec::default()
        },
    })
}

/// The definition that upgrades `current` (installed from `old`, when the catalog still has
/// it) to `new`: the same package (by kind and name, wherever `new` lists it), the values the
/// installer chose (not the old version's defaults), secrets kept secret, and what the
/// operator changed since (variables of their own, resources, idle...) kept.
pub fn upgrade(
    current: &McpServerSpec,
    old: Option<&Value>,
    new: &Value,
    runners: &Runners,
) -> Result<McpServerSpec, InstallError> {
    let source = current
        .registry
        .as_ref()
        .ok_or_else(|| refuse("name", "was not installed from the registry"))?;
    if let Some(index) = source.remote {
        return upgrade_remote(current, source, index, old, new);
    }
    let (package, old_vars) = match old {
        Some(old) => {
            let was = &old["packages"][source.package];
            let package = new["packages"]
                .as_array()
                .and_then(|ps| {
                    ps.iter().position(|p| {
                        p["registryType"] == was["registryType"]
                            && p["identifier"] == was["identifier"]
                    })
                })
                .ok_or_else(|| {
                    refuse(
                        "version",
                        format!(
                            "{} has no {} package {} any more: install it under another name",
                            new["version"].as_str().unwrap_or_default(),
                            was["registryType"].as_str().unwrap_or_default(),
                            was["identifier"].as_str().unwrap_or_default()
                        ),
                    )
                })?;
            (package, variables(old, source.package))
        }
        None => (source.package, Vec::new()),
    };
    // `registry` says which entry and package runs, and an edit of the resource may have
    // repointed it (to another entry declaring the same secret's name) without changing what
    // runs, which is all the stored values' mark covers: what is upgraded, with the values,
    // is the package that runs.
    let upgraded = &new["packages"][package];
    if !runs_package(current, upgraded) {
        return Err(refuse(
            "registry",
            format!(
                "the server does not run {}'s {} package {} (its definition was changed since it was installed): install it again",
                source.entry,
                upgraded["registryType"].as_str().unwrap_or("missing"),
                upgraded["identifier"].as_str().unwrap_or_default()
            ),
        ));
    }
    let new_vars = variables(new, package);
    // A stored secret's value is not here (the backend keeps it): it is passed through as a
    // mark, and stays stored.
    let stored_mark = String::from("stored-secret");
    // The operator's runner variables are not the installer's choices: the new plan takes
    // the operator's current ones, and ones the operator dropped since go. A name the
    // operator has set since, that the installer had chosen, is the operator's now.
    let runs_packages = matches!(
        new["packages"][package]["registryType"].as_str(),
        Some("npm" | "pypi")
    );
    let from_runner = |name: &str| {
        source.runner_env.iter().any(|r| r == name)
            || (runs_packages && runners.env.contains_key(name))
    };
    let values = current
        .env
        .iter()
        .filter(|e| !from_runner(&e.name))
        .filter_map(|e| {
            let v = e.value.as_ref().or(e.secret_value.as_ref());
            Some((e, v.or(e.stored_secret.then_some(&stored_mark))?))
        })
        .filter(|(e, v)| {
            let declared = new_vars.iter().any(|n| n["name"] == e.name.as_str());
            // A value the old version gave by itself is not the installer's choice.
            let given_by_old = old_vars.iter().any(|o| {
                o["name"] == e.name.as_str()
                    && (o["value"] == v.as_str() || o["default"] == v.as_str())
            });
            declared && !given_by_old
        })
        .map(|(e, v)| (e.name.clone(), v.clone()))
        .collect();
    let request = Request {
        name: None,
        package: Some(package),
        remote: None,
        values,
    };
    // What was secret stays secret, whatever the new version says: planned as secrets, so
    // that no argument or URL of the new version may carry them, and a stored one (its value
    // unknown here) is not checked against choices.
    let mut new = new.clone();
    if let Some(vars) = new["packages"][package]["environmentVariables"].as_array_mut() {
        for var in vars {
            let Some(was) = current.env.iter().find(|c| var["name"] == c.name.as_str()) else {
                continue;
            };
            if was.secret_value.is_some() || was.stored_secret {
                var["isSecret"] = Value::Bool(true);
            }
            if was.stored_secret
                && let Some(v) = var.as_object_mut()
            {
                v.remove("choices");
            }
        }
    }
    let planned = plan(&new, &request, runners).map_err(cannot_keep)?.spec;
    let mut env = planned.env;
    for e in &mut env {
        let was = current.env.iter().find(|c| c.name == e.name);
        if was.is_some_and(|c| c.stored_secret) {
            *e = EnvVarSpec {
                name: e.name.clone(),
                stored_secret: true,
                ..EnvVarSpec::default()
            };
        }
        let was_secret = was.is_some_and(|c| c.secret_value.is_some());
        if was_secret && let Some(v) = e.value.take() {
            e.secret_value = Some(v);
        }
        if let Some(c) = current.env.iter().find(|c| c.name == e.name) {
            e.as_file = c.as_file;
        }
    }
    // Variables of the operator's own (neither version declares them, nor did they come from
    // the runner environment) stay.
    for c in current.env.iter().filter(|c| !from_runner(&c.name)) {
        let declared = |vars: &[Value]| vars.iter().any(|v| v["name"] == c.name.as_str());
        if !declared(&old_vars) && !declared(&new_vars) && !env.iter().any(|e| e.name == c.name) {
            // Kept, it runs with the new version: no more the operator's to steer the runner
            // or the loader with than an entry's (an edit of the resource may have added it).
            if reserved(&c.name) {
                return Err(refuse(
                    format!("env.{}", c.name),
                    "changes how the package runs, which the gateway decides: remove it from the server's definition, then upgrade",
                ));
            }
            env.push(c.clone());
        }
    }
    Ok(McpServerSpec {
        image: planned.image,
        command: planned.command,
        args: planned.args,
        transport: planned.transport,
        env,
        registry: planned.registry,
        ..current.clone()
    })
}

/// [`upgrade`] of a server installed from remote `index` of `old`: the new version's remote
/// of the same kind (at the same place, else its first of that kind), its URL and plain
/// headers filled again with the installer's kept values, its secret headers kept as they are
/// stored, unless the new version makes that header differently (then it is installed again,
/// with its values).
fn upgrade_remote(
    current: &McpServerSpec,
    source: &RegistrySource,
    index: usize,
    old: Option<&Value>,
    new: &Value,
) -> Result<McpServerSpec, InstallError> {
    let installed = current
        .remote
        .as_ref()
        .ok_or_else(|| refuse("name", "was installed from a remote but has none"))?;
    let kind = match installed.kind {
        RemoteKind::StreamableHttp => "streamable-http",
        RemoteKind::Sse => "sse",
    };
    let version = new["version"].as_str().unwrap_or_default();
    let remotes = new["remotes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let at = match remotes.get(index) {
        Some(r) if r["type"] == kind => index,
        _ => remotes
            .iter()
            .position(|r| r["type"] == kind)
            .ok_or_else(|| {
                refuse(
                    "version",
                    format!(
                        "{version} has no {kind} remote any more: install it under another name"
                    ),
                )
            })?,
    };
    let was = old.map(|o| &o["remotes"][index]);
    let header = |remote: &Value, name: &str| {
        remote["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h["name"] == name)
            .cloned()
    };
    let kept_secrets = installed
        .headers
        .iter()
        .any(|h| h.secret_value.is_some() || h.stored_secret);
    if kept_secrets && old.is_none() {
        return Err(refuse(
            "version",
            "the installed version is no longer in the catalog, so its secret headers cannot be checked against the new one: install it again with its values",
        ));
    }
    let mut new = new.clone();
    // Kept values the new version still declares (one it dropped goes).
    let now = &new["remotes"][at];
    let declared = |k: &str| {
        now["variables"].get(k).is_some()
            || now["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|h| h["name"] == k || h["variables"].get(k).is_some())
    };
    let mut values: BTreeMap<String, String> = source
        .values
        .iter()
        .filter(|(k, _)| declared(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let stored_mark = String::from("stored-secret");
    for h in &installed.headers {
        let secret = h
            .secret_value
            .as_ref()
            .or(h.stored_secret.then_some(&stored_mark));
        let (Some(value), Some(now)) = (secret, header(&new["remotes"][at], &h.name)) else {
            continue;
        };
        // Passed by the header's name: no variable of the new version may bear that name
        // (it would copy the secret elsewhere, or a stored one's mark).
        let remote = &new["remotes"][at];
        let named = remote["variables"].get(h.name.as_str()).is_some()
            || remote["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| o["variables"].get(h.name.as_str()).is_some());
        if named {
            return Err(refuse(
                "version",
                format!(
                    "{version} has a variable named like its secret header {}: install it again with its values",
                    h.name
                ),
            ));
        }
        // The value kept is the header's as it was made: only a header made the same way.
        let made = |h: &Value| (h["value"].clone(), h["variables"].clone());
        if let Some(then) = was.and_then(|w| header(w, &h.name))
            && made(&then) != made(&now)
        {
            return Err(refuse(
                "version",
                format!(
                    "{version} makes its header {} differently: install it again with its values",
                    h.name
                ),
            ));
        }
        // Kept secret, and a stored one (its value unknown here) not checked against choices.
        if let Some(headers) = new["remotes"][at]["headers"].as_array_mut() {
            for n in headers.iter_mut().filter(|n| n["name"] == h.name.as_str()) {
                n["isSecret"] = Value::Bool(true);
                if let Some(n) = n.as_object_mut() {
                    n.remove("choices");
                }
            }
        }
        values.insert(h.name.clone(), value.clone());
    }
    let request = Request {
        name: None,
        package: None,
        remote: Some(at),
        values,
    };
    let planned = plan_remote(&new, &request, at).map_err(cannot_keep)?.spec;
    // A kept secret goes only where it was given for.
    if kept_secrets && planned.remote_origin() != current.remote_origin() {
        return Err(refuse(
            "version",
            format!(
                "{version} reaches another origin than the installed one ({}): its secret headers are not sent there; install it again with its values",
                planned.remote_origin().unwrap_or_default()
            ),
        ));
    }
    let mut remote = planned.remote.expect("a remote plan has a remote");
    for h in &mut remote.headers {
        let was = installed.headers.iter().find(|c| c.name == h.name);
        if was.is_some_and(|c| c.stored_secret) {
            h.secret_value = None;
            h.value = None;
            h.stored_secret = true;
        }
    }
    Ok(McpServerSpec {
        remote: Some(remote),
        registry: planned.registry,
        ..current.clone()
    })
}

/// Why an upgrade's plan failed: the new version cannot keep what was installed.
fn cannot_keep(e: InstallError) -> InstallError {
    refuse(
        "version",
        format!("the new version cannot keep what was installed: {e}"),
    )
}

/// The variables a package of `server` declares.
fn variables(server: &Value, package: usize) -> Vec<Value> {
    server["packages"][package]["environmentVariables"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Checks a package name for what npx, uvx or a container runtime would read as an option
/// or a second argument.
fn package_ref(kind: Option<&str>, identifier: &str) -> Result<(), &'static str> {
    let ok = |c: char, extra: &str| c.is_ascii_alphanumeric() || extra.contains(c);
    let fine = match kind {
        // `@scope/name`, as npm names are.
        Some("npm") => {
            let bare = identifier.strip_prefix('@').unwrap_or(identifier);
            let parts: Vec<&str> = bare.split('/').collect();
            parts.len() == (1 + usize::from(identifier.starts_with('@')))
                && parts.iter().all(|p| {
                    p.starts_with(|c: char| c.is_ascii_alphanumeric())
                        && p.chars().all(|c| ok(c, "-._~"))
                })
        }
        Some("pypi") => {
            identifier.starts_with(|c: char| c.is_ascii_alphanumeric())
                && identifier.chars().all(|c| ok(c, "-._"))
        }
        _ => {
            identifier.starts_with(|c: char| c.is_ascii_alphanumeric())
                && identifier.chars().all(|c| ok(c, "-._/:@"))
        }
    };
    if fine && identifier.len() <= 256 {
        Ok(())
    } else {
        Err(
            "is not a package name this gateway runs (letters, digits and -._ only, starting with a letter or digit; npm scopes and image paths allowed)",
        )
    }
}

/// Variables a catalog entry may not set: they change how npx, uvx, the runtime or the
/// loader behave (another package index, code loaded first), which the gateway decides.
const RESERVED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "NODE_OPTIONS",
    "NODE_PATH",
    "NODE_EXTRA_CA_CERTS",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "BASH_ENV",
    "ENV",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    // Where the runners download from, and whether they check whom they talk to.
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "NODE_TLS_REJECT_UNAUTHORIZED",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    // Code the interpreter runs besides the package's: Python imports the module a
    // `PYTHONWARNINGS` category names at start (`ignore::antigravity.X` opens the page
    // `BROWSER` names, and `BROWSER` is a command line), and calls `PYTHONBREAKPOINT`'s.
    "PYTHONWARNINGS",
    "PYTHONBREAKPOINT",
    "BROWSER",
    // Commands git runs when npm or uv fetch a git dependency.
    "GIT_SSH",
    "GIT_SSH_COMMAND",
    "GIT_ASKPASS",
    "SSH_ASKPASS",
    "GIT_EXEC_PATH",
    "GIT_PROXY_COMMAND",
];
const RESERVED_ENV_PREFIXES: &[&str] = &[
    // `GIT_CONFIG_COUNT`/`_KEY_n`/`_VALUE_n`, `GIT_CONFIG_PARAMETERS`, `GIT_CONFIG_GLOBAL`:
    // any git setting, `core.sshCommand` and aliases (`!cmd`) included.
    "GIT_CONFIG",
    "NPM_CONFIG_",
    "NPX_",
    "COREPACK_",
    "UV_",
    "PIP_",
    "LD_",
    "DYLD_",
    "GATEHOUSE_",
    "XDG_",
];

/// Checks a variable a catalog entry declares: a plain name, and none the gateway reserves.
fn env_name(name: &str) -> Result<(), String> {
    let plain = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 128;
    if !plain {
        return Err(format!(
            "{name:?} is not a variable name (letters, digits and _)"
        ));
    }
    if reserved(name) {
        return Err(format!(
            "{name} changes how the package runs, which the gateway decides; an entry may not set it"
        ));
    }
    Ok(())
}

/// Whether the gateway reserves variable `name` (any case): see [`RESERVED_ENV`].
fn reserved(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    RESERVED_ENV.contains(&upper.as_str())
        || RESERVED_ENV_PREFIXES.iter().any(|p| upper.starts_with(p))
}

/// Whether `spec` runs package `pkg` (any version of it): as npx's or uvx's package, or as
/// its image.
fn runs_package(spec: &McpServerSpec, pkg: &Value) -> bool {
    let Some(id) = pkg["identifier"].as_str() else {
        return false;
    };
    // The identifier, then nothing or a version after its separator (not a longer name).
    let names = |r: &str, sep: &str| {
        r.strip_prefix(id)
            .is_some_and(|v| v.is_empty() || v.starts_with(sep))
    };
    match pkg["registryType"].as_str() {
        Some("npm") => {
            spec.command.as_deref() == Some("npx")
                && spec.args.get(1).is_some_and(|a| names(a, "@"))
        }
        Some("pypi") => {
            spec.command.as_deref() == Some("uvx")
                && spec.args.first().is_some_and(|a| names(a, "=="))
        }
        Some("oci") => spec
            .image
            .as_deref()
            .is_some_and(|i| names(i, ":") || names(i, "@")),
        _ => false,
    }
}

/// Refuses a template that would put a secret variable's value in the open.
/// Refuses text Kubernetes would expand from the server's environment (`$(NAME)`), its
/// secrets among it, in an argument or a variable's value.
fn no_expansion(value: &str) -> Result<(), String> {
    match value.contains("$(") {
        true => Err(
            "contains \"$(\", which Kubernetes expands from the server's environment (its secrets among it)".into(),
        ),
        false => Ok(()),
    }
}

fn no_secret_in(template: Option<&str>, secrets: &[String]) -> Result<(), String> {
    let Some(template) = template else {
        return Ok(());
    };
    match secrets
        .iter()
        .find(|s| template.contains(&format!("{{{s}}}")))
    {
        Some(s) => Err(format!(
            "uses the secret variable {s}, which would show in the command line; the server reads it from its environment"
        )),
        None => Ok(()),
    }
}

/// Checks a package version the same way.
fn version_ref(version: &str) -> Result<(), &'static str> {
    if version.len() <= 128
        && version.starts_with(|c: char| c.is_ascii_alphanumeric())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._+".contains(c))
    {
        Ok(())
    } else {
        Err(
            "is not a version this gateway runs (letters, digits and -._+ only, starting with a letter or digit)",
        )
    }
}

/// Whether an image reference names a tag (a `:` after the last `/`).
fn tag_of(image: &str) -> bool {
    image
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':'))
}

/// An input's value: the installer's (`given`), else the document's fixed `value`, else its
/// `default`.
fn input_value(given: Option<&String>, input: &Value) -> Option<String> {
    given
        .cloned()
        .or_else(|| input["value"].as_str().map(str::to_string))
        .or_else(|| input["default"].as_str().map(str::to_string))
}

/// Refuses `value` for input `name` when the document lists `choices` without it.
fn chosen(name: &str, input: &Value, value: &str) -> Result<(), InstallError> {
    match input["choices"].as_array() {
        Some(choices) if !choices.iter().any(|c| c == value) => Err(refuse(
            format!("values.{name}"),
            format!(
                "must be one of {}",
                serde_json::to_string(choices).unwrap_or_default()
            ),
        )),
        _ => Ok(()),
    }
}

/// Fills every `{name}` of `template` from `values`, in one pass (a value naming another
/// variable stays as given); `None` when one has no value.
fn fill(template: &str, values: &BTreeMap<String, String>) -> Option<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}')? + open;
        out.push_str(values.get(&rest[open + 1..close])?);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// Replaces `{NAME}` with known values (unknown ones stay as written).
fn substitute(template: &str, known: &BTreeMap<String, String>) -> String {
    let mut out = template.to_string();
    for (k, v) in known {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// The port and path of a local URL (`http://localhost:3001/mcp` → 3001, `/mcp`).
fn port_and_path(url: &str) -> Option<(u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (_, port) = authority.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    Some((port, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn everything() -> Value {
        super::super::default_documents()
            .into_iter()
            .find(|d| d["name"] == "io.github.modelcontextprotocol/server-everything")
            .unwrap()
    }

    fn with_http(mut doc: Value) -> Value {
        doc["packages"].as_array_mut().unwrap().push(json!({
            "registryType": "npm", "identifier": "@modelcontextprotocol/server-everything",
            "version": "2.0.0", "runtimeHint": "npx",
            "packageArguments": [{"type": "positional", "value": "streamableHttp", "valueHint": "transport"}],
            "environmentVariables": [
                {"name": "PORT", "description": "Port the local HTTP server binds to.", "default": "3001"},
                {"name": "API_KEY", "isSecret": true, "isRequired": true},
                {"name": "MODE", "choices": ["fast", "safe"], "default": "safe"}
            ],
            "transport": {"type": "streamable-http", "url": "http://localhost:{PORT}/mcp"}
        }));
        doc
    }

    #[test]
    fn npm_pypi_and_oci_packages_become_definitions_that_resolve() {
        let def = plan(
            &everything(),
            &Request::default(),
            &Runners::of(&crate::config::RegistryConfig::default()),
        )
        .unwrap();
        assert_eq!(def.name, "server-everything");
        assert_eq!(def.spec.command.as_deref(), Some("npx"));
        assert_eq!(
            def.spec.args,
            [
                "-y",
                "@modelcontextprotocol/server-everything@2026.8.31",
                "stdio"
            ]
        );
        assert_eq!(def.spec.image.as_deref(), Some("node:22-alpine"));
        assert!(def.resolve_declared().is_ok(), "an admin-API definition");

        let docs = super::super::default_documents();
        let fetch = docs
            .iter()
            .find(|d| d["name"] == "io.github.modelcontextprotocol/server-fetch")
            .unwrap();
        let def = plan(
            fetch,
            &Request::default(),
            &Runners::of(&crate::config::RegistryConfig::default()),
        )
        .unwrap();
        assert_eq!(
            (def.spec.command.as_deref(), def.spec.args.as_slice()),
            (
                Some("uvx"),
                &["mcp-server-fetch==2026.10.24".to_string()][..]
            )
        );
        assert!(def.resolve_declared().is_ok());

        let example = docs
            .iter()
            .find(|d| d["name"] == "dev.gatehouse/example-server")
            .unwrap();
        let def = plan(
            example,
            &Request::default(),
            &Runners::of(&crate::config::RegistryConfig::default()),
        )
        .unwrap();
        assert_eq!(def.spec.image.as_deref(), Some("gatehouse:0.1.0"));
        assert_eq!(def.spec.command, None);
        assert_eq!(def.spec.args, ["example-server"]);
        assert_eq!(def.name, "example-server");
    }

    /// An argument Kubernetes would expand from the environment (`$(API_KEY)`) is refused,
    /// whether the document writes it as the value, the default or the name, or an installer's
    /// value brings it.
    #[test]
    fn arguments_that_kubernetes_expands_are_refused() {
        let runners = Runners::of(&crate::config::RegistryConfig::default());
        // (the package's arguments, a plain variable's default, the installer's PORT, where)
        let cases = [
            (
                json!([{"type": "positional", "value": "$(API_KEY)"}]),
                None,
                None,
                "packageArguments[0]",
            ),
            (
                json!([{"type": "positional", "default": "--key=$(API_KEY)"}]),
                None,
                None,
                "packageArguments[0]",
            ),
            (
                json!([{"type": "named", "name": "--k$(API_KEY)", "value": "x"}]),
                None,
                None,
                "packageArguments[0]",
            ),
            // A plain variable's value is expanded too (from the variables before it).
            (
                json!([]),
                Some("http://$(API_KEY)@proxy.example"),
                None,
                "values.UPSTREAM_URL",
            ),
            (
                json!([{"type": "positional", "value": "{PORT}"}]),
                None,
                Some("$(API_KEY)"),
                "values.PORT",
            ),
        ];
        for (args, proxy, port, at) in cases {
            let mut doc = with_http(everything());
            doc["packages"][1]["packageArguments"] = args.clone();
            if let Some(proxy) = proxy {
                doc["packages"][1]["environmentVariables"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "UPSTREAM_URL", "default": proxy}));
            }
            let mut request = Request {
                package: Some(1),
                ..Request::default()
            };
            request.values.insert("API_KEY".into(), "k-123".into());
            if let Some(port) = port {
                request.values.insert("PORT".into(), port.into());
            }
            let e = plan(&doc, &request, &runners).unwrap_err().to_string();
            assert!(e.contains(at) && e.contains("$("), "{args} {proxy:?}: {e}");
            assert!(!e.contains("k-123"), "{e}");
        }
    }

    #[test]
    fn values_are_checked_and_secrets_stay_secret() {
        let doc = with_http(everything());
        let req = |values: &[(&str, &str)]| Request {
            package: Some(1),
            values: values
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Request::default()
        };
        let r = Runners::of(&crate::config::RegistryConfig::default());
        assert_eq!(
            plan(&doc, &req(&[]), &r).unwrap_err().field,
            "values.API_KEY"
        );
        assert_eq!(
            plan(&doc, &req(&[("API_KEY", "k"), ("MODE", "reckless")]), &r)
                .unwrap_err()
                .field,
            "values.MODE"
        );
        assert_eq!(
            plan(&doc, &req(&[("API_KEY", "k"), ("NOPE", "x")]), &r)
                .unwrap_err()
                .field,
            "values.NOPE"
        );
        let def = plan(&doc, &req(&[("API_KEY", "s3cret"), ("PORT", "4100")]), &r).unwrap();
        assert_eq!(def.spec.transport.kind, TransportKind::StreamableHttp);
        assert_eq!(def.spec.transport.port, Some(4100));
        assert_eq!(def.spec.transport.path.as_deref(), Some("/mcp"));
        let key = def.spec.env.iter().find(|e| e.name == "API_KEY").unwrap();
        assert_eq!(
            (key.value.as_deref(), key.secret_value.as_deref()),
            (None, Some("s3cret"))
        );
        let mode = def.spec.env.iter().find(|e| e.name == "MODE").unwrap();
        assert_eq!(mode.value.as_deref(), Some("safe"), "the default");
        assert!(def.resolve_declared().is_ok());
        assert_eq!(
            plan(
                &doc,
                &Request {
                    package: Some(9),
                    ..Request::default()
                },
                &r
            )
            .unwrap_err()
            .field,
            "package"
        );
    }

    #[test]
    fn package_runners_get_the_operators_environment_and_images_do_not() {
        let mut runners = runners();
        runners.env = BTreeMap::from([
            ("UV_NATIVE_TLS".to_string(), "true".to_string()),
            ("PATH".to_string(), "/opt/uv/bin:/usr/bin".to_string()),
            ("LEVEL".to_string(), "operator".to_string()),
        ]);
        let vars =
            json!([{"name": "LEVEL", "default": "entry"}, {"name": "KEY", "isSecret": true}]);
        let mut values = BTreeMap::new();
        values.insert("KEY".to_string(), "s3cret".to_string());
        let request = Request {
            values,
            ..Request::default()
        };
        let doc = entry(
            "1.0.0",
            vars.clone(),
            json!([{"type": "named", "name": "--level", "value": "{LEVEL}"}]),
        );
        let def = plan(&doc, &request, &runners).unwrap();
        assert_eq!(
            def.spec.args[def.spec.args.len() - 2..],
            ["--level", "operator"],
            "an argument naming the package's variable gets the operator's value"
        );
        let env = |spec: &McpServerSpec| -> Vec<(String, Option<String>)> {
            spec.env
                .iter()
                .map(|e| (e.name.clone(), e.value.clone()))
                .collect()
        };
        let pair = |n: &str, v: Option<&str>| (n.to_string(), v.map(str::to_string));
        // The operator's LEVEL wins over the entry's (an imported document must not replace
        // the operator's settings); the secret stays secret; the runner's variables are plain.
        assert_eq!(
            env(&def.spec),
            [
                pair("KEY", None),
                pair("LEVEL", Some("operator")),
                pair("PATH", Some("/opt/uv/bin:/usr/bin")),
                pair("UV_NATIVE_TLS", Some("true")),
            ]
        );
        assert_eq!(def.spec.command.as_deref(), Some("uvx"));
        assert_eq!(
            def.spec.registry.as_ref().unwrap().runner_env,
            ["LEVEL", "PATH", "UV_NATIVE_TLS"]
        );
        // Nor may the installer set what the operator sets.
        let mut values = request.values.clone();
        values.insert("LEVEL".to_string(), "mine".to_string());
        let e = plan(
            &doc,
            &Request {
                values,
                ..Request::default()
            },
            &runners,
        )
        .unwrap_err();
        assert_eq!(e.field, "values.LEVEL", "{e}");

        // An upgrade takes the operator's current runner variables: one dropped since goes,
        // and none is taken for an installer's choice.
        let mut later = runners.clone();
        later.env.remove("PATH");
        later
            .env
            .insert("UV_NATIVE_TLS".to_string(), "false".to_string());
        let up = upgrade(
            &def.spec,
            Some(&doc),
            &entry("1.1.0", vars, json!([])),
            &later,
        )
        .unwrap();
        assert_eq!(
            env(&up),
            [
                pair("KEY", None),
                pair("LEVEL", Some("operator")),
                pair("UV_NATIVE_TLS", Some("false")),
            ]
        );
        assert_eq!(up.registry.unwrap().runner_env, ["LEVEL", "UV_NATIVE_TLS"]);

        // An image runs as it is built: the runner's environment is not its business.
        let oci = json!({"name": "io.example/img", "version": "1.0.0",
            "packages": [{"registryType": "oci", "identifier": "ghcr.io/x/img", "version": "1.0.0",
                "transport": {"type": "stdio"}}]});
        let def = plan(&oci, &Request::default(), &runners).unwrap();
        assert!(def.spec.env.is_empty(), "{:?}", def.spec.env);
    }

    /// A remote with a URL variable, a header made from a secret variable, and a plain one.
    fn remote_entry() -> Value {
        json!({"name": "com.example/remote", "description": "r", "version": "1.0.0",
            "remotes": [
                {"type": "streamable-http", "url": "https://{tenant}.example.com/mcp",
                 "variables": {"tenant": {"isRequired": true}},
                 "headers": [
                    {"name": "Authorization", "value": "Bearer {token}", "isRequired": true,
                     "variables": {"token": {"isRequired": true, "isSecret": true}}},
                    {"name": "X-Region", "default": "eu", "choices": ["eu", "us"]},
                    {"name": "X-Team"}]},
                {"type": "sse", "url": "https://sse.example.com/sse"}]})
    }

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_remote_becomes_its_url_with_its_headers_and_secrets_stay_secret() {
        let entry = remote_entry();
        let request = Request {
            values: values(&[("tenant", "acme"), ("token", "s3cret")]),
            ..Request::default()
        };
        // No package: the first remote.
        let def = plan(&entry, &request, &runners()).unwrap();
        assert_eq!(def.name, "remote");
        let remote = def.spec.remote.as_ref().unwrap();
        assert_eq!(remote.url, "https://acme.example.com/mcp");
        assert_eq!(remote.kind, RemoteKind::StreamableHttp);
        assert_eq!(remote.headers[0].name, "Authorization");
        assert_eq!(
            remote.headers[0].secret_value.as_deref(),
            Some("Bearer s3cret")
        );
        assert_eq!(remote.headers[0].value, None, "made from a secret: secret");
        assert_eq!(
            remote.headers[1].value.as_deref(),
            Some("eu"),
            "its default"
        );
        assert_eq!(def.spec.registry.as_ref().unwrap().remote, Some(0));
        assert!(def.spec.image.is_none() && def.spec.command.is_none());
        // What it plans is a valid definition.
        def.resolve_declared().unwrap();

        let second = Request {
            remote: Some(1),
            ..Request::default()
        };
        let def = plan(&entry, &second, &runners()).unwrap();
        assert_eq!(def.spec.remote.unwrap().kind, RemoteKind::Sse);

        // The whole header given instead of its variable.
        let whole = Request {
            values: values(&[("tenant", "acme"), ("Authorization", "Token t")]),
            ..Request::default()
        };
        let def = plan(&entry, &whole, &runners()).unwrap();
        let h = &def.spec.remote.unwrap().headers[0];
        assert_eq!(h.secret_value.as_deref(), Some("Token t"));
        // What the installer gives is kept secret, whatever the document says of it; a
        // choice among the document's own values is not.
        let given = Request {
            values: values(&[
                ("tenant", "acme"),
                ("token", "t"),
                ("X-Region", "us"),
                ("X-Team", "blue"),
            ]),
            ..Request::default()
        };
        let def = plan(&entry, &given, &runners()).unwrap();
        let headers = def.spec.remote.unwrap().headers;
        let pair = |h: &HeaderSpec| (h.value.clone(), h.secret_value.clone());
        assert_eq!(pair(&headers[1]), (Some("us".into()), None));
        assert_eq!(pair(&headers[2]), (None, Some("blue".into())));
    }

    #[test]
    fn remote_values_cannot_move_the_url_or_break_a_header() {
        let entry = remote_entry();
        let try_plan = |pairs: &[(&str, &str)], remote: Option<usize>| {
            plan(
                &entry,
                &Request {
                    values: values(pairs),
                    remote,
                    ..Request::default()
                },
                &runners(),
            )
            .unwrap_err()
        };
        let ok = [("tenant", "acme"), ("token", "t")];
        let plan_ok = |doc: &Value| {
            plan(
                doc,
                &Request {
                    values: values(&ok),
                    ..Request::default()
                },
                &runners(),
            )
        };
        for (pairs, field) in [
            // Another host, a path, a query, credentials: none through a URL variable.
            (
                vec![("tenant", "evil.com/x?"), ("token", "t")],
                "values.tenant",
            ),
            (vec![("tenant", "a@b"), ("token", "t")], "values.tenant"),
            (
                vec![("tenant", "169.254.169.254#"), ("token", "t")],
                "values.tenant",
            ),
            (vec![("tenant", ""), ("token", "t")], "values.tenant"),
            (vec![("tenant", ".."), ("token", "t")], "values.tenant"),
            (vec![("tenant", "{token}"), ("token", "t")], "values.tenant"),
            (vec![("token", "t")], "values.tenant"),
            (vec![("tenant", "acme")], "values.token"),
            // A header split in two.
            (
                vec![
                    ("tenant", "acme"),
                    (
                        "token",
                        "t
X-Evil: 1",
                    ),
                ],
                "values.Authorization",
            ),
            (
                vec![("tenant", "acme"), ("token", "t"), ("X-Region", "mars")],
                "values.X-Region",
            ),
            (
                vec![("tenant", "acme"), ("token", "t"), ("NOPE", "x")],
                "values.NOPE",
            ),
        ] {
            let e = try_plan(&pairs, None);
            assert_eq!(e.field, field, "{pairs:?}: {e}");
            assert!(!e.message.contains("X-Evil"), "values are not echoed: {e}");
        }
        assert_eq!(try_plan(&ok, Some(7)).field, "remote");
        let both = plan(
            &entry,
            &Request {
                values: values(&ok),
                remote: Some(0),
                package: Some(0),
                ..Request::default()
            },
            &runners(),
        )
        .unwrap_err();
        assert_eq!(both.field, "remote");
        // A secret URL variable is the document's error.
        let mut secret_url = remote_entry();
        secret_url["remotes"][0]["variables"]["tenant"]["isSecret"] = json!(true);
        let e = plan_ok(&secret_url).unwrap_err();
        assert_eq!(e.field, "$.remotes[0].variables.tenant");
        // A name that is secret anywhere in the remote is secret everywhere: not in the URL,
        // not in another header's plain value.
        let mut shared_name = remote_entry();
        shared_name["remotes"][0]["headers"][0]["variables"]["tenant"] = json!({"isSecret": true});
        let e = plan_ok(&shared_name).unwrap_err();
        assert_eq!(e.field, "$.remotes[0].variables.tenant", "{e}");
        let mut shared_name = remote_entry();
        shared_name["remotes"][0]["headers"][1] = json!({"name": "X-Echo", "value": "{token}",
            "variables": {"token": {}}});
        let def = plan_ok(&shared_name).unwrap();
        let echo = &def.spec.remote.unwrap().headers[1];
        assert_eq!(echo.name, "X-Echo");
        assert_eq!(
            (echo.value.as_deref(), echo.secret_value.as_deref()),
            (None, Some("t"))
        );
        // A header the gateway sends itself is the document's error, named where it is.
        let mut reserved = remote_entry();
        reserved["remotes"][0]["headers"][1]["name"] = json!("Mcp-Session-Id");
        let e = plan_ok(&reserved).unwrap_err();
        assert_eq!(e.field, "$.remotes[0].headers[1].name", "{e}");
    }

    #[test]
    fn a_remote_upgrades_in_place_with_its_values_and_stored_secrets_kept() {
        let v1 = remote_entry();
        let request = Request {
            values: values(&[("tenant", "acme"), ("token", "s3cret"), ("X-Region", "us")]),
            ..Request::default()
        };
        let installed = plan(&v1, &request, &runners()).unwrap().spec;
        let source = installed.registry.as_ref().unwrap();
        // Only what stayed plain is kept: the URL's value, the header chosen among choices.
        assert_eq!(
            source.values,
            values(&[("X-Region", "us"), ("tenant", "acme")])
        );
        // As the Kubernetes backend keeps it: the secret header stored apart.
        let mut stored = installed.clone();
        let auth = &mut stored.remote.as_mut().unwrap().headers[0];
        auth.secret_value = None;
        auth.stored_secret = true;

        let mut v2 = remote_entry();
        v2["version"] = json!("2.0.0");
        v2["remotes"][0]["url"] = json!("https://{tenant}.example.com/v2/mcp");
        for current in [&installed, &stored] {
            let up = upgrade(current, Some(&v1), &v2, &runners()).unwrap();
            let remote = up.remote.as_ref().unwrap();
            assert_eq!(remote.url, "https://acme.example.com/v2/mcp");
            assert_eq!(
                remote.headers[0],
                current.remote.as_ref().unwrap().headers[0]
            );
            assert_eq!(remote.headers[1].value.as_deref(), Some("us"));
            let source = up.registry.as_ref().unwrap();
            assert_eq!((source.version.as_str(), source.remote), ("2.0.0", Some(0)));
            assert_eq!(
                source.values,
                values(&[("X-Region", "us"), ("tenant", "acme")])
            );
        }
        // The remote moved in the list: found by its kind.
        let mut moved = v2.clone();
        let remotes = moved["remotes"].as_array_mut().unwrap();
        remotes.reverse();
        let up = upgrade(&stored, Some(&v1), &moved, &runners()).unwrap();
        assert_eq!(up.registry.unwrap().remote, Some(1));
        // A secret header made differently now cannot keep its stored value.
        let mut remade = v2.clone();
        remade["remotes"][0]["headers"][0]["value"] = json!("Token {token}");
        let e = upgrade(&stored, Some(&v1), &remade, &runners()).unwrap_err();
        assert!(e.message.contains("Authorization"), "{e}");
        // No remote of that kind any more; a new required value: said, nothing guessed.
        let mut gone = v2.clone();
        gone["remotes"] = json!([{"type": "sse", "url": "https://sse.example.com/sse"}]);
        let e = upgrade(&stored, Some(&v1), &gone, &runners()).unwrap_err();
        assert!(e.message.contains("streamable-http"), "{e}");
        let mut more = v2.clone();
        more["remotes"][0]["url"] = json!("https://{tenant}.{zone}.example.com/mcp");
        more["remotes"][0]["variables"]["zone"] = json!({"isRequired": true});
        let e = upgrade(&stored, Some(&v1), &more, &runners()).unwrap_err();
        assert!(e.message.contains("values.zone"), "{e}");
        // Kept secrets go only where they were given for: a new version at another origin
        // (a publisher's new host) does not get them, in memory or stored.
        let mut elsewhere = v2.clone();
        elsewhere["remotes"][0]["url"] = json!("https://{tenant}.attacker.example/mcp");
        for current in [&installed, &stored] {
            let e = upgrade(current, Some(&v1), &elsewhere, &runners()).unwrap_err();
            assert!(e.message.contains("another origin"), "{e}");
        }
        // Without the installed version's document the headers cannot be compared.
        let e = upgrade(&stored, None, &v2, &runners()).unwrap_err();
        assert!(e.message.contains("no longer in the catalog"), "{e}");
        // A variable named like a kept secret header would copy it elsewhere.
        let mut copying = v2.clone();
        copying["remotes"][0]["headers"][2] = json!({"name": "X-Team", "value": "{Authorization}", "variables": {"Authorization": {}}});
        let e = upgrade(&installed, Some(&v1), &copying, &runners()).unwrap_err();
        assert!(e.message.contains("named like its secret header"), "{e}");
        // A kept value the new version no longer declares goes (no secret kept here).
        let mut fixed = v2.clone();
        fixed["remotes"][0]["url"] = json!("https://acme.example.com/fixed");
        fixed["remotes"][0]
            .as_object_mut()
            .unwrap()
            .remove("variables");
        let up = upgrade(&stored, Some(&v1), &fixed, &runners()).unwrap();
        assert_eq!(up.remote.unwrap().url, "https://acme.example.com/fixed");
        assert_eq!(up.registry.unwrap().values, values(&[("X-Region", "us")]));
    }

    #[test]
    fn a_value_given_for_a_header_never_goes_into_the_url() {
        let mut entry = remote_entry();
        entry["remotes"][0]["headers"][2] =
            json!({"name": "X-Tenant", "value": "{tenant}", "variables": {"tenant": {}}});
        let request = Request {
            values: values(&[("tenant", "acme"), ("token", "s3cret")]),
            ..Request::default()
        };
        let e = plan(&entry, &request, &runners()).unwrap_err();
        assert_eq!(e.field, "$.remotes[0].variables.tenant", "{e}");
    }

    #[test]
    fn odd_names() {
        assert_eq!(
            default_name("io.github.x/Weather_Server.v2"),
            "weather-server-v2"
        );
        assert_eq!(default_name("io.github.x/9lives"), "mcp-9lives");
    }

    fn runners() -> Runners {
        Runners::of(&crate::config::RegistryConfig::default())
    }

    fn entry(version: &str, vars: Value, args: Value) -> Value {
        json!({
            "name": "io.example/up", "version": version,
            "packages": [{"registryType": "pypi", "identifier": "up-server", "version": version,
                "transport": {"type": "stdio"}, "environmentVariables": vars, "packageArguments": args}]
        })
    }

    #[test]
    fn an_upgrade_gives_the_operator_a_runner_variable_the_installer_had_set() {
        let vars = json!([{"name": "REGION", "default": "eu"}]);
        let values = BTreeMap::from([("REGION".to_string(), "us".to_string())]);
        let request = Request {
            values,
            ..Request::default()
        };
        let doc = entry("1.0.0", vars.clone(), json!([]));
        let def = plan(&doc, &request, &runners()).unwrap();
        let mut later = runners();
        later
            .env
            .insert("REGION".to_string(), "operator".to_string());
        let up = upgrade(
            &def.spec,
            Some(&doc),
            &entry("1.1.0", vars, json!([])),
            &later,
        )
        .expect("the installer's old choice is not passed off as a new one");
        let region: Vec<_> = up.env.iter().filter(|e| e.name == "REGION").collect();
        assert_eq!(region.len(), 1);
        assert_eq!(region[0].value.as_deref(), Some("operator"));
        assert_eq!(up.registry.unwrap().runner_env, ["REGION"]);
    }

    #[test]
    fn an_entry_cannot_steer_the_runner_or_show_a_secret() {
        for name in [
            "NODE_OPTIONS",
            "npm_config_registry",
            "UV_INDEX_URL",
            "LD_PRELOAD",
            "PATH",
            "Pip_Index_Url",
            "https_proxy",
            "NODE_TLS_REJECT_UNAUTHORIZED",
            "XDG_CACHE_HOME",
            "A-B",
            "",
        ] {
            let doc = entry("1.0.0", json!([{"name": name, "default": "x"}]), json!([]));
            let e = plan(&doc, &Request::default(), &runners()).unwrap_err();
            assert_eq!(
                e.field, "$.packages[0].environmentVariables[0].name",
                "{name}: {e}"
            );
        }
        let key = json!([{"name": "API_KEY", "isSecret": true}]);
        let values = Request {
            values: [("API_KEY".to_string(), "s3cret".to_string())].into(),
            ..Request::default()
        };
        let in_args = entry(
            "1.0.0",
            key.clone(),
            json!([{"type": "positional", "value": "--key={API_KEY}"}]),
        );
        let e = plan(&in_args, &values, &runners()).unwrap_err();
        assert_eq!(e.field, "$.packages[0].packageArguments[0]");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let mut in_url = entry("1.0.0", key, json!([]));
        in_url["packages"][0]["transport"] =
            json!({"type": "streamable-http", "url": "http://x:{API_KEY}/mcp"});
        let e = plan(&in_url, &values, &runners()).unwrap_err();
        assert_eq!(e.field, "$.packages[0].transport.url");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn an_upgrade_keeps_choices_secrets_and_the_operators_changes() {
        let vars = json!([
            {"name": "TOKEN", "isSecret": true, "isRequired": true},
            {"name": "LEVEL", "default": "info"},
            {"name": "ZONE", "default": "UTC"}
        ]);
        let v1 = entry("1.0.0", vars, json!([]));
        let request = Request {
            values: [
                ("TOKEN".to_string(), "t0k".to_string()),
                ("ZONE".to_string(), "CET".to_string()),
            ]
            .into(),
            ..Request::default()
        };
        let mut current = plan(&v1, &request, &runners()).unwrap().spec;
        current.env.push(EnvVarSpec {
            name: "OWN".into(),
            value: Some("mine".into()),
            ..EnvVarSpec::default()
        });
        current.idle = Some(crate::orchestrator::idle::IdleSpec {
            after: "15m".into(),
        });
        // v2 lists another package first, defaults LEVEL to debug and no longer says TOKEN is
        // secret.
        let mut v2 = entry(
            "2.0.0",
            json!([
                {"name": "TOKEN", "isRequired": true},
                {"name": "LEVEL", "default": "debug"},
                {"name": "ZONE", "default": "UTC"}
            ]),
            json!([]),
        );
        let pkg = v2["packages"][0].clone();
        v2["packages"] = json!([{"registryType": "npm", "identifier": "other", "transport": {"type": "stdio"}}, pkg]);
        let up = upgrade(&current, Some(&v1), &v2, &runners()).unwrap();
        assert_eq!(up.args, ["up-server==2.0.0"]);
        assert_eq!(
            up.registry.as_ref().unwrap().package,
            1,
            "the same package, found by name"
        );
        let env = |n: &str| up.env.iter().find(|e| e.name == n).unwrap().clone();
        assert_eq!(
            env("TOKEN").secret_value.as_deref(),
            Some("t0k"),
            "still secret"
        );
        assert_eq!(env("TOKEN").value, None);
        assert_eq!(
            env("LEVEL").value.as_deref(),
            Some("debug"),
            "the new default"
        );
        assert_eq!(
            env("ZONE").value.as_deref(),
            Some("CET"),
            "the installer's choice"
        );
        assert_eq!(
            env("OWN").value.as_deref(),
            Some("mine"),
            "the operator's own"
        );
        assert_eq!(up.idle, current.idle);
        let mut gone = v2.clone();
        gone["packages"] = json!([gone["packages"][0].clone()]);
        let e = upgrade(&current, Some(&v1), &gone, &runners()).unwrap_err();
        assert_eq!(e.field, "version");

        // Read back from the backend, the secret is stored (its value not here): it stays
        // stored, a required value the installer is not asked again.
        let (stored, values) = current.clone().without_secret_values();
        assert_eq!(values["TOKEN"], "t0k");
        let up = upgrade(&stored, Some(&v1), &v2, &runners()).unwrap();
        let token = up.env.iter().find(|e| e.name == "TOKEN").unwrap();
        assert_eq!(
            token,
            &EnvVarSpec {
                name: "TOKEN".into(),
                stored_secret: true,
                ..EnvVarSpec::default()
            }
        );
        assert!(!format!("{up:?}").contains("stored-secret"), "{up:?}");
        // A new version that would put it in its arguments cannot have it.
        let mut leaky = v2.clone();
        leaky["packages"][1]["packageArguments"] =
            json!([{"type": "named", "name": "--token", "value": "{TOKEN}"}]);
        let e = upgrade(&stored, Some(&v1), &leaky, &runners()).unwrap_err();
        assert_eq!(e.field, "version", "{e}");
        // Nor with its value at hand (this gateway's own record of the definition).
        let e = upgrade(&current, Some(&v1), &leaky, &runners()).unwrap_err();
        assert!(e.message.contains("TOKEN"), "{e}");
        assert!(!e.message.contains("t0k"), "{e}");
    }
}
