//! `rayfence agent`'s flags, each with its environment variable (the DaemonSet
//! sets those), as clap parses them: unchecked.
//!
//! Must not: check or combine flags (that is [`super::config`]).
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use rayfence::cli::DEFAULT_API_SOCKET;
use rayfence::datapath::paths::DEFAULT_BPFFS_DIR;
use rayfence::logging::{LogFormat, LogLevel};

use crate::commands::args::{CniDirsArgs, PolicyArgs};

#[derive(Args, Debug)]
pub(crate) struct AgentArgs {
    /// This node's name (the DaemonSet sets it from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub(super) node_name: String,
    /// Read objects from YAML/JSON files in DIR (watched) instead of the Kubernetes API.
    #[arg(long, value_name = "DIR", env = "RAYFENCE_MANIFESTS")]
    pub(super) manifests: Option<PathBuf>,
    /// Kubeconfig for the API source (default: in-cluster config or $KUBECONFIG).
    #[arg(long, value_name = "PATH", env = "RAYFENCE_KUBECONFIG")]
    pub(super) kubeconfig: Option<PathBuf>,
    /// Where programs, maps and links are pinned.
    #[arg(long, value_name = "DIR", env = "RAYFENCE_BPFFS", default_value = DEFAULT_BPFFS_DIR)]
    pub(super) bpffs: PathBuf,
    /// The cgroup2 mount as the agent sees it (default: found in /proc/self/mountinfo).
    #[arg(long, value_name = "PATH", env = "RAYFENCE_CGROUP_ROOT")]
    pub(super) cgroup_root: Option<PathBuf>,
    /// The kubelet's own --cgroup-root (repeatable; default "/").
    #[arg(
        long,
        value_name = "PATH",
        env = "RAYFENCE_KUBELET_CGROUP_ROOT",
        value_delimiter = ','
    )]
    pub(super) kubelet_cgroup_root: Vec<String>,
    /// The host's /proc.
    #[arg(
        long,
        value_name = "PATH",
        env = "RAYFENCE_HOST_PROC",
        default_value = "/proc"
    )]
    pub(super) host_proc: PathBuf,
    /// Serve /metrics, /healthz, /readyz and the operator API (/v1/) here.
    #[arg(
        long,
        value_name = "ADDR",
        env = "RAYFENCE_METRICS_ADDR",
        default_value = "127.0.0.1:9402"
    )]
    pub(super) metrics_addr: SocketAddr,
    /// Bind --metrics-addr's port on this address instead of --metrics-addr's
    /// host: where the scrapers reach the node, never every address. The
    /// DaemonSet sets it to the node's own address (downward API status.hostIP).
    #[arg(long, value_name = "IP", env = "RAYFENCE_METRICS_BIND_ADDRESS")]
    pub(super) metrics_bind_address: Option<IpAddr>,
    /// Also serve /healthz and /readyz (only those, no token) here, with caps of
    /// its own: the kubelet's probes on loopback stay answered while the metrics
    /// listener is full. Not opened when --metrics-addr already covers it.
    #[arg(long, value_name = "ADDR", env = "RAYFENCE_HEALTH_ADDR")]
    pub(super) health_addr: Option<SocketAddr>,
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
    pub(super) metrics_max_connections: usize,
    /// At most this many connections open at once from one source address.
    #[arg(
        long,
        value_name = "N",
        env = "RAYFENCE_METRICS_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = 16
    )]
    pub(super) metrics_max_connections_per_source: usize,
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
    pub(super) metrics_header_timeout: u64,
    /// Require a bearer token on every path but /healthz and /readyz, checked with
    /// TokenReview and SubjectAccessReview (as kube-rbac-proxy does): 401 without a
    /// valid token, 403 when not allowed, 503 when the API server cannot be asked.
    /// Needs a Kubernetes client even with --manifests (--kubeconfig or in-cluster).
    #[arg(long, env = "RAYFENCE_METRICS_AUTH")]
    pub(super) metrics_auth: bool,
    /// With --metrics-auth: an audience the token must be valid for (repeatable;
    /// default: the API server's own audiences).
    #[arg(
        long,
        value_name = "AUDIENCE",
        env = "RAYFENCE_METRICS_AUTH_AUDIENCE",
        value_delimiter = ','
    )]
    pub(super) metrics_auth_audience: Vec<String>,
    /// With --metrics-auth: ask SubjectAccessReview about this resource instead of
    /// the request path as a non-resource URL: k=v[,k=v] of namespace, group,
    /// version, resource (required), subresource, name; the verb is the method's
    /// (GET -> get).
    #[arg(
        long,
        value_name = "K=V[,K=V]",
        env = "RAYFENCE_METRICS_AUTH_RESOURCE_ATTRIBUTES"
    )]
    pub(super) metrics_auth_resource_attributes: Option<String>,
    /// Serve --metrics-addr over TLS with this certificate chain (PEM; needs
    /// --metrics-tls-key). Re-read when the file changes.
    #[arg(
        long,
        value_name = "PATH",
        env = "RAYFENCE_METRICS_TLS_CERT",
        requires = "metrics_tls_key"
    )]
    pub(super) metrics_tls_cert: Option<PathBuf>,
    /// The private key of --metrics-tls-cert (PEM).
    #[arg(
        long,
        value_name = "PATH",
        env = "RAYFENCE_METRICS_TLS_KEY",
        requires = "metrics_tls_cert"
    )]
    pub(super) metrics_tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub(super) policy: PolicyArgs,
    /// Serve the operator API (status, explain, flows) on this local socket.
    #[arg(long, value_name = "PATH", env = "RAYFENCE_API_SOCKET", default_value = DEFAULT_API_SOCKET)]
    pub(super) api_socket: PathBuf,
    /// Where denied-flow events are logged besides `rayfence flows`: in the log
    /// (whatever --log-level says), or not at all.
    #[arg(long, value_enum, env = "RAYFENCE_FLOW_LOG", default_value = "stdout")]
    pub(super) flow_log: FlowLogArg,
    /// Flow events each local pod may log per second; the rest are counted as suppressed.
    #[arg(
        long,
        value_name = "N",
        env = "RAYFENCE_FLOW_LOG_RATE",
        default_value_t = 10
    )]
    pub(super) flow_log_rate: u32,
    /// Evaluate and count, never drop.
    #[arg(long, env = "RAYFENCE_AUDIT")]
    pub(super) audit: bool,
    /// More addresses of this node (repeatable), besides its interfaces' and the Node object's.
    #[arg(
        long,
        value_name = "IP",
        env = "RAYFENCE_NODE_ADDRESS",
        value_delimiter = ','
    )]
    pub(super) node_address: Vec<IpAddr>,
    /// Map capacity: local endpoints (host veths and cgroups).
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_ENDPOINTS")]
    pub(super) max_endpoints: Option<u32>,
    /// Map capacity: peer addresses.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_IDENTITIES")]
    pub(super) max_identities: Option<u32>,
    /// Map capacity: ipBlock prefixes.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_CIDRS")]
    pub(super) max_cidrs: Option<u32>,
    /// Map capacity: policy rows.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_POLICY")]
    pub(super) max_policy: Option<u32>,
    /// Map capacity: tracked connections.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_CONNTRACK")]
    pub(super) max_conntrack: Option<u32>,
    /// Map capacity: IP fragments in flight.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_FRAGMENTS")]
    pub(super) max_fragments: Option<u32>,
    /// Map capacity: counter keys.
    #[arg(long, value_name = "N", env = "RAYFENCE_MAX_COUNTERS")]
    pub(super) max_counters: Option<u32>,
    /// Flow event ring buffer size in bytes (a power of two, page multiple).
    #[arg(long, value_name = "BYTES", env = "RAYFENCE_EVENTS_BYTES")]
    pub(super) events_bytes: Option<u32>,
    #[command(flatten)]
    pub(super) cni: CniDirsArgs,
    /// The bpffs directory as the host sees it, written into the CNI plugin's
    /// entry (default: --bpffs; differs when the host's bpffs is mounted elsewhere).
    #[arg(long, value_name = "DIR", env = "RAYFENCE_CNI_BPFFS")]
    pub(super) cni_bpffs: Option<PathBuf>,
    /// The CNI plugin to copy (default: rayfence-cni next to this executable).
    #[arg(long, value_name = "PATH", env = "RAYFENCE_CNI_PLUGIN_BINARY")]
    pub(super) cni_plugin_binary: Option<PathBuf>,
    /// Log format, on stdout: text (colour only on a terminal and without NO_COLOR)
    /// or JSON lines.
    #[arg(long, value_enum, env = "RAYFENCE_LOG_FORMAT", default_value = "text")]
    pub(super) log_format: LogFormat,
    /// Log level; wins over RUST_LOG, whose directives apply without it (default:
    /// info).
    #[arg(long, value_enum, env = "RAYFENCE_LOG_LEVEL")]
    pub(super) log_level: Option<LogLevel>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum FlowLogArg {
    /// In the agent's log on stdout, one line each, in --log-format.
    Stdout,
    /// Not logged (still counted, and listed by `rayfence flows`).
    Off,
}
