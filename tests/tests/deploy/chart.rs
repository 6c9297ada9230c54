//! deploy/helm/rayfence without a helm binary: the templates use only values that
//! exist in values.yaml (and every value is used), they render (with the small
//! evaluator in `rayfence_tests::deploy::chart`) to objects of their Kubernetes types, and
//! the chart passes the agent the same flags, settings and RBAC as the Kustomize
//! base and its overlays.

use std::collections::BTreeSet;

use anyhow::Result;
use rayfence_tests::deploy::chart::{self, render};
use rayfence_tests::deploy::*;
use serde_json::{Value, json};

#[test]
fn templates_use_only_values_that_exist_and_every_value_is_used() -> Result<()> {
    assert!(chart::is_chart(&chart::chart_dir()));
    let values = chart::default_values()?;
    let mut used = BTreeSet::new();
    for (name, text) in chart::templates()? {
        for path in chart::value_paths(&text) {
            assert!(
                chart::lookup(&values, &path).is_some(),
                "{name} uses .Values.{path}, which values.yaml does not define"
            );
            used.insert(path);
        }
    }
    // Every leaf of values.yaml (or a map/list handed whole to toYaml) is read.
    fn leaves(v: &Value, prefix: &str, out: &mut Vec<String>) {
        match v.as_object() {
            Some(o) if !o.is_empty() => {
                for (k, child) in o {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(child, &p, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }
    let mut all = Vec::new();
    leaves(&values, "", &mut all);
    for leaf in all {
        assert!(
            used.iter()
                .any(|u| leaf == *u || leaf.starts_with(&format!("{u}."))),
            "values.yaml defines {leaf}, which no template reads"
        );
    }
    Ok(())
}

fn overrides_cases() -> Vec<(&'static str, Vec<(&'static str, Value)>)> {
    vec![
        ("deploy/base", vec![]),
        (
            "deploy/overlays/audit",
            vec![("settings.audit", json!(true))],
        ),
        (
            "deploy/overlays/k3s-flannel",
            vec![
                ("cni.confDir", json!(K3S_CNI_DIRS.0)),
                ("cni.binDir", json!(K3S_CNI_DIRS.1)),
            ],
        ),
        (
            "deploy/overlays/networkpolicies",
            vec![("settings.enforceNetworkPolicies", json!(true))],
        ),
    ]
}

#[test]
fn chart_renders_objects_of_their_kubernetes_types() -> Result<()> {
    for (_, overrides) in overrides_cases() {
        let docs = render(&overrides, "rayfence-system")?;
        let kinds: BTreeSet<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            BTreeSet::from([
                "ClusterRole",
                "ClusterRoleBinding",
                "DaemonSet",
                "ServiceAccount"
            ])
        );
        for doc in &docs {
            check_typed(doc)?;
        }
    }
    Ok(())
}

/// The pod as both ways render it, minus what legitimately differs: where the
/// settings come from (env vs a ConfigMap; compared separately, as values), the
/// image reference (kustomize `images:` vs values), labels, and comments.
fn comparable_pod(ds: &Value) -> Value {
    let mut spec = ds["spec"].clone();
    let pod = &mut spec["template"]["spec"];
    if pod["nodeSelector"] == json!({}) {
        pod.as_object_mut().unwrap().remove("nodeSelector");
    }
    // Kustomize's patches put the volumes they touch first; the order means nothing.
    if let Some(volumes) = pod["volumes"].as_array_mut() {
        volumes.sort_by_key(|v| v["name"].as_str().unwrap_or_default().to_owned());
    }
    for c in pod["containers"].as_array_mut().unwrap() {
        let c = c.as_object_mut().unwrap();
        for field in ["env", "envFrom", "image"] {
            c.remove(field);
        }
    }
    spec
}

#[test]
fn chart_and_kustomize_pass_the_same_flags_settings_and_rbac() -> Result<()> {
    for (dir, overrides) in overrides_cases() {
        let kust = kustomize(dir)?;
        let helm = render(&overrides, "rayfence-system")?;
        let k_ds = find(&kust, "DaemonSet", "rayfence-agent");
        let h_ds = find(&helm, "DaemonSet", "rayfence-agent");
        assert_eq!(agent_args(h_ds), agent_args(k_ds), "{dir}: flags");
        assert_eq!(
            agent_environment(&helm, h_ds),
            agent_environment(&kust, k_ds),
            "{dir}: settings"
        );
        assert_eq!(comparable_pod(h_ds), comparable_pod(k_ds), "{dir}: pod");
        assert_eq!(
            agent_container(h_ds)["image"],
            agent_container(k_ds)["image"],
            "{dir}: image"
        );
        let k_role = find(&kust, "ClusterRole", "rayfence-agent");
        let h_role = find(&helm, "ClusterRole", "rayfence-agent");
        assert_eq!(h_role["rules"], k_role["rules"], "{dir}: RBAC rules");
        for reader in ["rayfence-metrics-reader", "rayfence-api-reader"] {
            assert_eq!(
                find(&helm, "ClusterRole", reader)["rules"],
                find(&kust, "ClusterRole", reader)["rules"],
                "{dir}: {reader}"
            );
        }
        let k_binding = find(&kust, "ClusterRoleBinding", "rayfence-agent");
        let h_binding = find(&helm, "ClusterRoleBinding", "rayfence-agent");
        assert_eq!(h_binding["roleRef"], k_binding["roleRef"], "{dir}");
        assert_eq!(h_binding["subjects"], k_binding["subjects"], "{dir}");
        find(&helm, "ServiceAccount", "rayfence-agent");
    }
    Ok(())
}

#[test]
fn chart_follows_the_release_namespace_and_values() -> Result<()> {
    let docs = render(
        &[
            ("image.tag", json!("9.9.9")),
            ("maps.conntrack", json!(1048576)),
            ("nodeSelector", json!({"rayfence.io/enforce": "true"})),
            ("settings.operatorNamespaces", json!(["ops"])),
        ],
        "security",
    )?;
    let ds = find(&docs, "DaemonSet", "rayfence-agent");
    assert_eq!(ds["metadata"]["namespace"], "security");
    assert_eq!(
        find(&docs, "ClusterRoleBinding", "rayfence-agent")["subjects"][0]["namespace"],
        "security"
    );
    assert_eq!(
        agent_container(ds)["image"],
        "ghcr.io/rayfence/rayfence:9.9.9"
    );
    let env = agent_environment(&docs, ds);
    assert_eq!(env["RAYFENCE_MAX_CONNTRACK"], "1048576");
    assert_eq!(env["RAYFENCE_OPERATOR_NAMESPACE"], "ops");
    assert_eq!(
        ds["spec"]["template"]["spec"]["nodeSelector"],
        json!({"rayfence.io/enforce": "true"})
    );
    for doc in &docs {
        check_typed(doc)?;
    }
    Ok(())
}

#[test]
fn chart_metrics_auth_values_set_the_flags_and_the_review_rules() -> Result<()> {
    let review_rules = |docs: &[Value]| -> BTreeSet<String> {
        rule_triples(find(docs, "ClusterRole", "rayfence-agent"))
            .into_iter()
            .filter(|(g, _, _)| g.starts_with("authentication.") || g.starts_with("authorization."))
            .map(|(_, r, v)| format!("{r}/{v}"))
            .collect()
    };
    let on = render(
        &[(
            "metrics.auth.resourceAttributes",
            json!("namespace=rayfence-system,resource=services,subresource=proxy"),
        )],
        "rayfence-system",
    )?;
    let env = agent_environment(&on, find(&on, "DaemonSet", "rayfence-agent"));
    assert_eq!(env["RAYFENCE_METRICS_AUTH"], "true");
    assert_eq!(env["RAYFENCE_METRICS_AUTH_AUDIENCE"], "rayfence");
    assert_eq!(
        env["RAYFENCE_METRICS_AUTH_RESOURCE_ATTRIBUTES"],
        "namespace=rayfence-system,resource=services,subresource=proxy"
    );
    assert_eq!(
        review_rules(&on),
        BTreeSet::from([
            "subjectaccessreviews/create".to_owned(),
            "tokenreviews/create".to_owned()
        ])
    );
    let off = render(
        &[
            ("metrics.auth.enabled", json!(false)),
            ("metrics.bindNodeAddress", json!(false)),
            ("metrics.host", json!("127.0.0.1")),
        ],
        "rayfence-system",
    )?;
    let env = agent_environment(&off, find(&off, "DaemonSet", "rayfence-agent"));
    assert_eq!(env["RAYFENCE_METRICS_AUTH"], "false");
    assert_eq!(env["RAYFENCE_METRICS_ADDR"], "127.0.0.1:9402");
    assert!(!env.contains_key("RAYFENCE_METRICS_BIND_ADDRESS"));
    assert!(!env.contains_key("RAYFENCE_METRICS_AUTH_RESOURCE_ATTRIBUTES"));
    assert!(
        review_rules(&off).is_empty(),
        "no review rules without auth"
    );
    for doc in on.iter().chain(&off) {
        check_typed(doc)?;
    }
    Ok(())
}

#[test]
fn chart_cni_values_set_the_host_dirs_and_disabled_renders_no_cni_at_all() -> Result<()> {
    let docs = render(
        &[
            ("cni.confDir", json!("/host/net.d")),
            ("cni.binDir", json!("/host/bin")),
            ("hostPaths.bpffs", json!("/host/bpf")),
        ],
        "rayfence-system",
    )?;
    let ds = find(&docs, "DaemonSet", "rayfence-agent");
    let c = agent_container(ds);
    let args = agent_args(ds);
    let host = |flag: &str| host_path_of(ds, c, flag_value(&args, flag).expect(flag));
    assert_eq!(host("--cni-conf-dir").as_deref(), Some("/host/net.d"));
    assert_eq!(host("--cni-bin-dir").as_deref(), Some("/host/bin"));
    assert_eq!(
        flag_value(&args, "--cni-bpffs").map(str::to_owned),
        host("--bpffs")
    );
    assert_eq!(flag_value(&args, "--cni-bpffs"), Some("/host/bpf/rayfence"));

    let off = render(&[("cni.enabled", json!(false))], "rayfence-system")?;
    let ds = find(&off, "DaemonSet", "rayfence-agent");
    assert!(
        !agent_args(ds).iter().any(|a| a.starts_with("--cni-")),
        "{:?}",
        agent_args(ds)
    );
    let text = serde_json::to_string(ds)?;
    assert!(!text.contains("cni"), "no CNI mount or volume: {text}");
    for doc in docs.iter().chain(&off) {
        check_typed(doc)?;
    }
    Ok(())
}

#[test]
fn the_evaluator_rejects_constructs_it_does_not_know() {
    let values = json!({"a": {"b": "x"}});
    assert!(chart::render_text("{{ .Values.a.b | upper }}", &values, "ns").is_err());
    assert!(chart::render_text("{{ include \"x\" . }}", &values, "ns").is_err());
    assert!(chart::render_text("{{ .Values.a.c }}", &values, "ns").is_err());
    assert!(chart::render_text("{{- if .Values.a.b }}", &values, "ns").is_err());
    assert_eq!(
        chart::render_text(
            "k:\n{{- if .Values.a.b }}\n  v: {{ .Values.a.b | quote }}\n{{- end }}\n",
            &values,
            "ns"
        )
        .unwrap(),
        "k:\n  v: \"x\"\n"
    );
}
