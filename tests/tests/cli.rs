//! The `rayfence` command line, needing no privilege: `rayfence agent` parses its
//! flags once and fails fast naming the bad one, before touching the kernel; every
//! error is one line and exit 2; `explain` (offline) exits with its verdict and
//! ends quietly when its reader goes away; completions; help.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result};
use rayfence_tests::agent::{Manifests, rayfence_bin};
use rayfence_tests::objects::json::{head_labels, namespace, raycluster, worker_labels};

fn agent_fails(args: &[&str], envs: &[(&str, &str)]) -> Result<String> {
    let out = Command::new(rayfence_bin()?)
        .arg("agent")
        .args(args)
        .env_remove("NODE_NAME")
        .envs(envs.iter().copied())
        .output()?;
    assert!(!out.status.success(), "{args:?} should fail");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_missing_node_name_is_named() -> Result<()> {
    let err = agent_fails(&["--manifests", "/tmp"], &[])?;
    assert!(err.contains("--node-name"), "{err}");
    Ok(())
}

#[test]
fn bad_flags_are_named_with_their_value() -> Result<()> {
    for (args, needle) in [
        (vec!["--dns-service", "kube-dns"], "--dns-service"),
        (
            vec!["--operator-selector", "novalue"],
            "--operator-selector",
        ),
        (vec!["--manifests", "/nonexistent-rf"], "--manifests"),
        (vec!["--max-conntrack", "0"], "--max-conntrack"),
        (vec!["--events-bytes", "1000"], "--events-bytes"),
        (vec!["--dns-mode", "sometimes"], "--dns-mode"),
        (vec!["--node-address", "not-an-ip"], "--node-address"),
    ] {
        let mut all = vec!["--node-name", "n1", "--manifests", "/tmp"];
        all.extend(args);
        let err = agent_fails(&all, &[])?;
        assert!(err.contains(needle), "{needle}: {err}");
    }
    Ok(())
}

#[test]
fn flags_have_environment_variables() -> Result<()> {
    let err = agent_fails(
        &["--manifests", "/tmp"],
        &[("NODE_NAME", "n1"), ("RAYFENCE_DNS_SERVICE", "nope")],
    )?;
    assert!(err.contains("--dns-service"), "{err}");
    Ok(())
}

/// `rayfence ARGS` with `env`: (exit status, stdout, stderr).
fn rayfence(args: &[&str], envs: &[(&str, &str)]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(rayfence_bin()?)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn an_error_is_one_line_with_its_causes_and_exit_2_even_under_rust_backtrace() -> Result<()> {
    let socket = std::env::temp_dir().join(format!("rf-no-agent-{}.sock", std::process::id()));
    let socket = socket.to_str().context("utf-8")?;
    for command in [
        &["status"][..],
        &["flows"],
        &["explain", "--from", "a/b", "--to", "c/d"],
    ] {
        let args = [command, &["--socket", socket]].concat();
        let (code, out, err) = rayfence(&args, &[("RUST_BACKTRACE", "1")])?;
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("Error: connecting to agent socket")
                && err.contains(socket)
                && err.contains("No such file or directory"),
            "{err}"
        );
        assert!(
            !err.contains("backtrace") && !err.contains("Caused by"),
            "{err}"
        );
    }
    // Bad arguments: clap's own message, the same status.
    let (code, _, err) = rayfence(&["status", "--json", "-o", "yaml"], &[])?;
    assert!(
        code == Some(2) && err.contains("cannot be used with"),
        "{err}"
    );
    Ok(())
}

/// A manifests directory: RayCluster `rc` (DenyAll) with a head and a worker, and
/// an outsider, in namespace `team-a`.
fn cluster_manifests() -> Result<Manifests> {
    let pod = |name: &str, ip: &str, labels: &[(&str, &str)]| {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "team-a", "uid": format!("uid-{name}"), "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
    };
    let manifests = Manifests::new()?;
    manifests.write(
        "cluster.yaml",
        &[
            namespace("team-a"),
            pod("head", "10.244.0.16", &head_labels("rc")),
            pod("worker", "10.244.0.17", &worker_labels("rc")),
            pod("outsider", "10.244.0.30", &[("app", "outsider")]),
            raycluster("team-a", "rc", serde_json::json!({"mode": "DenyAll"})),
        ],
    )?;
    Ok(manifests)
}

#[test]
fn explain_exits_with_its_verdict_0_allowed_1_denied() -> Result<()> {
    let manifests = cluster_manifests()?;
    let dir = manifests.dir.to_str().context("utf-8")?;
    for (from, verdict, status) in [
        ("team-a/worker", "allowed", 0),
        ("team-a/outsider", "denied", 1),
    ] {
        for output in ["table", "json", "yaml", "wide"] {
            let (code, out, err) = rayfence(
                &[
                    "explain",
                    "--manifests",
                    dir,
                    "--dns-mode",
                    "off",
                    "-o",
                    output,
                    "--from",
                    from,
                    "--to",
                    "team-a/head:8265",
                ],
                &[],
            )?;
            assert_eq!(code, Some(status), "{from} -o {output}: {out} {err}");
            assert!(
                out.to_lowercase().contains(verdict),
                "{from} -o {output}: {out}"
            );
        }
    }
    let (code, _, err) = rayfence(
        &[
            "explain",
            "--manifests",
            dir,
            "--from",
            "team-a/nobody",
            "--to",
            "team-a/head",
        ],
        &[],
    )?;
    assert!(code == Some(2) && err.starts_with("Error: "), "{err}");
    Ok(())
}

#[test]
fn a_closed_stdout_ends_explain_quietly_with_its_verdict() -> Result<()> {
    let manifests = cluster_manifests()?;
    let dir = manifests.dir.to_str().context("utf-8")?;
    for (from, status) in [("team-a/worker", 0), ("team-a/outsider", 1)] {
        for output in ["json", "table"] {
            // The reading end closed before anything is written: every write is EPIPE.
            let (reader, writer) = std::io::pipe()?;
            drop(reader);
            let out = Command::new(rayfence_bin()?)
                .args([
                    "explain",
                    "--manifests",
                    dir,
                    "-o",
                    output,
                    "--from",
                    from,
                    "--to",
                    "team-a/head:8265",
                ])
                .env("RUST_BACKTRACE", "1")
                .stdin(Stdio::null())
                .stdout(writer)
                .stderr(Stdio::piped())
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(status), "{from} -o {output}: {err}");
            assert!(err.is_empty(), "{from} -o {output}: {err}");
        }
    }
    // status and flows end the same way (exit 0) once their reader is gone: that
    // needs an agent, and is covered with one in `agent_privileged::observe`.
    Ok(())
}

