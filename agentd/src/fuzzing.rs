//! Entry points for the fuzz targets (fuzz/): each takes arbitrary bytes and must never
//! panic, whatever they hold. Each runs one parser the way agentd runs it on input it
//! does not control, then checks what the parser accepted (the assertions are what a
//! fuzzer finds besides panics). None touches the host: no file, socket or process; where
//! the daemon would look at the host (a path through /proc, a file's permissions), the
//! entry point answers "unknown", as the daemon does for a process that is gone.

use std::{
    fmt::Debug,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock},
};

use serde::{Serialize, de::DeserializeOwned};

use crate::{
    ask::sign::AllowedSigners,
    audit::{record::RecordHash, verify},
    bpf::decode::{self, AT_FDCWD, AgentInfo, ClockOffset, Targets},
    daemon::proto::{ClientLine, Reply, Request},
    link::{SupervisorLine, ToSupervisor},
    profile::{self, CompileContext, CompiledPolicy},
    report,
};

/// What `{workspace}` and `{home}` stand for in the profile and kernel-record targets.
fn context() -> CompileContext {
    CompileContext {
        workspace: PathBuf::from("/home/u/project"),
        home: PathBuf::from("/home/u"),
    }
}

/// A profile file's contents, as `agentd profile check` takes them: parsed and validated
/// (`profile::parse`); a valid profile compiled (with a fixed workspace and home: the
/// check's only reads of the host are those two directories) and rendered as the check
/// prints it, in text and JSON; an invalid one's errors rendered. Checks what
/// `CompiledPolicy` promises the privileged code: one Landlock rule per path, sorted;
/// no system call both allowed and handed to the supervisor.
pub fn profile(bytes: &[u8]) {
    // The check reads the file as UTF-8; other bytes never reach the parser.
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let profile = match profile::parse("fuzz.toml", text) {
        Ok(profile) => profile,
        Err(errors) => {
            let _ = errors.to_string();
            let _ = serde_json::to_string(&errors.0);
            return;
        }
    };
    let policy = profile::compile(&profile, &context());
    let _ = report::render_policy("fuzz.toml", &policy);
    let _ = serde_json::to_string(&policy);
    let rules = &policy.landlock.rules;
    assert!(
        rules.windows(2).all(|w| w[0].path < w[1].path),
        "Landlock rules not one per path, sorted: {rules:?}"
    );
    let seccomp = &policy.seccomp;
    for call in &seccomp.notify {
        assert!(
            !seccomp.allow.contains(call),
            "{call} both allowed and notified"
        );
    }
}

/// One line of the control protocol or of the daemon–supervisor link, as either end
/// decodes it (`crate::link::decode`: size limit, UTF-8, strict JSON): as a client's
/// `Request` and `ClientLine`, the daemon's `Reply`, a supervisor's
/// `SupervisorLine` and the daemon's `ToSupervisor`. What decodes must encode to a
/// line that decodes to the same value: the other end reads what this end writes.
pub fn control_line(bytes: &[u8]) {
    round_trip::<Request>(bytes);
    round_trip::<ClientLine>(bytes);
    round_trip::<Reply>(bytes);
    round_trip::<SupervisorLine>(bytes);
    round_trip::<ToSupervisor>(bytes);
}

/// Decodes `line` as a `T`; if it is one, checks that its encoding decodes back to it.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(line: &[u8]) {
    let Ok(value) = crate::link::decode::<T>(line) else {
        return;
    };
    let encoded = crate::link::encode(&value);
    let again = crate::link::decode::<T>(encoded.strip_suffix(b"\n").unwrap_or(&encoded));
    assert!(
        again.as_ref() == Ok(&value),
        "{} {value:?} encodes to {:?}, which decodes to {again:?}",
        std::any::type_name::<T>(),
        String::from_utf8_lossy(&encoded),
    );
}

/// The cgroup id of the one agent the kernel-record target knows: records of any other
/// cgroup decode as an unknown agent's, as in the daemon.
pub const FUZZ_AGENT_CGROUP: u64 = 4242;

/// The agent at [`FUZZ_AGENT_CGROUP`]: the built-in `coding-agent` profile (canaries,
/// protected paths, network rules) compiled with `context`. Its identity is not
/// recorded (as before its launch completes), so no refusal is put down to a file's
/// permissions: that would read the host's files.
static FUZZ_AGENT: LazyLock<Option<AgentInfo>> = LazyLock::new(|| {
    let text = profile::builtin("coding-agent")?;
    let profile = profile::parse("builtin:coding-agent", text).ok()?;
    let policy: Arc<CompiledPolicy> = Arc::new(profile::compile(&profile, &context()));
    Some(AgentInfo::new("fuzz-agent", policy))
});

