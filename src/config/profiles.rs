//! Profiles as configured (`profiles:` and `mcp.root_access`): what each shows and to whom,
//! checked field by field. [`crate::mcp::profile`] compiles them for the request path.

use serde::Deserialize;

/// Who is granted a profile (or the root endpoint): a caller that matches any one list.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grantees {
    /// Every caller, authenticated or not (when authentication is off, the only way in).
    #[serde(default)]
    pub everyone: bool,
    /// Principals, exactly.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Groups an access token lists.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Scopes an access token grants (a broader scope covers narrower ones). Static tokens
    /// grant no scopes: name their principals instead.
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl Grantees {
    /// Whether it grants no one.
    pub fn is_empty(&self) -> bool {
        !self.everyone
            && self.principals.is_empty()
            && self.groups.is_empty()
            && self.scopes.is_empty()
    }
}

/// One profile, as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// The name in its URL (`/mcp/{name}`): letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// What it is for (its protected-resource metadata's `resource_name`).
    #[serde(default)]
    pub description: Option<String>,
    /// Who may use it.
    pub grant: Grantees,
    /// Its servers, and what of each it shows.
    pub servers: Vec<ProfileServer>,
}

/// One server of a profile. A list left out shows everything of its kind; an empty list shows
/// nothing of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileServer {
    /// The server's name.
    pub name: String,
    /// The tools shown (by the server's own names).
    #[serde(default)]
    pub tools: Option<Vec<ProfileTool>>,
    /// Prompt-name globs.
    #[serde(default)]
    pub prompts: Option<Vec<String>>,
    /// Resource-URI (and URI template) globs.
    #[serde(default)]
    pub resources: Option<Vec<String>>,
}

/// One tool of a profile: a name (or a glob, without overrides) and what the profile changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileTool {
    /// The server's own name for it (a glob shows every tool it matches, unchanged).
    pub name: String,
    /// The name the profile's callers see and call it by (instead of the prefixed one).
    #[serde(default)]
    pub rename: Option<String>,
    /// A title in place of the server's.
    #[serde(default)]
    pub title: Option<String>,
    /// A description in place of the server's.
    #[serde(default)]
    pub description: Option<String>,
    /// Annotations merged over the server's (a key set here wins).
    #[serde(default)]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ProfileConfig {
    /// The server and the server's own name of the tool renamed `public`, if one is.
    pub fn renamed_tool(&self, public: &str) -> Option<(&str, &str)> {
        self.servers.iter().find_map(|s| {
            s.tools
                .iter()
                .flatten()
                .find(|t| t.rename.as_deref() == Some(public))
                .map(|t| (s.name.as_str(), t.name.as_str()))
        })
    }
}

impl ProfileTool {
    fn overrides(&self) -> bool {
        self.rename.is_some()
            || self.title.is_some()
            || self.description.is_some()
            || self.annotations.is_some()
    }
}

/// A profile setting that is wrong, named by its path.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ProfileError {
    /// The path of the bad field (`profiles[0].servers[1].name`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn error(field: String, reason: impl Into<String>) -> ProfileError {
    ProfileError {
        field,
        reason: reason.into(),
    }
}

/// Longest profile name (it is a URL path segment and a metadata URL's).
const MAX_NAME: usize = 64;

