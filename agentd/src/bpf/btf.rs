//! Just enough of a BTF reader to find struct member offsets in the running kernel's
//! `/sys/kernel/btf/vmlinux`. Rust BPF programs have no CO-RE field relocations; the
//! offsets they need are set as globals before the object is loaded.
//!
//! Format: include/uapi/linux/btf.h. A header, then a type section of `btf_type` records
//! (12 bytes, followed by kind-specific data) numbered from 1, then a string section.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
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
                2 | 7..=12 | 16 | KIND_TYPE_TAG => 0,
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
    fn rejects_garbage() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0u8; 24]).unwrap_err().contains("magic"));
        let mut raw = blob(b"\0", &[]);
        raw.truncate(20);
        assert!(Btf::parse(&raw).is_err());
    }
}
