//! Profiles embedded in the binary, so `--profile analyze-only` works on a host where
//! nothing is installed. The files in `profiles/` are the source; a test parses each.

pub const BUILTIN: &[(&str, &str)] = &[
    (
        "analyze-only",
        include_str!("../../../profiles/analyze-only.toml"),
    ),
    (
        "claude-code",
        include_str!("../../../profiles/claude-code.toml"),
    ),
    ("codex", include_str!("../../../profiles/codex.toml")),
    (
        "coding-agent",
        include_str!("../../../profiles/coding-agent.toml"),
    ),
    (
        "gemini-cli",
        include_str!("../../../profiles/gemini-cli.toml"),
    ),
    (
        "offline-build",
        include_str!("../../../profiles/offline-build.toml"),
    ),
];

pub fn builtin(name: &str) -> Option<&'static str> {
    BUILTIN
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}
