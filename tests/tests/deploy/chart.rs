//! deploy/helm/rayfence without a helm binary: the templates use only values that
//! exist in values.yaml (and every value is used), values.schema.json refuses bad
//! values naming the field, the templates render (with the strict evaluator in
//! `rayfence_tests::deploy::chart`) to objects of their Kubernetes types with
//! Helm's standard names and labels, and the chart passes the agent the same
//! flags, settings and RBAC as the Kustomize base and its overlays.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{Context as _, Result};
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
                "Role",
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
        // kubectl rayfence's Role, in the agents' namespace.
        let k_viewer = find(&kust, "Role", "rayfence-viewer");
        let h_viewer = find(&helm, "Role", "rayfence-viewer");
        assert_eq!(
            h_viewer["rules"], k_viewer["rules"],
            "{dir}: rayfence-viewer"
        );
        assert_eq!(
            h_viewer["metadata"]["namespace"], k_viewer["metadata"]["namespace"],
            "{dir}: rayfence-viewer"
        );
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
    // Auth off alone binds loopback: metrics.host and bindNodeAddress are for
    // a listener that checks tokens.
    let off = render(&[("metrics.auth.enabled", json!(false))], "rayfence-system")?;
    let env = agent_environment(&off, find(&off, "DaemonSet", "rayfence-agent"));
    assert_eq!(env["RAYFENCE_METRICS_AUTH"], "false");
    assert_eq!(env["RAYFENCE_METRICS_ADDR"], "127.0.0.1:9402");
    assert_eq!(env["RAYFENCE_HEALTH_ADDR"], "127.0.0.1:9402");
    for unused in [
        "RAYFENCE_METRICS_BIND_ADDRESS",
        "RAYFENCE_METRICS_AUTH_AUDIENCE",
        "RAYFENCE_METRICS_AUTH_RESOURCE_ATTRIBUTES",
    ] {
        assert!(!env.contains_key(unused), "{unused} without auth");
    }
    let off_elsewhere = render(
        &[
            ("metrics.auth.enabled", json!(false)),
            ("metrics.bindNodeAddress", json!(true)),
            ("metrics.host", json!("0.0.0.0")),
            ("metrics.port", json!(9500)),
        ],
        "rayfence-system",
    )?;
    let env = agent_environment(
        &off_elsewhere,
        find(&off_elsewhere, "DaemonSet", "rayfence-agent"),
    );
    assert_eq!(env["RAYFENCE_METRICS_ADDR"], "127.0.0.1:9500");
    assert!(!env.contains_key("RAYFENCE_METRICS_BIND_ADDRESS"));
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
fn the_evaluator_renders_what_helm_renders_and_rejects_what_it_does_not_know() {
    let values = json!({
        "a": {"b": "x", "empty": "", "big": 1048576, "small": 9402},
        "m": {"big": 1048576, "small": 9402},
    });
    let render = |t: &str| chart::render_text(t, &values, "ns");
    for unknown in [
        "{{ .Values.a.b | upper }}",
        "{{ include \"x\" . }}",
        "{{ .Values.a.c }}",
        "{{- if .Values.a.b }}",
        "{{ end }}",
        "{{ range .Values.a }}{{ end }}",
        "{{ with .Values.a }}{{ end }}",
        "{{ $x := .Values.a.b }}",
        "{{ .Values.a }}",
        "{{ printf \"%d\" .Values.a.big }}",
        "{{ required \"a.empty is required\" .Values.a.empty }}",
        "{{ /* Go wants the comment at the delimiter */ }}",
    ] {
        assert!(render(unknown).is_err(), "{unknown} rendered");
    }
    let required = render("{{ .Values.a.empty | required \"set a.empty\" }}").unwrap_err();
    assert!(
        format!("{required:#}").contains("set a.empty"),
        "{required:#}"
    );
    let cases = [
        (
            "k:\n{{- if .Values.a.b }}\n  v: {{ .Values.a.b | quote }}\n{{- end }}\n",
            "k:\n  v: \"x\"\n",
        ),
        (
            "{{ if .Values.a.empty }}1{{ else if .Values.a.b }}2{{ else }}3{{ end }}",
            "2",
        ),
        (
            "{{/* a comment, \"quoted\" */}}x {{- /* trimmed */ -}} y",
            "xy",
        ),
        ("{{ .Values.a.empty | default \"d\" }}", "d"),
        ("{{ default \"d\" .Values.a.b }}", "x"),
        (
            "{{ printf \"%s-%s\" .Release.Name .Values.a.b | trunc 9 | trimSuffix \"-\" }}",
            "rayfence",
        ),
        ("{{ \"1+2\" | replace \"+\" \"_\" }}", "1_2"),
        ("{{ contains \"ray\" .Release.Name }}", "true"),
        ("{{ and .Values.a.b (not .Values.a.empty) }}", "true"),
        ("{{ or .Values.a.empty .Values.a.b }}", "x"),
        ("{{ eq .Values.a.b \"x\" }}", "true"),
        (
            "{{ .Values.m | toYaml | nindent 2 }}",
            "\n  big: 1048576\n  small: 9402",
        ),
        // helm reads values as float64: Go prints a million in exponent form,
        // which is why the chart's counts go through int64.
        ("{{ .Values.a.big }}", "1.048576e+06"),
        ("{{ .Values.a.big | int64 | quote }}", "\"1048576\""),
        ("{{ .Values.a.small }}", "9402"),
        ("{{ .Chart.Name }}/{{ .Release.Namespace }}", "rayfence/ns"),
    ];
    for (template, want) in cases {
        assert_eq!(render(template).unwrap(), want, "{template}");
    }
}

