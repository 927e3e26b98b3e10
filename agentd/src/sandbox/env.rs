//! The agent's environment: exactly what the profile passes or sets, plus
//! `AGENTD_AGENT_ID`. Nothing else of agentd's environment reaches the agent.

use std::ffi::OsString;

use serde::Serialize;

use super::identity::Resolved;
use crate::profile::EnvPolicy;

/// Set for every agent: its id, for the agent's own logs.
pub const AGENT_ID_VAR: &str = "AGENTD_AGENT_ID";

/// Where a variable's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `environment.pass`: copied from agentd's environment.
    Passed,
    /// `environment.set`.
    Set,
    /// HOME, USER and LOGNAME, when passed, describe the agent's identity, not agentd's
    /// (under sudo, agentd's are root's).
    Identity,
    /// Set by agentd.
    Agentd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Var {
    pub name: String,
    pub value: OsString,
    pub source: Source,
}

/// `{name, source, value}`; the value only when agentd chose it (set, identity, agentd):
/// passed values come from the invoker's environment and may be secrets, so `--dry-run`
/// output (often pasted into logs) names them without showing them.
impl Serialize for Var {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let shown = match self.source {
            Source::Passed => None,
            Source::Set | Source::Identity | Source::Agentd => Some(self.value.to_string_lossy()),
        };
        let mut st = s.serialize_struct("Var", 3)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("source", &self.source)?;
        st.serialize_field("value", &shown)?;
        st.end()
    }
}

/// Whether `name` may never reach an agent, whatever the profile says: the dynamic
/// loader's variables run code before the program's own (validation refuses them in
/// profiles too; this is the launch's own check).
pub fn forbidden(name: &str) -> bool {
    name.starts_with("LD_") || name.is_empty() || name.contains('=') || name.contains('\0')
}

/// The agent's environment, sorted by name. `lookup` reads agentd's environment.
pub fn build(
    policy: &EnvPolicy,
    lookup: impl Fn(&str) -> Option<OsString>,
    identity: &Resolved,
    agent_id: &str,
) -> Vec<Var> {
    let mut vars: std::collections::BTreeMap<String, (OsString, Source)> = Default::default();
    let account = (!identity.user.starts_with("uid ")).then_some(identity.user.as_str());
    for name in policy.pass.iter().filter(|n| !forbidden(n)) {
        let from_identity = match name.as_str() {
            "HOME" => Some(identity.home.clone().into_os_string()),
            "USER" | "LOGNAME" => account.map(OsString::from),
            _ => None,
        };
        match from_identity {
            Some(v) => {
                vars.insert(name.clone(), (v, Source::Identity));
            }
            None if matches!(name.as_str(), "USER" | "LOGNAME") => {}
            None => {
                if let Some(v) = lookup(name) {
                    vars.insert(name.clone(), (v, Source::Passed));
                }
            }
        }
    }
    for (name, value) in policy.set.iter().filter(|(n, _)| !forbidden(n)) {
        vars.insert(name.clone(), (value.into(), Source::Set));
    }
    vars.insert(AGENT_ID_VAR.to_owned(), (agent_id.into(), Source::Agentd));
    vars.into_iter()
        .filter(|(_, (v, _))| !v.as_encoded_bytes().contains(&0))
        .map(|(name, (value, source))| Var {
            name,
            value,
            source,
        })
        .collect()
}

/// The value of `PATH` in `vars`, if any.
pub fn path_of(vars: &[Var]) -> Option<&OsString> {
    vars.iter().find(|v| v.name == "PATH").map(|v| &v.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::RunAs;

    fn who(user: &str) -> Resolved {
        Resolved {
            run_as: RunAs::Invoker,
            uid: 1000,
            gid: 1000,
            user: user.into(),
            home: "/home/alice".into(),
            how: String::new(),
        }
    }

    fn host(name: &str) -> Option<OsString> {
        match name {
            "PATH" => Some("/usr/bin:/bin".into()),
            "HOME" => Some("/root".into()),
            "USER" => Some("root".into()),
            "LD_PRELOAD" => Some("/tmp/evil.so".into()),
            "SECRET" => Some("s3cr3t".into()),
            "LANG" => Some("C.UTF-8".into()),
            _ => None,
        }
    }

    fn get<'a>(vars: &'a [Var], name: &str) -> Option<&'a str> {
        vars.iter()
            .find(|v| v.name == name)
            .and_then(|v| v.value.to_str())
    }

    #[test]
    fn only_passed_and_set_variables_and_never_ld() {
        let policy = EnvPolicy {
            pass: vec![
                "PATH".into(),
                "HOME".into(),
                "USER".into(),
                "LD_PRELOAD".into(),
                "TZ".into(),
            ],
            set: vec![
                ("FOO".into(), "bar".into()),
                ("LD_LIBRARY_PATH".into(), "/x".into()),
            ],
        };
        let vars = build(&policy, host, &who("alice"), "a-1");
        let names: Vec<&str> = vars.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["AGENTD_AGENT_ID", "FOO", "HOME", "PATH", "USER"]);
        assert_eq!(get(&vars, "HOME"), Some("/home/alice"));
        assert_eq!(get(&vars, "USER"), Some("alice"));
        assert_eq!(get(&vars, "PATH"), Some("/usr/bin:/bin"));
        assert_eq!(get(&vars, "AGENTD_AGENT_ID"), Some("a-1"));
        assert_eq!(
            path_of(&vars).and_then(|p| p.to_str()),
            Some("/usr/bin:/bin")
        );
        // plans name passed variables without their values
        let json = serde_json::to_value(&vars).unwrap();
        assert_eq!(json[3]["name"], "PATH");
        assert!(json[3]["value"].is_null());
        assert_eq!(json[1]["name"], "FOO");
        assert_eq!(json[1]["value"], "bar");
    }

    #[test]
    fn set_overrides_pass_and_no_user_without_an_account() {
        let policy = EnvPolicy {
            pass: vec!["LANG".into(), "USER".into(), "LOGNAME".into()],
            set: vec![("LANG".into(), "C".into())],
        };
        let vars = build(&policy, host, &who("uid 2000000000"), "a-1");
        assert_eq!(get(&vars, "LANG"), Some("C"));
        assert_eq!(get(&vars, "USER"), None);
        assert_eq!(get(&vars, "LOGNAME"), None);
        // agentd's own id wins over a profile's
        let policy = EnvPolicy {
            pass: vec![],
            set: vec![(AGENT_ID_VAR.into(), "spoof".into())],
        };
        assert_eq!(
            get(&build(&policy, host, &who("a"), "a-1"), AGENT_ID_VAR),
            Some("a-1")
        );
    }
}
