//! Just enough of a BTF reader to find struct member offsets in the running kernel's
//! `/sys/kernel/btf/vmlinux`. Rust BPF programs have no CO-RE field relocations; the
//! offsets they need are set as globals before the object is loaded.
//!
//! Format: include/uapi/linux/btf.h. A header, then a type section of `btf_type` records
//! (12 bytes, followed by kind-specific data) numbered from 1, then a string section.

use std::collections::HashMap;

use agentd_common::WINDOW_WORDS;

const MAGIC: u16 = 0xeb9f;

/// The struct members the file programs' dentry walks read (agentd-ebpf `vfs`): (the
/// program global the offset is loaded into, struct, member). Resolved by [`Btf::offsets`]
/// at load; a kernel missing one fails the load rather than walking garbage.
pub const VFS_MEMBERS: [(&str, &str, &str); 24] = [
    ("TASK_FILES_OFFSET", "task_struct", "files"),
    ("TASK_FS_OFFSET", "task_struct", "fs"),
    ("FILES_FDT_OFFSET", "files_struct", "fdt"),
    ("FDT_MAX_FDS_OFFSET", "fdtable", "max_fds"),
    ("FDT_FD_OFFSET", "fdtable", "fd"),
    ("FILE_F_PATH_OFFSET", "file", "f_path"),
    ("FILE_F_MODE_OFFSET", "file", "f_mode"),
    ("FILE_F_INODE_OFFSET", "file", "f_inode"),
    ("VMA_VM_FILE_OFFSET", "vm_area_struct", "vm_file"),
    ("FS_ROOT_OFFSET", "fs_struct", "root"),
    ("FS_PWD_OFFSET", "fs_struct", "pwd"),
    ("PATH_MNT_OFFSET", "path", "mnt"),
    ("PATH_DENTRY_OFFSET", "path", "dentry"),
    ("DENTRY_D_PARENT_OFFSET", "dentry", "d_parent"),
    ("DENTRY_D_NAME_OFFSET", "dentry", "d_name"),
    ("DENTRY_D_INODE_OFFSET", "dentry", "d_inode"),
    ("QSTR_NAME_OFFSET", "qstr", "name"),
    ("INODE_I_INO_OFFSET", "inode", "i_ino"),
    ("INODE_I_SB_OFFSET", "inode", "i_sb"),
    ("SB_S_DEV_OFFSET", "super_block", "s_dev"),
    ("MOUNT_MNT_OFFSET", "mount", "mnt"),
    ("MOUNT_MNT_PARENT_OFFSET", "mount", "mnt_parent"),
    ("MOUNT_MNT_MOUNTPOINT_OFFSET", "mount", "mnt_mountpoint"),
    ("VFSMOUNT_MNT_ROOT_OFFSET", "vfsmount", "mnt_root"),
];

/// Members only the BPF LSM programs read (the unix-socket hooks), as [`VFS_MEMBERS`]. A
/// kernel whose BTF lacks one (`struct unix_sock` is in a module's BTF when unix sockets
/// are built as a module) runs without BPF LSM, not without the watch.
pub const LSM_MEMBERS: [(&str, &str, &str); 7] = [
    ("SOCKET_SK_OFFSET", "socket", "sk"),
    ("SOCK_SK_CGRP_DATA_OFFSET", "sock", "sk_cgrp_data"),
    (
        "SOCK_CGROUP_DATA_CGROUP_OFFSET",
        "sock_cgroup_data",
        "cgroup",
    ),
    ("CGROUP_KN_OFFSET", "cgroup", "kn"),
    ("KERNFS_NODE_ID_OFFSET", "kernfs_node", "id"),
    ("UNIX_SOCK_ADDR_OFFSET", "unix_sock", "addr"),
    ("UNIX_SOCK_PATH_OFFSET", "unix_sock", "path"),
];

