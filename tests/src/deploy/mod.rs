//! deploy/ as the tests read it: renders it (kustomize through `kubectl kustomize`,
//! the Helm chart through [`chart`], which checks its values with [`schema`] and
//! renders its templates with [`template`]), finds objects, runs the agent's CLI. Shared by
//! the `deploy` and `deploy_privileged` suites. Must not: decide anything; the
//! assertions live in the tests.

pub mod chart;
pub mod monitoring;
pub mod schema;
pub mod template;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use crate::agent_bin::rayfence_bin;
use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// The repository root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Every kustomization under deploy/ a user applies, relative to the root.
pub const KUSTOMIZATIONS: [&str; 6] = [
    "deploy/base",
    "deploy/overlays/audit",
    "deploy/overlays/k3s-flannel",
    "deploy/overlays/networkpolicies",
    "deploy/cleanup",
    "deploy/overlays/k3s-flannel/cleanup",
];

/// The host's CNI directories (configuration, plugins): the containerd and CRI-O
/// defaults, and k3s's own.
pub const CNI_DIRS: (&str, &str) = ("/etc/cni/net.d", "/opt/cni/bin");
pub const K3S_CNI_DIRS: (&str, &str) = (
    "/var/lib/rancher/k3s/agent/etc/cni/net.d",
    "/var/lib/rancher/k3s/data/cni",
);

/// (agent kustomization, the cleanup that goes with it, its CNI dirs).
pub const CLEANUPS: [(&str, &str, (&str, &str)); 2] = [
    ("deploy/base", "deploy/cleanup", CNI_DIRS),
    (
        "deploy/overlays/k3s-flannel",
        "deploy/overlays/k3s-flannel/cleanup",
        K3S_CNI_DIRS,
    ),
];

/// The agent's kustomizations (all but the cleanup).
pub const AGENT_KUSTOMIZATIONS: [&str; 4] = [
    "deploy/base",
    "deploy/overlays/audit",
    "deploy/overlays/k3s-flannel",
    "deploy/overlays/networkpolicies",
];

/// `kubectl kustomize DIR`, as documents.
pub fn kustomize(dir: &str) -> Result<Vec<Value>> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(workspace().join(dir))
        .output()
        .context("running kubectl kustomize (kubectl is needed for the deploy tests)")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize {dir}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    documents(&String::from_utf8(out.stdout)?)
}

