//! The `rayfence` binary: the node agent (`rayfence agent`) and its operator
//! commands (`rayfence status`, `explain`, `flows`, `cleanup`, `cni`).
//!
//! Parses every flag once (each has an environment variable too) and fails fast
//! with a message that names the flag; then wires sources, runtime and HTTP.
//!
//! Errors: `Error: ` and the error's chain of causes on one line (no backtrace,
//! whatever `RUST_BACKTRACE` says), exit status 2 (`cli::exit::ERROR`), the status
//! clap gives bad arguments too. `explain` exits with its verdict ([`cli::exit`]).
//! A closed stdout ends a command quietly, with the status it would have had.
//!
//! Must not: hold agent logic (that is `rayfence::runtime`).
use std::collections::BTreeSet;
use std::io::{IsTerminal as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use rayfence::cli::{self, DEFAULT_API_SOCKET, Output};
use rayfence::cni::install::{self as cni_install, DEFAULT_BIN_DIR, DEFAULT_CONF_DIR};
use rayfence::datapath::{self, Capacities, DatapathOptions, paths::DEFAULT_BPFFS_DIR};
use rayfence::discovery::LocatorConfig;
use rayfence::logging::{LogConfig, LogFormat, LogLevel};
use rayfence::operator::events::{EventReporterConfig, KubeEventReporter};
use rayfence::operator::flows::{FlowConfig, FlowEvents, FlowHub, FlowLog};
use rayfence::operator::health::Health;
use rayfence::operator::query::QueryClient;
use rayfence::policy::selector::Selector;
use rayfence::policy::{DnsMode, Settings};
use rayfence::runtime::{Runtime, RuntimeConfig};
use rayfence::serve::auth::{AuthConfig, Authorizer, ResourceAttributes};
use rayfence::serve::limits::{self, Limits};
use rayfence::serve::tls::TlsFiles;
use rayfence::serve::{OperatorApi, Served};
use rayfence::source::ObjectKind;
use rayfence::source::ProblemReporter;
use rayfence::source::files::{self, FilesConfig};
use rayfence::source::kube::{self as kube_source, KubeSourceConfig};

#[derive(Parser, Debug)]
#[command(
    name = "rayfence",
    version,
    about = "RayCluster network isolation enforced in eBPF"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What `rayfence explain --help` says after the flags.
const EXPLAIN_EXIT_STATUS: &str = "\
Exit status (as `kubectl auth can-i` gives its answer):
  0  allowed: every side that is enforced allows the flow (a side rayfence does not
     isolate, `not-enforced`, lets it pass)
  1  denied, or audit: the policy denies it and only audit mode lets it through
     (the status does not change when audit mode is switched off)
  2  error: bad arguments, no agent, unreadable manifests, ...
  3  unknown: a side is decided by another node's agent (ask that node, or use
     --manifests, where every pod counts as local)