/// Fields the programs read together, one probe read per struct (agentd-ebpf `vfs`): per
/// struct, the global of the window's offset and, per field, the global of its word in
/// the window and the [`VFS_MEMBERS`] globals whose offsets add up to the field's.
type Window = (
    &'static str,
    &'static [(&'static str, &'static [&'static str])],
);

pub const VFS_WINDOWS: [Window; 3] = [
    (
        "PATH_WINDOW",
        &[
            ("PATH_MNT_WORD", &["PATH_MNT_OFFSET"]),
            ("PATH_DENTRY_WORD", &["PATH_DENTRY_OFFSET"]),
        ],
    ),
    (
        "DENTRY_WINDOW",
        &[
            ("DENTRY_PARENT_WORD", &["DENTRY_D_PARENT_OFFSET"]),
            ("DENTRY_INODE_WORD", &["DENTRY_D_INODE_OFFSET"]),
            (
                "DENTRY_NAME_WORD",
                &["DENTRY_D_NAME_OFFSET", "QSTR_NAME_OFFSET"],
            ),
        ],
    ),
    (
        "INODE_WINDOW",
        &[
            ("INODE_INO_WORD", &["INODE_I_INO_OFFSET"]),
            ("INODE_SB_WORD", &["INODE_I_SB_OFFSET"]),
        ],
    ),
];

/// Where to read a window of [`WINDOW_WORDS`] words holding as many of the fields at
/// `offsets` as one read can (each 8 bytes, at a multiple of 8 from the window's start):
/// the window's offset and each field's word, `WINDOW_WORDS` for a field outside it (the
/// program reads that one on its own). The window starts at one of the fields.
pub fn place_window(offsets: &[u64]) -> (u64, Vec<u64>) {
    let word = |start: u64, off: u64| {
        let rel = off.checked_sub(start)?;
        (rel % 8 == 0 && rel / 8 < WINDOW_WORDS as u64).then_some(rel / 8)
    };
    let start = offsets
        .iter()
        .copied()
        .max_by_key(|&start| {
            let inside = offsets
                .iter()
                .filter(|&&o| word(start, o).is_some())
                .count();
            // Most fields inside; among equals, the lowest start.
            (inside, std::cmp::Reverse(start))
        })
        .unwrap_or(0);
    let words = offsets
        .iter()
        .map(|&o| word(start, o).unwrap_or(WINDOW_WORDS as u64))
        .collect();
    (start, words)
}

/// Every global the `vfs` programs need: the [`VFS_MEMBERS`] offsets and the
/// [`VFS_WINDOWS`] placements, and the [`LSM_MEMBERS`] this kernel's BTF has, with why
/// each other one is missing (their globals stay 0; BPF LSM is then not used).
pub fn vfs_globals(btf: &Btf<'_>) -> Result<VfsGlobals, String> {
    let mut out = btf.offsets(&VFS_MEMBERS)?;
    let mut lsm_missing = Vec::new();
    for member in LSM_MEMBERS {
        match btf.offsets(&[member]) {
            Ok(found) => out.extend(found),
            Err(e) => lsm_missing.push(e),
        }
    }
    for (window, fields) in VFS_WINDOWS {
        let offsets = fields
            .iter()
            .map(|(_, parts)| {
                parts
                    .iter()
                    .map(|p| {
                        out.iter()
                            .find(|(g, _)| g == p)
                            .map(|(_, o)| *o)
                            .ok_or_else(|| format!("{p} is not among the resolved offsets"))
                    })
                    .sum::<Result<u64, String>>()
            })
            .collect::<Result<Vec<u64>, String>>()?;
        let (start, words) = place_window(&offsets);
        out.push((window, start));
        out.extend(fields.iter().map(|(g, _)| *g).zip(words));
    }
    Ok(VfsGlobals {
        globals: out,
        lsm_missing,
    })
}