/// A multi-document YAML stream as JSON values, empty documents left out.
pub fn documents(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(doc).context("parsing YAML")?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The one object of `kind` named `name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} {name}");
    found[0]
}

/// The one object of `kind`.
pub fn only<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

/// The agent container of a DaemonSet document.
pub fn agent_container(ds: &Value) -> &Value {
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    containers
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("container agent")
}

/// The environment the agent container runs with: its `env` values and the data of
/// the ConfigMaps it takes with `envFrom` (from `docs`), `NODE_NAME` as
/// "<downward API>". `env` wins over `envFrom`, as in Kubernetes.
pub fn agent_environment(docs: &[Value], ds: &Value) -> std::collections::BTreeMap<String, String> {
    let c = agent_container(ds);
    let mut env = std::collections::BTreeMap::new();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let name = from["configMapRef"]["name"]
            .as_str()
            .expect("only configMapRef envFrom");
        let cm = find(docs, "ConfigMap", name);
        for (k, v) in cm["data"].as_object().expect("data") {
            env.insert(k.clone(), v.as_str().expect("string value").to_owned());
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name").to_owned();
        let value = match (&e["value"], &e["valueFrom"]) {
            (Value::String(s), _) => s.clone(),
            (_, Value::Object(_)) => "<downward API>".to_owned(),
            other => panic!("env {name}: unexpected {other:?}"),
        };
        env.insert(name, value);
    }
    env
}

/// The agent container's args.
pub fn agent_args(ds: &Value) -> Vec<String> {
    agent_container(ds)["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect()
}

/// The value of `--flag=value` in `args`.
pub fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
}

/// The host path a container path of `container` in DaemonSet `ds` is: through
/// the hostPath volume mounted at (a parent of) it. `None` when no hostPath
/// volume holds it.
pub fn host_path_of(ds: &Value, container: &Value, path: &str) -> Option<String> {
    let volumes = ds["spec"]["template"]["spec"]["volumes"].as_array()?;
    container["volumeMounts"]
        .as_array()?
        .iter()
        .filter_map(|m| {
            let mount = m["mountPath"].as_str()?;
            let rest = path.strip_prefix(mount)?;
            (rest.is_empty() || rest.starts_with('/')).then_some((m, rest))
        })
        .max_by_key(|(m, _)| m["mountPath"].as_str().map_or(0, str::len))
        .and_then(|(m, rest)| {
            let volume = volumes.iter().find(|v| v["name"] == m["name"])?;
            Some(format!("{}{rest}", volume["hostPath"]["path"].as_str()?))
        })
}

/// The cleanup DaemonSet's init container (the one that runs `rayfence cleanup`).
pub fn cleanup_container(ds: &Value) -> &Value {
    &ds["spec"]["template"]["spec"]["initContainers"][0]
}

/// A container's args.
pub fn container_args(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect()
}

/// What `rayfence <subcommand> --help` lists: long flags and environment variables.
#[derive(Debug, Default)]
pub struct CliSurface {
    pub flags: BTreeSet<String>,
    pub envs: BTreeSet<String>,
}

pub fn cli_surface(subcommand: &str) -> Result<CliSurface> {
    let out = Command::new(rayfence_bin()?)
        .args([subcommand, "--help"])
        .env_clear()
        .output()?;
    if !out.status.success() {
        bail!("rayfence {subcommand} --help: {}", out.status);
    }
    let help = String::from_utf8(out.stdout)?;
    let mut surface = CliSurface::default();
    for word in help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']') {
        if let Some(flag) = word.strip_prefix("--")
            && !flag.is_empty()
        {
            let flag = flag.split(['=', '<']).next().unwrap_or(flag);
            surface.flags.insert(format!("--{flag}"));
        }
    }
    for part in help.split("[env: ").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        surface.envs.insert(name);
    }
    Ok(surface)
}

/// The long flag of an argument (`--bpffs=/x` -> `--bpffs`), `None` for values and
/// the subcommand.
pub fn flag_of(arg: &str) -> Option<&str> {
    arg.starts_with("--")
        .then(|| arg.split('=').next().unwrap_or(arg))
}

/// Parses `doc` as the k8s-openapi type of its kind and checks that nothing was
/// lost on the way back: a misspelled or misplaced field (which the API server
/// would drop or reject) makes the round trip differ.
pub fn check_typed(doc: &Value) -> Result<()> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role};

    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Result<Value> {
        let typed: T = serde_json::from_value(doc.clone())?;
        Ok(serde_json::to_value(typed)?)
    }
    let kind = doc["kind"].as_str().context("kind")?;
    let back = match kind {
        "Namespace" => round_trip::<Namespace>(doc),
        "ServiceAccount" => round_trip::<ServiceAccount>(doc),
        "ClusterRole" => round_trip::<ClusterRole>(doc),
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(doc),
        "Role" => round_trip::<Role>(doc),
        "ConfigMap" => round_trip::<ConfigMap>(doc),
        "DaemonSet" => round_trip::<DaemonSet>(doc),
        other => bail!("unexpected kind {other} in deploy/"),
    }
    .with_context(|| format!("{kind} {}", doc["metadata"]["name"]))?;
    if back != *doc {
        bail!(
            "{kind} {} changes when parsed as its type (unknown or misplaced field?):\nwritten: {}\nparsed:  {}",
            doc["metadata"]["name"],
            serde_json::to_string_pretty(doc)?,
            serde_json::to_string_pretty(&back)?
        );
    }
    Ok(())
}

/// A ClusterRole's rules as (group, resource, verb) triples.
pub fn rule_triples(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "only plain resource rules: {rule}"
        );
        for g in rule["apiGroups"].as_array().expect("apiGroups") {
            for r in rule["resources"].as_array().expect("resources") {
                for v in rule["verbs"].as_array().expect("verbs") {
                    let s = |x: &Value| x.as_str().expect("string").to_owned();
                    assert!(s(v) != "*" && s(r) != "*" && s(g) != "*", "no wildcards");
                    out.insert((s(g), s(r), s(v)));
                }
            }
        }
    }
    out
}
