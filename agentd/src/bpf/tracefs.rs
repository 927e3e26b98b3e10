//! Classic tracepoint record layouts, from `events/<category>/<name>/format` in tracefs.
//! The syscall programs read argument `i` at offset 16 + 8·i and the exit's `ret` at 16;
//! before attaching, the loader checks that each tracepoint's format says exactly that,
//! so a kernel that changes the layout fails loudly instead of feeding garbage.

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// Parses the `field:` lines of a format file.
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("field:")?;
            let mut parts = rest.split(';').map(str::trim);
            let decl = parts.next()?;
            let mut offset = None;
            let mut size = None;
            for p in parts {
                if let Some(v) = p.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = p.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            // The name is the declaration's last word, without an array suffix.
            let name = decl.rsplit([' ', '*']).next()?;
            let name = name.split('[').next()?.to_owned();
            Some(Field {
                name,
                offset: offset?,
                size: size?,
            })
        })
        .collect()
}

/// Offset of argument 0 in a `sys_enter_*` record, and of `ret` in a `sys_exit_*` one.
pub const SYSCALL_ARGS_OFFSET: usize = 16;
/// Offset of `__syscall_nr` in both.
pub const SYSCALL_NR_OFFSET: usize = 8;

fn expect(fields: &[Field], name: &str, offset: usize, size: usize) -> Result<(), String> {
    match fields.iter().find(|f| f.name == name) {
        None => Err(format!("has no field `{name}`")),
        Some(f) if f.offset != offset || f.size != size => Err(format!(
            "field `{name}` is at offset {} size {}, expected offset {offset} size {size}",
            f.offset, f.size
        )),
        Some(_) => Ok(()),
    }
}

/// Checks a `sys_enter_*` format: `__syscall_nr` at 8, then `args` in order, 8 bytes each
/// from offset 16.
pub fn check_enter(fields: &[Field], args: &[&str]) -> Result<(), String> {
    expect(fields, "__syscall_nr", SYSCALL_NR_OFFSET, 4)?;
    for (i, a) in args.iter().enumerate() {
        expect(fields, a, SYSCALL_ARGS_OFFSET + 8 * i, 8)?;
    }
    Ok(())
}

/// Checks a `sys_exit_*` format: `__syscall_nr` at 8, `ret` at 16.
pub fn check_exit(fields: &[Field]) -> Result<(), String> {
    expect(fields, "__syscall_nr", SYSCALL_NR_OFFSET, 4)?;
    expect(fields, "ret", SYSCALL_ARGS_OFFSET, 8)
}

/// Reads `<tracefs>/events/<category>/<name>/format`; `None` when the tracepoint does not
/// exist on this kernel.
pub fn read_format(
    tracefs: &Path,
    category: &str,
    name: &str,
) -> Result<Option<Vec<Field>>, super::BpfError> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(parse_format(&text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(super::BpfError::Read { path, source }),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    const OPENAT: &str = "name: sys_enter_openat
ID: 782
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int dfd;\toffset:16;\tsize:8;\tsigned:0;
\tfield:const char * filename;\toffset:24;\tsize:8;\tsigned:0;
\tfield:int flags;\toffset:32;\tsize:8;\tsigned:0;
\tfield:umode_t mode;\toffset:40;\tsize:8;\tsigned:0;

print fmt: \"dfd: 0x%08lx, filename: 0x%08lx\", ((unsigned long)(REC->dfd))
";

    const EXIT: &str = "format:
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;
";

    #[test]
    fn parses_fields_with_pointers_and_arrays() {
        let f = parse_format(OPENAT);
        assert_eq!(f.len(), 9);
        assert_eq!(
            f[6],
            Field {
                name: "filename".into(),
                offset: 24,
                size: 8
            }
        );
        let comm = parse_format("\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;");
        assert_eq!(comm[0].name, "comm");
    }

    #[test]
    fn accepts_the_expected_layout() {
        let f = parse_format(OPENAT);
        assert_eq!(
            check_enter(&f, &["dfd", "filename", "flags", "mode"]),
            Ok(())
        );
        assert_eq!(check_exit(&parse_format(EXIT)), Ok(()));
    }

    #[test]
    fn rejects_moved_renamed_or_missing_fields() {
        let f = parse_format(OPENAT);
        let err = check_enter(&f, &["filename"]).unwrap_err();
        assert!(err.contains("`filename` is at offset 24"), "{err}");
        let err = check_enter(&f, &["dfd", "path"]).unwrap_err();
        assert!(err.contains("no field `path`"), "{err}");
        let moved = EXIT.replace("offset:16", "offset:24");
        assert!(check_exit(&parse_format(&moved)).is_err());
    }
}