/// Resolves paths lexically: absolute ones as they are, relative ones against the
/// working directory `{workspace}`; a path relative to another directory fd cannot be
/// resolved (as for a process that is gone).
fn resolve(_pid: u32, dfd: i32, path: &str, _follow: bool) -> Option<PathBuf> {
    let path = Path::new(path);
    if path.is_absolute() {
        Some(decode::normalize(path))
    } else if dfd == AT_FDCWD {
        Some(decode::normalize(&context().workspace.join(path)))
    } else {
        None
    }
}

/// Nothing is known of a signal's target (it is gone).
const NO_TARGETS: Targets<'static> = Targets {
    fd_pid: &|_, _| None,
    creds: &|_| None,
};

/// Arbitrary bytes as one ring-buffer record, decoded as the daemon decodes each record
/// it drains: a record shorter than a `RawEvent` is ignored, a longer one read for its
/// first `RawEvent` (`decode::raw_event`), then `decode::decode` with the agent of
/// its cgroup, if known. The event it gives must go through the control protocol and the
/// audit log unchanged: encoded as a `Reply::Event`, it decodes back to itself.
pub fn kernel_record(bytes: &[u8]) {
    let Some(raw) = decode::raw_event(bytes) else {
        return;
    };
    let agent = FUZZ_AGENT
        .as_ref()
        .filter(|_| raw.agent_cgroup == FUZZ_AGENT_CGROUP);
    // 2001-09-09T01:46:40Z at ktime 0: far from the ends of the range a time can show.
    let clock = ClockOffset(1_000_000_000_000_000_000);
    let Some(event) = decode::decode(&raw, agent, clock, &resolve, &NO_TARGETS) else {
        return;
    };
    let reply = Reply::Event(Box::new(event));
    let line = crate::link::encode(&reply);
    match crate::link::decode::<Reply>(line.strip_suffix(b"\n").unwrap_or(&line)) {
        Ok(back) => assert!(back == reply, "{reply:?} decodes back as {back:?}"),
        Err(e) => panic!("{reply:?} encodes to a line that does not decode: {e}"),
    }
}

/// What separates files in an audit-log target's input: a form feed, which JSON escapes
/// and so no record holds.
pub const AUDIT_FILE_SEPARATOR: u8 = 0x0c;

/// The files one audit-log input stands for, at most three, named as rotation names
/// them, oldest first.
const AUDIT_FILES: [&str; 3] = ["audit.log.2", "audit.log.1", "audit.log"];

/// The seed of the ed25519 key of the audit-log target's allowed signer, who signed the
/// decision in the seed corpus (fuzz/corpus/audit_log/signed).
const SIGNER_SEED: [u8; 32] = [0x5e; 32];

/// The audit-log target's signer's key.
fn signer_key() -> ssh_key::PrivateKey {
    ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&SIGNER_SEED))
}

/// The audit-log target's allowed signers: `signer_key`, for approvals.
static SIGNERS: LazyLock<Option<AllowedSigners>> = LazyLock::new(|| {
    let key = signer_key().public_key().to_openssh().ok()?;
    let text = format!("alice@example.com namespaces=\"agentd-approval\" {key}\n");
    AllowedSigners::parse("fuzz_signers", &text).ok()
});

/// Arbitrary bytes as the contents of an audit log, up to three files, oldest first,
/// separated by [`AUDIT_FILE_SEPARATOR`]; verified (`verify::verify_contents`) with
/// allowed signers, as `agentd audit verify --all` verifies them and as `agentd audit
/// verify` verifies the newest alone (which may begin with a rotate record). Verified as
/// they are, and as someone with write access would make them pass the hash chain (each
/// record's `prev` set to the hash before it and its `hash` recomputed), so that the
/// fuzzer, which cannot forge SHA-256, reaches every check after the hashes.
pub fn audit_log(bytes: &[u8]) {
    let files: Vec<&[u8]> = bytes
        .splitn(AUDIT_FILES.len(), |&b| b == AUDIT_FILE_SEPARATOR)
        .collect();
    verify_audit(&files);
    let mut head = RecordHash::GENESIS;
    let resealed: Vec<Vec<u8>> = files.iter().map(|f| reseal(f, &mut head)).collect();
    verify_audit(&resealed.iter().map(Vec::as_slice).collect::<Vec<_>>());
}

