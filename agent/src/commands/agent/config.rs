//! `rayfence agent`'s flags checked and turned into what the agent runs with: the
//! runtime's configuration (policy settings, map capacities, where pods live),
//! the HTTP listeners' addresses and limits, and `--metrics-auth`.
//!
//! Errors name the flag they are about. Must not: start anything (that is
//! [`super::run`](mod@super::run)).
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rayfence::datapath::{Capacities, DatapathOptions};
use rayfence::discovery::LocatorConfig;
use rayfence::runtime::RuntimeConfig;
use rayfence::serve::auth::{AuthConfig, ResourceAttributes};
use rayfence::serve::limits::Limits;
use rayfence::source::ObjectKind;

use super::LOG_TARGET;
use super::args::AgentArgs;

/// The listeners' limits from their flags, checked.
pub(super) fn listener_limits(args: &AgentArgs) -> anyhow::Result<Limits> {
    let limits = Limits {
        max_connections: args.metrics_max_connections,
        max_per_source: args.metrics_max_connections_per_source,
        header_timeout: Duration::from_secs(args.metrics_header_timeout),
        ..Limits::default()
    };
    limits.check()?;
    Ok(limits)
}

/// Where the metrics listener binds (`--metrics-bind-address` replaces the host of
/// `--metrics-addr`), and the health listener's address unless the metrics
/// listener already serves it (the same address and port, or every address).
pub(super) fn listener_addresses(args: &AgentArgs) -> (SocketAddr, Option<SocketAddr>) {
    let mut metrics = args.metrics_addr;
    if let Some(ip) = args.metrics_bind_address {
        metrics.set_ip(ip);
    }
    let health = args.health_addr.filter(|health| {
        let covered = health.port() == metrics.port()
            && (metrics.ip() == health.ip()
                // [::] takes IPv4 too (IPV6_V6ONLY is off by default).
                || (metrics.ip().is_unspecified() && (metrics.is_ipv6() || health.is_ipv4())));
        !covered
    });
    (metrics, health)
}

/// `--metrics-auth` and its flags, checked: `None` when auth is off.
pub(super) fn metrics_auth_config(args: &AgentArgs) -> anyhow::Result<Option<AuthConfig>> {
    let resource = match args.metrics_auth_resource_attributes.as_deref() {
        Some(text) if !text.trim().is_empty() => Some(
            ResourceAttributes::parse(text)
                .with_context(|| format!("--metrics-auth-resource-attributes {text:?}"))?,
        ),
        _ => None,
    };
    if args
        .metrics_auth_audience
        .iter()
        .any(|a| a.trim().is_empty())
    {
        bail!(
            "--metrics-auth-audience {:?}: an audience must not be empty",
            args.metrics_auth_audience.join(",")
        );
    }
    if !args.metrics_auth {
        if !args.metrics_auth_audience.is_empty() || resource.is_some() {
            tracing::warn!(
                target: LOG_TARGET,
                "--metrics-auth-audience and --metrics-auth-resource-attributes have no effect without --metrics-auth"
            );
        }
        let (addr, _) = listener_addresses(args);
        if !addr.ip().is_loopback() {
            tracing::warn!(target: LOG_TARGET, %addr, "serving /metrics without authentication on a non-loopback address (see --metrics-auth)");
        }
        return Ok(None);
    }
    Ok(Some(AuthConfig {
        audiences: args
            .metrics_auth_audience
            .iter()
            .map(|a| a.trim().to_owned())
            .collect(),
        resource,
        ..AuthConfig::default()
    }))
}

