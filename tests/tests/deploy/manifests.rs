//! deploy/ rendered with `kubectl kustomize` (base, every overlay, the cleanup):
//! the objects parse as their Kubernetes types, the agent's pod is least privilege
//! as deploy/base/daemonset.yaml justifies it, and every flag and setting the
//! manifests pass is one the `rayfence` binary accepts; `kubectl rayfence` finds
//! the agents the base installs, and its Role grants exactly what it needs.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::Result;
use rayfence::capabilities::Capability;
use rayfence_tests::deploy::*;
use serde_json::{Value, json};

fn agent_ds(docs: &[Value]) -> &Value {
    find(docs, "DaemonSet", "rayfence-agent")
}

#[test]
fn every_rendering_parses_as_its_kubernetes_types() -> Result<()> {
    for dir in KUSTOMIZATIONS {
        let docs = kustomize(dir)?;
        assert!(!docs.is_empty(), "{dir} renders nothing");
        for doc in &docs {
            check_typed(doc).map_err(|e| e.context(dir))?;
        }
    }
    Ok(())
}

#[test]
fn agent_pod_is_not_privileged_and_adds_exactly_the_justified_capabilities() -> Result<()> {
    let expected: BTreeSet<String> = Capability::AGENT
        .iter()
        .map(|c| c.k8s_name().to_owned())
        .collect();
    for dir in AGENT_KUSTOMIZATIONS {
        let docs = kustomize(dir)?;
        let sc = &agent_container(agent_ds(&docs))["securityContext"];
        assert_eq!(sc["privileged"], false, "{dir}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{dir}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{dir}");
        assert_eq!(
            sc["runAsUser"], 0,
            "{dir}: capabilities are effective for uid 0 only"
        );
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{dir}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{dir}");
        let added: BTreeSet<String> = sc["capabilities"]["add"]
            .as_array()
            .expect("add")
            .iter()
            .map(|c| c.as_str().expect("name").to_owned())
            .collect();
        assert_eq!(
            added, expected,
            "{dir}: the DaemonSet must add exactly what rayfence::capabilities checks"
        );
    }
    Ok(())
}