/// A `--set path=value`.
type Override<'a> = (&'a str, Value);

/// `helm install` with these values must fail, naming `field`.
fn assert_refused(overrides: &[(&str, Value)], field: &str) {
    let err = chart::values(overrides).expect_err("the schema let it through");
    let err = format!("{err:#}");
    assert!(
        err.lines().any(|l| l.starts_with(&format!("- {field}: "))),
        "{overrides:?}: the error does not name {field}:\n{err}"
    );
    assert!(
        render(overrides, "rayfence-system").is_err(),
        "{overrides:?} rendered"
    );
}

#[test]
fn the_schema_refuses_bad_values_naming_the_field() {
    assert_refused(&[("settings.dnsMode", json!("bogus"))], "settings.dnsMode");
    assert_refused(&[("metrics.port", json!("notaport"))], "metrics.port");
    assert_refused(&[("metrics.port", json!(0))], "metrics.port");
    assert_refused(&[("metrics.port", json!(65536))], "metrics.port");
    assert_refused(&[("metrics.port", json!(9402.5))], "metrics.port");
    assert_refused(&[("bogus", json!(true))], "bogus");
    // A misspelt key would otherwise be ignored silently.
    assert_refused(&[("settings.dnsmode", json!("off"))], "settings.dnsmode");
    assert_refused(
        &[("metrics.auth.enable", json!(false))],
        "metrics.auth.enable",
    );
    assert_refused(
        &[("settings.logFormat", json!("xml"))],
        "settings.logFormat",
    );
    assert_refused(&[("settings.flowLog", json!("file"))], "settings.flowLog");
    assert_refused(&[("settings.audit", json!("yes"))], "settings.audit");
    assert_refused(
        &[("image.pullPolicy", json!("Sometimes"))],
        "image.pullPolicy",
    );
    assert_refused(&[("maps.conntrack", json!(0))], "maps.conntrack");
    assert_refused(
        &[("maps.conntrack", json!(4294967296_u64))],
        "maps.conntrack",
    );
    assert_refused(
        &[("settings.operatorNamespaces", json!("ray-system"))],
        "settings.operatorNamespaces",
    );
    assert_refused(
        &[("settings.operatorNamespaces", json!(["ray-system", 7]))],
        "settings.operatorNamespaces[1]",
    );
    assert_refused(
        &[("nodeSelector", json!({"rayfence.io/enforce": true}))],
        "nodeSelector.rayfence.io/enforce",
    );
    assert_refused(&[("maxUnavailable", json!(0))], "maxUnavailable");
}

#[test]
fn the_schema_passes_the_defaults_and_what_the_tests_install() -> Result<()> {
    chart::values(&[])?;
    for (_, overrides) in overrides_cases() {
        chart::values(&overrides)?;
    }
    chart::values(&[
        ("settings.dnsMode", json!("anywhere")),
        ("settings.logFormat", json!("text")),
        ("settings.flowLog", json!("off")),
        ("metrics.port", json!(65535)),
        ("maxUnavailable", json!("10%")),
        ("resources.limits.cpu", json!(1)),
        ("global", json!({"imageRegistry": "x"})),
    ])?;
    Ok(())
}