#[test]
fn completion_prints_a_script_for_each_shell() -> Result<()> {
    for (shell, needle) in [
        ("bash", "complete -F _rayfence"),
        ("zsh", "#compdef rayfence"),
        ("fish", "complete -c rayfence"),
    ] {
        let (code, out, err) = rayfence(&["completion", shell], &[])?;
        assert_eq!(code, Some(0), "{shell}: {err}");
        assert!(
            out.contains(needle),
            "{shell}: {}",
            &out[..out.len().min(300)]
        );
        assert!(
            out.contains("explain") && out.contains("raycluster"),
            "{shell}"
        );
    }
    let (code, _, _) = rayfence(&["completion", "tcsh"], &[])?;
    assert_eq!(code, Some(2));
    Ok(())
}

#[test]
fn help_names_every_output_format_and_explain_its_exit_status() -> Result<()> {
    let (code, out, _) = rayfence(&["explain", "--help"], &[])?;
    assert_eq!(code, Some(0));
    for needle in [
        "--output",
        "table",
        "wide",
        "json",
        "yaml",
        "Exit status",
        "1  denied",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    let (_, out, _) = rayfence(&["agent", "--help"], &[])?;
    for needle in ["--log-level", "--log-format", "RUST_LOG", "NO_COLOR"] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    Ok(())
}

#[test]
fn man_prints_the_page_and_writes_one_per_command() -> Result<()> {
    let (code, out, err) = rayfence(&["man"], &[])?;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(".TH rayfence 1"),
        "{}",
        &out[..out.len().min(200)]
    );
    assert!(
        out.contains("explain") && out.contains("completion"),
        "{out}"
    );

    let dir = std::env::temp_dir().join(format!("rf-man-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (code, _, err) = rayfence(&["man", "--dir", dir.to_str().context("utf-8")?], &[])?;
    let explain = std::fs::read_to_string(dir.join("rayfence-explain.1"));
    let agent = std::fs::read_to_string(dir.join("rayfence-agent.1"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(0), "{err}");
    let (explain, agent) = (explain?, agent?);
    assert!(
        explain.contains("Exit status") && explain.contains("\\-\\-manifests"),
        "{explain}"
    );
    assert!(agent.contains("\\-\\-log\\-level"), "{agent}");
    Ok(())
}
