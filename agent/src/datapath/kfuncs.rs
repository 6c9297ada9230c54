//! The kernel's conntrack, for the datapath's "who is behind a node address"
//! (docs/semantics.md "What counts as the node", `ebpf/src/kernel/node.rs`): the BTF ids of the conntrack kfuncs
//! (`bpf_skb_ct_lookup`, `bpf_ct_release`, Linux 6.0+) and where `struct nf_conn`
//! keeps the original source address, both read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), and the rewrite of the object's placeholder calls
//! into calls of those kfuncs before it is loaded.
//!
//! Only vmlinux kfuncs can be called this way: where conntrack is a module (its BTF
//! in `/sys/kernel/btf/nf_conntrack`), or BTF is missing, [`find`] says why and the
//! placeholders stay behind a switch the verifier sees is off. Traffic the node
//! forwarded is then judged by the node address it carries: ipBlocks only (fail
//! closed), which the agent reports.
//!
//! Must not: write anything, or guess an offset the BTF does not state.
use std::path::Path;

/// The placeholder call immediates in the eBPF object (`ebpf/src/kernel/node.rs`).
const PLACEHOLDER_CT_LOOKUP: u32 = 0x5246_4301;
const PLACEHOLDER_CT_RELEASE: u32 = 0x5246_4302;

/// What the datapath needs of the kernel's conntrack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelConntrack {
    pub lookup_btf_id: u32,
    pub release_btf_id: u32,
    /// Byte offset of `tuplehash[IP_CT_DIR_ORIGINAL].tuple.src.u3` in `struct nf_conn`.
    pub original_source_offset: u32,
}

/// Reads what the datapath needs from the running kernel's BTF, once per process
/// (vmlinux BTF is megabytes, and the kernel does not change under us).
pub fn find() -> Result<KernelConntrack, String> {
    static FOUND: std::sync::OnceLock<Result<KernelConntrack, String>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| find_in(Path::new("/sys/kernel/btf/vmlinux")))
        .clone()
}

pub fn find_in(vmlinux: &Path) -> Result<KernelConntrack, String> {
    let data = std::fs::read(vmlinux).map_err(|e| {
        format!(
            "reading {}: {e} (a kernel with BTF is needed)",
            vmlinux.display()
        )
    })?;
    let btf = Btf::parse(&data).map_err(|e| format!("{}: {e}", vmlinux.display()))?;
    let func = |name: &str| {
        btf.id_of(KIND_FUNC, name).ok_or_else(|| {
            format!(
                "the kernel's BTF has no kfunc {name} (nf_conntrack built as a module, or \
                 older than 6.0)"
            )
        })
    };
    let lookup_btf_id = func("bpf_skb_ct_lookup")?;
    let release_btf_id = func("bpf_ct_release")?;
    let offset = btf
        .member_offset("nf_conn", &["tuplehash", "tuple", "src", "u3"])
        .ok_or("the kernel's BTF does not describe nf_conn.tuplehash[].tuple.src.u3")?;
    Ok(KernelConntrack {
        lookup_btf_id,
        release_btf_id,
        original_source_offset: offset,
    })
}