#[test]
fn agent_runs_on_every_node_as_node_critical_with_host_namespaces() -> Result<()> {
    for dir in AGENT_KUSTOMIZATIONS {
        let docs = kustomize(dir)?;
        let ds = agent_ds(&docs);
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(
            pod["tolerations"],
            json!([{"operator": "Exists"}]),
            "{dir}: one toleration without key tolerates every taint"
        );
        assert_eq!(pod["priorityClassName"], "system-node-critical", "{dir}");
        assert_eq!(pod["hostNetwork"], true, "{dir}");
        assert_eq!(pod["hostPID"], true, "{dir}: /proc/<pid>/ns/net of pods");
        assert_eq!(pod["serviceAccountName"], "rayfence-agent", "{dir}");
        let update = &ds["spec"]["updateStrategy"];
        assert_eq!(update["type"], "RollingUpdate", "{dir}");
        assert_eq!(update["rollingUpdate"]["maxUnavailable"], 1, "{dir}");

        let env = agent_environment(&docs, ds);
        assert_eq!(env["NODE_NAME"], "<downward API>", "{dir}");
        let node_name = agent_container(ds)["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == "NODE_NAME")
            .expect("NODE_NAME");
        assert_eq!(
            node_name["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.nodeName"
        );
    }
    Ok(())
}

#[test]
fn probes_hit_readyz_and_healthz_on_the_loopback_health_address() -> Result<()> {
    for dir in AGENT_KUSTOMIZATIONS {
        let docs = kustomize(dir)?;
        let ds = agent_ds(&docs);
        let c = agent_container(ds);
        let addr: std::net::SocketAddr = agent_environment(&docs, ds)["RAYFENCE_HEALTH_ADDR"]
            .parse()
            .expect("RAYFENCE_HEALTH_ADDR is host:port");
        // The kubelet (host network) reaches the agent's loopback; pods do not.
        assert!(addr.ip().is_loopback(), "{dir}: {addr}");
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{dir} {probe}");
            assert_eq!(get["port"], addr.port(), "{dir} {probe}");
            assert_eq!(get["host"], addr.ip().to_string(), "{dir} {probe}");
        }
    }
    Ok(())
}

/// Metrics reachable by Prometheus on the node's own address (host network: the
/// pod IP), not every address, only behind --metrics-auth with an audience;
/// never an open endpoint off loopback.
#[test]
fn metrics_listen_for_prometheus_only_behind_auth_with_an_audience() -> Result<()> {
    for dir in AGENT_KUSTOMIZATIONS {
        let docs = kustomize(dir)?;
        let ds = agent_ds(&docs);
        let env = agent_environment(&docs, ds);
        let addr: std::net::SocketAddr = env["RAYFENCE_METRICS_ADDR"].parse()?;
        assert_eq!(
            env.get("RAYFENCE_METRICS_BIND_ADDRESS").map(String::as_str),
            Some("<downward API>"),
            "{dir}: the listener binds the node's address, not {addr}"
        );
        let bind = agent_container(ds)["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == "RAYFENCE_METRICS_BIND_ADDRESS")
            .expect("RAYFENCE_METRICS_BIND_ADDRESS");
        assert_eq!(
            bind["valueFrom"]["fieldRef"]["fieldPath"],
            "status.hostIP",
            "{dir}: Prometheus scrapes <node IP>:{}",
            addr.port()
        );
        assert_eq!(
            env.get("RAYFENCE_METRICS_AUTH").map(String::as_str),
            Some("true"),
            "{dir}: off loopback, --metrics-auth is on"
        );
        let audiences = env
            .get("RAYFENCE_METRICS_AUTH_AUDIENCE")
            .cloned()
            .unwrap_or_default();
        assert!(
            !audiences.is_empty() && audiences.split(',').all(|a| !a.trim().is_empty()),
            "{dir}: tokens bound to an audience (a sniffed one cannot be replayed to the API server)"
        );
        let port = &agent_container(ds)["ports"][0];
        assert_eq!(port["name"], "metrics", "{dir}");
        assert_eq!(port["containerPort"], addr.port(), "{dir}");
    }
    Ok(())
}

#[test]
fn host_mounts_are_bpffs_a_read_only_cgroup2_and_the_cni_dirs_only() -> Result<()> {
    for dir in KUSTOMIZATIONS {
        let docs = kustomize(dir)?;
        for ds in docs.iter().filter(|d| d["kind"] == "DaemonSet") {
            let pod = &ds["spec"]["template"]["spec"];
            let volumes = pod["volumes"].as_array().expect("volumes");
            // Besides the host paths, only a small in-memory emptyDir (the API socket).
            for v in volumes.iter().filter(|v| v.get("hostPath").is_none()) {
                assert_eq!(v["emptyDir"]["medium"], "Memory", "{dir}: {v}");
            }
            let host_paths: BTreeMap<String, String> = volumes
                .iter()
                .filter_map(|v| {
                    let path = v["hostPath"]["path"].as_str()?;
                    Some((v["name"].as_str().unwrap().to_owned(), path.to_owned()))
                })
                .collect();
            let allowed = [
                "/sys/fs/bpf",
                "/sys/fs/cgroup",
                CNI_DIRS.0,
                CNI_DIRS.1,
                K3S_CNI_DIRS.0,
                K3S_CNI_DIRS.1,
            ];
            for path in host_paths.values() {
                assert!(allowed.contains(&path.as_str()), "{dir}: host path {path}");
            }
            let containers = pod["containers"]
                .as_array()
                .into_iter()
                .chain(pod["initContainers"].as_array())
                .flatten();
            for c in containers {
                let privileged = c["securityContext"]["privileged"] == true;
                assert!(!privileged, "{dir}: container {} is privileged", c["name"]);
                for m in c["volumeMounts"].as_array().into_iter().flatten() {
                    // The API server rejects Bidirectional on unprivileged containers.
                    assert_ne!(m["mountPropagation"], "Bidirectional", "{dir}");
                    let host = host_paths.get(m["name"].as_str().unwrap());
                    if host.map(String::as_str) == Some("/sys/fs/cgroup") {
                        assert_eq!(m["readOnly"], true, "{dir}: cgroup fs read-only");
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn every_flag_and_setting_the_manifests_pass_is_in_the_agent_cli() -> Result<()> {
    let cli = cli_surface("agent")?;
    for dir in AGENT_KUSTOMIZATIONS {
        let docs = kustomize(dir)?;
        let ds = agent_ds(&docs);
        let args = agent_args(ds);
        assert_eq!(args[0], "agent", "{dir}");
        for arg in &args[1..] {
            let flag = flag_of(arg).unwrap_or_else(|| panic!("{dir}: {arg} is not --flag=value"));
            assert!(
                cli.flags.contains(flag),
                "{dir}: rayfence agent has no {flag}"
            );
        }
        for name in agent_environment(&docs, ds).keys() {
            assert!(
                cli.envs.contains(name),
                "{dir}: rayfence agent reads no environment variable {name} (a typo is ignored silently)"
            );
        }
    }
    let cleanup = cli_surface("cleanup")?;
    let docs = kustomize("deploy/cleanup")?;
    let ds = find(&docs, "DaemonSet", "rayfence-cleanup");
    let init = &ds["spec"]["template"]["spec"]["initContainers"][0];
    let args: Vec<&str> = init["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "cleanup");
    for arg in &args[1..] {
        assert!(cleanup.flags.contains(flag_of(arg).expect("flag")), "{arg}");
    }
    Ok(())
}

/// Runs `rayfence agent` with exactly the pod's args and environment, plus a
/// manifests directory that does not exist: the agent validates every flag and
/// setting (values, NS/NAME, k=v selectors, capacities) before it checks that
/// directory, so failing on it, and on nothing earlier, proves all of them valid.
#[test]
fn the_agent_accepts_every_rendered_configuration() -> Result<()> {
    for dir in AGENT_KUSTOMIZATIONS {
        let docs = kustomize(dir)?;
        let ds = agent_ds(&docs);
        let mut env = agent_environment(&docs, ds);
        env.insert("NODE_NAME".into(), "node-a".into());
        // What the downward API gives: status.hostIP.
        env.insert("RAYFENCE_METRICS_BIND_ADDRESS".into(), "10.0.0.1".into());
        env.insert("RAYFENCE_MANIFESTS".into(), "/nonexistent/rayfence".into());
        let out = Command::new(rayfence_bin()?)
            .args(agent_args(ds))
            .env_clear()
            .envs(&env)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--manifests /nonexistent/rayfence: not a directory"),
            "{dir}: the agent rejected its configuration earlier:\n{stderr}"
        );
    }
    Ok(())
}

/// The agent's CNI flags name the host's CNI directories through their mounts
/// (the overlay's own on k3s), writable, created when missing; the plugin's entry
/// names the pin directory as the host sees it.
#[test]
fn the_agent_installs_the_cni_plugin_into_the_hosts_cni_dirs() -> Result<()> {
    for dir in AGENT_KUSTOMIZATIONS {
        let docs = kustomize(dir)?;
        let ds = agent_ds(&docs);
        let c = agent_container(ds);
        let args = agent_args(ds);
        let (conf, bin) = if dir.contains("k3s") {
            K3S_CNI_DIRS
        } else {
            CNI_DIRS
        };
        let host = |flag: &str| {
            let path = flag_value(&args, flag).unwrap_or_else(|| panic!("{dir}: no {flag}"));
            host_path_of(ds, c, path).unwrap_or_else(|| panic!("{dir}: {flag} is not mounted"))
        };
        assert_eq!(host("--cni-conf-dir"), conf, "{dir}");
        assert_eq!(host("--cni-bin-dir"), bin, "{dir}");
        assert_eq!(
            flag_value(&args, "--cni-bpffs").map(str::to_owned),
            Some(host("--bpffs")),
            "{dir}: the plugin runs on the host"
        );
        for name in ["cni-conf", "cni-bin"] {
            let mount = c["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .find(|m| m["name"] == name)
                .expect("mount");
            assert_ne!(mount["readOnly"], true, "{dir}: {name} is written");
            let volume = ds["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .expect("volumes")
                .iter()
                .find(|v| v["name"] == name)
                .expect("volume");
            assert_eq!(volume["hostPath"]["type"], "DirectoryOrCreate", "{dir}");
        }
    }
    Ok(())
}

/// The cleanup that goes with each agent rendering removes the plugin from the
/// same host directories (and the pins from the same bpffs).
#[test]
fn each_cleanup_removes_the_cni_plugin_from_its_agents_dirs() -> Result<()> {
    for (agent_dir, cleanup_dir, (conf, bin)) in CLEANUPS {
        let agent_docs = kustomize(agent_dir)?;
        let agent = agent_ds(&agent_docs);
        let agent_args = agent_args(agent);
        let docs = kustomize(cleanup_dir)?;
        let ds = find(&docs, "DaemonSet", "rayfence-cleanup");
        let init = cleanup_container(ds);
        let args = container_args(init);
        assert_eq!(args[0], "cleanup", "{cleanup_dir}");
        let host = |flag: &str| {
            let path = flag_value(&args, flag).unwrap_or_else(|| panic!("{cleanup_dir}: {flag}"));
            host_path_of(ds, init, path).unwrap_or_else(|| panic!("{cleanup_dir}: {flag}"))
        };
        let agent_host = |flag: &str| {
            let path = flag_value(&agent_args, flag).expect("agent flag");
            host_path_of(agent, agent_container(agent), path).expect("agent mount")
        };
        assert_eq!(host("--cni-conf-dir"), conf, "{cleanup_dir}");
        assert_eq!(host("--cni-bin-dir"), bin, "{cleanup_dir}");
        for flag in ["--cni-conf-dir", "--cni-bin-dir", "--bpffs"] {
            assert_eq!(host(flag), agent_host(flag), "{cleanup_dir} {flag}");
        }
    }
    Ok(())
}

/// (overlay, settings it changes, RBAC rules it adds).
type OverlayCase = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [(&'static str, &'static str, &'static str)],
);

#[test]
fn overlays_change_only_what_they_are_for() -> Result<()> {
    let base = kustomize("deploy/base")?;
    let base_env = agent_environment(&base, agent_ds(&base));
    let base_rules = rule_triples(find(&base, "ClusterRole", "rayfence-agent"));
    let host_paths = |ds: &Value| -> BTreeMap<String, String> {
        ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(|v| {
                Some((
                    v["name"].as_str()?.to_owned(),
                    v["hostPath"]["path"].as_str()?.to_owned(),
                ))
            })
            .collect()
    };
    let cases: [OverlayCase; 3] = [
        ("deploy/overlays/audit", &[("RAYFENCE_AUDIT", "true")], &[]),
        (
            "deploy/overlays/k3s-flannel",
            &[
                ("RAYFENCE_DNS_SERVICE", "kube-system/kube-dns"),
                ("RAYFENCE_KUBELET_CGROUP_ROOT", "/"),
            ],
            &[],
        ),
        (
            "deploy/overlays/networkpolicies",
            &[("RAYFENCE_ENFORCE_NETWORKPOLICIES", "true")],
            &[
                ("networking.k8s.io", "networkpolicies", "get"),
                ("networking.k8s.io", "networkpolicies", "list"),
                ("networking.k8s.io", "networkpolicies", "watch"),
            ],
        ),
    ];
    for (dir, settings, extra_rules) in cases {
        let docs = kustomize(dir)?;
        let mut expected_env = base_env.clone();
        for (k, v) in settings {
            expected_env.insert((*k).to_owned(), (*v).to_owned());
        }
        assert_eq!(
            agent_environment(&docs, agent_ds(&docs)),
            expected_env,
            "{dir}"
        );
        let mut expected_rules = base_rules.clone();
        for (g, r, v) in extra_rules {
            expected_rules.insert(((*g).into(), (*r).into(), (*v).into()));
        }
        assert_eq!(
            rule_triples(find(&docs, "ClusterRole", "rayfence-agent")),
            expected_rules,
            "{dir}"
        );
        assert_eq!(
            agent_args(agent_ds(&docs)),
            agent_args(agent_ds(&base)),
            "{dir}"
        );
        // Only k3s moves host directories: its CNI ones.
        let mut expected_paths = host_paths(agent_ds(&base));
        if dir.contains("k3s") {
            expected_paths.insert("cni-conf".into(), K3S_CNI_DIRS.0.into());
            expected_paths.insert("cni-bin".into(), K3S_CNI_DIRS.1.into());
        }
        assert_eq!(host_paths(agent_ds(&docs)), expected_paths, "{dir}");
    }
    Ok(())
}

#[test]
fn kubectl_rayfence_finds_the_agents_and_its_role_grants_exactly_what_it_needs() -> Result<()> {
    use rayfence::kubectl::{DEFAULT_CONTAINER, DEFAULT_NAMESPACE, DEFAULT_SELECTOR};
    let docs = kustomize("deploy/base")?;
    let ds = agent_ds(&docs);
    assert_eq!(ds["metadata"]["namespace"], DEFAULT_NAMESPACE);
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for pair in DEFAULT_SELECTOR.split(',') {
        let (key, value) = pair.split_once('=').expect("k=v");
        assert_eq!(labels[key], value, "the agent pods carry {pair}");
    }
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert!(containers.iter().any(|c| c["name"] == DEFAULT_CONTAINER));
    // The cleanup DaemonSet's pods are not taken for agents.
    let cleanup = kustomize("deploy/cleanup")?;
    let cleanup_ds = only(&cleanup, "DaemonSet");
    let cleanup_labels = &cleanup_ds["spec"]["template"]["metadata"]["labels"];
    assert!(
        DEFAULT_SELECTOR.split(',').any(|pair| {
            let (key, value) = pair.split_once('=').expect("k=v");
            cleanup_labels[key] != value
        }),
        "{cleanup_labels}"
    );

    let viewer = find(&docs, "Role", "rayfence-viewer");
    assert_eq!(viewer["metadata"]["namespace"], DEFAULT_NAMESPACE);
    let triple = |r: &str, v: &str| (String::new(), r.to_owned(), v.to_owned());
    assert_eq!(
        rule_triples(viewer),
        BTreeSet::from([
            triple("pods", "get"),
            triple("pods", "list"),
            triple("pods/exec", "create"),
            triple("pods/exec", "get"),
        ])
    );
    // Nothing binds it: who may exec into the agents is the installer's choice.
    assert!(
        !docs
            .iter()
            .any(|d| d["roleRef"]["name"] == "rayfence-viewer"),
        "rayfence-viewer is bound by deploy/"
    );
    Ok(())
}

#[test]
fn cleanup_uses_the_agents_bpffs_with_bpf_and_net_admin_only() -> Result<()> {
    let base = kustomize("deploy/base")?;
    let agent_bpffs = agent_args(agent_ds(&base))
        .into_iter()
        .find(|a| a.starts_with("--bpffs="))
        .expect("--bpffs");
    let docs = kustomize("deploy/cleanup")?;
    let ds = find(&docs, "DaemonSet", "rayfence-cleanup");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(
        pod["hostNetwork"], true,
        "clsact filters live in the host netns"
    );
    let init = &pod["initContainers"][0];
    assert!(
        init["args"]
            .as_array()
            .unwrap()
            .contains(&json!(agent_bpffs))
    );
    assert_eq!(
        init["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["BPF", "NET_ADMIN"])
    );
    // Same host directory at the same container path as the agent.
    let mount = |docs: &[Value], ds: &Value, container: &Value| -> (String, String) {
        let _ = docs;
        let m = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "bpffs")
            .expect("bpffs mount")
            .clone();
        let v = ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "bpffs")
            .expect("bpffs volume")
            .clone();
        (
            m["mountPath"].as_str().unwrap().to_owned(),
            v["hostPath"]["path"].as_str().unwrap().to_owned(),
        )
    };
    let agent = agent_ds(&base);
    assert_eq!(
        mount(&docs, ds, init),
        mount(&base, agent, agent_container(agent))
    );
    Ok(())
}
