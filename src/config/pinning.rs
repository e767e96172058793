//! Tool-definition pinning settings (`pinning:`); [`crate::pins`] keeps the pins.

use std::path::PathBuf;

use serde::Deserialize;

/// What a flagged tool gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnChange {
    /// Hidden from listings and refused when called, until approved.
    #[default]
    Block,
    /// Listed and callable; the change is only recorded.
    Warn,
}

/// How a tool seen for the first time is approved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApproveNew {
    /// Its first definition is approved as seen (trust on first use).
    #[default]
    FirstSight,
    /// It waits for an operator, like a changed one.
    Admin,
}

/// The ConfigMap pins are kept in on Kubernetes when the settings name neither it nor a file.
pub const DEFAULT_CONFIG_MAP: &str = "gatehouse-pins";

/// Pinning settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinningConfig {
    /// A file pins are kept in. Without it, on Kubernetes they are kept in a ConfigMap
    /// (shared by the replicas); elsewhere they last as long as the process.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// The ConfigMap (in the servers' namespace) pins are kept in on Kubernetes
    /// (default [`DEFAULT_CONFIG_MAP`]).
    #[serde(default)]
    pub config_map: Option<String>,
    /// What a flagged tool gets.
    #[serde(default)]
    pub on_change: OnChange,
    /// How a new tool is approved.
    #[serde(default)]
    pub approve_new: ApproveNew,
}

impl PinningConfig {
    /// Checks the settings: `Err` names the field at fault and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(name) = &self.config_map {
            if self.file.is_some() {
                return Err((
                    "pinning.config_map",
                    "pins are kept in a file or a ConfigMap, not both".into(),
                ));
            }
            // A ConfigMap's name is a DNS subdomain (RFC 1123).
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                });
            if !valid {
                return Err((
                    "pinning.config_map",
                    format!(
                        "{name:?} is not a ConfigMap name (lowercase letters, digits, '-' and '.', at most 253)"
                    ),
                ));
            }
        }
        Ok(())
    }
}