/// Verifies `contents` as the last files of `AUDIT_FILES`, and the last alone, and
/// renders the outcomes.
fn verify_audit(contents: &[&[u8]]) {
    verify_named(contents);
    if contents.len() > 1 {
        verify_named(&contents[contents.len() - 1..]);
    }
}

/// Verifies `contents` as the last files of `AUDIT_FILES`, with `SIGNERS`.
fn verify_named(contents: &[&[u8]]) {
    let first = AUDIT_FILES.len().saturating_sub(contents.len());
    let files: Vec<(PathBuf, &[u8])> = AUDIT_FILES[first..]
        .iter()
        .map(PathBuf::from)
        .zip(contents.iter().copied())
        .collect();
    let report = match verify::verify_contents(&files, None, SIGNERS.as_ref()) {
        Ok(report) => report,
        Err(e) => panic!("contents held in memory found unreadable: {e}"),
    };
    // What `agentd audit verify` prints.
    let _ = match &report.outcome {
        verify::Outcome::Intact => String::new(),
        verify::Outcome::Incomplete(incomplete) => incomplete.to_string(),
        verify::Outcome::Tampered(problem) => problem.to_string(),
    };
}

/// What separates a record's hashed part from its stated hash, and what ends it (see
/// `crate::audit::record`).
const HASH_KEY: &[u8] = br#","hash":""#;
const LINE_END: &[u8] = br#""}"#;
const PREV_KEY: &[u8] = br#""prev":""#;
/// Length of a hash in hex.
const HEX_LEN: usize = 64;

