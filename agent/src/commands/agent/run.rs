//! `rayfence agent` started: the log, then the async wiring of sources, runtime and
//! HTTP listeners, until SIGTERM or Ctrl-C.
//!
//! Must not: hold agent logic (that is `rayfence::runtime`), or check a flag (that
//! is [`super::config`], done before anything starts).
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use rayfence::cni::install as cni_install;
use rayfence::logging::LogConfig;
use rayfence::runtime::{Runtime, RuntimeConfig};
use rayfence::serve::auth::{AuthConfig, Authorizer};
use rayfence::serve::limits;
use rayfence::serve::tls::TlsFiles;
use rayfence::serve::{OperatorApi, Served};
use rayfence::source::ProblemReporter;
use rayfence::source::files::{self, FilesConfig};
use rayfence::source::kube::{self as kube_source, KubeSourceConfig};
// The operator surface the agent wires to the runtime: health, operator queries,
// flow events and the problems reported as Kubernetes Events.
use rayfence::operator::events::{EventReporterConfig, KubeEventReporter};
use rayfence::operator::flows::{FlowConfig, FlowEvents, FlowHub, FlowLog};
use rayfence::operator::health::Health;
use rayfence::operator::query::QueryClient;

use super::LOG_TARGET;
use super::args::{AgentArgs, FlowLogArg};
use super::config::{listener_addresses, listener_limits, metrics_auth_config, runtime_config};

/// Runs the agent until it is told to stop.
pub(crate) fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
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
        .block_on(agent(args, config, auth, tls))?;
    Ok(ExitCode::SUCCESS)
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
    log_dns_base_flow(&config.settings);
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
                target: LOG_TARGET,
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
        target: LOG_TARGET,
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
        tracing::info!(target: LOG_TARGET, addr = %bound, "serving /healthz, /readyz");
    }
    // Enforcement matters more than the commands' socket: without it the agent
    // still runs (and says why).
    let _socket = match rayfence::serve::spawn_socket(&args.api_socket, served).await {
        Ok(guard) => {
            tracing::info!(target: LOG_TARGET, socket = %args.api_socket.display(), "serving the operator API");
            Some(guard)
        }
        Err(error) => {
            tracing::warn!(target: LOG_TARGET, error = %format!("{error:#}"), "no operator API socket; the commands can use --agent http://...");
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
            tracing::info!(target: LOG_TARGET, dir = %dir.display(), "reading objects from manifests");
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
            tracing::info!(target: LOG_TARGET, kinds = %rayfence::logging::list(&config.expected_kinds), "watching the Kubernetes API");
            tokio::spawn(async move {
                if let Err(error) = kube_source::run(client, source, tx).await {
                    tracing::error!(target: LOG_TARGET, %error, "the Kubernetes source stopped; the last state stays enforced");
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

/// What the DNS base flow allows on this node, once at start (docs/semantics.md "What
/// an isolated pod may do").
fn log_dns_base_flow(settings: &rayfence::policy::Settings) {
    use rayfence::policy::DnsMode;
    let node_local = rayfence::logging::list(&settings.dns_node_local);
    match &settings.dns {
        DnsMode::Service { namespace, name } => tracing::info!(
            target: LOG_TARGET,
            service = %format!("{namespace}/{name}"),
            node_local = %node_local,
            "DNS base flow: UDP/TCP 53 to the DNS Service and its pods, and to the node-local DNS addresses"
        ),
        DnsMode::Anywhere => tracing::info!(
            target: LOG_TARGET,
            node_local = %node_local,
            "DNS base flow: UDP/TCP 53 to any address"
        ),
        DnsMode::Off if !settings.dns_node_local.is_empty() => tracing::warn!(
            target: LOG_TARGET,
            node_local = %node_local,
            "DNS base flow off: queries to the node-local DNS addresses need a rule (they are not the node's)"
        ),
        DnsMode::Off => {
            tracing::info!(target: LOG_TARGET, "DNS base flow off: rules must allow DNS")
        }
    }
    // A cache address no device of this node holds is answered elsewhere, if at all.
    if settings.dns_node_local.is_empty() {
        return;
    }
    use rayfence::discovery::netlink::{Rtnl, interfaces_with_address};
    match Rtnl::in_current().and_then(|mut rtnl| rtnl.addresses()) {
        Ok(addresses) => {
            for ip in &settings.dns_node_local {
                if interfaces_with_address(&addresses, *ip).is_empty() {
                    tracing::warn!(
                        target: LOG_TARGET,
                        address = %ip,
                        "--dns-node-local: no device of this node holds this address (yet): \
                         is NodeLocal DNSCache running here? Queries to it leave the node"
                    );
                }
            }
        }
        Err(error) => tracing::warn!(target: LOG_TARGET, %error, "listing the node's addresses"),
    }
}
