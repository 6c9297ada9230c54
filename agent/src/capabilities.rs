//! The Linux capabilities the agent needs, read from its own effective set, so that
//! a missing one is reported at start with the reason instead of surfacing later as
//! an `EPERM` from deep inside a load, an attach or a `setns`.
//!
//! Reads `CapEff` from `/proc/self/status` (a 64-bit hex mask, bit N = capability
//! N from linux/capability.h); no crate needed. Must not: change capabilities, or
//! decide anything besides "present or not" (the kernel has the last word).
//!
//! The set is the one `deploy/base/daemonset.yaml` grants, each for the reason given
//! in [`Capability::why`]; the two lists are kept equal by the deploy test suites
//! (`tests/tests/deploy/`, `tests/tests/deploy_privileged/`).
use std::fmt;
use std::path::Path;

/// A Linux capability the agent may need, with its number from linux/capability.h.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Capability {
    /// 12
    NetAdmin = 12,
    /// 19
    SysPtrace = 19,
    /// 21
    SysAdmin = 21,
    /// 38 (kernel >= 5.8)
    Perfmon = 38,
    /// 39 (kernel >= 5.8)
    Bpf = 39,
}

impl Capability {
    /// Every capability [`check_for_agent`] requires, in capability-number order.
    pub const AGENT: [Capability; 5] = [
        Capability::NetAdmin,
        Capability::SysPtrace,
        Capability::SysAdmin,
        Capability::Perfmon,
        Capability::Bpf,
    ];

    /// The bit number in the kernel's capability masks.
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The name as in capabilities(7) and the Kubernetes securityContext without
    /// its `CAP_` prefix (`NET_ADMIN`).
    pub fn k8s_name(self) -> &'static str {
        match self {
            Capability::NetAdmin => "NET_ADMIN",
            Capability::SysPtrace => "SYS_PTRACE",
            Capability::SysAdmin => "SYS_ADMIN",
            Capability::Perfmon => "PERFMON",
            Capability::Bpf => "BPF",
        }
    }

    /// What the agent does that needs it.
    pub fn why(self) -> &'static str {
        match self {
            Capability::Bpf => {
                "bpf(2): create the maps, load the programs, pin and open pinned objects"
            }
            Capability::Perfmon => {
                "the verifier accepts the programs' pointer arithmetic and direct packet reads \
                 only with CAP_PERFMON next to CAP_BPF (else it applies the unprivileged \
                 Spectre rules and rejects them)"
            }
            Capability::NetAdmin => {
                "load SCHED_CLS and CGROUP_SKB programs at all (BPF_PROG_LOAD requires it for \
                 network program types), attach them to host veths (tcx or clsact) and pod \
                 cgroups, and read links and addresses over rtnetlink"
            }
            Capability::SysAdmin => {
                "setns(2) into pods' network namespaces to find their interfaces (the kernel \
                 requires CAP_SYS_ADMIN over both namespaces)"
            }
            Capability::SysPtrace => {
                "open /proc/<pid>/ns/net of pod processes that run as other users or are not \
                 dumpable (the kernel's ptrace access check guards namespace files)"
            }
        }
    }

    fn from_number(n: u8) -> Option<Capability> {
        Capability::AGENT.into_iter().find(|c| c.number() == n)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CAP_{}", self.k8s_name())
    }
}

/// A capability set as the kernel reports it: bit N set = capability N present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    /// The bit itself is set.
    pub fn contains(self, cap: Capability) -> bool {
        self.0 & (1u64 << cap.number()) != 0
    }

    /// What the kernel checks: `bpf_capable()` and `perfmon_capable()` also accept
    /// CAP_SYS_ADMIN (include/linux/capability.h, since 5.8), so CAP_SYS_ADMIN
    /// satisfies CAP_BPF and CAP_PERFMON.
    pub fn satisfies(self, cap: Capability) -> bool {
        self.contains(cap)
            || (matches!(cap, Capability::Bpf | Capability::Perfmon)
                && self.contains(Capability::SysAdmin))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CapabilitiesError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no CapEff line")]
    NoCapEff { path: String },
    #[error("{path}: CapEff {value:?} is not a hexadecimal mask")]
    BadCapEff { path: String, value: String },
}

/// The `CapEff` mask from the text of a `/proc/<pid>/status` file; `None` when the
/// line is missing or not hex.
pub fn parse_cap_eff(status: &str) -> Option<Result<CapSet, String>> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    let value = line.trim();
    Some(
        u64::from_str_radix(value, 16)
            .map(CapSet)
            .map_err(|_| value.to_owned()),
    )
}

/// The effective capabilities of the process whose status file is `path`.
pub fn effective_from(path: &Path) -> Result<CapSet, CapabilitiesError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| CapabilitiesError::Read {
        path: shown.clone(),
        source,
    })?;
    match parse_cap_eff(&text) {
        None => Err(CapabilitiesError::NoCapEff { path: shown }),
        Some(Err(value)) => Err(CapabilitiesError::BadCapEff { path: shown, value }),
        Some(Ok(set)) => Ok(set),
    }
}

/// This process's effective capabilities.
pub fn effective() -> Result<CapSet, CapabilitiesError> {
    effective_from(Path::new("/proc/self/status"))
}

/// Those of `required` that `set` does not satisfy (see [`CapSet::satisfies`]), in
/// the order given.
pub fn missing_from(set: CapSet, required: &[Capability]) -> Vec<Capability> {
    required
        .iter()
        .copied()
        .filter(|c| !set.satisfies(*c))
        .collect()
}

/// Those of `required` this process lacks; all of them when its set cannot be read
/// (an agent that cannot read its own status is not going to manage the kernel).
pub fn missing(required: &[Capability]) -> Vec<Capability> {
    match effective() {
        Ok(set) => missing_from(set, required),
        Err(_) => required.to_vec(),
    }
}

