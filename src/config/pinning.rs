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

/// Pinning settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinningConfig {
    /// Where pins are kept (without one they last as long as the process).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// What a flagged tool gets.
    #[serde(default)]
    pub on_change: OnChange,
    /// How a new tool is approved.
    #[serde(default)]
    pub approve_new: ApproveNew,
}