/// Checks every profile: names unique and URL-safe, grants that grant someone, servers listed
/// once, renames unique and plain, overrides only on exact names.
pub fn validate(profiles: &[ProfileConfig]) -> Result<(), ProfileError> {
    let mut names = std::collections::HashSet::new();
    for (p, profile) in profiles.iter().enumerate() {
        let at = format!("profiles[{p}]");
        let name = &profile.name;
        let url_safe = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if name.is_empty() || name.len() > MAX_NAME || !url_safe || name == "." || name == ".." {
            return Err(error(
                format!("{at}.name"),
                format!(
                    "{name:?} must be 1 to {MAX_NAME} letters, digits, '.', '_' or '-' (it is a URL path segment)"
                ),
            ));
        }
        if !names.insert(name.as_str()) {
            return Err(error(
                format!("{at}.name"),
                format!("profile {name:?} is defined twice"),
            ));
        }
        if profile.grant.is_empty() {
            return Err(error(
                format!("{at}.grant"),
                "grants no one: list principals, groups or scopes, or set everyone: true",
            ));
        }
        if profile.servers.is_empty() {
            return Err(error(format!("{at}.servers"), "at least one server"));
        }
        let mut servers = std::collections::HashSet::new();
        let mut renames = std::collections::HashSet::new();
        for (s, server) in profile.servers.iter().enumerate() {
            let at = format!("{at}.servers[{s}]");
            if !servers.insert(server.name.as_str()) {
                return Err(error(
                    format!("{at}.name"),
                    format!("server {:?} is listed twice in this profile", server.name),
                ));
            }
            let mut tools = std::collections::HashSet::new();
            for (t, tool) in server.tools.iter().flatten().enumerate() {
                let at = format!("{at}.tools[{t}]");
                if tool.name.is_empty() {
                    return Err(error(format!("{at}.name"), "must not be empty"));
                }
                if !tools.insert(tool.name.as_str()) {
                    return Err(error(
                        format!("{at}.name"),
                        format!("tool {:?} is listed twice for this server", tool.name),
                    ));
                }
                let glob = tool.name.contains(['*', '?']);
                if glob && tool.overrides() {
                    return Err(error(
                        format!("{at}.name"),
                        format!(
                            "{:?} is a glob: rename and overrides apply to one tool, named exactly",
                            tool.name
                        ),
                    ));
                }
                if let Some(rename) = &tool.rename {
                    let plain = !rename.is_empty()
                        && rename.len() <= 128
                        && rename
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
                    if !plain {
                        return Err(error(
                            format!("{at}.rename"),
                            format!(
                                "{rename:?} must be 1 to 128 letters, digits, '.', '_', '-' or '/'"
                            ),
                        ));
                    }
                    if !renames.insert(rename.as_str()) {
                        return Err(error(
                            format!("{at}.rename"),
                            format!("two tools of this profile are renamed {rename:?}"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Profiles read from YAML and checked, as the config does (for tests).
#[cfg(test)]
pub(crate) fn from_yaml(yaml: &str) -> Result<Vec<ProfileConfig>, String> {
    let p: Vec<ProfileConfig> = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
    validate(&p).map_err(|e| e.to_string())?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::from_yaml as profile;

    #[test]
    fn bad_profiles_are_named() {
        let cases = [
            (
                "- {name: 'a/b', grant: {everyone: true}, servers: [{name: s}]}",
                "profiles[0].name",
            ),
            (
                "- {name: a, grant: {}, servers: [{name: s}]}",
                "profiles[0].grant",
            ),
            (
                "- {name: a, grant: {everyone: true}, servers: []}",
                "profiles[0].servers",
            ),
            (
                "- {name: a, grant: {everyone: true}, servers: [{name: s}]}\n- {name: a, grant: {everyone: true}, servers: [{name: s}]}",
                "profiles[1].name",
            ),
            (
                "- {name: a, grant: {everyone: true}, servers: [{name: s}, {name: s}]}",
                "profiles[0].servers[1].name",
            ),
            (
                "- {name: a, grant: {everyone: true}, servers: [{name: s, tools: [{name: 'x*', rename: y}]}]}",
                "profiles[0].servers[0].tools[0].name",
            ),
            (
                "- {name: a, grant: {everyone: true}, servers: [{name: s, tools: [{name: x, rename: 'y z'}]}]}",
                "profiles[0].servers[0].tools[0].rename",
            ),
            (
                "- {name: a, grant: {everyone: true}, servers: [{name: s, tools: [{name: x, rename: y}]}, {name: t, tools: [{name: x, rename: y}]}]}",
                "profiles[0].servers[1].tools[0].rename",
            ),
            (
                "- {name: a, grant: {everyone: true}, servers: [{name: s, tools: [{name: x, rename: y}, {name: x}]}]}",
                "profiles[0].servers[0].tools[1].name",
            ),
        ];
        for (yaml, field) in cases {
            let e = profile(yaml).unwrap_err();
            assert!(e.starts_with(field), "{yaml}: {e}");
        }
    }
}