A closed stdout (`| head`) ends the command quietly with the same status.";

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent: watch the cluster (or a manifests directory) and keep
    /// the datapath equal to the policy, live.
    Agent(Box<AgentArgs>),
    /// The local endpoints of the agent on this node: hook, mode, isolation, drops.
    Status {
        #[command(flatten)]
        agent: AgentConnection,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Why a flow is allowed or denied, and by which rule, from the same engine the
    /// datapath's tables come from. The exit status is the verdict.
    #[command(after_help = EXPLAIN_EXIT_STATUS)]
    Explain(Box<ExplainArgs>),
    /// Denied (and audited) flows seen by the agent on this node.
    Flows {
        #[command(flatten)]
        agent: AgentConnection,
        /// Keep printing new flows until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Only `dropped` or only `audit` (would have been dropped).
        #[arg(long, value_parser = ["dropped", "audit"])]
        verdict: Option<String>,
        /// Only flows of local pods in this namespace.
        #[arg(long, value_name = "NS")]
        namespace: Option<String>,
        /// Only flows of local pods of this RayCluster.
        #[arg(long, value_name = "NAME")]
        raycluster: Option<String>,
        /// How many recent flows to print first.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Detach every program rayfence attached and remove everything it pinned.
    Cleanup {
        /// The agent's bpffs directory.
        #[arg(long, value_name = "DIR", env = "RAYFENCE_BPFFS", default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// Also remove the rayfence-cni plugin (entry and binary) from these.
        #[command(flatten)]
        cni: CniDirsArgs,
    },
    /// Install or remove the chained CNI plugin rayfence-cni on this node.
    #[command(subcommand)]
    Cni(CniCommand),
    /// Print a shell completion script: `source <(rayfence completion bash)`.
    Completion {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page rayfence(1) (`rayfence man | man -l -`), or write one
    /// page per command with --dir.
    Man {
        /// Write rayfence.1 and rayfence-COMMAND.1 for every command into DIR.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum CniCommand {
    /// Copy rayfence-cni into the bin dir and chain it as the last plugin of the
    /// node's first CNI configuration. A second run changes nothing.
    Install {
        /// The node's CNI configuration directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_CONF_DIR)]
        cni_conf_dir: PathBuf,
        /// The node's CNI plugin directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_BIN_DIR)]
        cni_bin_dir: PathBuf,
        /// The agent's bpffs directory as the host sees it (the plugin runs there).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// The plugin to copy (default: rayfence-cni next to this executable).
        #[arg(long, value_name = "PATH")]
        plugin_binary: Option<PathBuf>,
    },
    /// Remove the rayfence-cni entries and binary (nothing else). A second run
    /// changes nothing.
    Uninstall {
        /// The node's CNI configuration directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_CONF_DIR)]
        cni_conf_dir: PathBuf,
        /// The node's CNI plugin directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_BIN_DIR)]
        cni_bin_dir: PathBuf,
    },
}

/// Where the node's CNI configuration and plugins are, for the agent and cleanup.
#[derive(Args, Debug)]
struct CniDirsArgs {
    /// The node's CNI configuration directory. The agent chains rayfence-cni into
    /// its first configuration once the datapath is pinned, keeps it there and
    /// leaves it when it exits; cleanup removes it.
    #[arg(
        long,
        value_name = "DIR",
        env = "RAYFENCE_CNI_CONF_DIR",
        requires = "cni_bin_dir"
    )]
    cni_conf_dir: Option<PathBuf>,
    /// The node's CNI plugin directory, where rayfence-cni is copied.
    #[arg(
        long,
        value_name = "DIR",
        env = "RAYFENCE_CNI_BIN_DIR",
        requires = "cni_conf_dir"
    )]
    cni_bin_dir: Option<PathBuf>,
}

/// `-o` (and `--json`, kept for scripts written before `-o`).
#[derive(Args, Debug)]
struct OutputArgs {
    /// Output format: table, wide (every field in a column), json or yaml.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
    /// The same as -o json.
    #[arg(long, hide = true, conflicts_with = "output")]
    json: bool,
}

impl OutputArgs {
    fn format(&self) -> Output {
        if self.json { Output::Json } else { self.output }
    }
}

/// How the commands reach the agent.
#[derive(Args, Debug)]
struct AgentConnection {
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
    fn address(&self) -> anyhow::Result<cli::AgentAddress> {
        cli::agent_address(
            self.agent.as_deref(),
            &self.socket,
            self.token_file.as_deref(),
        )
    }
}

#[derive(Args, Debug)]
struct ExplainArgs {
    /// The source: NAMESPACE/POD or an IP.
    #[arg(long, value_name = "NS/POD|IP")]
    from: String,
    /// The destination, then :PORT and /tcp|udp|sctp (default tcp); no port: ICMP echo.
    #[arg(long, value_name = "NS/POD|IP[:PORT[/PROTO]]")]
    to: String,
    /// Answer offline from the objects in DIR (YAML/JSON) instead of asking the agent.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    agent: AgentConnection,
    #[command(flatten)]
    output: OutputArgs,
}

