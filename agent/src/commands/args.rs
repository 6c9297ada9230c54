//! Argument groups more than one command takes: the output format, how the
//! operator commands reach the agent, the policy flags (the agent and offline
//! `explain`) and the node's CNI directories (the agent and `cleanup`).
//!
//! Must not: hold a flag only one command has (that goes in the command's file).
use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};
use rayfence::cli::{self, DEFAULT_API_SOCKET, Output};
use rayfence::policy::selector::Selector;
use rayfence::policy::{DnsMode, Settings};

/// `-o` (and `--json`, kept for scripts written before `-o`).
#[derive(Args, Debug)]
pub(super) struct OutputArgs {
    /// Output format: table, wide (every field in a column), json or yaml.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
    /// The same as -o json.
    #[arg(long, hide = true, conflicts_with = "output")]
    json: bool,
}

impl OutputArgs {
    pub(super) fn format(&self) -> Output {
        if self.json { Output::Json } else { self.output }
    }
}

/// How the commands reach the agent.
#[derive(Args, Debug)]
pub(super) struct AgentConnection {
    /// The agent's local socket.
    #[arg(long, value_name = "PATH", env = "RAYFENCE_API_SOCKET", default_value = DEFAULT_API_SOCKET)]
    socket: PathBuf,
    /// Ask the agent over HTTP instead (its --metrics-addr), e.g. http://10.0.0.5:9402.
    #[arg(long, value_name = "URL")]
    agent: Option<String>,
    /// Bearer token for --agent (when the agent runs with --metrics-auth).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
}

impl AgentConnection {
    pub(super) fn address(&self) -> anyhow::Result<cli::AgentAddress> {
        cli::agent_address(
            self.agent.as_deref(),
            &self.socket,
            self.token_file.as_deref(),
        )
    }
}

/// Flags that change what the policy allows; shared by the agent and offline explain.
#[derive(Args, Debug)]
pub(super) struct PolicyArgs {
    /// The DNS base flow: to the DNS Service, to port 53 anywhere, or none (given
    /// twice, the last one counts).
    #[arg(
        long,
        value_enum,
        env = "RAYFENCE_DNS_MODE",
        default_value = "service",
        overrides_with = "dns_mode"
    )]
    dns_mode: DnsModeArg,
    /// The cluster DNS Service, NAMESPACE/NAME.
    #[arg(
        long,
        value_name = "NS/NAME",
        env = "RAYFENCE_DNS_SERVICE",
        default_value = "kube-system/kube-dns"
    )]
    dns_service: String,
    /// The addresses of a node-local DNS cache on every node (NodeLocal DNSCache:
    /// 169.254.20.10), comma-separated (empty: none): UDP and TCP 53 to them join
    /// the DNS base flow (not with --dns-mode off), and they are not the node's own
    /// addresses.
    #[arg(
        long,
        value_name = "IP[,IP]",
        env = "RAYFENCE_DNS_NODE_LOCAL",
        value_delimiter = ','
    )]
    dns_node_local: Vec<String>,
    /// Namespaces the KubeRay operator runs in (repeatable; default ray-system, kuberay-system).
    #[arg(
        long,
        value_name = "NS",
        env = "RAYFENCE_OPERATOR_NAMESPACE",
        value_delimiter = ','
    )]
    operator_namespace: Vec<String>,
    /// Labels of the KubeRay operator pods, k=v[,k=v].
    #[arg(long, value_name = "K=V[,K=V]", env = "RAYFENCE_OPERATOR_SELECTOR")]
    operator_selector: Option<String>,
    /// Also enforce plain networking.k8s.io/v1 NetworkPolicies.
    #[arg(long, env = "RAYFENCE_ENFORCE_NETWORKPOLICIES")]
    pub(super) enforce_networkpolicies: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DnsModeArg {
    /// To the pods behind --dns-service, port 53.
    Service,
    /// To port 53 anywhere.
    Anywhere,
    /// No DNS base flow: rules must allow it.
    Off,
}