/// The object with its placeholder calls turned into kfunc calls (src_reg 2,
/// `BPF_PSEUDO_KFUNC_CALL`, imm the BTF id, off 0: vmlinux). Instructions are
/// 8-byte aligned in every section, so only aligned offsets are looked at; the
/// count of rewritten calls is returned so a build that lost them is noticed.
pub fn patch(object: &[u8], conntrack: &KernelConntrack) -> (Vec<u8>, usize) {
    let mut out = object.to_vec();
    let mut patched = 0;
    let mut at = 0;
    while at + 8 <= out.len() {
        let insn = &out[at..at + 8];
        if insn[0] == 0x85 && insn[1] == 0 && insn[2] == 0 && insn[3] == 0 {
            let imm = u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            let id = match imm {
                PLACEHOLDER_CT_LOOKUP => Some(conntrack.lookup_btf_id),
                PLACEHOLDER_CT_RELEASE => Some(conntrack.release_btf_id),
                _ => None,
            };
            if let Some(id) = id {
                // dst_reg 0 (low nibble), src_reg BPF_PSEUDO_KFUNC_CALL (high nibble).
                out[at + 1] = 0x20;
                out[at + 4..at + 8].copy_from_slice(&id.to_le_bytes());
                patched += 1;
            }
        }
        at += 8;
    }
    (out, patched)
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One BTF type: what the lookups here need.
struct Type {
    name: u32,
    kind: u32,
    kind_flag: bool,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    /// STRUCT/UNION members: (name, type, bit offset).
    members: Vec<(u32, u32, u32)>,
    /// ARRAY: element type.
    element: u32,
}

/// A minimal reader of the BTF format (`Documentation/bpf/btf.rst`): type ids,
/// names, struct members.
struct Btf<'a> {
    /// Index 0 is the void type.
    types: Vec<Type>,
    strings: &'a [u8],
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, String> {
        let u32_at = |at: usize| -> Result<u32, String> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| format!("BTF truncated at byte {at}"))
        };
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err("not little-endian BTF".into());
        }
        let header_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_start = header_len + type_off;
        let strings_start = header_len + str_off;
        let strings = data
            .get(strings_start..strings_start + str_len)
            .ok_or("BTF string section out of bounds")?;
        let end = types_start + type_len;
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            kind_flag: false,
            size_or_type: 0,
            members: Vec::new(),
            element: 0,
        }];
        let mut at = types_start;
        while at < end {
            let name = u32_at(at)?;
            let info = u32_at(at + 4)?;
            let size_or_type = u32_at(at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let mut element = 0;
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => {
                    element = u32_at(at)?;
                    at += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        members.push((u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?));
                        at += 12;
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => at += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => at += 12 * vlen,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
                other => return Err(format!("unknown BTF kind {other}")),
            }
            types.push(Type {
                name,
                kind,
                kind_flag,
                size_or_type,
                members,
                element,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn id_of(&self, kind: u32, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == kind && self.name(t.name) == name.as_bytes())
            .and_then(|id| u32::try_from(id).ok())
    }

    /// Follows typedefs, qualifiers and arrays (element 0) to a struct or union.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                KIND_ARRAY => id = t.element,
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `path` (member names, arrays at index 0) in struct `root`.
    fn member_offset(&self, root: &str, path: &[&str]) -> Option<u32> {
        let mut current = self.types.iter().find(|t| {
            t.kind == KIND_STRUCT && !t.members.is_empty() && self.name(t.name) == root.as_bytes()
        })?;
        let mut bits = 0;
        for step in path {
            let (_, ty, offset) = current
                .members
                .iter()
                .find(|(name, _, _)| self.name(*name) == step.as_bytes())?;
            bits += if current.kind_flag {
                offset & 0x00ff_ffff
            } else {
                *offset
            };
            current = self.resolve(*ty)?;
        }
        (bits % 8 == 0).then_some(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_calls_become_kfunc_calls_and_nothing_else_changes() {
        let ct = KernelConntrack {
            lookup_btf_id: 0x1234,
            release_btf_id: 0x5678,
            original_source_offset: 24,
        };
        let mut object = vec![0u8; 8];
        object.extend([0x85, 0, 0, 0, 0x01, 0x43, 0x46, 0x52]);
        object.extend([0x85, 0, 0, 0, 0x02, 0x43, 0x46, 0x52]);
        // An ordinary helper call, and the pattern at an unaligned offset.
        object.extend([0x85, 0, 0, 0, 84, 0, 0, 0]);
        object.extend([
            0, 0x85, 0, 0, 0, 0x01, 0x43, 0x46, 0x52, 0, 0, 0, 0, 0, 0, 0,
        ]);
        let (patched, count) = patch(&object, &ct);
        assert_eq!(count, 2);
        assert_eq!(&patched[8..16], &[0x85, 0x20, 0, 0, 0x34, 0x12, 0, 0]);
        assert_eq!(&patched[16..24], &[0x85, 0x20, 0, 0, 0x78, 0x56, 0, 0]);
        assert_eq!(&patched[24..], &object[24..]);
    }

    #[test]
    fn this_kernel_describes_what_the_datapath_reads() {
        // Where conntrack is built in and the kernel has BTF (the machines this
        // project is tested on), the lookup must succeed; elsewhere `find` says why.
        let built_in = Path::new("/sys/kernel/btf/vmlinux").exists()
            && !Path::new("/sys/kernel/btf/nf_conntrack").exists()
            && std::fs::read_to_string("/proc/kallsyms")
                .is_ok_and(|s| s.contains(" bpf_skb_ct_lookup\n"));
        if !built_in {
            return;
        }
        let ct = find().expect("conntrack kfuncs in vmlinux BTF");
        assert!(ct.lookup_btf_id > 0 && ct.release_btf_id > 0);
        // After ct_general, the lock and the timeout, and a 16-byte hash node.
        assert!((24..512).contains(&ct.original_source_offset), "{ct:?}");
    }
}