/// Flags that change what the policy allows; shared by the agent and offline explain.
#[derive(Args, Debug)]
struct PolicyArgs {
    /// The DNS base flow: to the DNS Service, to port 53 anywhere, or none.
    #[arg(long, value_enum, env = "RAYFENCE_DNS_MODE", default_value = "service")]
    dns_mode: DnsModeArg,
    /// The cluster DNS Service, NAMESPACE/NAME.
    #[arg(
        long,
        value_name = "NS/NAME",
        env = "RAYFENCE_DNS_SERVICE",
        default_value = "kube-system/kube-dns"
    )]
    dns_service: String,
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
    enforce_networkpolicies: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FlowLogArg {
    /// In the agent's log on stdout, one line each, in --log-format.
    Stdout,
    /// Not logged (still counted, and listed by `rayfence flows`).
    Off,
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

#[derive(Args, Debug)]
struct AgentArgs {
    /// This node's name (the DaemonSet sets it from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Read objects from YAML/JSON files in DIR (watched) instead of the Kubernetes API.
    #[arg(long, value_name = "DIR", env = "RAYFENCE_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API source (default: in-cluster config or $KUBECONFIG).
    #[arg(long, value_name = "PATH", env = "RAYFENCE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Where programs, maps and links are pinned.
    #[arg(long, value_name = "DIR", env = "RAYFENCE_BPFFS", default_value = DEFAULT_BPFFS_DIR)]
    bpffs: PathBuf,
    /// The cgroup2 mount as the agent sees it (default: found in /proc/self/mountinfo).
    #[arg(long, value_name = "PATH", env = "RAYFENCE_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// The kubelet's own --cgroup-root (repeatable; default "/").
    #[arg(
        long,
        value_name = "PATH",
        env = "RAYFENCE_KUBELET_CGROUP_ROOT",
        value_delimiter = ','
    )]
    kubelet_cgroup_root: Vec<String>,
    /// The host's /proc.
    #[arg(
        long,
        value_name = "PATH",
        env = "RAYFENCE_HOST_PROC",
        default_value = "/proc"
    )]
    host_proc: PathBuf,
    /// Serve /metrics, /healthz, /readyz and the operator API (/v1/) here.
    #[arg(
        long,
        value_name = "ADDR",
        env = "RAYFENCE_METRICS_ADDR",
        default_value = "127.0.0.1:9402"
    )]
    metrics_addr: SocketAddr,
    /// Bind --metrics-addr's port on this address instead of --metrics-addr's
    /// host: where the scrapers reach the node, never every address. The
    /// DaemonSet sets it to the node's own address (downward API status.hostIP).
    #[arg(long, value_name = "IP", env = "RAYFENCE_METRICS_BIND_ADDRESS")]
    metrics_bind_address: Option<IpAddr>,
    /// Also serve /healthz and /readyz (only those, no token) here, with caps of
    /// its own: the kubelet's probes on loopback stay answered while the metrics
    /// listener is full. Not opened when --metrics-addr already covers it.
    #[arg(long, value_name = "ADDR", env = "RAYFENCE_HEALTH_ADDR")]
    health_addr: Option<SocketAddr>,
    /// At most this many connections open at once on --metrics-addr (and as many
    /// on --health-addr); one more is reset as soon as it is accepted and counted
    /// in rayfence_http_connections_refused_total. Must fit in RLIMIT_NOFILE
    /// (raised to its hard limit at start) with 1024 descriptors to spare.
    #[arg(
        long,
        value_name = "N",
        env = "RAYFENCE_METRICS_MAX_CONNECTIONS",
        default_value_t = 256
    )]
    metrics_max_connections: usize,
    /// At most this many connections open at once from one source address.
    #[arg(
        long,
        value_name = "N",
        env = "RAYFENCE_METRICS_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = 16
    )]
    metrics_max_connections_per_source: usize,
    /// A request's head (request line and headers, at most 16 KiB) must arrive
    /// within this many seconds of the connection opening or of the previous
    /// response; idle kept-alive connections close after it too. A response
    /// the client stops reading for 30 s ends the connection.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "RAYFENCE_METRICS_HEADER_TIMEOUT",
        default_value_t = 5
    )]
    metrics_header_timeout: u64,
    /// Require a bearer token on every path but /healthz and /readyz, checked with
    /// TokenReview and SubjectAccessReview (as kube-rbac-proxy does): 401 without a
    /// valid token, 403 when not allowed, 503 when the API server cannot be asked.
    /// Needs a Kubernetes client even with --manifests (--kubeconfig or in-cluster).
    #[arg(long, env = "RAYFENCE_METRICS_AUTH")]
    metrics_auth: bool,
    /// With --metrics-auth: an audience the token must be valid for (repeatable;
    /// default: the API server's own audiences).
    #[arg(
        long,
        value_name = "AUDIENCE",
        env = "RAYFENCE_METRICS_AUTH_AUDIENCE",
        value_delimiter = ','
    )]
    metrics_auth_audience: Vec<String>,
    /// With --metrics-auth: ask SubjectAccessReview about this resource instead of
    /// the request path as a non-resource URL: k=v[,k=v] of namespace, group,
    /// version, resource (required), subresource, name; the verb is the method's
    /// (GET -> get).
    #[arg(
        long,
        value_name = "K=V[,K=V]",
        env = "RAYFENCE_METRICS_AUTH_RESOURCE_ATTRIBUTES"
    )]
    metrics_auth_resource_attributes: Option<String>,
    /// Serve --metrics-addr over TLS with this certificate chain (PEM; needs
    /// --metrics-tls-key). Re-read when the file changes.
    #[arg(
        long,
        value_name = "PATH",
        env = "RAYFENCE_METRICS_TLS_CERT",
        requires = "metrics_tls_key"
    )]
    metrics_tls_cert: Option<PathBuf>,
    /// The private key of --metrics-tls-cert (PEM).
    #[arg(
        long,
        value_name = "PATH",
        env = "RAYFENCE_METRICS_TLS_KEY",
        requires = "metrics_tls_cert"
    )]
    metrics_tls_key: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Serve the operator API (status, explain, flows) on this local socket.
    #[arg(long, value_name = "PATH", env = "RAYFENCE_API_SOCKET", default_value = DEFAULT_API_SOCKET)]
    api_socket: PathBuf,
    /// Where denied-flow events are logged besides `rayfence flows`: in the log
    /// (whatever --log-level says), or not at all.
    #[arg(long, value_enum, env = "RAYFENCE_FLOW_LOG", default_value = "stdout")]
    flow_log: FlowLogArg,
    /// Flow events each local pod may log per second; the rest are counted as suppressed.
    #[arg(
        long,
        value_name = "N",
        env = "RAYFENCE_FLOW_LOG_RATE",
        default_value_t = 10
    )]
    flow_log_rate: u32,
    /// Evaluate and count, never drop.
    #[arg(long, env = "RAYFENCE_AUDIT")]
    audit: bool,
    /// More addresses of this node (repeatable), besides its interfaces' and the Node object's.
    #[arg(
        long,
        value_name = "IP",
        env = "RAYFENCE_NODE_ADDRESS",
        value_delimiter = ','
    )]
    node_address: Vec<IpAddr>,
    /// Map capacity: local endpoints (host veths and cgroups).
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_ENDPOINTS")]
    max_endpoints: Option<u32>,
    /// Map capacity: peer addresses.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_IDENTITIES")]
    max_identities: Option<u32>,
    /// Map capacity: ipBlock prefixes.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_CIDRS")]
    max_cidrs: Option<u32>,
    /// Map capacity: policy rows.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_POLICY")]
    max_policy: Option<u32>,
    /// Map capacity: tracked connections.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_CONNTRACK")]
    max_conntrack: Option<u32>,
    /// Map capacity: IP fragments in flight.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_FRAGMENTS")]
    max_fragments: Option<u32>,
    /// Map capacity: counter keys.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_COUNTERS")]
    max_counters: Option<u32>,
    /// Flow event ring buffer size in bytes (a power of two, page multiple).
    #[arg(long, value_name = "BYTES", env = "RAYFENCE_EVENTS_BYTES")]
    events_bytes: Option<u32>,
    #[command(flatten)]
    cni: CniDirsArgs,
    /// The bpffs directory as the host sees it, written into the CNI plugin's
    /// entry (default: --bpffs; differs when the host's bpffs is mounted elsewhere).
    #[arg(long, value_name = "DIR", env = "RAYFENCE_CNI_BPFFS")]
    cni_bpffs: Option<PathBuf>,
    /// The CNI plugin to copy (default: rayfence-cni next to this executable).
    #[arg(long, value_name = "PATH", env = "RAYFENCE_CNI_PLUGIN_BINARY")]
    cni_plugin_binary: Option<PathBuf>,
    /// Log format, on stdout: text (colour only on a terminal and without NO_COLOR)
    /// or JSON lines.
    #[arg(long, value_enum, env = "RAYFENCE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// Log level; wins over RUST_LOG, whose directives apply without it (default:
    /// info).
    #[arg(long, value_enum, env = "RAYFENCE_LOG_LEVEL")]
    log_level: Option<LogLevel>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) if cli::stdout_closed(&error) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}`: the chain of causes on one line; never anyhow's Debug form,
            // which adds a backtrace under RUST_BACKTRACE=1.
            let _ = writeln!(std::io::stderr().lock(), "Error: {error:#}");
            ExitCode::from(cli::exit::ERROR)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Cleanup { bpffs, cni } => {
            // The entry first: no new pod is handed to a plugin whose state is
            // about to go.
            if let (Some(conf), Some(bin)) = (&cni.cni_conf_dir, &cni.cni_bin_dir) {
                let report = cni_install::uninstall(conf, bin)?;
                cli::out(&format!("{report}\n"))?;
            }
            let report = datapath::cleanup(&bpffs)
                .with_context(|| format!("cleaning up {}", bpffs.display()))?;
            cli::out(&format!(
                "removed {} links and {} maps under {}\n",
                report.links,
                report.maps,
                bpffs.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cni(CniCommand::Install {
            cni_conf_dir,
            cni_bin_dir,
            bpffs,
            plugin_binary,
        }) => {
            let report = cni_install::install(&cni_install::InstallConfig {
                conf_dir: cni_conf_dir,
                bin_dir: cni_bin_dir,
                bpffs,
                plugin_binary: match plugin_binary {
                    Some(path) => path,
                    None => cni_install::default_plugin_binary()?,
                },
            })?;
            cli::out(&format!("{report}\n"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cni(CniCommand::Uninstall {
            cni_conf_dir,
            cni_bin_dir,
        }) => {
            let report = cni_install::uninstall(&cni_conf_dir, &cni_bin_dir)?;
            cli::out(&format!("{report}\n"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { agent, output } => {
            let address = agent.address()?;
            block_on(cli::status(&address, output.format()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain(args) => {
            let output = args.output.format();
            let report = match &args.manifests {
                Some(dir) => {
                    let settings = policy_settings(&args.policy, "offline")?;
                    cli::explain_offline(dir, settings, &args.from, &args.to, output)?
                }
                None => {
                    let address = args.agent.address()?;
                    block_on(cli::explain(&address, &args.from, &args.to, output))?
                }
            };
            Ok(ExitCode::from(cli::verdict_exit_code(&report.verdict)))
        }
        Command::Flows {
            agent,
            follow,
            verdict,
            namespace,
            raycluster,
            limit,
            output,
        } => {
            let address = agent.address()?;
            let filter = rayfence::operator::wire::FlowFilter {
                verdict: verdict.as_deref().map(cli::parse_verdict).transpose()?,
                namespace,
                raycluster,
            };
            block_on(cli::flows(
                &address,
                &filter,
                follow,
                limit,
                output.format(),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completion { shell } => {
            // Into a buffer first: clap_complete panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "rayfence", &mut script);
            cli::out(&String::from_utf8_lossy(&script))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            match dir {
                Some(dir) => clap_mangen::generate_to(Cli::command(), &dir)
                    .with_context(|| format!("--dir {}", dir.display()))?,
                None => {
                    let mut page = Vec::new();
                    clap_mangen::Man::new(Cli::command())
                        .render(&mut page)
                        .context("rendering the manual page")?;
                    cli::out(&String::from_utf8_lossy(&page))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => {
            rayfence::logging::init(&LogConfig {
                format: args.log_format,
                level: args.log_level,
                rust_log: std::env::var("RUST_LOG").ok(),
                flows: matches!(args.flow_log, FlowLogArg::Stdout),
                colour: rayfence::logging::colour(
                    args.log_format,
                    std::io::stdout().is_terminal(),
                    std::env::var_os("NO_COLOR").as_deref(),
                ),
            })?;
            let auth = metrics_auth_config(&args)?;
            let tls = match (&args.metrics_tls_cert, &args.metrics_tls_key) {
                (Some(cert), Some(key)) => Some(Arc::new(TlsFiles::load(cert, key)?)),
                _ => None,
            };
            let config = runtime_config(&args)?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(agent(*args, config, auth, tls))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The commands' own small runtime (the agent builds its own).
fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}

/// The listeners' limits from their flags, checked.
fn listener_limits(args: &AgentArgs) -> anyhow::Result<Limits> {
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
fn listener_addresses(args: &AgentArgs) -> (SocketAddr, Option<SocketAddr>) {
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
fn metrics_auth_config(args: &AgentArgs) -> anyhow::Result<Option<AuthConfig>> {
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
                "--metrics-auth-audience and --metrics-auth-resource-attributes have no effect without --metrics-auth"
            );
        }
        let (addr, _) = listener_addresses(args);
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "serving /metrics without authentication on a non-loopback address (see --metrics-auth)");
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

/// The settings the policy flags give, for node `node_name`.
fn policy_settings(policy: &PolicyArgs, node_name: &str) -> anyhow::Result<Settings> {
    let mut settings = Settings::new(node_name.to_owned(), Vec::new());
    settings.dns = match policy.dns_mode {
        DnsModeArg::Anywhere => DnsMode::Anywhere,
        DnsModeArg::Off => DnsMode::Off,
        DnsModeArg::Service => {
            let Some((namespace, name)) = policy.dns_service.split_once('/') else {
                bail!(
                    "--dns-service {:?}: expected NAMESPACE/NAME",
                    policy.dns_service
                );
            };
            if namespace.is_empty() || name.is_empty() || name.contains('/') {
                bail!(
                    "--dns-service {:?}: expected NAMESPACE/NAME",
                    policy.dns_service
                );
            }
            DnsMode::Service {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }
        }
    };
    if !policy.operator_namespace.is_empty() {
        settings.operator_namespaces = policy.operator_namespace.clone();
    }
    if let Some(selector) = &policy.operator_selector {
        let mut pairs = Vec::new();
        for pair in selector.split(',') {
            match pair.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => pairs.push((k.trim(), v.trim())),
                _ => bail!("--operator-selector {selector:?}: expected key=value[,key=value]"),
            }
        }
        settings.operator_selector = Selector::from_labels(pairs);
    }
    settings.enforce_networkpolicies = policy.enforce_networkpolicies;
    Ok(settings)
}

/// Every flag checked and turned into the runtime's configuration.
fn runtime_config(args: &AgentArgs) -> anyhow::Result<RuntimeConfig> {
    if args.node_name.trim().is_empty() {
        bail!("--node-name (NODE_NAME) must not be empty");
    }
    let mut settings = policy_settings(&args.policy, &args.node_name)?;
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

async fn agent(
    args: AgentArgs,
    mut config: RuntimeConfig,
    auth: Option<AuthConfig>,
    tls: Option<Arc<TlsFiles>>,
) -> anyhow::Result<()> {
    // Say what is missing before anything half-starts (the error names each
    // capability and what it is for).
    rayfence::capabilities::check_for_agent()?;
    // Descriptors first: the listeners' caps must leave room for enforcement.
    let nofile = limits::raise_nofile();
    let listener_limits = listener_limits(&args)?;
    let (_, health_addr) = listener_addresses(&args);
    limits::check_headroom(
        &listener_limits,
        1 + usize::from(health_addr.is_some()),
        nofile,
    )?;
    let health = Arc::new(Health::new());
    let hub = Arc::new(FlowHub::default());
    let (queries, query_rx) = QueryClient::channel();
    let served = Served {
        health: health.clone(),
        api: Some(OperatorApi {
            queries,
            flows: hub.clone(),
        }),
    };
    // One client for whatever talks to the API server: the source, the Event
    // reporter and --metrics-auth (which needs it even with --manifests).
    let client = if auth.is_some() || args.manifests.is_none() {
        let client = kube_client(args.kubeconfig.as_deref()).await;
        Some(match auth {
            Some(_) => client.context("--metrics-auth needs a Kubernetes client")?,
            None => client?,
        })
    } else {
        None
    };
    let authorizer = match (auth, &client) {
        (Some(auth), Some(client)) => {
            let client = client.clone();
            tracing::info!(
                audiences = %rayfence::logging::list(&auth.audiences),
                resource = auth.resource.as_ref().map(tracing::field::display),
                "--metrics-auth: every path but /healthz and /readyz needs a bearer token"
            );
            Some(Arc::new(Authorizer::new(client, auth)))
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let (metrics_addr, health_addr) = listener_addresses(&args);
    // The TCP listeners run on a thread of their own: whatever a client makes
    // them do, the reconcile loop's worker threads never run it.
    let http = http_runtime()?;
    let bound = http
        .spawn(rayfence::serve::spawn(
            metrics_addr,
            served.clone(),
            authorizer,
            tls,
            listener_limits.clone(),
        ))
        .await
        .context("the HTTP thread stopped")?
        .context("--metrics-addr")?;
    tracing::info!(
        addr = %bound,
        scheme,
        max_connections = listener_limits.max_connections,
        max_per_source = listener_limits.max_per_source,
        header_timeout_s = listener_limits.header_timeout.as_secs(),
        nofile,
        "serving /metrics, /healthz, /readyz, /v1/"
    );
    if let Some(addr) = health_addr {
        let bound = http
            .spawn(rayfence::serve::spawn_health(
                addr,
                served.clone(),
                listener_limits,
            ))
            .await
            .context("the HTTP thread stopped")?
            .context("--health-addr")?;
        tracing::info!(addr = %bound, "serving /healthz, /readyz");
    }
    // Enforcement matters more than the commands' socket: without it the agent
    // still runs (and says why).
    let _socket = match rayfence::serve::spawn_socket(&args.api_socket, served).await {
        Ok(guard) => {
            tracing::info!(socket = %args.api_socket.display(), "serving the operator API");
            Some(guard)
        }
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "no operator API socket; the commands can use --agent http://...");
            None
        }
    };
    let flow_config = FlowConfig {
        log: match args.flow_log {
            FlowLogArg::Stdout => FlowLog::Stdout,
            FlowLogArg::Off => FlowLog::Off,
        },
        per_pod_per_second: args.flow_log_rate,
    };

    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut reporter: Option<Arc<dyn ProblemReporter>> = None;
    match args.manifests.clone() {
        Some(dir) => {
            tracing::info!(dir = %dir.display(), "reading objects from manifests");
            std::thread::Builder::new()
                .name("rf-manifests".into())
                .spawn(move || files::run_blocking(FilesConfig::new(dir), tx))
                .context("starting the manifests watcher")?;
        }
        None => {
            let client = client.context("the API source needs a Kubernetes client")?;
            let mut source = KubeSourceConfig::new(args.node_name.clone());
            source.enforce_networkpolicies = args.policy.enforce_networkpolicies;
            config.expected_kinds = source.kinds().into_iter().collect();
            reporter = Some(Arc::new(KubeEventReporter::spawn(
                client.clone(),
                EventReporterConfig::new(args.node_name.clone()),
            )));
            tracing::info!(kinds = %rayfence::logging::list(&config.expected_kinds), "watching the Kubernetes API");
            tokio::spawn(async move {
                if let Err(error) = kube_source::run(client, source, tx).await {
                    tracing::error!(%error, "the Kubernetes source stopped; the last state stays enforced");
                }
            });
        }
    }

    let runtime = tokio::task::block_in_place(|| Runtime::new(config, health, reporter))
        .context("starting the agent")?
        .with_observability(query_rx, FlowEvents::new(flow_config, hub))
        .context("starting the agent")?;
    // Only now: the plugin needs the pinned state it is pointed at.
    if let (Some(conf_dir), Some(bin_dir)) = (args.cni.cni_conf_dir, args.cni.cni_bin_dir) {
        cni_install::spawn_keeper(cni_install::InstallConfig {
            conf_dir,
            bin_dir,
            bpffs: args.cni_bpffs.unwrap_or(args.bpffs),
            plugin_binary: match args.cni_plugin_binary {
                Some(path) => path,
                None => cni_install::default_plugin_binary()?,
            },
        })
        .context("--cni-plugin-binary")?;
    }
    let links = rayfence::runtime::spawn_link_watcher();
    runtime.run(rx, links, shutdown_signal()).await;
    Ok(())
}

/// A single-threaded runtime on its own thread (`rf-http`) for the TCP listeners;
/// it lives as long as the process.
fn http_runtime() -> anyhow::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("rf-http".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))
        .context("starting the HTTP thread")?;
    Ok(handle)
}

/// `--kubeconfig PATH`, else in-cluster config or $KUBECONFIG (`Config::infer`).
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes configuration (in-cluster, $KUBECONFIG or --kubeconfig)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_tree_passes_clap_s_own_checks() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                if help.trim().is_empty() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{path} (the command itself)"));
                }
                walk(sub, &path, missing);
            }
        }
        let mut command = Cli::command();
        command.build();
        let mut missing = Vec::new();
        walk(&command, "rayfence", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
        // The walk sees the subcommands' own flags.
        let flows = command.find_subcommand("flows").expect("flows");
        assert!(flows.get_arguments().any(|a| a.get_id() == "raycluster"));
    }

    #[test]
    fn explain_help_documents_its_exit_status() {
        let mut command = Cli::command();
        let explain = command.find_subcommand_mut("explain").expect("explain");
        let help = explain.render_long_help().to_string();
        for needle in [
            "Exit status",
            "0  allowed",
            "1  denied",
            "2  error",
            "3  unknown",
        ] {
            assert!(help.contains(needle), "{needle}: {help}");
        }
    }

    #[test]
    fn json_is_a_hidden_alias_of_output_json_and_conflicts_with_o() {
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        let Ok(Cli {
            command: Command::Status { output, .. },
        }) = parse(&["rayfence", "status", "--json"])
        else {
            panic!("status --json parses");
        };
        assert_eq!(output.format(), Output::Json);
        let Ok(Cli {
            command: Command::Status { output, .. },
        }) = parse(&["rayfence", "status"])
        else {
            panic!("status parses");
        };
        assert_eq!(output.format(), Output::Table);
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