/// The capabilities the agent lacks, each with why it is needed.
#[derive(Debug, thiserror::Error)]
pub struct MissingCapabilities {
    pub missing: Vec<Capability>,
    /// Set when the effective set itself could not be read.
    #[source]
    pub unreadable: Option<CapabilitiesError>,
}

impl fmt::Display for MissingCapabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unreadable.is_some() {
            write!(f, "could not read the effective capabilities; ")?;
        }
        write!(
            f,
            "the agent needs {} more capabilit{} (securityContext.capabilities.add, and run as \
             uid 0 so they are effective):",
            self.missing.len(),
            if self.missing.len() == 1 { "y" } else { "ies" }
        )?;
        for cap in &self.missing {
            write!(f, " {cap} ({}: {});", cap.k8s_name(), cap.why())?;
        }
        Ok(())
    }
}

/// [`check_for_agent`] against a given set (the testable part).
pub fn check_set(set: CapSet) -> Result<(), MissingCapabilities> {
    let missing = missing_from(set, &Capability::AGENT);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingCapabilities {
            missing,
            unreadable: None,
        })
    }
}

/// Checks that this process has every capability in [`Capability::AGENT`]; the
/// error names each missing one and what it is for. Call once at agent start.
pub fn check_for_agent() -> Result<(), MissingCapabilities> {
    match effective() {
        Ok(set) => check_set(set),
        Err(e) => Err(MissingCapabilities {
            missing: Capability::AGENT.to_vec(),
            unreadable: Some(e),
        }),
    }
}

/// Names of the bits set in `set` that rayfence knows, for logs (`CAP_BPF,...`).
pub fn describe(set: CapSet) -> String {
    (0..64u8)
        .filter(|n| set.0 & (1u64 << n) != 0)
        .filter_map(Capability::from_number)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_STATUS: &str = "Name:\tcat\nUmask:\t0022\nState:\tR (running)\n\
        CapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n\
        CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\n";

    fn set_of(caps: &[Capability]) -> CapSet {
        CapSet(caps.iter().fold(0, |m, c| m | 1u64 << c.number()))
    }

    #[test]
    fn full_root_set_parses_and_has_everything() {
        let set = parse_cap_eff(ROOT_STATUS).expect("line").expect("hex");
        assert_eq!(set, CapSet(0x1ff_ffff_ffff));
        assert!(check_set(set).is_ok());
    }

    #[test]
    fn daemonset_set_parses_to_exactly_the_agent_capabilities() {
        // NET_ADMIN, SYS_PTRACE, SYS_ADMIN, PERFMON, BPF = bits 12, 19, 21, 38, 39.
        let status = "CapPrm:\t000000c000281000\nCapEff:\t000000c000281000\n";
        let set = parse_cap_eff(status).expect("line").expect("hex");
        assert_eq!(set, set_of(&Capability::AGENT));
        assert!(check_set(set).is_ok());
        assert_eq!(
            describe(set),
            "CAP_NET_ADMIN,CAP_SYS_PTRACE,CAP_SYS_ADMIN,CAP_PERFMON,CAP_BPF"
        );
    }

    #[test]
    fn default_container_set_lacks_all_agent_capabilities() {
        // Docker/containerd's default set: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID
        // SETUID SETPCAP NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP.
        let status = "CapEff:\t00000000a80425fb\n";
        let set = parse_cap_eff(status).expect("line").expect("hex");
        let err = check_set(set).expect_err("missing");
        assert_eq!(err.missing, Capability::AGENT.to_vec());
        let message = err.to_string();
        for cap in Capability::AGENT {
            assert!(message.contains(&cap.to_string()), "{message}");
            assert!(message.contains(cap.why()), "{message}");
        }
    }

    #[test]
    fn one_missing_capability_is_named_with_its_reason() {
        let mut caps = Capability::AGENT.to_vec();
        caps.retain(|c| *c != Capability::SysPtrace);
        let err = check_set(set_of(&caps)).expect_err("missing");
        assert_eq!(err.missing, vec![Capability::SysPtrace]);
        assert!(err.to_string().contains("1 more capability"));
        assert!(
            err.to_string()
                .contains("CAP_SYS_PTRACE (SYS_PTRACE: open /proc/<pid>/ns/net")
        );
    }

    #[test]
    fn sys_admin_satisfies_bpf_and_perfmon_as_the_kernel_does() {
        let set = set_of(&[
            Capability::NetAdmin,
            Capability::SysAdmin,
            Capability::SysPtrace,
        ]);
        assert!(check_set(set).is_ok());
        let without_sys_admin = set_of(&[Capability::NetAdmin, Capability::SysPtrace]);
        assert_eq!(
            check_set(without_sys_admin).expect_err("missing").missing,
            vec![Capability::SysAdmin, Capability::Perfmon, Capability::Bpf]
        );
    }

    #[test]
    fn missing_keeps_the_requested_order() {
        let set = set_of(&[Capability::NetAdmin]);
        assert_eq!(
            missing_from(
                set,
                &[Capability::Bpf, Capability::NetAdmin, Capability::SysAdmin]
            ),
            vec![Capability::Bpf, Capability::SysAdmin]
        );
    }

    #[test]
    fn absent_or_malformed_cap_eff_is_reported() {
        assert!(parse_cap_eff("Name:\tx\nCapPrm:\t0\n").is_none());
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), Some(Err("zz".to_owned())));
    }

    #[test]
    fn own_status_is_readable() {
        // Whatever the test runs with, the file parses.
        effective().expect("/proc/self/status has CapEff");
    }
}
