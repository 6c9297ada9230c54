//! The `rayfence` binary: the node agent (`rayfence agent`) and its operator
//! commands (`rayfence status`, `explain`, `flows`, `cleanup`).
//!
//! Parses every flag once (each has an environment variable too) and fails fast
//! with a message that names the flag; then wires sources, runtime and HTTP.
//! Must not: hold agent logic (that is `rayfence::runtime`).
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rayfence::cli::{self, DEFAULT_API_SOCKET, Output};
use rayfence::datapath::{self, Capacities, DatapathOptions, paths::DEFAULT_BPFFS_DIR};
use rayfence::discovery::LocatorConfig;
use rayfence::policy::selector::Selector;
use rayfence::policy::{DnsMode, Settings};
use rayfence::runtime::api::QueryClient;
use rayfence::runtime::flows::{FlowConfig, FlowEvents, FlowHub, FlowLog};
use rayfence::runtime::{Runtime, RuntimeConfig};
use rayfence::serve::auth::{AuthConfig, Authorizer, ResourceAttributes};
use rayfence::serve::tls::TlsFiles;
use rayfence::serve::{Health, OperatorApi, Served};
use rayfence::source::ObjectKind;
use rayfence::source::ProblemReporter;
use rayfence::source::events::{EventReporterConfig, KubeEventReporter};
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

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent: watch the cluster (or a manifests directory) and keep
    /// the datapath equal to the policy, live.
    Agent(Box<AgentArgs>),
    /// The local endpoints of the agent on this node: hook, mode, isolation, drops.
    Status {
        #[command(flatten)]
        agent: AgentConnection,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Why a flow is allowed or denied, and by which rule, from the same engine the
    /// datapath's tables come from.
    Explain(Box<ExplainArgs>),
    /// Denied (and audited) flows seen by the agent on this node.
    Flows {
        #[command(flatten)]
        agent: AgentConnection,
        /// Keep printing new flows until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Only `dropped` or only `audit` (would have been dropped).
        #[arg(long, value_name = "dropped|audit")]
        verdict: Option<String>,
        #[arg(long, value_name = "NS")]
        namespace: Option<String>,
        #[arg(long, value_name = "NAME")]
        raycluster: Option<String>,
        /// How many recent flows to print first.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Detach every program rayfence attached and remove everything it pinned.
    Cleanup {
        /// The agent's bpffs directory.
        #[arg(long, value_name = "DIR", env = "RAYFENCE_BPFFS", default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
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
    /// Print JSON.
    #[arg(long)]
    json: bool,
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
    Stdout,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DnsModeArg {
    Service,
    Anywhere,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// Serve /metrics, /healthz and /readyz here.
    #[arg(
        long,
        value_name = "ADDR",
        env = "RAYFENCE_METRICS_ADDR",
        default_value = "127.0.0.1:9402"
    )]
    metrics_addr: SocketAddr,
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
    /// Where denied-flow events are logged as JSON lines besides `rayfence flows`.
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
    /// Log format.
    #[arg(long, value_enum, env = "RAYFENCE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Cleanup { bpffs } => {
            let report = datapath::cleanup(&bpffs)
                .with_context(|| format!("cleaning up {}", bpffs.display()))?;
            println!(
                "removed {} links and {} maps under {}",
                report.links,
                report.maps,
                bpffs.display()
            );
            Ok(())
        }
        Command::Status { agent, json } => {
            let address = agent.address()?;
            block_on(cli::status(&address, output(json)))
        }
        Command::Explain(args) => {
            let output = output(args.json);
            match &args.manifests {
                Some(dir) => {
                    let settings = policy_settings(&args.policy, "offline")?;
                    cli::explain_offline(dir, settings, &args.from, &args.to, output)?;
                }
                None => {
                    let address = args.agent.address()?;
                    block_on(cli::explain(&address, &args.from, &args.to, output))?;
                }
            }
            Ok(())
        }
        Command::Flows {
            agent,
            follow,
            verdict,
            namespace,
            raycluster,
            limit,
            json,
        } => {
            let address = agent.address()?;
            let filter = rayfence::api::FlowFilter {
                verdict: verdict.as_deref().map(cli::parse_verdict).transpose()?,
                namespace,
                raycluster,
            };
            block_on(cli::flows(&address, &filter, follow, limit, output(json)))
        }
        Command::Agent(args) => {
            init_tracing(args.log_format);
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
                .block_on(agent(*args, config, auth, tls))
        }
    }
}

fn output(json: bool) -> Output {
    if json { Output::Json } else { Output::Human }
}

/// The commands' own small runtime (the agent builds its own).
fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
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
        if !args.metrics_addr.ip().is_loopback() {
            tracing::warn!(addr = %args.metrics_addr, "serving /metrics without authentication on a non-loopback address (see --metrics-auth)");
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
            tracing::info!(audiences = ?auth.audiences, resource = ?auth.resource, "--metrics-auth: every path but /healthz and /readyz needs a bearer token");
            Some(Arc::new(Authorizer::new(client, auth)))
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let bound = rayfence::serve::spawn(args.metrics_addr, served.clone(), authorizer, tls)
        .await
        .context("--metrics-addr")?;
    tracing::info!(addr = %bound, scheme, "serving /metrics, /healthz, /readyz, /v1/");
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
            tracing::info!(kinds = ?config.expected_kinds, "watching the Kubernetes API");
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
    let links = rayfence::runtime::spawn_link_watcher();
    runtime.run(rx, links, shutdown_signal()).await;
    Ok(())
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
