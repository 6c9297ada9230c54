//! `rayfence-cni`: a chained CNI plugin (spec 1.0; 1.1's GC and STATUS answered as
//! no-ops) that closes a new pod's network before the runtime starts its containers,
//! when its namespace is guarded, until the agent programs its policy.
//!
//! ADD: with the agent's pinned state present and `K8S_POD_NAMESPACE` listed in
//! `RF_GUARDNS`, finds the host side of the pod's veth (the `prevResult` interface
//! without a `sandbox` that is a veth here; else the peer of `CNI_IFNAME` in
//! `CNI_NETNS`), guards it ([`crate::datapath::guard::guard`]) and prints
//! `prevResult` unchanged. A pod that should be guarded and cannot be fails the ADD
//! (the runtime tears the sandbox down and retries): never an open pod. Anything
//! else passes through untouched: no pinned state (the agent never ran on this node,
//! or was cleaned up), a namespace not listed, a non-Kubernetes invocation.
//!
//! DEL: removes the guard of the pod's veth if it is still a guard (never the
//! agent's entry); missing things are not errors. CHECK: a guarded namespace's pod
//! must be held (by a guard or by the agent). VERSION: the versions below.
//!
//! Must not: load eBPF programs (it links the agent's pinned ones), change the
//! result, or write anything but the CNI result or error to stdout.
use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::datapath::guard::{self, GuardError, Guarded, PinnedState};
use crate::datapath::paths::DEFAULT_BPFFS_DIR;
use crate::discovery::netlink::{LinkFacts, NetlinkError, Rtnl};

/// CNI spec versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.1.1"];

/// The version of errors and of VERSION's answer when the config names none.
const OWN_VERSION: &str = "1.0.0";