impl PolicyArgs {
    /// The settings the policy flags give, for node `node_name`.
    pub(super) fn settings(&self, node_name: &str) -> anyhow::Result<Settings> {
        let mut settings = Settings::new(node_name.to_owned(), Vec::new());
        settings.dns = match self.dns_mode {
            DnsModeArg::Anywhere => DnsMode::Anywhere,
            DnsModeArg::Off => DnsMode::Off,
            DnsModeArg::Service => {
                let Some((namespace, name)) = self.dns_service.split_once('/') else {
                    bail!(
                        "--dns-service {:?}: expected NAMESPACE/NAME",
                        self.dns_service
                    );
                };
                if namespace.is_empty() || name.is_empty() || name.contains('/') {
                    bail!(
                        "--dns-service {:?}: expected NAMESPACE/NAME",
                        self.dns_service
                    );
                }
                DnsMode::Service {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                }
            }
        };
        for item in self.dns_node_local.iter().map(|s| s.trim()) {
            if item.is_empty() {
                continue;
            }
            match item.parse::<std::net::IpAddr>() {
                Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => {
                    settings.dns_node_local.push(ip);
                }
                _ => bail!(
                    "--dns-node-local {item:?}: expected the unicast IP address of the node-local DNS cache"
                ),
            }
        }
        settings.dns_node_local.sort();
        settings.dns_node_local.dedup();
        if !self.operator_namespace.is_empty() {
            settings.operator_namespaces = self.operator_namespace.clone();
        }
        if let Some(selector) = &self.operator_selector {
            let mut pairs = Vec::new();
            for pair in selector.split(',') {
                match pair.split_once('=') {
                    Some((k, v)) if !k.trim().is_empty() => pairs.push((k.trim(), v.trim())),
                    _ => bail!("--operator-selector {selector:?}: expected key=value[,key=value]"),
                }
            }
            settings.operator_selector = Selector::from_labels(pairs);
        }
        settings.enforce_networkpolicies = self.enforce_networkpolicies;
        Ok(settings)
    }
}

/// Where the node's CNI configuration and plugins are, for the agent and cleanup.
#[derive(Args, Debug)]
pub(super) struct CniDirsArgs {
    /// The node's CNI configuration directory. The agent chains rayfence-cni into
    /// its first configuration once the datapath is pinned, keeps it there and
    /// leaves it when it exits; cleanup removes it.
    #[arg(
        long,
        value_name = "DIR",
        env = "RAYFENCE_CNI_CONF_DIR",
        requires = "cni_bin_dir"
    )]
    pub(super) cni_conf_dir: Option<PathBuf>,
    /// The node's CNI plugin directory, where rayfence-cni is copied.
    #[arg(
        long,
        value_name = "DIR",
        env = "RAYFENCE_CNI_BIN_DIR",
        requires = "cni_conf_dir"
    )]
    pub(super) cni_bin_dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;
    use crate::commands::{Cli, Command};

    /// The policy flags alone, as every command that takes them parses them.
    #[derive(clap::Parser)]
    struct PolicyOnly {
        #[command(flatten)]
        policy: PolicyArgs,
    }

    fn agent_settings(args: &[&str]) -> anyhow::Result<Settings> {
        let argv = std::iter::once("rayfence").chain(args.iter().copied());
        PolicyOnly::try_parse_from(argv)?.policy.settings("n")
    }

    #[test]
    fn dns_node_local_takes_comma_separated_addresses_and_names_itself_on_bad_ones() {
        assert!(agent_settings(&[]).unwrap().dns_node_local.is_empty());
        // Empty (how a chart leaves it unset): none.
        assert!(
            agent_settings(&["--dns-node-local", ""])
                .unwrap()
                .dns_node_local
                .is_empty()
        );
        // A later --dns-mode wins (a wrapper's default, then the operator's choice).
        let settings = agent_settings(&["--dns-mode", "off", "--dns-mode", "anywhere"]).unwrap();
        assert_eq!(settings.dns, DnsMode::Anywhere);
        let settings = agent_settings(&[
            "--dns-node-local",
            "169.254.20.10,fd00:10:ffff::a,169.254.20.10",
        ])
        .unwrap();
        assert_eq!(
            settings.dns_node_local,
            vec![
                "169.254.20.10".parse::<std::net::IpAddr>().unwrap(),
                "fd00:10:ffff::a".parse().unwrap()
            ]
        );
        for bad in [
            "169.254.20",
            "nodelocaldns",
            "169.254.20.10/32",
            "0.0.0.0",
            "ff02::1",
        ] {
            let error = agent_settings(&["--dns-node-local", bad]).unwrap_err();
            let text = error.to_string();
            assert!(
                text.contains("--dns-node-local") && text.contains(bad),
                "{bad}: {text}"
            );
        }
    }

    #[test]
    fn json_is_a_hidden_alias_of_output_json_and_conflicts_with_o() {
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        let Ok(Cli {
            command: Command::Status(status),
        }) = parse(&["rayfence", "status", "--json"])
        else {
            panic!("status --json parses");
        };
        assert_eq!(status.output.format(), Output::Json);
        let Ok(Cli {
            command: Command::Status(status),
        }) = parse(&["rayfence", "status"])
        else {
            panic!("status parses");
        };
        assert_eq!(status.output.format(), Output::Table);
        assert!(parse(&["rayfence", "status", "--json", "-o", "yaml"]).is_err());
        let help = Cli::command()
            .find_subcommand_mut("status")
            .expect("status")
            .render_help()
            .to_string();
        assert!(
            help.contains("--output") && !help.contains("--json"),
            "{help}"
        );
    }
}