/// `file` with each line that has a record's shape (ends `,"hash":"<64 bytes>"}`) made
/// to pass the hash chain: its first `"prev":"<64 bytes>"` set to `head`, its hash
/// recomputed, and `head` set to that hash. Other lines are left as they are.
fn reseal(file: &[u8], head: &mut RecordHash) -> Vec<u8> {
    let trailer = HASH_KEY.len() + HEX_LEN + LINE_END.len();
    let mut out = Vec::with_capacity(file.len());
    for (i, line) in file.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        let Some(split) = line.len().checked_sub(trailer) else {
            out.extend_from_slice(line);
            continue;
        };
        let (hashed, stated) = line.split_at(split);
        if !stated.starts_with(HASH_KEY) || !stated.ends_with(LINE_END) {
            out.extend_from_slice(line);
            continue;
        }
        let mut hashed = hashed.to_vec();
        let prev = hashed
            .windows(PREV_KEY.len())
            .position(|w| w == PREV_KEY)
            .map(|at| at + PREV_KEY.len());
        if let Some(prev) = prev.filter(|at| at + HEX_LEN <= hashed.len()) {
            hashed[prev..prev + HEX_LEN].copy_from_slice(head.to_string().as_bytes());
        }
        *head = RecordHash::of(&hashed);
        out.extend_from_slice(&hashed);
        out.extend_from_slice(HASH_KEY);
        out.extend_from_slice(head.to_string().as_bytes());
        out.extend_from_slice(LINE_END);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{fs, num::NonZeroUsize};

    use agentd_common::{
        EVENT_FLAG_DIR, EVENT_FLAG_MAPPED, EVENT_FLAG_TRIPPED, EVENT_FLAG_WRITE_INTENT,
        EXEC_ARG_LEN, EXEC_REFUSED_SHIFT, EXEC_REFUSED_SWAPPED, EventKind, IPPROTO_TCP, Layer,
        RawEvent, Syscall, Verdict,
    };

    use super::*;
    use crate::{
        ask,
        audit::{
            AuditLog, Options,
            record::{Action, Actor, Control},
            verify::Outcome,
        },
        event::{self, Event},
    };

    /// fuzz/corpus/<target>/.
    fn corpus(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target)
    }

    /// The seeds of `target`, by file name.
    fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
        let mut seeds: Vec<(String, Vec<u8>)> = fs::read_dir(corpus(target))
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                (name, fs::read(entry.path()).unwrap())
            })
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "no seeds for {target}");
        seeds
    }

    /// Every seed is a real input of its target, which takes it without a panic: a
    /// profile that validates, a line that decodes, a record that decodes to an event, a
    /// log that verifies (as it is, and re-hashed).
    #[test]
    fn the_seeds_are_what_their_targets_take() {
        assert!(FUZZ_AGENT.is_some() && SIGNERS.is_some());
        for (name, text) in seeds("profile") {
            let text = String::from_utf8(text.clone()).unwrap();
            profile::parse(&name, &text).unwrap_or_else(|e| panic!("{name}: {e}"));
            super::profile(text.as_bytes());
        }
        for (name, line) in seeds("control_line") {
            let decodes = [
                crate::link::decode::<Request>(&line).is_ok(),
                crate::link::decode::<ClientLine>(&line).is_ok(),
                crate::link::decode::<Reply>(&line).is_ok(),
                crate::link::decode::<SupervisorLine>(&line).is_ok(),
                crate::link::decode::<ToSupervisor>(&line).is_ok(),
            ];
            assert!(decodes.contains(&true), "{name} decodes as no message");
            control_line(&line);
        }
        for (name, record) in seeds("kernel_record") {
            let raw = decode::raw_event(&record).unwrap();
            let agent = FUZZ_AGENT
                .as_ref()
                .filter(|_| raw.agent_cgroup == FUZZ_AGENT_CGROUP);
            let decoded = decode::decode(&raw, agent, ClockOffset(0), &resolve, &NO_TARGETS);
            assert!(decoded.is_some(), "{name} decodes to no event");
            kernel_record(&record);
        }
        for (name, contents) in seeds("audit_log") {
            let files: Vec<&[u8]> = contents.split(|&b| b == AUDIT_FILE_SEPARATOR).collect();
            let first = AUDIT_FILES.len() - files.len();
            let named: Vec<(PathBuf, &[u8])> = AUDIT_FILES[first..]
                .iter()
                .map(PathBuf::from)
                .zip(files)
                .collect();
            let report = verify::verify_contents(&named, None, SIGNERS.as_ref()).unwrap();
            assert!(
                matches!(report.outcome, Outcome::Intact | Outcome::Incomplete(_)),
                "{name}: {:?}",
                report.outcome
            );
            audit_log(&contents);
        }
    }

    /// The re-hashing the audit-log target does leaves a log intact as it is.
    #[test]
    fn resealing_an_intact_log_changes_nothing() {
        for (name, contents) in seeds("audit_log") {
            let mut head = RecordHash::GENESIS;
            let resealed: Vec<Vec<u8>> = contents
                .split(|&b| b == AUDIT_FILE_SEPARATOR)
                .map(|file| reseal(file, &mut head))
                .collect();
            let resealed = resealed.join(&AUDIT_FILE_SEPARATOR);
            assert!(resealed == contents, "{name} changed");
        }
    }

    /// A record as the BPF programs write it: the decode tests' defaults, at the fuzzed
    /// agent's cgroup.
    fn raw(kind: EventKind) -> RawEvent {
        let raw = crate::bpf::decode::sample_raw(kind);
        assert_eq!(raw.agent_cgroup, FUZZ_AGENT_CGROUP);
        raw
    }

    fn set(buf: &mut [u8], bytes: &[u8]) {
        buf[..bytes.len()].copy_from_slice(bytes);
    }

    /// The record's bytes, as the ring buffer holds them.
    fn record_bytes(raw: &RawEvent) -> Vec<u8> {
        // SAFETY: `raw` is a valid RawEvent of size_of::<RawEvent>() bytes, all of them
        // initialised: it is plain data without padding (agentd-common asserts its size).
        let bytes = unsafe {
            std::slice::from_raw_parts((raw as *const RawEvent).cast::<u8>(), size_of::<RawEvent>())
        };
        bytes.to_vec()
    }

    /// Records of the kinds and shapes the BPF programs send.
    fn kernel_records() -> Vec<(&'static str, RawEvent)> {
        let mut connect = raw(EventKind::Connect);
        connect.layer = Layer::Bpf as u8;
        connect.verdict = Verdict::Deny as u8;
        connect.proto = IPPROTO_TCP;
        connect.addr = std::net::Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x5db8, 0xd822]).octets();
        connect.port = 443;
        connect.family = libc::AF_INET as u16;

        let mut unix = raw(EventKind::Connect);
        unix.family = libc::AF_UNIX as u16;
        unix.layer = Layer::BpfLsm as u8;
        unix.ret = -i64::from(libc::EACCES);
        set(&mut unix.path, b"/run/docker.sock");
        unix.aux = b"/run/docker.sock".len() as u64;

        // `notes/../out.txt` relative to /home/u/project, refused by Landlock.
        let mut open = raw(EventKind::OpenWrite);
        open.syscall = Syscall::Openat as u8;
        open.flags = EVENT_FLAG_DIR | EVENT_FLAG_WRITE_INTENT;
        open.ret = -i64::from(libc::EACCES);
        open.aux = (libc::O_WRONLY | libc::O_CREAT) as u64;
        set(&mut open.path, b"notes/../../.bashrc\0");
        set(&mut open.dir, b"project\0u\0home\0");
        open.dir_parts = 3;

        let mut canary = raw(EventKind::Canary);
        canary.syscall = Syscall::Openat as u8;
        canary.flags = EVENT_FLAG_TRIPPED;
        canary.ret = -i64::from(libc::EACCES);
        canary.canary = 1;
        set(&mut canary.path, b"/home/u/.ssh/id_ed25519\0");

        let mut exec = raw(EventKind::Exec);
        exec.syscall = Syscall::Execve as u8;
        exec.ret = -i64::from(libc::EACCES);
        set(&mut exec.path, b"/usr/bin/curl\0");
        for (i, arg) in [&b"curl\0"[..], b"-d\0", b"@answer.txt\0"]
            .iter()
            .enumerate()
        {
            set(&mut exec.path2[i * EXEC_ARG_LEN..], arg);
        }

        let mut refused = raw(EventKind::Exec);
        refused.layer = Layer::Bpf as u8;
        refused.verdict = Verdict::Deny as u8;
        refused.aux = (EXEC_REFUSED_SWAPPED << EXEC_REFUSED_SHIFT) | (8 << 20 | 1);
        refused.ret = 131_077;

        let mut mapped = raw(EventKind::Exec);
        mapped.flags = EVENT_FLAG_MAPPED | EVENT_FLAG_DIR;
        mapped.layer = Layer::BpfLsm as u8;
        mapped.verdict = Verdict::Deny as u8;
        set(&mut mapped.dir, b"payload.so\0tmp\0");
        mapped.dir_parts = 2;

        let mut rename = raw(EventKind::Rename);
        rename.syscall = Syscall::Renameat2 as u8;
        rename.ret = -i64::from(libc::EXDEV);
        set(&mut rename.path, b"build/out\0");
        set(&mut rename.path2, b"/etc/cron.d/x\0");

        let mut signal = raw(EventKind::Signal);
        signal.dfd = 1;
        signal.aux = 9;
        signal.ret = -i64::from(libc::EPERM);

        let mut syscall = raw(EventKind::Syscall);
        syscall.syscall = Syscall::Ptrace as u8;
        syscall.ret = -i64::from(libc::EPERM);

        // Of a cgroup no agent has.
        let mut fork = raw(EventKind::Fork);
        fork.agent_cgroup = 77;
        fork.ret = 101;

        vec![
            ("connect", connect),
            ("unix-connect", unix),
            ("open-relative", open),
            ("canary", canary),
            ("exec", exec),
            ("exec-swapped", refused),
            ("exec-mapped", mapped),
            ("rename", rename),
            ("signal", signal),
            ("syscall", syscall),
            ("fork-unknown-agent", fork),
        ]
    }

    fn event(i: u32) -> Event {
        Event::new(
            "a-1",
            1000 + i,
            "sh",
            event::Kind::Exec,
            event::Verdict::Allow,
            event::Layer::Kernel,
        )
        .with("argv", format!("sh -c 'step {i}'"))
    }

    /// The actor in the seeds' control records: a client of the daemon's socket.
    const ACTOR: Actor = Actor {
        uid: 1000,
        gid: 1000,
        pid: 4242,
    };

    fn control(action: Action) -> Control {
        Control {
            action,
            agent: Some("a-1".into()),
            by: ACTOR,
            detail: serde_json::Map::new(),
        }
    }

    /// A held connect and the daemon's record of its signed approval by `signer_key`.
    fn signed_approval() -> (Control, Control) {
        let request = ask::Request {
            id: "r-a1-3".into(),
            agent: "a-1".into(),
            profile: "analyze-only".into(),
            tid: 7,
            chain: Vec::new(),
            target: ask::Target::Connect {
                addr: [93, 184, 216, 34].into(),
                port: 443,
                proto: "tcp".into(),
                domain: Some("forum.example.com".into()),
            },
            argv: Vec::new(),
            since: "2026-01-01T00:00:00Z".into(),
            timeout_s: 60,
            require_signature: true,
        };
        let answer = ask::Answer::Allow {
            scope: ask::Scope::Once,
        };
        let message = ask::message(&request, &answer);
        let key = signer_key();
        let signature = ssh_key::SshSig::sign(
            &key,
            "agentd-approval",
            ssh_key::HashAlg::Sha512,
            message.as_bytes(),
        )
        .unwrap()
        .to_pem(ssh_key::LineEnding::LF)
        .unwrap();
        let public = key.public_key().to_openssh().unwrap();
        let fingerprint =
            ask::sign::verify_with_key(&public, message.as_bytes(), &signature).unwrap();
        let mut ask = control(Action::Ask);
        ask.detail = serde_json::json!({
            "request": request.id,
            "what": request.target.to_string(),
            "target": request.target,
        })
        .as_object()
        .unwrap()
        .clone();
        let mut approve = control(Action::Approve);
        approve.detail = serde_json::json!({
            "request": request.id,
            "what": request.target.to_string(),
            "answer": answer,
            "via": "agentd approve",
            "waited_ms": 4200,
            "message": message,
            "signature": signature,
            "key": public,
            "principal": "alice@example.com",
            "fingerprint": fingerprint,
        })
        .as_object()
        .unwrap()
        .clone();
        (ask, approve)
    }

    /// Audit logs the writer makes, each as the audit-log target takes it (rotated
    /// files oldest first, separated by a form feed).
    fn audit_logs() -> Vec<(&'static str, Vec<u8>)> {
        let dir = tempfile::tempdir().unwrap();
        let mut logs = Vec::new();
        let mut written = |name: &'static str, write: &dyn Fn(&Path)| {
            let path = dir.path().join(name).join("audit.log");
            fs::create_dir(path.parent().unwrap()).unwrap();
            write(&path);
            let mut files = verify::rotated_files(&path).unwrap();
            files.push(path);
            let contents: Vec<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
            logs.push((name, contents.join(&AUDIT_FILE_SEPARATOR)));
        };
        written("events", &|path| {
            let mut log = AuditLog::open(path).unwrap();
            log.append_control(&control(Action::Launch)).unwrap();
            log.append_event(&event(1)).unwrap();
            log.append_event(&event(2)).unwrap();
            log.append_control(&control(Action::Kill)).unwrap();
        });
        written("rotated", &|path| {
            let options = Options {
                keep: NonZeroUsize::MIN.saturating_add(1),
                ..Options::default()
            };
            let mut log = AuditLog::open_with(path, options).unwrap();
            log.append_event(&event(1)).unwrap();
            log.rotate().unwrap();
            log.append_event(&event(2)).unwrap();
            log.rotate().unwrap();
            log.append_control(&control(Action::Stop)).unwrap();
        });
        written("signed", &|path| {
            let (ask, approve) = signed_approval();
            let mut log = AuditLog::open(path).unwrap();
            log.append_control(&ask).unwrap();
            log.append_control(&approve).unwrap();
        });
        // One record, then a write cut short.
        let cut_short = |path: &Path| {
            let mut log = AuditLog::open(path).unwrap();
            log.append_event(&event(1)).unwrap();
            drop(log);
            let mut bytes = fs::read(path).unwrap();
            bytes.extend_from_slice(br#"{"seq":3,"ts":"2026-01-"#);
            fs::write(path, bytes).unwrap();
        };
        // Noted by the next writer.
        written("remnant", &|path| {
            cut_short(path);
            let mut log = AuditLog::open(path).unwrap();
            log.append_event(&event(2)).unwrap();
        });
        // Not yet noted: an incomplete final record.
        written("incomplete", &cut_short);
        logs
    }

    /// Writes the generated seeds, fuzz/corpus/kernel_record/ and fuzz/corpus/audit_log/,
    /// with the encoders agentd and its tests use: run it after a change of `RawEvent` or
    /// of the audit record format (`cargo test -p agentd --lib write_seeds -- --ignored`).
    /// The profile seeds are copies of profiles/ (and one with ask rules), the control
    /// lines hand-written; `the_seeds_are_what_their_targets_take` checks them all.
    #[test]
    #[ignore = "writes fuzz/corpus/kernel_record and fuzz/corpus/audit_log"]
    fn write_seeds() {
        for (target, seeds) in [
            (
                "kernel_record",
                kernel_records()
                    .iter()
                    .map(|(name, raw)| (*name, record_bytes(raw)))
                    .collect::<Vec<_>>(),
            ),
            ("audit_log", audit_logs()),
        ] {
            let dir = corpus(target);
            if dir.exists() {
                fs::remove_dir_all(&dir).unwrap();
            }
            fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in seeds {
                fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }
}