/// Every flag checked and turned into the runtime's configuration.
pub(super) fn runtime_config(args: &AgentArgs) -> anyhow::Result<RuntimeConfig> {
    if args.node_name.trim().is_empty() {
        bail!("--node-name (NODE_NAME) must not be empty");
    }
    let mut settings = args.policy.settings(&args.node_name)?;
    settings.audit = args.audit;
    if args.flow_log_rate == 0 {
        bail!("--flow-log-rate must be at least 1");
    }

    let mut capacities = Capacities::default();
    for (flag, value, slot) in [
        (
            "--max-endpoints",
            args.max_endpoints,
            &mut capacities.endpoints,
        ),
        (
            "--max-identities",
            args.max_identities,
            &mut capacities.identities,
        ),
        ("--max-cidrs", args.max_cidrs, &mut capacities.cidrs),
        ("--max-policy", args.max_policy, &mut capacities.policy),
        (
            "--max-conntrack",
            args.max_conntrack,
            &mut capacities.conntrack,
        ),
        (
            "--max-fragments",
            args.max_fragments,
            &mut capacities.fragments,
        ),
        (
            "--max-counters",
            args.max_counters,
            &mut capacities.counters,
        ),
        (
            "--events-bytes",
            args.events_bytes,
            &mut capacities.events_bytes,
        ),
    ] {
        if let Some(v) = value {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
            *slot = v;
        }
    }
    if !capacities.events_bytes.is_power_of_two() || capacities.events_bytes < 4096 {
        bail!(
            "--events-bytes {}: must be a power of two of at least 4096",
            capacities.events_bytes
        );
    }
    if let Some(dir) = &args.manifests
        && !dir.is_dir()
    {
        bail!("--manifests {}: not a directory", dir.display());
    }
    // The manifests source lists every kind; the API source replaces this with
    // the kinds it watches.
    let expected_kinds: BTreeSet<ObjectKind> = ObjectKind::ALL.into_iter().collect();
    Ok(RuntimeConfig {
        settings,
        extra_node_addresses: args.node_address.clone(),
        datapath: DatapathOptions {
            bpffs_dir: Some(args.bpffs.clone()),
            capacities,
            ..DatapathOptions::default()
        },
        locator: LocatorConfig {
            cgroup_root: args.cgroup_root.clone(),
            kubelet_cgroup_roots: if args.kubelet_cgroup_root.is_empty() {
                vec!["/".into()]
            } else {
                args.kubelet_cgroup_root.clone()
            },
            host_proc: args.host_proc.clone(),
            ..LocatorConfig::default()
        },
        expected_kinds,
        retry_interval: Duration::from_millis(200),
        counters_interval: Duration::from_secs(1),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::commands::{Cli, Command};

    fn agent_args(extra: &[&str]) -> AgentArgs {
        let mut argv = vec!["rayfence", "agent", "--node-name", "n"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Command::Agent(args),
            }) => *args,
            other => panic!("{extra:?}: {other:?}"),
        }
    }

    #[test]
    fn the_bind_address_replaces_the_host_and_a_covered_health_address_is_not_bound_twice() {
        let addrs = |extra: &[&str]| listener_addresses(&agent_args(extra));
        let health = "127.0.0.1:9402".parse().ok();
        // The DaemonSet: the node's address, probes on loopback.
        assert_eq!(
            addrs(&[
                "--metrics-addr",
                "0.0.0.0:9402",
                "--metrics-bind-address",
                "10.0.0.5",
                "--health-addr",
                "127.0.0.1:9402"
            ]),
            ("10.0.0.5:9402".parse().expect("addr"), health)
        );
        // Every address, or the same one, already serves the probes.
        for metrics in ["0.0.0.0:9402", "[::]:9402", "127.0.0.1:9402"] {
            let (_, h) = addrs(&["--metrics-addr", metrics, "--health-addr", "127.0.0.1:9402"]);
            assert_eq!(h, None, "{metrics}");
        }
        // Another port: both.
        let (_, h) = addrs(&[
            "--metrics-addr",
            "0.0.0.0:9402",
            "--health-addr",
            "127.0.0.1:9403",
        ]);
        assert_eq!(h, "127.0.0.1:9403".parse().ok());
        // IPv4 everywhere does not take IPv6 loopback.
        let (_, h) = addrs(&[
            "--metrics-addr",
            "0.0.0.0:9402",
            "--health-addr",
            "[::1]:9402",
        ]);
        assert_eq!(h, "[::1]:9402".parse().ok());
    }

    #[test]
    fn listener_limits_default_sanely_and_zero_is_refused_naming_the_flag() {
        let limits = listener_limits(&agent_args(&[])).expect("defaults");
        assert_eq!(limits, Limits::default());
        for (flag, name) in [
            ("--metrics-max-connections", "--metrics-max-connections"),
            (
                "--metrics-max-connections-per-source",
                "--metrics-max-connections-per-source",
            ),
            ("--metrics-header-timeout", "--metrics-header-timeout"),
        ] {
            let error = listener_limits(&agent_args(&[flag, "0"])).expect_err(flag);
            assert!(error.to_string().contains(name), "{error}");
        }
    }
}
