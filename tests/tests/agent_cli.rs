//! `rayfence agent` parses its flags once and fails fast naming the bad one, before
//! touching the kernel. Needs no privilege.
mod agent_common;

use std::process::Command;

use agent_common::rayfence_bin;
use anyhow::Result;

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