/// values.yaml and values.schema.json describe the same keys: a value the schema
/// does not know would be refused, and a schema entry without a value is dead.
#[test]
fn the_schema_describes_exactly_the_values_in_values_yaml() -> Result<()> {
    fn walk(schema: &Value, values: &Value, at: &str) {
        let (Some(properties), Some(map)) = (schema["properties"].as_object(), values.as_object())
        else {
            return;
        };
        if schema["additionalProperties"] == json!(false) {
            for key in map.keys() {
                assert!(
                    properties.contains_key(key),
                    "values.yaml has {at}{key}, values.schema.json does not"
                );
            }
        }
        for (key, sub) in properties {
            if at.is_empty() && key == "global" {
                continue;
            }
            match map.get(key) {
                Some(v) => walk(sub, v, &format!("{at}{key}.")),
                None => panic!("values.schema.json describes {at}{key}, values.yaml has none"),
            }
        }
    }
    let schema = chart::values_schema()?;
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    assert_eq!(schema["additionalProperties"], false);
    walk(&schema, &chart::default_values()?, "");
    Ok(())
}

const STANDARD_LABELS: [&str; 6] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
];

#[test]
fn every_object_carries_the_standard_labels_and_the_selector_is_stable() -> Result<()> {
    let chart_yaml = chart::chart_yaml()?;
    let docs = render(&[], "rayfence-system")?;
    let want = BTreeMap::from([
        ("app.kubernetes.io/name", json!("rayfence")),
        ("app.kubernetes.io/instance", json!("rayfence")),
        (
            "app.kubernetes.io/version",
            chart_yaml["appVersion"].clone(),
        ),
        ("app.kubernetes.io/managed-by", json!("Helm")),
        ("app.kubernetes.io/part-of", json!("rayfence")),
        (
            "helm.sh/chart",
            json!(format!(
                "rayfence-{}",
                chart_yaml["version"].as_str().unwrap()
            )),
        ),
    ]);
    for doc in &docs {
        let labels = doc["metadata"]["labels"].as_object().expect("labels");
        for (key, value) in &want {
            assert_eq!(
                labels.get(*key),
                Some(value),
                "{} {}: {key}",
                doc["kind"],
                doc["metadata"]["name"]
            );
        }
    }
    // Selector: name and instance (and the component, which keeps it apart from
    // the cleanup DaemonSet's in the same namespace); nothing that changes with
    // an upgrade, since a DaemonSet's selector cannot change.
    let ds = find(&docs, "DaemonSet", "rayfence-agent");
    let selector = json!({
        "app.kubernetes.io/name": "rayfence",
        "app.kubernetes.io/instance": "rayfence",
        "app.kubernetes.io/component": "agent",
    });
    assert_eq!(ds["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(ds["spec"]["template"]["metadata"]["labels"], selector);
    let upgraded = render(&[("image.tag", json!("0.2.0"))], "rayfence-system")?;
    let upgraded = find(&upgraded, "DaemonSet", "rayfence-agent");
    assert_eq!(upgraded["spec"]["selector"], ds["spec"]["selector"]);
    assert_eq!(
        upgraded["metadata"]["labels"]["app.kubernetes.io/version"],
        "0.2.0"
    );

    // The Kustomize renderings carry the labels that mean something without helm.
    for dir in KUSTOMIZATIONS {
        for doc in kustomize(dir)? {
            let labels = &doc["metadata"]["labels"];
            for key in &STANDARD_LABELS[..2] {
                assert_eq!(labels[key], "rayfence", "{dir}: {} {key}", doc["kind"]);
            }
            assert_eq!(labels["app.kubernetes.io/part-of"], "rayfence", "{dir}");
        }
    }
    Ok(())
}

#[test]
fn object_names_follow_the_release() -> Result<()> {
    let names = |docs: &[Value]| -> BTreeSet<String> {
        docs.iter()
            .map(|d| {
                format!(
                    "{}/{}",
                    d["kind"].as_str().unwrap(),
                    d["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    };
    let expected = |prefix: &str| -> BTreeSet<String> {
        [
            format!("ClusterRole/{prefix}-agent"),
            format!("ClusterRole/{prefix}-api-reader"),
            format!("ClusterRole/{prefix}-metrics-reader"),
            format!("ClusterRoleBinding/{prefix}-agent"),
            format!("DaemonSet/{prefix}-agent"),
            format!("Role/{prefix}-viewer"),
            format!("ServiceAccount/{prefix}-agent"),
        ]
        .into()
    };
    // (release, overrides, the names' prefix)
    let cases: [(&str, &[Override], &str); 4] = [
        ("rayfence", &[], "rayfence"),
        ("rayfence-canary", &[], "rayfence-canary"),
        ("edge", &[], "edge-rayfence"),
        ("edge", &[("fullnameOverride", json!("fence"))], "fence"),
    ];
    for (release, overrides, prefix) in cases {
        let installed = chart::install(release, "security", overrides)?;
        let docs = &installed.objects;
        assert_eq!(names(docs), expected(prefix), "release {release}");
        let agent = format!("{prefix}-agent");
        let ds = find(docs, "DaemonSet", &agent);
        assert_eq!(
            ds["spec"]["template"]["spec"]["serviceAccountName"],
            agent.as_str()
        );
        assert_eq!(
            ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
            release
        );
        let binding = find(docs, "ClusterRoleBinding", &agent);
        assert_eq!(binding["roleRef"]["name"], agent.as_str());
        let viewer = find(docs, "Role", &format!("{prefix}-viewer"));
        assert_eq!(viewer["metadata"]["namespace"], "security");
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": agent, "namespace": "security"}])
        );
        assert!(
            installed.notes.contains(&format!("ds/{agent}")),
            "{}",
            installed.notes
        );
        for doc in docs {
            check_typed(doc)?;
        }
    }
    Ok(())
}

#[test]
fn image_tag_defaults_to_the_app_version_and_the_chart_states_its_kubernetes() -> Result<()> {
    let chart_yaml = chart::chart_yaml()?;
    assert_eq!(chart::default_values()?["image"]["tag"], "");
    let docs = render(&[], "rayfence-system")?;
    assert_eq!(
        agent_container(find(&docs, "DaemonSet", "rayfence-agent"))["image"],
        format!(
            "ghcr.io/rayfence/rayfence:{}",
            chart_yaml["appVersion"].as_str().unwrap()
        )
    );
    // deploy/README.md: Kubernetes >= 1.30 (the appArmorProfile field).
    assert_eq!(chart_yaml["kubeVersion"], ">=1.30.0-0");
    Ok(())
}

#[test]
fn notes_say_what_was_installed_and_how_to_check_it() -> Result<()> {
    let notes = chart::install("rayfence", "security", &[])?.notes;
    for line in [
        "kubectl -n security rollout status ds/rayfence-agent",
        "kubectl -n security exec ds/rayfence-agent -- rayfence status",
        "kubectl label namespace security pod-security.kubernetes.io/enforce=privileged",
        "rayfence-metrics-reader",
        "rayfence-viewer",
        "kubectl rayfence -n security status",
        ":9402/metrics",
    ] {
        assert!(notes.contains(line), "NOTES.txt lacks {line:?}:\n{notes}");
    }
    assert!(!notes.contains("Audit mode"), "{notes}");
    let audit = chart::install("rayfence", "security", &[("settings.audit", json!(true))])?.notes;
    assert!(audit.contains("Audit mode"), "{audit}");
    let off = chart::install(
        "rayfence",
        "security",
        &[("metrics.auth.enabled", json!(false))],
    )?
    .notes;
    assert!(off.contains("127.0.0.1:9402 only"), "{off}");
    Ok(())
}

#[test]
fn chart_metrics_tls_mounts_the_secret_and_passes_it_to_the_agent() -> Result<()> {
    let cli = cli_surface("agent")?;
    let with_tls = |extra: &[(&str, Value)]| -> Result<Vec<Value>> {
        let mut overrides = vec![
            ("metrics.tls.enabled", json!(true)),
            ("metrics.tls.secretName", json!("rayfence-metrics-tls")),
        ];
        overrides.extend(extra.iter().cloned());
        render(&overrides, "rayfence-system")
    };
    let docs = with_tls(&[])?;
    let ds = find(&docs, "DaemonSet", "rayfence-agent");
    let env = agent_environment(&docs, ds);
    let container = agent_container(ds);
    for (var, file) in [
        ("RAYFENCE_METRICS_TLS_CERT", "tls.crt"),
        ("RAYFENCE_METRICS_TLS_KEY", "tls.key"),
    ] {
        assert!(cli.envs.contains(var), "rayfence agent reads no {var}");
        // The Secret's file, through its read-only mount.
        let path = &env[var];
        let mount = container["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
            .unwrap_or_else(|| panic!("{var}={path}: no mount holds it"));
        assert_eq!(mount["readOnly"], true, "{var}");
        assert_eq!(
            *path,
            format!("{}/{file}", mount["mountPath"].as_str().unwrap())
        );
        let volume = ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mount's volume");
        assert_eq!(volume["secret"]["secretName"], "rayfence-metrics-tls");
    }
    // The probes (127.0.0.1:port) speak TLS when they reach the metrics listener,
    // i.e. when it covers loopback and the agent opens no plain health listener.
    let schemes = |docs: &[Value]| -> Vec<Value> {
        let c = agent_container(find(docs, "DaemonSet", "rayfence-agent"));
        ["readinessProbe", "livenessProbe"]
            .iter()
            .map(|p| c[p]["httpGet"]["scheme"].clone())
            .collect()
    };
    assert_eq!(
        schemes(&docs),
        vec![Value::Null; 2],
        "node address: plain health listener"
    );
    let https = vec![json!("HTTPS"); 2];
    assert_eq!(
        schemes(&with_tls(&[("metrics.auth.enabled", json!(false))])?),
        https
    );
    assert_eq!(
        schemes(&with_tls(&[("metrics.bindNodeAddress", json!(false))])?),
        https
    );
    assert_eq!(
        schemes(&with_tls(&[
            ("metrics.bindNodeAddress", json!(false)),
            ("metrics.host", json!("10.0.0.1")),
        ])?),
        vec![Value::Null; 2]
    );
    for doc in &docs {
        check_typed(doc)?;
    }

    let plain = render(&[], "rayfence-system")?;
    let text = serde_json::to_string(find(&plain, "DaemonSet", "rayfence-agent"))?;
    assert!(!text.contains("TLS") && !text.contains("tls"), "{text}");
    let unnamed = render(&[("metrics.tls.enabled", json!(true))], "rayfence-system")
        .expect_err("TLS without a Secret");
    assert!(
        format!("{unnamed:#}").contains("metrics.tls.secretName"),
        "{unnamed:#}"
    );
    Ok(())
}

/// A self-signed certificate and its key (PEM files in a fresh directory), for
/// the agent to load as --metrics-tls-cert / --metrics-tls-key.
fn self_signed_pair() -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = std::env::temp_dir().join(format!("rayfence-chart-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=rayfence", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("running openssl (needed for the chart's TLS case)")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((cert, key))
}

/// As manifests::the_agent_accepts_every_rendered_configuration for Kustomize:
/// `rayfence agent` with exactly the chart's args and environment gets as far as
/// its (missing) manifests directory, so it accepted every flag and setting.
#[test]
fn the_agent_accepts_the_charts_configurations() -> Result<()> {
    let cases: [&[(&str, Value)]; 5] = [
        &[],
        &[
            ("metrics.auth.enabled", json!(false)),
            ("settings.dnsMode", json!("anywhere")),
            ("settings.logFormat", json!("text")),
            ("settings.flowLog", json!("off")),
        ],
        // Counts of a million and more: helm would print 1.048576e+06 without int64.
        &[
            ("maps.conntrack", json!(1048576)),
            ("maps.eventsBytes", json!(4194304)),
            ("settings.flowLogRate", json!(1000000)),
        ],
        &[
            ("settings.enforceNetworkPolicies", json!(true)),
            ("settings.audit", json!(true)),
            (
                "metrics.auth.resourceAttributes",
                json!("namespace=rayfence-system,resource=services,subresource=proxy"),
            ),
            ("cni.enabled", json!(false)),
        ],
        &[
            ("metrics.tls.enabled", json!(true)),
            ("metrics.tls.secretName", json!("rayfence-metrics-tls")),
        ],
    ];
    let (cert, key) = self_signed_pair()?;
    for overrides in cases {
        let docs = render(overrides, "rayfence-system")?;
        let ds = find(&docs, "DaemonSet", "rayfence-agent");
        let mut env = agent_environment(&docs, ds);
        env.insert("NODE_NAME".into(), "node-a".into());
        if env.contains_key("RAYFENCE_METRICS_BIND_ADDRESS") {
            env.insert("RAYFENCE_METRICS_BIND_ADDRESS".into(), "10.0.0.1".into());
        }
        // What the Secret's mount gives: a certificate and its key.
        if env.contains_key("RAYFENCE_METRICS_TLS_CERT") {
            env.insert(
                "RAYFENCE_METRICS_TLS_CERT".into(),
                cert.display().to_string(),
            );
            env.insert("RAYFENCE_METRICS_TLS_KEY".into(), key.display().to_string());
        }
        env.insert("RAYFENCE_MANIFESTS".into(), "/nonexistent/rayfence".into());
        let out = Command::new(rayfence_bin()?)
            .args(agent_args(ds))
            .env_clear()
            .envs(&env)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--manifests /nonexistent/rayfence: not a directory"),
            "{overrides:?}: the agent rejected its configuration earlier:\n{stderr}"
        );
        for doc in &docs {
            check_typed(doc)?;
        }
    }
    std::fs::remove_dir_all(cert.parent().expect("the pair's directory"))?;
    Ok(())
}