/// What [`vfs_globals`] found.
#[derive(Debug)]
pub struct VfsGlobals {
    /// (program global, value), for `EbpfLoader::override_global`.
    pub globals: Vec<(&'static str, u64)>,
    /// Why each missing [`LSM_MEMBERS`] entry is missing.
    pub lsm_missing: Vec<String>,
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone, Copy)]
struct Type {
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` or `type`, by kind.
    size_type: u32,
    /// Byte position of the kind-specific data.
    data: usize,
}

#[derive(Debug)]
pub struct Btf<'a> {
    raw: &'a [u8],
    strings: usize,
    strings_len: usize,
    /// Index = type id; id 0 is void.
    types: Vec<Type>,
    /// struct name -> type ids (a name may appear more than once: forward and full).
    structs: HashMap<&'a str, Vec<u32>>,
}

fn u32_at(raw: &[u8], pos: usize) -> Result<u32, String> {
    raw.get(pos..pos + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| format!("truncated at byte {pos}"))
}

impl<'a> Btf<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<Btf<'a>, String> {
        let magic = raw
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or("empty")?;
        if magic != MAGIC {
            return Err(format!("bad magic {magic:#06x} (not little-endian BTF)"));
        }
        let hdr_len = u32_at(raw, 4)? as usize;
        let type_off = u32_at(raw, 8)? as usize;
        let type_len = u32_at(raw, 12)? as usize;
        let str_off = u32_at(raw, 16)? as usize;
        let str_len = u32_at(raw, 20)? as usize;
        let strings = hdr_len + str_off;
        if raw.len() < strings + str_len || raw.len() < hdr_len + type_off + type_len {
            return Err("sections extend past the end of the data".into());
        }
        let mut btf = Btf {
            raw,
            strings,
            strings_len: str_len,
            types: vec![Type {
                kind: 0,
                vlen: 0,
                kind_flag: false,
                size_type: 0,
                data: 0,
            }],
            structs: HashMap::new(),
        };
        let mut pos = hdr_len + type_off;
        let end = pos + type_len;
        while pos < end {
            let name_off = u32_at(raw, pos)?;
            let info = u32_at(raw, pos + 4)?;
            let size_type = u32_at(raw, pos + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let data = pos + 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                KIND_PTR | 7..=12 | 16 | KIND_TYPE_TAG => 0,
                other => return Err(format!("unknown BTF kind {other} at byte {pos}")),
            };
            let id = btf.types.len() as u32;
            btf.types.push(Type {
                kind,
                vlen,
                kind_flag: info >> 31 == 1,
                size_type,
                data,
            });
            if kind == KIND_STRUCT {
                let name = btf.name(name_off)?;
                if !name.is_empty() {
                    btf.structs.entry(name).or_default().push(id);
                }
            }
            pos = data + extra;
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> Result<&'a str, String> {
        let off = off as usize;
        if off >= self.strings_len {
            return Err(format!("string offset {off} out of range"));
        }
        let s = &self.raw[self.strings + off..self.strings + self.strings_len];
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).map_err(|_| format!("string at {off} is not UTF-8"))
    }

    fn ty(&self, id: u32) -> Result<Type, String> {
        self.types
            .get(id as usize)
            .copied()
            .ok_or_else(|| format!("type id {id} out of range"))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Result<Type, String> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_type;
                }
                _ => return Ok(t),
            }
        }
        Err(format!("type chain from {id} too long"))
    }

    /// Byte offset of `member` in the composite `t`, searching anonymous struct and union
    /// members too (randomised layouts put fields in those).
    fn member_in(&self, t: Type, member: &str, depth: u32) -> Result<Option<u32>, String> {
        if depth > 8 {
            return Ok(None);
        }
        for i in 0..t.vlen {
            let m = t.data + 12 * i;
            let name_off = u32_at(self.raw, m)?;
            let mtype = u32_at(self.raw, m + 4)?;
            let raw_off = u32_at(self.raw, m + 8)?;
            let bit_off = if t.kind_flag {
                raw_off & 0x00ff_ffff
            } else {
                raw_off
            };
            if name_off == 0 {
                let inner = self.resolve(mtype)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(off) = self.member_in(inner, member, depth + 1)?
                {
                    return Ok(Some(bit_off / 8 + off));
                }
            } else if self.name(name_off)? == member {
                if bit_off % 8 != 0 {
                    return Err(format!("member {member} is a bitfield"));
                }
                return Ok(Some(bit_off / 8));
            }
        }
        Ok(None)
    }

    /// `offsetof(struct sname, member)`.
    pub fn member_offset(&self, sname: &str, member: &str) -> Result<u32, String> {
        let ids = self
            .structs
            .get(sname)
            .ok_or_else(|| format!("struct {sname} not found"))?;
        for &id in ids {
            if let Some(off) = self.member_in(self.ty(id)?, member, 0)? {
                return Ok(off);
            }
        }
        Err(format!("struct {sname} has no member {member}"))
    }

    /// The offsets of `members` ((global, struct, member), as [`VFS_MEMBERS`]), as
    /// (global, offset) for `EbpfLoader::override_global`.
    pub fn offsets(
        &self,
        members: &[(&'static str, &str, &str)],
    ) -> Result<Vec<(&'static str, u64)>, String> {
        members
            .iter()
            .map(|&(global, sname, member)| {
                self.member_offset(sname, member)
                    .map(|off| (global, u64::from(off)))
            })
            .collect()
    }

    /// How many arguments the kernel passes to the BTF tracepoint `tp`: its
    /// `btf_trace_<tp>` typedef is a pointer to a prototype whose first parameter is the
    /// probe's `void *` data, followed by the `TP_PROTO` arguments.
    pub fn tracepoint_args(&self, tp: &str) -> Result<usize, String> {
        let want = format!("btf_trace_{tp}");
        for t in self.types.iter().skip(1) {
            // A record's name offset is the first word of its 12-byte header, which ends
            // where its kind-specific data starts.
            if t.kind != KIND_TYPEDEF || self.name(u32_at(self.raw, t.data - 12)?)? != want {
                continue;
            }
            let ptr = self.resolve(t.size_type)?;
            if ptr.kind != KIND_PTR {
                return Err(format!("{want} is not a pointer"));
            }
            let proto = self.resolve(ptr.size_type)?;
            if proto.kind != KIND_FUNC_PROTO || proto.vlen == 0 {
                return Err(format!("{want} does not point to a tracepoint prototype"));
            }
            return Ok(proto.vlen - 1);
        }
        Err(format!("no BTF tracepoint {tp} ({want} not found)"))
    }

    /// Which of the functions `names` this BTF does not have (one pass over the types).
    pub fn missing_funcs<'n>(&self, names: &[&'n str]) -> Result<Vec<&'n str>, String> {
        let mut missing: Vec<&'n str> = names.to_vec();
        for t in self.types.iter().skip(1) {
            if t.kind != KIND_FUNC {
                continue;
            }
            let name = self.name(u32_at(self.raw, t.data - 12)?)?;
            missing.retain(|n| *n != name);
            if missing.is_empty() {
                break;
            }
        }
        Ok(missing)
    }
}

#[cfg(test)]
pub(crate) mod tests {

    use super::*;

    /// Builds a BTF blob from (name, info, size_type, extra words) records.
    pub(crate) fn blob(strings: &[u8], types: &[(u32, u32, u32, Vec<u32>)]) -> Vec<u8> {
        let mut t = Vec::new();
        for (name, info, st, extra) in types {
            for w in [*name, *info, *st].iter().chain(extra) {
                t.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(strings);
        b
    }

    fn info(kind: u32, vlen: u32, kflag: bool) -> u32 {
        (kind << 24) | vlen | (u32::from(kflag) << 31)
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        // strings: 0 "", 1 "int", 5 "task_struct", 17 "pid", 21 "tgid", 26 "exit_code"
        let strings = b"\0int\0task_struct\0pid\0tgid\0exit_code\0";
        let types = vec![
            // 1: int
            (1, info(KIND_INT, 0, false), 4, vec![32]),
            // 2: const int (a qualifier in the chain)
            (0, info(KIND_CONST, 0, false), 1, vec![]),
            // 3: struct task_struct { int pid @0; struct { int tgid; } @64 bits; int exit_code @128 }
            (
                5,
                info(KIND_STRUCT, 3, false),
                20,
                vec![17, 2, 0, 0, 4, 64, 26, 1, 128],
            ),
            // 4: anonymous struct { int tgid @32 bits }
            (0, info(KIND_STRUCT, 1, false), 8, vec![21, 1, 32]),
        ];
        let raw = blob(strings, &types);
        let btf = Btf::parse(&raw).unwrap();
        assert_eq!(btf.member_offset("task_struct", "pid").unwrap(), 0);
        assert_eq!(btf.member_offset("task_struct", "tgid").unwrap(), 12);
        assert_eq!(btf.member_offset("task_struct", "exit_code").unwrap(), 16);
        assert!(
            btf.member_offset("task_struct", "nope")
                .unwrap_err()
                .contains("no member nope")
        );
        assert!(
            btf.member_offset("file", "f_inode")
                .unwrap_err()
                .contains("not found")
        );
    }

    #[test]
    fn finds_which_functions_are_missing() {
        // strings: 0 "", 1 "bpf_lsm_file_open", 19 "bpf_lsm_mmap_file"
        let strings = b"\0bpf_lsm_file_open\0bpf_lsm_mmap_file\0";
        let types = vec![
            // 1: int (*)(void): an empty prototype
            (0, info(KIND_FUNC_PROTO, 0, false), 0, vec![]),
            (1, info(KIND_FUNC, 0, false), 1, vec![]),
            (19, info(KIND_FUNC, 0, false), 1, vec![]),
        ];
        let raw = blob(strings, &types);
        let btf = Btf::parse(&raw).unwrap();
        assert_eq!(
            btf.missing_funcs(&[
                "bpf_lsm_mmap_file",
                "bpf_lsm_path_mknod",
                "bpf_lsm_file_open"
            ])
            .unwrap(),
            ["bpf_lsm_path_mknod"]
        );
    }

    #[test]
    fn kind_flag_offsets_drop_the_bitfield_size() {
        let strings = b"\0int\0s\0a\0";
        let types = vec![
            (1, info(KIND_INT, 0, false), 4, vec![32]),
            // struct s (kind_flag) { int a @ bit 32, bitfield size 0 }
            (5, info(KIND_STRUCT, 1, true), 8, vec![7, 1, 32]),
        ];
        let raw = blob(strings, &types);
        assert_eq!(
            Btf::parse(&raw).unwrap().member_offset("s", "a").unwrap(),
            4
        );
    }

    #[test]
    fn counts_tracepoint_arguments_from_the_prototype() {
        // strings: 0 "", 1 "btf_trace_sched_process_exit", 30 "btf_trace_old"
        let strings = b"\0btf_trace_sched_process_exit\0btf_trace_old\0";
        let types = vec![
            // 1: int
            (0, info(KIND_INT, 0, false), 4, vec![32]),
            // 2: void (*)(void *, int, int): params (name, type) x 3
            (
                0,
                info(KIND_FUNC_PROTO, 3, false),
                0,
                vec![0, 0, 0, 1, 0, 1],
            ),
            // 3: pointer to 2
            (0, info(KIND_PTR, 0, false), 2, vec![]),
            // 4: typedef btf_trace_sched_process_exit -> 3
            (1, info(KIND_TYPEDEF, 0, false), 3, vec![]),
            // 5: typedef btf_trace_old -> int (not a pointer)
            (30, info(KIND_TYPEDEF, 0, false), 1, vec![]),
        ];
        let raw = blob(strings, &types);
        let btf = Btf::parse(&raw).unwrap();
        assert_eq!(btf.tracepoint_args("sched_process_exit").unwrap(), 2);
        assert!(btf.tracepoint_args("old").unwrap_err().contains("pointer"));
        assert!(
            btf.tracepoint_args("nope")
                .unwrap_err()
                .contains("not found")
        );
    }

    #[test]
    fn offsets_name_their_globals_and_fail_on_a_missing_member() {
        // strings: 0 "", 1 "long", 6 "path", 11 "mnt", 15 "dentry"
        let strings = b"\0long\0path\0mnt\0dentry\0";
        let types = vec![
            // 1: long
            (1, info(KIND_INT, 0, false), 8, vec![64]),
            // 2: struct path { long mnt @0; long dentry @64 bits }
            (
                6,
                info(KIND_STRUCT, 2, false),
                16,
                vec![11, 1, 0, 15, 1, 64],
            ),
        ];
        let raw = blob(strings, &types);
        let btf = Btf::parse(&raw).unwrap();
        let members = [("A", "path", "mnt"), ("B", "path", "dentry")];
        assert_eq!(btf.offsets(&members).unwrap(), [("A", 0), ("B", 8)]);
        assert!(
            btf.offsets(&[("C", "path", "nope")])
                .unwrap_err()
                .contains("no member nope")
        );
        // Every global is named once: each is a distinct program global.
        let mut globals: Vec<&str> = VFS_MEMBERS
            .iter()
            .chain(&LSM_MEMBERS)
            .map(|m| m.0)
            .collect();
        globals.sort_unstable();
        globals.dedup();
        assert_eq!(globals.len(), VFS_MEMBERS.len() + LSM_MEMBERS.len());
    }

    #[test]
    fn this_kernel_has_every_member_the_programs_read() {
        // The running kernel's BTF (readable without root): every offset resolves, BPF
        // LSM's own included, and each window field is placed.
        let raw = std::fs::read("/sys/kernel/btf/vmlinux").unwrap();
        let btf = Btf::parse(&raw).unwrap();
        let found = vfs_globals(&btf).unwrap();
        assert!(found.lsm_missing.is_empty(), "{:?}", found.lsm_missing);
        for (global, _, _) in VFS_MEMBERS.iter().chain(&LSM_MEMBERS) {
            assert!(found.globals.iter().any(|(g, _)| g == global), "{global}");
        }
        // A member this kernel lacks is reported, not fatal.
        assert!(
            btf.offsets(&[("X", "unix_sock", "no_such_member")])
                .is_err()
        );
    }

    #[test]
    fn windows_cover_neighbouring_fields() {
        // 6.18's dentry: d_parent @24, d_inode @48, d_name @32 (qstr.name @8): one read.
        assert_eq!(place_window(&[24, 48, 40]), (24, vec![0, 3, 2]));
        // inode: i_ino @64, i_sb @40.
        assert_eq!(place_window(&[64, 40]), (40, vec![3, 0]));
        // struct path.
        assert_eq!(place_window(&[0, 8]), (0, vec![0, 1]));
        // A layout that spreads them (randomised): the most that fit, the rest alone.
        let (start, words) = place_window(&[0, 200, 216]);
        assert_eq!((start, &words[..]), (200, &[WINDOW_WORDS as u64, 0, 2][..]));
        // Misaligned relative to every start: each read alone but the start's.
        let (_, words) = place_window(&[0, 4]);
        assert_eq!(
            words.iter().filter(|&&w| w < WINDOW_WORDS as u64).count(),
            1
        );
        // Every window field names offsets that VFS_MEMBERS resolves.
        for (_, fields) in VFS_WINDOWS {
            for (_, parts) in fields {
                for p in *parts {
                    assert!(VFS_MEMBERS.iter().any(|m| m.0 == *p), "{p}");
                }
            }
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0u8; 24]).unwrap_err().contains("magic"));
        let mut raw = blob(b"\0", &[]);
        raw.truncate(20);
        assert!(Btf::parse(&raw).is_err());
    }
}