/// CNI error codes (spec, "Error").
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODING: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Plugin-specific codes start at 100.
    pub const NOT_GUARDED: u32 = 100;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{var} is not set")]
    MissingEnv { var: &'static str },
    #[error("CNI_COMMAND {value:?} is not ADD, DEL, CHECK, GC, STATUS or VERSION")]
    UnknownCommand { value: String },
    #[error("CNI_ARGS: {field}: {detail}")]
    BadArgs { field: String, detail: String },
    #[error("network configuration on stdin is not valid JSON")]
    Decode(#[source] serde_json::Error),
    #[error("network configuration field {field}: {detail}")]
    Config { field: &'static str, detail: String },
    #[error("cniVersion {version:?} is not supported (supported: {SUPPORTED_VERSIONS:?})")]
    Version { version: String },
    #[error("pod {pod}: cannot find the host side of its veth ({detail})")]
    NoHostVeth { pod: String, detail: String },
    #[error("pod {pod}: guarding its veth {interface}")]
    Guard {
        pod: String,
        interface: String,
        #[source]
        source: GuardError,
    },
    #[error("reading the agent's pinned state under {dir}")]
    State {
        dir: PathBuf,
        #[source]
        source: GuardError,
    },
    #[error("pod {pod}: its namespace is guarded but veth {interface} is held by no one")]
    NotHeld { pod: String, interface: String },
}

impl CniError {
    pub fn code(&self) -> u32 {
        match self {
            Self::MissingEnv { .. } | Self::UnknownCommand { .. } | Self::BadArgs { .. } => {
                code::INVALID_ENV
            }
            Self::Decode(_) => code::DECODING,
            Self::Config { .. } => code::INVALID_CONFIG,
            Self::Version { .. } => code::INCOMPATIBLE_VERSION,
            Self::NoHostVeth { .. } | Self::Guard { .. } | Self::State { .. } => {
                code::TRY_AGAIN_LATER
            }
            Self::NotHeld { .. } => code::NOT_GUARDED,
        }
    }

    /// The error chain below the message.
    fn details(&self) -> String {
        let mut parts = Vec::new();
        let mut source = std::error::Error::source(self);
        while let Some(error) = source {
            parts.push(error.to_string());
            source = error.source();
        }
        parts.join(": ")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

/// The pod, from `CNI_ARGS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
}

/// What the runtime passes in the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    /// `None`: not a Kubernetes pod (no `K8S_POD_NAMESPACE`).
    pub pod: Option<PodArgs>,
}

/// Parses the environment (`get` looks a variable up).
pub fn parse_env(get: impl Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
    let value = get("CNI_COMMAND").ok_or(CniError::MissingEnv { var: "CNI_COMMAND" })?;
    let command = match value.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "GC" => Command::Gc,
        "STATUS" => Command::Status,
        "VERSION" => Command::Version,
        _ => return Err(CniError::UnknownCommand { value }),
    };
    let nonempty = |var: &str| get(var).filter(|v| !v.is_empty());
    let invocation = Invocation {
        command,
        container_id: nonempty("CNI_CONTAINERID"),
        netns: nonempty("CNI_NETNS").map(PathBuf::from),
        ifname: nonempty("CNI_IFNAME"),
        pod: parse_args(&get("CNI_ARGS").unwrap_or_default())?,
    };
    if matches!(command, Command::Add | Command::Check) {
        for (var, present) in [
            ("CNI_CONTAINERID", invocation.container_id.is_some()),
            ("CNI_NETNS", invocation.netns.is_some()),
            ("CNI_IFNAME", invocation.ifname.is_some()),
        ] {
            if !present {
                return Err(CniError::MissingEnv { var });
            }
        }
    }
    if matches!(command, Command::Del) && invocation.container_id.is_none() {
        return Err(CniError::MissingEnv {
            var: "CNI_CONTAINERID",
        });
    }
    Ok(invocation)
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`. The pod's namespace and name come
/// from `K8S_POD_NAMESPACE` and `K8S_POD_NAME`; other keys are ignored.
pub fn parse_args(args: &str) -> Result<Option<PodArgs>, CniError> {
    let mut pairs = BTreeMap::new();
    for item in args.split(';').filter(|item| !item.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(CniError::BadArgs {
                field: item.to_owned(),
                detail: "not KEY=VALUE".into(),
            });
        };
        pairs.insert(key, value);
    }
    let Some(namespace) = pairs.get("K8S_POD_NAMESPACE") else {
        return Ok(None);
    };
    let bad = |field: &str, detail: &str| CniError::BadArgs {
        field: field.to_owned(),
        detail: detail.to_owned(),
    };
    if !is_dns_label(namespace) {
        return Err(bad(
            "K8S_POD_NAMESPACE",
            &format!(
                "{namespace:?} is not a namespace name (a DNS label of at most 63 characters)"
            ),
        ));
    }
    let name = pairs
        .get("K8S_POD_NAME")
        .ok_or_else(|| bad("K8S_POD_NAME", "missing while K8S_POD_NAMESPACE is set"))?;
    if name.is_empty() || name.len() > rayfence_common::POD_NAME_MAX {
        return Err(bad(
            "K8S_POD_NAME",
            &format!("{name:?} is not a pod name (1 to 253 characters)"),
        ));
    }
    Ok(Some(PodArgs {
        namespace: (*namespace).to_owned(),
        name: (*name).to_owned(),
    }))
}

fn is_dns_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= rayfence_common::NAMESPACE_MAX
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// The plugin's network configuration (unknown fields ignored).
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    /// The agent's pin directory on the host.
    pub bpffs: PathBuf,
    pub prev_result: Option<Value>,
}

pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(CniError::Decode)?;
    let object = value.as_object().ok_or(CniError::Config {
        field: "(top level)",
        detail: "not a JSON object".into(),
    })?;
    let cni_version = match object.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        Some(_) => {
            return Err(CniError::Config {
                field: "cniVersion",
                detail: "not a string".into(),
            });
        }
        None => {
            return Err(CniError::Config {
                field: "cniVersion",
                detail: "missing".into(),
            });
        }
    };
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::Version {
            version: cni_version,
        });
    }
    let bpffs = match object.get("bpffs") {
        None | Some(Value::Null) => PathBuf::from(DEFAULT_BPFFS_DIR),
        Some(Value::String(path)) if Path::new(path).is_absolute() => PathBuf::from(path),
        Some(other) => {
            return Err(CniError::Config {
                field: "bpffs",
                detail: format!("{other} is not an absolute path"),
            });
        }
    };
    let prev_result = match object.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(result @ Value::Object(_)) => Some(result.clone()),
        Some(_) => {
            return Err(CniError::Config {
                field: "prevResult",
                detail: "not an object".into(),
            });
        }
    };
    Ok(NetConf {
        cni_version,
        bpffs,
        prev_result,
    })
}

/// Host-side interface names in a result: its interfaces without a `sandbox`.
pub fn host_interfaces(result: &Value) -> Vec<String> {
    result
        .get("interfaces")
        .and_then(Value::as_array)
        .map(|interfaces| {
            interfaces
                .iter()
                .filter(|i| {
                    i.get("sandbox")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .is_empty()
                })
                .filter_map(|i| i.get("name").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The pod's host veth here: the one result interface without a sandbox that is a
/// veth, else the peer of `ifname` in `netns`. `Ok(None)`: there is none.
fn host_veth(
    result: Option<&Value>,
    netns: Option<&Path>,
    ifname: Option<&str>,
) -> Result<Option<LinkFacts>, NetlinkError> {
    let links: Vec<LinkFacts> = Rtnl::in_current()?
        .links()?
        .iter()
        .map(LinkFacts::from_message)
        .collect();
    let named = result.map(host_interfaces).unwrap_or_default();
    let veths: Vec<&LinkFacts> = links
        .iter()
        .filter(|l| l.is_veth() && named.contains(&l.name))
        .collect();
    if let [one] = veths.as_slice() {
        return Ok(Some((*one).clone()));
    }
    // None named (or several): ask the container side which host link is its peer.
    let (Some(netns), Some(ifname)) = (netns, ifname) else {
        return Ok(None);
    };
    if !netns.exists() {
        return Ok(None);
    }
    let inside = Rtnl::in_netns(netns)?.links()?;
    let peer = inside
        .iter()
        .map(LinkFacts::from_message)
        .find(|l| l.name == ifname && l.is_veth())
        .and_then(|l| l.link);
    Ok(peer.and_then(|index| {
        links
            .iter()
            .find(|l| l.ifindex == index && l.is_veth())
            .cloned()
    }))
}

/// What the plugin prints and whether it succeeded.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
}

/// One invocation: `env` looks a variable up, `stdin` is the configuration.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    // Errors are reported in the config's version when it has a usable one.
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| OWN_VERSION.to_owned());
    match dispatch(env, stdin) {
        Ok(stdout) => Outcome {
            stdout,
            success: true,
        },
        Err(error) => Outcome {
            stdout: json!({
                "cniVersion": version,
                "code": error.code(),
                "msg": error.to_string(),
                "details": error.details(),
            })
            .to_string(),
            success: false,
        },
    }
}

fn dispatch(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<String, CniError> {
    let invocation = parse_env(env)?;
    if invocation.command == Command::Version {
        return Ok(json!({
            "cniVersion": OWN_VERSION,
            "supportedVersions": SUPPORTED_VERSIONS,
        })
        .to_string());
    }
    let conf = parse_conf(stdin)?;
    match invocation.command {
        Command::Add => add(&invocation, &conf),
        Command::Del => del(&invocation, &conf).map(|()| String::new()),
        Command::Check => check(&invocation, &conf).map(|()| String::new()),
        Command::Gc | Command::Status | Command::Version => Ok(String::new()),
    }
}

fn state(conf: &NetConf) -> Result<PinnedState, CniError> {
    guard::pinned_state(&conf.bpffs).map_err(|source| CniError::State {
        dir: conf.bpffs.clone(),
        source,
    })
}

/// The pod, if its namespace is guarded and the agent's state is there.
fn guarded_pod<'a>(
    invocation: &'a Invocation,
    conf: &NetConf,
) -> Result<Option<&'a PodArgs>, CniError> {
    let Some(pod) = &invocation.pod else {
        return Ok(None);
    };
    if state(conf)? == PinnedState::Absent {
        return Ok(None);
    }
    let guarded = guard::namespace_guarded(&conf.bpffs, &pod.namespace).map_err(|source| {
        CniError::State {
            dir: conf.bpffs.clone(),
            source,
        }
    })?;
    Ok(guarded.then_some(pod))
}

fn add(invocation: &Invocation, conf: &NetConf) -> Result<String, CniError> {
    let result = conf.prev_result.as_ref().ok_or(CniError::Config {
        field: "prevResult",
        detail: "missing: rayfence-cni is a chained plugin and must come after the one \
                 that creates the pod's interface"
            .into(),
    })?;
    let unchanged = result.to_string();
    let Some(pod) = guarded_pod(invocation, conf)? else {
        return Ok(unchanged);
    };
    let pod_name = format!("{}/{}", pod.namespace, pod.name);
    let veth = host_veth(
        Some(result),
        invocation.netns.as_deref(),
        invocation.ifname.as_deref(),
    )
    .map_err(|e| CniError::NoHostVeth {
        pod: pod_name.clone(),
        detail: e.to_string(),
    })?
    .ok_or_else(|| CniError::NoHostVeth {
        pod: pod_name.clone(),
        detail: format!(
            "no veth among the result's host interfaces {:?}, nor as the peer of {:?}",
            host_interfaces(result),
            invocation.ifname
        ),
    })?;
    match guard::guard(&conf.bpffs, veth.ifindex, &pod.namespace, &pod.name) {
        Ok(Guarded::Held | Guarded::AgentOwns) => Ok(unchanged),
        Err(source) => Err(CniError::Guard {
            pod: pod_name,
            interface: veth.name,
            source,
        }),
    }
}

fn del(invocation: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    // Only the guard maps are needed: a DEL must not fail (and hold up the pod's
    // removal) for want of anything else.
    if !guard::guard_maps_pinned(&conf.bpffs) {
        return Ok(());
    }
    // Best effort: a veth already gone has nothing left to clear here (its links
    // went with it; the agent forgets records of vanished veths).
    let Ok(Some(veth)) = host_veth(
        conf.prev_result.as_ref(),
        invocation.netns.as_deref(),
        invocation.ifname.as_deref(),
    ) else {
        return Ok(());
    };
    guard::unguard(&conf.bpffs, veth.ifindex).map_err(|source| CniError::Guard {
        pod: invocation
            .pod
            .as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_default(),
        interface: veth.name,
        source,
    })
}

fn check(invocation: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let Some(pod) = guarded_pod(invocation, conf)? else {
        return Ok(());
    };
    let pod_name = format!("{}/{}", pod.namespace, pod.name);
    let veth = host_veth(
        conf.prev_result.as_ref(),
        invocation.netns.as_deref(),
        invocation.ifname.as_deref(),
    )
    .map_err(|e| CniError::NoHostVeth {
        pod: pod_name.clone(),
        detail: e.to_string(),
    })?
    .ok_or_else(|| CniError::NoHostVeth {
        pod: pod_name.clone(),
        detail: "not found".into(),
    })?;
    match guard::entry_state(&conf.bpffs, veth.ifindex) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(CniError::NotHeld {
            pod: pod_name,
            interface: veth.name,
        }),
        Err(source) => Err(CniError::Guard {
            pod: pod_name,
            interface: veth.name,
            source,
        }),
    }
}

/// The binary's main: real environment and stdin; the exit status says success.
pub fn main() -> std::process::ExitCode {
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => run(|var| std::env::var(var).ok(), &stdin),
        Err(e) => Outcome {
            stdout: json!({"cniVersion": OWN_VERSION, "code": code::DECODING,
                           "msg": "reading the network configuration from stdin",
                           "details": e.to_string()})
            .to_string(),
            success: false,
        },
    };
    println!("{}", outcome.stdout);
    if outcome.success {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |key| map.get(key).cloned()
    }

    const ADD_ENV: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_NETNS", "/nonexistent/netns"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ray;K8S_POD_NAME=head-0;K8S_POD_INFRA_CONTAINER_ID=abc",
        ),
    ];

    fn error_of(outcome: &Outcome) -> Value {
        assert!(!outcome.success, "{}", outcome.stdout);
        serde_json::from_str(&outcome.stdout).expect("error JSON")
    }

    #[test]
    fn cni_args_give_the_pod_and_ignore_other_keys() {
        let pod = parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ray;K8S_POD_NAME=head-0")
            .expect("parse")
            .expect("a pod");
        assert_eq!(pod.namespace, "ray");
        assert_eq!(pod.name, "head-0");
        assert_eq!(parse_args("").expect("parse"), None);
        assert_eq!(parse_args("IgnoreUnknown=1").expect("parse"), None);
    }

    #[test]
    fn bad_cni_args_are_an_error_naming_the_field() {
        let mut vars = ADD_ENV;
        vars[4].1 = "K8S_POD_NAMESPACE=Not_A_Label;K8S_POD_NAME=x";
        let error = error_of(&run(env(&vars), br#"{"cniVersion":"1.0.0"}"#));
        assert_eq!(error["code"], 4);
        assert!(
            error["msg"].as_str().unwrap().contains("K8S_POD_NAMESPACE"),
            "{error}"
        );
        vars[4].1 = "K8S_POD_NAMESPACE=ray";
        let error = error_of(&run(env(&vars), br#"{"cniVersion":"1.0.0"}"#));
        assert!(
            error["msg"].as_str().unwrap().contains("K8S_POD_NAME"),
            "{error}"
        );
        vars[4].1 = "K8S_POD_NAMESPACE=ray;garbage";
        let error = error_of(&run(env(&vars), br#"{"cniVersion":"1.0.0"}"#));
        assert!(
            error["msg"].as_str().unwrap().contains("garbage"),
            "{error}"
        );
    }

    #[test]
    fn add_without_prev_result_is_a_config_error_naming_it() {
        let error = error_of(&run(
            env(&ADD_ENV),
            br#"{"cniVersion":"1.0.0","name":"k8s","type":"rayfence-cni"}"#,
        ));
        assert_eq!(error["code"], 7);
        assert_eq!(error["cniVersion"], "1.0.0");
        assert!(
            error["msg"].as_str().unwrap().contains("prevResult"),
            "{error}"
        );
    }

    #[test]
    fn config_fields_are_parsed_and_unknown_ones_ignored() {
        let conf = parse_conf(
            br#"{"cniVersion":"1.0.0","name":"k8s","type":"rayfence-cni","bpffs":"/x/rf",
                "somethingElse":{"a":1},"prevResult":{"cniVersion":"1.0.0","interfaces":[
                {"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/run/netns/p"}]}}"#,
        )
        .expect("parse");
        assert_eq!(conf.bpffs, PathBuf::from("/x/rf"));
        let result = conf.prev_result.expect("prevResult");
        assert_eq!(host_interfaces(&result), ["cni0", "veth1"]);
        let conf = parse_conf(br#"{"cniVersion":"0.4.0"}"#).expect("parse");
        assert_eq!(conf.bpffs, PathBuf::from(DEFAULT_BPFFS_DIR));
        assert!(matches!(
            parse_conf(br#"{"cniVersion":"1.0.0","bpffs":"relative"}"#),
            Err(CniError::Config { field: "bpffs", .. })
        ));
        assert!(matches!(parse_conf(b"{not json"), Err(CniError::Decode(_))));
        assert!(matches!(
            parse_conf(br#"{"cniVersion":"9.9.9"}"#),
            Err(CniError::Version { .. })
        ));
    }

    #[test]
    fn missing_environment_is_an_error_naming_the_variable() {
        let error = error_of(&run(env(&[]), b"{}"));
        assert!(
            error["msg"].as_str().unwrap().contains("CNI_COMMAND"),
            "{error}"
        );
        let error = error_of(&run(env(&ADD_ENV[..3]), br#"{"cniVersion":"1.0.0"}"#));
        assert!(
            error["msg"].as_str().unwrap().contains("CNI_IFNAME"),
            "{error}"
        );
    }

    #[test]
    fn version_lists_the_supported_versions() {
        let outcome = run(
            env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"1.0.0"}"#,
        );
        assert!(outcome.success);
        let answer: Value = serde_json::from_str(&outcome.stdout).expect("JSON");
        assert!(
            answer["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&json!("1.0.0"))
        );
    }

    #[test]
    fn without_the_agents_state_add_passes_the_result_through() {
        let stdin = br#"{"cniVersion":"1.0.0","bpffs":"/nonexistent/rayfence-pins",
            "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"veth9"}],"ips":[]}}"#;
        let outcome = run(env(&ADD_ENV), stdin);
        assert!(outcome.success, "{}", outcome.stdout);
        let printed: Value = serde_json::from_str(&outcome.stdout).expect("JSON");
        let conf = parse_conf(stdin).expect("parse");
        assert_eq!(Some(printed), conf.prev_result);
        let mut del = ADD_ENV;
        del[0].1 = "DEL";
        assert!(run(env(&del), stdin).success);
    }
}
