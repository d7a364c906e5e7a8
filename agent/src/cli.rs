//! The `nodeward` command line: the agent and the commands that talk to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{
    ArgAction, ArgMatches, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand,
    ValueEnum,
};

use crate::api::{self, Request};
use crate::datapath::sizes;
use crate::flows::filter::PodMatch;
use crate::flows::{Flow, FlowFilter};

const DEFAULT_SOCKET: &str = "/run/nodeward/nodeward.sock";

#[derive(Parser, Debug)]
#[command(
    name = "nodeward",
    version,
    about = "Sidecar-less service mesh enforcement: identity-based L3/L4 policy in the kernel, flows you can follow",
    long_about = None,
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent (one per node).
    Agent(Box<AgentArgs>),
    /// Print flows recorded by the local agent.
    Observe(Box<ObserveArgs>),
    /// Show whether the datapath is loaded and attached, map fill, policies and errors.
    Status(StatusArgs),
    /// Show the certificates of the local workloads and of the agent: identity, issuer,
    /// serial, expiry and time to renewal.
    Certs(StatusArgs),
    /// List the Services this node translates: each ClusterIP:port with its backends and their
    /// states (ready, serving, terminating; `*` marks where new connections go).
    Services(StatusArgs),
    /// Create a root CA (ca-cert.pem, ca-key.pem): for `nodeward issuer --ca-cert/--ca-key`
    /// (agents then get only ca-cert.pem, as --trust-bundle), or, with --ca-mode local, for
    /// every agent's --ca-cert/--ca-key, so all agents of a cluster trust the same certificates.
    CaCreate {
        /// Directory to write the two files into (created, mode 0700).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Trust domain the root is named for.
        #[arg(long, default_value = crate::ca::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Sign a client certificate with a CA key, for reading flows from other nodes (`observe
    /// --node`, the agents' --flows-addr): writes cert.pem, key.pem and ca.pem into --out.
    CaIssue(Box<CaIssueArgs>),
    /// Run the certificate issuer: the only holder of the CA key. Agents with `--ca-mode
    /// issuer` send it CSRs; it signs an identity only for the agent of a node where a pod of
    /// that identity is scheduled.
    Issuer(Box<IssuerArgs>),
    /// Ask the issuer for a certificate as a node would (with that node's token), to check a
    /// setup or a refusal: prints what was signed, or why not. The key is thrown away unless
    /// --out is given.
    IssuerRequest(Box<IssuerRequestArgs>),
    /// Print the CustomResourceDefinitions of the nodeward.io kinds (or write them to a directory).
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
    /// Remove an agent's pinned programs and maps: enforcement on its endpoints STOPS.
    Cleanup {
        /// The agent's --bpffs-dir.
        #[arg(long, default_value = "/sys/fs/bpf/nodeward")]
        bpffs_dir: PathBuf,
    },
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// This node's name: pods whose spec.nodeName equals it are this agent's endpoints.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Standalone mode: read every YAML document under DIR (recursively) and watch it.
    #[arg(long, value_name = "DIR", required_unless_present = "kubernetes")]
    manifests: Option<PathBuf>,
    /// Read objects from the Kubernetes API server: in-cluster service account, or --kubeconfig.
    #[arg(long, conflicts_with = "manifests")]
    kubernetes: bool,
    /// With --kubernetes: the kubeconfig to use instead of the in-cluster configuration.
    #[arg(long, value_name = "PATH", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// CA, identities, flow log and other state.
    #[arg(long, default_value = "/var/lib/nodeward")]
    state_dir: PathBuf,
    /// Where programs, links and maps are pinned (per agent instance).
    #[arg(long, default_value = "/sys/fs/bpf/nodeward")]
    bpffs_dir: PathBuf,
    /// Unix socket of the local control and flow API.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// Prometheus metrics and /healthz, /readyz.
    #[arg(long, env = "NODEWARD_METRICS_ADDR", default_value = "0.0.0.0:9962")]
    metrics_addr: SocketAddr,
    /// The flows port (e.g. 0.0.0.0:4244): flows over mutual TLS for clients with a certificate
    /// of the mesh CA whose identity --flows-allow names (`observe --node`). Off by default:
    /// flows are then read only on the local --api-socket.
    #[arg(long, env = "NODEWARD_FLOWS_ADDR", value_name = "ADDR")]
    flows_addr: Option<SocketAddr>,
    /// Who may read flows on --flows-addr: SPIFFE IDs, prefixes of one ending in '*', or
    /// namespace/serviceaccount of --trust-domain; repeatable, or comma-separated.
    #[arg(
        long,
        env = "NODEWARD_FLOWS_ALLOW",
        value_name = "IDENTITY",
        value_delimiter = ',',
        default_values_t = crate::flowapi::access::default_allow()
    )]
    flows_allow: Vec<String>,
    /// Flow streams one client identity may have open at once on --flows-addr (more are
    /// refused with 429).
    #[arg(
        long,
        env = "NODEWARD_FLOWS_FOLLOWERS_PER_CLIENT",
        default_value_t = 8,
        value_parser = clap::value_parser!(u64).range(1..=1024)
    )]
    flows_followers_per_client: u64,
    /// The DNS proxy (e.g. the node address, 10.0.0.1:53; UDP and TCP): pods' DNS to a
    /// Service on port 53 (kube-dns), datagrams and TCP connections, goes to it while it runs,
    /// so toFQDNs learns the answers and rules.dns refuses names; when the agent is down it
    /// goes straight to kube-dns. Needs --cgroup. Off by default: then toFQDNs allows nothing
    /// and rules.dns refuses nothing.
    #[arg(long, env = "NODEWARD_DNS_PROXY_ADDR", value_name = "ADDR")]
    dns_proxy_addr: Option<SocketAddr>,
    /// The shortest time an address learned from DNS stays allowed (a smaller TTL is raised to
    /// it), before --dns-ttl-grace.
    #[arg(
        long,
        env = "NODEWARD_DNS_MIN_TTL",
        default_value = "5s",
        value_parser = humantime::parse_duration
    )]
    dns_min_ttl: Duration,
    /// How long past its TTL a learned address stays allowed (clients reconnect to an address
    /// they resolved a moment before it expired).
    #[arg(
        long,
        env = "NODEWARD_DNS_TTL_GRACE",
        default_value = "5s",
        value_parser = humantime::parse_duration
    )]
    dns_ttl_grace: Duration,
    /// HTTP tracing: the share (0 to 1) of proxied requests arriving without a W3C
    /// `traceparent` that get a new, sampled trace (the backend sees the header; the L7 flow
    /// names the trace id). A request that brings its own keeps it, whatever this says.
    #[arg(
        long,
        env = "NODEWARD_TRACE_SAMPLE_RATE",
        value_name = "RATE",
        default_value_t = crate::http::trace::DEFAULT_SAMPLE_RATE
    )]
    trace_sample_rate: f64,
    /// HTTP tracing: an OpenTelemetry collector's OTLP/HTTP endpoint (`http://HOST:4318`, or a
    /// full `.../v1/traces` URL; plaintext). The proxy's span of each sampled request goes
    /// there as protobuf, in batches. Unset: no spans are sent; `traceparent` is still passed
    /// on and named on flows.
    #[arg(long, env = "NODEWARD_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// The cgroup (v2 path) for socket-level programs (Service translation, DNS steering);
    /// never the machine's root cgroup. `auto`: the kubelet's pod cgroup (`kubepods.slice` or
    /// `kubepods`) under a cgroup v2 mount of the agent, an error when there is none.
    #[arg(long, env = "NODEWARD_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Flows kept in memory for `observe --last`.
    #[arg(long, env = "NODEWARD_FLOW_BUFFER", default_value_t = 4096)]
    flow_buffer: usize,
    /// Also append every flow as a JSON line to DIR/flows.jsonl (rotated by size).
    #[arg(long, env = "NODEWARD_FLOW_LOG", value_name = "DIR")]
    flow_log: Option<PathBuf>,
    /// Size cap of one flow log file.
    #[arg(
        long,
        env = "NODEWARD_FLOW_LOG_MAX_BYTES",
        default_value_t = 16 * 1024 * 1024,
        value_name = "BYTES"
    )]
    flow_log_max_bytes: u64,
    /// Flow log files kept, the current one included.
    #[arg(
        long,
        env = "NODEWARD_FLOW_LOG_FILES",
        default_value_t = 8,
        value_parser = clap::value_parser!(u64).range(1..=1000)
    )]
    flow_log_files: u64,
    /// Which new flows the datapath reports: `all`, or only `drops` (cheaper).
    #[arg(long, env = "NODEWARD_FLOW_EVENTS", value_enum, default_value = "all")]
    flow_events: FlowEvents,
    /// Re-read the manifests this often even without a file event.
    #[arg(
        long,
        env = "NODEWARD_RESYNC_INTERVAL",
        default_value = "10s",
        value_parser = humantime::parse_duration
    )]
    resync_interval: Duration,
    /// How often the conntrack garbage collector deletes expired entries (lifetimes: TCP 6h
    /// established, 60s unanswered, 10s after FIN/RST; other protocols 60s). A table full
    /// of live flows refuses new ones (drop reason CT_MAP_INSERTION_FAILED); a larger
    /// --map-conntrack-entries is the cure.
    #[arg(
        long,
        env = "NODEWARD_CONNTRACK_GC_INTERVAL",
        default_value = "30s",
        value_parser = humantime::parse_duration
    )]
    conntrack_gc_interval: Duration,
    /// Trust domain of the mesh's SPIFFE IDs (spiffe://<trust-domain>/ns/<ns>/sa/<account>).
    #[arg(long, env = "NODEWARD_TRUST_DOMAIN", default_value = crate::ca::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Issuing CA certificate (PEM, optionally followed by its issuers) shared by the nodes
    /// (`nodeward ca-create` makes one); without it the agent creates a root of its own in
    /// --state-dir/ca on first start, which only its own node trusts.
    #[arg(
        long,
        env = "NODEWARD_CA_CERT",
        value_name = "FILE",
        requires = "ca_key"
    )]
    ca_cert: Option<PathBuf>,
    /// The --ca-cert's private key (PKCS#8 PEM).
    #[arg(
        long,
        env = "NODEWARD_CA_KEY",
        value_name = "FILE",
        requires = "ca_cert"
    )]
    ca_key: Option<PathBuf>,
    /// More trust roots (PEM), e.g. the old root while a new one rolls out; repeatable (or
    /// comma-separated in the environment).
    #[arg(
        long,
        env = "NODEWARD_TRUST_BUNDLE",
        value_name = "FILE",
        value_delimiter = ','
    )]
    trust_bundle: Vec<PathBuf>,
    /// Lifetime of workload certificates; each is renewed at half of it.
    #[arg(long, env = "NODEWARD_CERT_TTL", default_value = "24h", value_parser = cert_ttl_arg)]
    cert_ttl: Duration,
    /// Where workload certificates come from. local: this agent's own CA (--ca-cert/--ca-key,
    /// or a generated root): standalone mode and the demo, and whoever takes the node has the
    /// key. issuer: CSRs to `nodeward issuer` (--issuer-addr), which signs only identities of
    /// pods scheduled on this node; no CA key on the node, and --trust-bundle gives the roots.
    #[arg(long, env = "NODEWARD_CA_MODE", value_enum, default_value = "local")]
    ca_mode: CaModeArg,
    /// With --ca-mode issuer: the issuer's HOST:PORT.
    #[arg(
        long,
        env = "NODEWARD_ISSUER_ADDR",
        default_value = "nodeward-issuer.nodeward-system.svc:15012"
    )]
    issuer_addr: String,
    /// With --ca-mode issuer: the file holding this node's token, read for every request (a
    /// projected ServiceAccount token for the issuer's audience, which the kubelet rotates, or
    /// a bootstrap token in standalone mode).
    #[arg(
        long,
        env = "NODEWARD_ISSUER_TOKEN_FILE",
        value_name = "FILE",
        default_value = "/var/run/secrets/nodeward/issuer/token"
    )]
    issuer_token_file: PathBuf,
    /// mTLS mode of pods no MutualTLS object selects: DISABLE (not in the mesh), PERMISSIVE
    /// (tunnel between meshed pods, plaintext accepted) or STRICT (only the tunnel reaches them).
    #[arg(
        long,
        env = "NODEWARD_MTLS_MODE",
        value_enum,
        default_value = "DISABLE"
    )]
    mtls_mode: MtlsModeArg,
    /// Where the HBONE (mTLS tunnel) server listens; peers connect to port 15008 of this node's
    /// addresses.
    #[arg(long, env = "NODEWARD_HBONE_ADDR", default_value = "[::]:15008")]
    hbone_addr: SocketAddr,
    /// Which address the HBONE client dials for a destination pod: `pod` (port 15008 of the
    /// pod's own address, as ambient does; this node then also takes new connections to its
    /// own pods' `podIP:15008` for the agent: an nftables table `nodeward_hbone` marks them by
    /// conntrack, and a rule and routes in table 20056 deliver them; needs `nft`) or `node` (the
    /// destination node's address, the pod named in the TLS server name; removes that table,
    /// rule and routes). Set it alike on every node; a `pod` client falls back to the node's
    /// address when a pod's address does not answer.
    #[arg(long, env = "NODEWARD_HBONE_DIAL", value_enum, default_value = "pod")]
    hbone_dial: HboneDialArg,
    /// How pod traffic that policy allowed leaves the datapath: `ebpf` sends it from the
    /// programs straight into a local destination pod (`bpf_redirect_peer`) or to the device
    /// toward a remote pod's node (`bpf_fib_lookup`, `bpf_redirect_neigh`), and puts what
    /// arrives from other nodes straight into the pod, bypassing the node's IP forwarding and
    /// netfilter (iptables FORWARD rules do not see it); `kernel` leaves it to the node's
    /// routing. Policy, conntrack and flows are the same either way.
    #[arg(
        long,
        env = "NODEWARD_HOST_ROUTING",
        value_enum,
        default_value = "ebpf"
    )]
    host_routing: HostRoutingArg,
    /// Underlay devices for eBPF host routing, comma-separated: where packets from other nodes
    /// arrive. Default: the devices of the routes to the other nodes' pods.
    #[arg(
        long,
        env = "NODEWARD_DEVICES",
        value_delimiter = ',',
        value_name = "DEVICES"
    )]
    devices: Vec<String>,
    /// Entries of the ipcache map: every pod address in the cluster (two for a dual-stack pod),
    /// node and CIDR. The default holds 150,000 dual-stack pods with room for rollouts.
    #[arg(long, env = "NODEWARD_MAP_IPCACHE_ENTRIES", default_value_t = sizes::DEFAULT_IPCACHE,
          value_parser = clap::value_parser!(u32).range(16..))]
    map_ipcache_entries: u32,
    /// Entries of the policy map: the local pods' compiled rules (old and new side by side
    /// while a change is written). Allocated as used.
    #[arg(long, env = "NODEWARD_MAP_POLICY_ENTRIES", default_value_t = sizes::DEFAULT_POLICY,
          value_parser = clap::value_parser!(u32).range(16..))]
    map_policy_entries: u32,
    /// Entries of the map of CIDRs that policies name (ipBlock).
    #[arg(long, env = "NODEWARD_MAP_POLICY_CIDR_ENTRIES",
          default_value_t = sizes::DEFAULT_POLICY_CIDRS,
          value_parser = clap::value_parser!(u32).range(16..))]
    map_policy_cidr_entries: u32,
    /// The most pods (workload interfaces) this node runs: entries of the endpoints map.
    #[arg(long, env = "NODEWARD_MAP_ENDPOINTS_ENTRIES", default_value_t = sizes::DEFAULT_ENDPOINTS,
          value_parser = clap::value_parser!(u32).range(1..))]
    map_endpoints_entries: u32,
    /// Entries of the conntrack table (an LRU: when full, the least recently used flow is
    /// evicted and its next packet is evaluated again). Default: from the node's memory, see
    /// --map-dynamic-size-ratio.
    #[arg(long, env = "NODEWARD_MAP_CONNTRACK_ENTRIES",
          value_parser = clap::value_parser!(u32).range(1024..))]
    map_conntrack_entries: Option<u32>,
    /// Share of the node's memory for the conntrack table when --map-conntrack-entries is not
    /// given (as Cilium's bpf-map-dynamic-size-ratio; 128 bytes an entry, 65,536 to 4,194,304
    /// entries).
    #[arg(long, env = "NODEWARD_MAP_DYNAMIC_SIZE_RATIO",
          default_value_t = sizes::DEFAULT_DYNAMIC_SIZE_RATIO, value_parser = size_ratio_arg)]
    map_dynamic_size_ratio: f64,
    /// Log filter (tracing EnvFilter syntax), also RUST_LOG.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum HostRoutingArg {
    /// eBPF host routing: allowed pod-to-pod traffic skips the node's forwarding path.
    Ebpf,
    /// The node's own routing and netfilter carry all traffic.
    Kernel,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum HboneDialArg {
    /// The destination pod's address, port 15008.
    Pod,
    /// The destination node's address, port 15008.
    Node,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
#[value(rename_all = "UPPER")]
enum MtlsModeArg {
    Disable,
    Permissive,
    Strict,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum FlowEvents {
    /// Every new flow, forwarded or dropped.
    All,
    /// Drops only.
    Drops,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum FlowOutput {
    /// One readable line per flow.
    Compact,
    /// One Hubble-style JSON object per line.
    Json,
    /// Aligned columns.
    Table,
}

/// Filter flags, in the order `--not` may precede them (each negates only the next one).
/// Every filter may be given once positively and any number of times after `--not`.
const FILTER_FLAGS: &[&str] = &[
    "verdict",
    "from_pod",
    "to_pod",
    "pod",
    "namespace",
    "from_ip",
    "to_ip",
    "port",
    "protocol",
    "identity",
    "from_label",
    "to_label",
    "to_fqdn",
    "to_service",
    "http_method",
    "http_path",
    "http_status",
];

/// The filter fields define the flags; their values are read from `ArgMatches` in command-line
/// order (see [`filter_of`]) so that `--not` applies to the flag after it.
#[derive(Args, Debug)]
struct ObserveArgs {
    #[arg(long, default_value = DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// Read flows from a flow log (a file, or an agent's --flow-log DIR with its rotated files)
    /// instead of the agent.
    #[arg(long, value_name = "FILE_OR_DIR", conflicts_with_all = ["node", "follow"])]
    flow_log: Option<PathBuf>,
    /// Read another node's agent through its flows port (`host[:port]`, port 4244 by default;
    /// the agent's --flows-addr) over mutual TLS, with the client certificate of --tls-dir;
    /// repeat to merge several nodes in time order.
    #[arg(long, value_name = "NAME_OR_ADDR")]
    node: Vec<String>,
    /// With --node: the directory of the client's cert.pem, key.pem and ca.pem (`nodeward
    /// ca-issue` writes them) [default: ~/.config/nodeward/observer].
    #[arg(long, env = "NODEWARD_OBSERVER_DIR", value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// With --node: the client certificate (PEM, then its chain) instead of --tls-dir's.
    #[arg(long, value_name = "FILE", requires = "node")]
    cert: Option<PathBuf>,
    /// With --node: the client certificate's private key (PEM) instead of --tls-dir's.
    #[arg(long, value_name = "FILE", requires = "node")]
    key: Option<PathBuf>,
    /// With --node: the CA certificate(s) the agents' certificates must chain to instead of
    /// --tls-dir's.
    #[arg(long, value_name = "FILE", requires = "node")]
    ca_cert: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value = "compact")]
    output: FlowOutput,
    /// Keep printing new flows as they happen.
    #[arg(short, long)]
    follow: bool,
    /// Print the last N stored flows first (default 20, or 0 with --follow; all in a flow log).
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    /// Only flows since a duration ago (`5m`) or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Only flows until an RFC 3339 time or a duration ago.
    #[arg(long)]
    until: Option<String>,
    /// Negate the next filter flag: `--not --verdict FORWARDED`.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    not: Vec<String>,
    /// FORWARDED or DROPPED.
    #[arg(long, action = ArgAction::Append)]
    verdict: Vec<String>,
    /// Source pod, `[namespace/]name-prefix`.
    #[arg(long, action = ArgAction::Append)]
    from_pod: Vec<String>,
    /// Destination pod, `[namespace/]name-prefix`.
    #[arg(long, action = ArgAction::Append)]
    to_pod: Vec<String>,
    /// Either end's pod, `[namespace/]name-prefix`.
    #[arg(long, action = ArgAction::Append)]
    pod: Vec<String>,
    /// Either end's namespace.
    #[arg(long, action = ArgAction::Append)]
    namespace: Vec<String>,
    /// Source address or CIDR.
    #[arg(long, action = ArgAction::Append)]
    from_ip: Vec<String>,
    /// Destination address or CIDR.
    #[arg(long, action = ArgAction::Append)]
    to_ip: Vec<String>,
    /// Either port.
    #[arg(long, action = ArgAction::Append)]
    port: Vec<String>,
    /// TCP, UDP, SCTP, ICMPv4, ICMPv6, or DNS (the DNS proxy's flows: query, type, rcode, answers).
    #[arg(long, action = ArgAction::Append)]
    protocol: Vec<String>,
    /// Either end's identity.
    #[arg(long, action = ArgAction::Append)]
    identity: Vec<String>,
    /// Source label `key=value` (or `k8s:key=value`, or `key` for any value).
    #[arg(long, action = ArgAction::Append)]
    from_label: Vec<String>,
    /// Destination label `key=value` (or `k8s:key=value`, or `key` for any value).
    #[arg(long, action = ArgAction::Append)]
    to_label: Vec<String>,
    /// A name the destination was resolved from (`api.example.com`, `*.example.com`).
    #[arg(long, action = ArgAction::Append)]
    to_fqdn: Vec<String>,
    /// The Service (`namespace/name`) whose ClusterIP the source dialled: flows to its backends.
    #[arg(long, action = ArgAction::Append, value_name = "NS/NAME")]
    to_service: Vec<String>,
    /// L7 (HTTP) flows of this method.
    #[arg(long, action = ArgAction::Append, value_name = "METHOD")]
    http_method: Vec<String>,
    /// L7 flows whose URL path matches this regular expression (`^/api/`).
    #[arg(long, action = ArgAction::Append, value_name = "REGEX")]
    http_path: Vec<String>,
    /// L7 flows with this status code (`404`) or code prefix (`5+`).
    #[arg(long, action = ArgAction::Append, value_name = "CODE")]
    http_status: Vec<String>,
}

#[derive(Args, Debug)]
struct IssuerArgs {
    /// Address to serve CSRs on (TLS 1.3, POST /v1/sign).
    #[arg(long, env = "NODEWARD_ISSUER_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Address for `GET /metrics` and `/healthz` (plain HTTP); empty to serve none.
    #[arg(
        long,
        env = "NODEWARD_ISSUER_METRICS_ADDR",
        default_value = "0.0.0.0:9963"
    )]
    metrics_addr: String,
    /// The issuing CA certificate (PEM, optionally followed by its issuers): a root or an
    /// intermediate, e.g. cert-manager's. Without it (and --ca-key) the issuer generates a
    /// root in --state-dir/ca on first start.
    #[arg(
        long,
        env = "NODEWARD_CA_CERT",
        value_name = "FILE",
        requires = "ca_key"
    )]
    ca_cert: Option<PathBuf>,
    /// The --ca-cert's private key (PKCS#8 PEM). Mount it here and nowhere else.
    #[arg(
        long,
        env = "NODEWARD_CA_KEY",
        value_name = "FILE",
        requires = "ca_cert"
    )]
    ca_key: Option<PathBuf>,
    /// More trust roots (PEM); repeatable.
    #[arg(
        long,
        env = "NODEWARD_TRUST_BUNDLE",
        value_name = "FILE",
        value_delimiter = ','
    )]
    trust_bundle: Vec<PathBuf>,
    /// Where a generated CA is kept.
    #[arg(
        long,
        env = "NODEWARD_STATE_DIR",
        default_value = "/var/lib/nodeward-issuer"
    )]
    state_dir: PathBuf,
    /// Trust domain of the identities it signs.
    #[arg(long, env = "NODEWARD_TRUST_DOMAIN", default_value = crate::ca::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Lifetime of the certificates it signs (agents renew at half of it).
    #[arg(long, env = "NODEWARD_CERT_TTL", default_value = "24h", value_parser = cert_ttl_arg)]
    cert_ttl: Duration,
    /// Standalone authentication: a file of `NODE TOKEN` lines, one bootstrap token per node
    /// (the agents' --issuer-token-file). Without it, tokens are checked with TokenReview.
    #[arg(long, env = "NODEWARD_ISSUER_BOOTSTRAP_TOKENS", value_name = "FILE")]
    bootstrap_tokens: Option<PathBuf>,
    /// Standalone pods: read them from this manifests directory (as the agents' --manifests)
    /// instead of the API server.
    #[arg(long, env = "NODEWARD_MANIFESTS", value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// The kubeconfig to use instead of the in-cluster configuration.
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The audience the agents' tokens must be for.
    #[arg(long, env = "NODEWARD_ISSUER_AUDIENCE", default_value = crate::issuer::auth::DEFAULT_AUDIENCE)]
    audience: String,
    /// The agents' service account (NAMESPACE/NAME): only its tokens may ask.
    #[arg(
        long,
        env = "NODEWARD_AGENT_SERVICE_ACCOUNT",
        default_value = "nodeward-system/nodeward"
    )]
    agent_service_account: String,
    /// Requests a node may make at once, before --rate-per-second applies.
    #[arg(long, env = "NODEWARD_ISSUER_RATE_BURST", default_value_t = 200)]
    rate_burst: u32,
    /// Requests per second each node is refilled with.
    #[arg(long, env = "NODEWARD_ISSUER_RATE", default_value_t = 20.0)]
    rate_per_second: f64,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "NODEWARD_LOG", default_value = "info")]
    log: String,
}

#[derive(Args, Debug)]
struct IssuerRequestArgs {
    /// The issuer's HOST:PORT.
    #[arg(long, default_value = "nodeward-issuer.nodeward-system.svc:15012")]
    issuer_addr: String,
    /// The node's token (as the agent's --issuer-token-file).
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// The roots the issuer's certificate chains to (as the agent's --trust-bundle).
    #[arg(long, value_name = "FILE", required = true)]
    trust_bundle: Vec<PathBuf>,
    #[arg(long, default_value = crate::ca::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The identity to ask for.
    #[arg(long, value_name = "SPIFFE_ID")]
    identity: String,
    /// Also write the certificate chain and its key to DIR/cert.pem and DIR/key.pem (mode
    /// 0600): what a node holds for its own workloads, e.g. to test a peer's checks.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

async fn issuer_request(args: IssuerRequestArgs) -> anyhow::Result<()> {
    use crate::issuer::client::{IssuerClient, IssuerClientConfig};
    let identity: crate::ca::SpiffeId = args
        .identity
        .parse()
        .with_context(|| format!("--identity {:?}", args.identity))?;
    let mesh = crate::ca::MeshCa::from_bundle(
        &args.trust_domain,
        &args.trust_bundle,
        String::new(),
        String::new(),
    )?;
    let client = IssuerClient::new(
        &mesh.trust(),
        IssuerClientConfig {
            address: args.issuer_addr.clone(),
            token_file: args.token_file,
            timeout: Duration::from_secs(10),
        },
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    if let Some(dir) = &args.out {
        let (key, csr) = IssuerClient::csr_for(&identity).map_err(|e| anyhow::anyhow!(e))?;
        let chain = client
            .sign(&csr)
            .await
            .map_err(|e| anyhow::anyhow!("{identity} from {}: {e}", args.issuer_addr))?;
        let pem: String = chain
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
            .collect();
        crate::ca::create_private_dir(dir)?;
        crate::ca::write_atomically(&dir.join("cert.pem"), pem.as_bytes(), 0o644)?;
        crate::ca::write_atomically(&dir.join("key.pem"), key.serialize_pem().as_bytes(), 0o600)?;
        println!("wrote {} and key.pem", dir.join("cert.pem").display());
        return Ok(());
    }
    let issued = client
        .issue_async(&identity)
        .await
        .map_err(|e| anyhow::anyhow!("{identity} from {}: {e}", args.issuer_addr))?;
    println!(
        "signed {} serial {} by {} until {}",
        issued.identity,
        issued.serial,
        issued.issuer,
        humantime::format_rfc3339_seconds(issued.not_after)
    );
    Ok(())
}

async fn issuer(args: IssuerArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("--log {:?}", args.log))?,
        )
        .init();
    if !(args.rate_per_second > 0.0 && args.rate_per_second.is_finite()) || args.rate_burst == 0 {
        anyhow::bail!("--rate-burst and --rate-per-second must be positive");
    }
    crate::issuer::run(crate::issuer::IssuerConfig {
        ca: crate::ca::CaConfig {
            state_dir: args.state_dir,
            ca_cert: args.ca_cert,
            ca_key: args.ca_key,
            trust_bundle: args.trust_bundle,
            trust_domain: args.trust_domain,
        },
        listen: args.listen,
        metrics_addr: if args.metrics_addr.is_empty() {
            None
        } else {
            Some(
                args.metrics_addr
                    .parse()
                    .with_context(|| format!("--metrics-addr {:?}", args.metrics_addr))?,
            )
        },
        cert_ttl: args.cert_ttl,
        rate_burst: args.rate_burst,
        rate_per_second: args.rate_per_second,
        bootstrap_tokens: args.bootstrap_tokens,
        manifests: args.manifests,
        kubeconfig: args.kubeconfig,
        audience: args.audience,
        agent_service_account: args.agent_service_account,
    })
    .await
}

#[derive(Args, Debug)]
struct CaIssueArgs {
    /// The CA as a directory holding ca-cert.pem and ca-key.pem: `nodeward ca-create`'s, or a
    /// standalone agent's generated one (its --state-dir/ca).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["ca_cert", "ca_key"], required_unless_present = "ca_cert")]
    ca_dir: Option<PathBuf>,
    /// The issuing CA certificate (PEM), as the agents' --ca-cert.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The CA's private key (PKCS#8 PEM), as the agents' --ca-key.
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The identity to certify [default: spiffe://<trust-domain>/ns/nodeward-system/sa/nodeward-observer,
    /// which the agents' default --flows-allow lets read flows].
    #[arg(long, value_name = "SPIFFE_ID")]
    identity: Option<String>,
    /// Trust domain of the default identity (the agents' --trust-domain).
    #[arg(long, default_value = crate::ca::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Lifetime of the certificate.
    #[arg(long, default_value = "7d", value_parser = cert_ttl_arg)]
    ttl: Duration,
    /// Directory to write cert.pem, key.pem (mode 0600) and ca.pem into (created, mode 0700;
    /// files there are replaced) [default: $NODEWARD_OBSERVER_DIR, else
    /// ~/.config/nodeward/observer, where `observe --node` looks].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum CaModeArg {
    Local,
    Issuer,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum StatusOutput {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[arg(long, default_value = DEFAULT_SOCKET)]
    api_socket: PathBuf,
    #[arg(short, long, value_enum, default_value = "text")]
    output: StatusOutput,
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Agent(args) => runtime.block_on(agent(*args)),
        Command::Observe(args) => {
            let sub = matches
                .subcommand_matches("observe")
                .context("observe arguments")?;
            let filter = filter_of(&args, sub)?;
            runtime.block_on(observe(*args, filter))
        }
        Command::Status(args) => runtime.block_on(status(args)),
        Command::Certs(args) => runtime.block_on(certs(args)),
        Command::Services(args) => runtime.block_on(services(args)),
        Command::CaCreate { dir, trust_domain } => {
            let (cert, key) = crate::ca::create_root(&dir, &trust_domain)?;
            println!(
                "created a root CA for trust domain {trust_domain}:\n  --ca-cert {}\n  --ca-key  {}",
                cert.display(),
                key.display()
            );
            Ok(())
        }
        Command::CaIssue(args) => ca_issue(&args),
        Command::Issuer(args) => runtime.block_on(issuer(*args)),
        Command::IssuerRequest(args) => runtime.block_on(issuer_request(*args)),
        Command::Crd { write } => crd(write),
        Command::Cleanup { bpffs_dir } => {
            crate::datapath::loader::Datapath::remove_all(&bpffs_dir)
                .with_context(|| format!("removing {}", bpffs_dir.display()))?;
            println!("removed pinned state under {}", bpffs_dir.display());
            Ok(())
        }
    }
}

/// Every tunnelled connection holds two descriptors in the agent (the pod's socket, and on the
/// other node the socket to the pod): the soft limit, often 1024, would cap the mesh at a few
/// hundred connections. Raised to the hard limit, as Go's runtime does for every program.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0
            && limit.rlim_cur < limit.rlim_max
        {
            let soft = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
                tracing::warn!(soft, "could not raise the open files limit");
            }
        }
    }
}

fn size_ratio_arg(text: &str) -> Result<f64, String> {
    let ratio: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if ratio > 0.0 && ratio <= 0.1 {
        Ok(ratio)
    } else {
        Err("must be above 0 and at most 0.1 (a share of the node's memory)".into())
    }
}

/// The sizes of the datapath's maps from the flags (conntrack from memory unless given).
fn map_sizes(args: &AgentArgs) -> anyhow::Result<sizes::MapSizes> {
    let conntrack = match args.map_conntrack_entries {
        Some(n) => n,
        None => {
            let memory = sizes::node_memory().context(
                "reading the node's memory to size conntrack (or give --map-conntrack-entries)",
            )?;
            sizes::conntrack_from_memory(memory, args.map_dynamic_size_ratio)
        }
    };
    Ok(sizes::MapSizes {
        endpoints: args.map_endpoints_entries,
        policy: args.map_policy_entries,
        ipcache: args.map_ipcache_entries,
        policy_cidrs: args.map_policy_cidr_entries,
        conntrack,
    })
}

async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("--log {:?}", args.log))?,
        )
        .with_writer(std::io::stderr)
        .init();
    if args.node.trim().is_empty() {
        anyhow::bail!("--node: must not be empty");
    }
    raise_open_files_limit();
    let map_sizes = map_sizes(&args)?;
    let config = crate::app::AgentConfig {
        map_sizes,
        node: args.node,
        source: match args.manifests {
            Some(dir) => crate::app::SourceConfig::Manifests(dir),
            None => crate::app::SourceConfig::Kubernetes {
                kubeconfig: args.kubeconfig,
            },
        },
        state_dir: args.state_dir.clone(),
        bpffs_dir: args.bpffs_dir,
        api_socket: args.api_socket,
        metrics_addr: args.metrics_addr,
        flow_api: args
            .flows_addr
            .map(|addr| -> anyhow::Result<crate::flowapi::FlowApiConfig> {
                Ok(crate::flowapi::FlowApiConfig {
                    addr,
                    allow: crate::flowapi::AllowList::parse(&args.flows_allow, &args.trust_domain)?,
                    followers_per_client: usize::try_from(args.flows_followers_per_client)
                        .unwrap_or(8),
                    handshake_timeout: Duration::from_secs(10),
                })
            })
            .transpose()?,
        trace: crate::http::trace::TraceConfig::new(
            args.trace_sample_rate,
            args.otlp_endpoint.as_deref(),
        )?,
        dns_proxy: args.dns_proxy_addr,
        dns_cache: crate::dns::cache::CacheConfig {
            min_ttl: args.dns_min_ttl,
            grace: args.dns_ttl_grace,
            ..crate::dns::cache::CacheConfig::default()
        },
        cgroup: args
            .cgroup
            .map(|c| crate::datapath::cgroup::resolve(&c))
            .transpose()
            .map_err(anyhow::Error::msg)?,
        flow_buffer: args.flow_buffer,
        flow_log: args.flow_log.map(|dir| crate::flows::log::FlowLogConfig {
            dir,
            max_bytes: args.flow_log_max_bytes,
            files: usize::try_from(args.flow_log_files).unwrap_or(8),
        }),
        flow_events_all: args.flow_events == FlowEvents::All,
        host_routing: args.host_routing == HostRoutingArg::Ebpf,
        devices: args.devices.into_iter().filter(|d| !d.is_empty()).collect(),
        resync_interval: args.resync_interval,
        ct_gc_interval: args.conntrack_gc_interval.max(Duration::from_millis(100)),
        ca: crate::ca::CaConfig {
            state_dir: args.state_dir,
            ca_cert: args.ca_cert,
            ca_key: args.ca_key,
            trust_bundle: args.trust_bundle,
            trust_domain: args.trust_domain,
        },
        ca_mode: match args.ca_mode {
            CaModeArg::Local => crate::ca::CaMode::Local,
            CaModeArg::Issuer => {
                crate::ca::CaMode::Issuer(crate::issuer::client::IssuerClientConfig {
                    address: args.issuer_addr,
                    token_file: args.issuer_token_file,
                    timeout: Duration::from_secs(5),
                })
            }
        },
        cert_ttl: args.cert_ttl,
        mtls_default: match args.mtls_mode {
            MtlsModeArg::Disable => crate::policy::crd::MutualTlsMode::Disable,
            MtlsModeArg::Permissive => crate::policy::crd::MutualTlsMode::Permissive,
            MtlsModeArg::Strict => crate::policy::crd::MutualTlsMode::Strict,
        },
        tunnel: crate::tunnel::TunnelConfig {
            hbone_addr: args.hbone_addr,
            dial: match args.hbone_dial {
                HboneDialArg::Pod => crate::tunnel::HboneDial::Pod,
                HboneDialArg::Node => crate::tunnel::HboneDial::Node,
            },
            ..crate::tunnel::TunnelConfig::default()
        },
    };
    crate::app::run(config).await
}

/// `nodeward ca-issue`: a client certificate for the flows port, signed with a CA key.
fn ca_issue(args: &CaIssueArgs) -> anyhow::Result<()> {
    use crate::ca::{Authority, CaConfig, SpiffeId};
    let (cert, key) = match (&args.ca_dir, &args.ca_cert, &args.ca_key) {
        (Some(dir), _, _) => (
            dir.join(crate::ca::CA_CERT_FILE),
            dir.join(crate::ca::CA_KEY_FILE),
        ),
        (None, Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => anyhow::bail!("give the CA: --ca-dir DIR, or --ca-cert FILE and --ca-key FILE"),
    };
    let identity: SpiffeId = match &args.identity {
        Some(id) => id.parse().with_context(|| format!("--identity {id:?}"))?,
        None => crate::flowapi::access::observer(&args.trust_domain)
            .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?,
    };
    if !cert.exists() {
        anyhow::bail!(
            "{}: no such file (a generated CA lives in the agent's --state-dir/ca; `nodeward ca-create` makes one)",
            cert.display()
        );
    }
    // With both files given, the state directory is never used: nothing is generated.
    let authority = Authority::load_or_create(&CaConfig {
        ca_cert: Some(cert.clone()),
        ca_key: Some(key),
        ..CaConfig::generated(Path::new("/nonexistent"), identity.trust_domain())
    })?;
    let client = authority.issue_client(&identity, args.ttl)?;
    let ca_pem = std::fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(crate::flowapi::client::default_dir);
    let [cert_file, key_file, ca_file] = crate::ca::client::write_files(&out, &client, &ca_pem)?;
    println!(
        "issued a client certificate for {identity} (valid {}):\n  {}\n  {}\n  {}",
        humantime::format_duration(args.ttl),
        cert_file.display(),
        key_file.display(),
        ca_file.display()
    );
    Ok(())
}

fn cert_ttl_arg(value: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if ttl < crate::ca::MIN_CERT_TTL {
        return Err(format!(
            "at least {}",
            humantime::format_duration(crate::ca::MIN_CERT_TTL)
        ));
    }
    Ok(ttl)
}

async fn certs(args: StatusArgs) -> anyhow::Result<()> {
    let mut reply = serde_json::Value::Null;
    api::call(&args.api_socket, &Request::Certs, |v| {
        reply = v;
        Ok(())
    })
    .await?;
    if args.output == StatusOutput::Json {
        println!("{reply}");
    } else {
        print!("{}", certs_text(&reply)?);
    }
    Ok(())
}

async fn services(args: StatusArgs) -> anyhow::Result<()> {
    let mut reply = serde_json::Value::Null;
    api::call(&args.api_socket, &Request::Services, |v| {
        reply = v;
        Ok(())
    })
    .await?;
    if args.output == StatusOutput::Json {
        println!("{reply}");
    } else {
        print!("{}", services_text(&reply));
    }
    Ok(())
}

/// One line per frontend, then one per endpoint.
fn services_text(reply: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{:<32} {:<28} BACKENDS", "FRONTEND", "SERVICE");
    let empty = serde_json::Map::new();
    for port in reply["ports"].as_array().map_or(&[][..], Vec::as_slice) {
        let f = &port["frontend"];
        let addr = f["addr"].as_str().unwrap_or_default();
        let addr = if addr.contains(':') {
            format!("[{addr}]")
        } else {
            addr.to_owned()
        };
        let frontend = format!(
            "{addr}:{}/{}",
            f["port"],
            f["protocol"].as_str().unwrap_or_default()
        );
        let service = format!(
            "{}/{}{}",
            port["service"]["namespace"].as_str().unwrap_or_default(),
            port["service"]["name"].as_str().unwrap_or_default(),
            port["port_name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
        let endpoints = port["endpoints"].as_array().map_or(&[][..], Vec::as_slice);
        let used = endpoints.iter().filter(|e| e["used"] == true).count();
        let mut summary = if used == 0 {
            "none: connects are refused".to_owned()
        } else {
            format!("{used} in use of {}", endpoints.len())
        };
        if port["local_only"] == true {
            summary.push_str(", this node's only");
        }
        if let Some(secs) = port["affinity_secs"].as_u64().filter(|s| *s > 0) {
            let _ = write!(summary, ", ClientIP affinity {secs}s");
        }
        let _ = writeln!(out, "{frontend:<32} {service:<28} {summary}");
        for e in endpoints {
            let addr = e["addr"].as_str().unwrap_or_default();
            let states: Vec<&str> = ["ready", "serving", "terminating"]
                .into_iter()
                .filter(|k| e[*k] == true)
                .collect();
            let _ = writeln!(
                out,
                "  {} {addr}:{} {}{}{}",
                if e["used"] == true { "*" } else { " " },
                e["port"],
                if states.is_empty() {
                    "not ready".to_owned()
                } else {
                    states.join(",")
                },
                e["node"]
                    .as_str()
                    .map(|n| format!(" node={n}"))
                    .unwrap_or_default(),
                e["pod"]
                    .as_str()
                    .map(|p| format!(" pod={p}"))
                    .unwrap_or_default(),
            );
        }
    }
    for (name, why) in reply["skipped"].as_object().unwrap_or(&empty) {
        let _ = writeln!(
            out,
            "not translated: {name}: {}",
            why.as_str().unwrap_or_default()
        );
    }
    out
}

fn certs_text(reply: &serde_json::Value) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let report: api::CertsReply =
        serde_json::from_value(reply.clone()).context("decoding the agent's certificates")?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "trust domain {}, issuer {} ({}), {} trust roots",
        report.trust_domain, report.issuer, report.ca, report.trust_roots
    );
    // Columns as wide as their longest cell: issuers and issuer addresses vary in length.
    let rows: Vec<[String; 6]> = report
        .certificates
        .iter()
        .map(|c| {
            let renews = humantime::format_duration(Duration::from_secs(c.renews_in_seconds));
            let agent = match (&c.node, c.agent) {
                (Some(node), _) => format!("  (agent of node {node})"),
                (None, true) => "  (agent)".to_owned(),
                (None, false) => String::new(),
            };
            [
                c.identity.clone(),
                c.issuer.clone(),
                c.not_after.clone(),
                renews.to_string(),
                if c.via.is_empty() {
                    "-".to_owned()
                } else {
                    c.via.clone()
                },
                format!("{}{agent}", c.serial),
            ]
        })
        .collect();
    let header = [
        "IDENTITY",
        "ISSUER",
        "NOT AFTER",
        "RENEWS IN",
        "ISSUED VIA",
        "SERIAL",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        l
    };
    let _ = writeln!(out, "\n{}", line(header));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.each_ref().map(String::as_str)));
    }
    Ok(out)
}

fn time_arg(flag: &str, value: &str) -> anyhow::Result<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(value) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(value).with_context(|| {
        format!("{flag} {value:?}: expected a duration like 5m or a time like 2026-11-22T10:00:00Z")
    })?;
    Ok(SystemTime::now() - ago)
}

fn ip_arg(flag: &str, value: &str) -> anyhow::Result<ipnet::IpNet> {
    value
        .parse::<ipnet::IpNet>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .with_context(|| format!("{flag} {value:?}: expected an address or a CIDR"))
}

/// Sets one filter flag's value on `filter`.
fn set_filter(filter: &mut FlowFilter, id: &str, value: &str) -> anyhow::Result<()> {
    let flag = format!("--{}", id.replace('_', "-"));
    let number = |what: &str| -> anyhow::Result<u32> {
        value
            .parse()
            .with_context(|| format!("{flag} {value:?}: expected {what}"))
    };
    let taken = match id {
        "verdict" => filter.verdict.replace(value.to_owned()).is_some(),
        "from_pod" => filter.from_pod.replace(PodMatch::parse(value)).is_some(),
        "to_pod" => filter.to_pod.replace(PodMatch::parse(value)).is_some(),
        "pod" => filter.pod.replace(PodMatch::parse(value)).is_some(),
        "namespace" => filter.namespace.replace(value.to_owned()).is_some(),
        "from_ip" => filter.from_ip.replace(ip_arg(&flag, value)?).is_some(),
        "to_ip" => filter.to_ip.replace(ip_arg(&flag, value)?).is_some(),
        "port" => {
            let port = u16::try_from(number("a port number")?)
                .with_context(|| format!("{flag} {value:?}: expected a port number"))?;
            filter.port.replace(port).is_some()
        }
        "protocol" => filter.protocol.replace(value.to_owned()).is_some(),
        "identity" => filter
            .identity
            .replace(number("an identity number")?)
            .is_some(),
        "from_label" => filter.from_label.replace(value.to_owned()).is_some(),
        "to_label" => filter.to_label.replace(value.to_owned()).is_some(),
        "to_fqdn" => filter.to_fqdn.replace(value.to_owned()).is_some(),
        "to_service" => filter.to_service.replace(value.to_owned()).is_some(),
        "http_method" => filter.http_method.replace(value.to_owned()).is_some(),
        "http_path" => filter.http_path.replace(value.to_owned()).is_some(),
        "http_status" => filter.http_status.replace(value.to_owned()).is_some(),
        other => anyhow::bail!("unknown filter {other}"),
    };
    if taken {
        anyhow::bail!("{flag} given twice; use it once (and `--not {flag} X` to exclude values)");
    }
    Ok(())
}

/// The filter of an `observe` command line. Filter flags are read in command-line order so
/// that `--not` applies to exactly the filter flag after it.
fn filter_of(args: &ObserveArgs, matches: &ArgMatches) -> anyhow::Result<FlowFilter> {
    enum Token<'a> {
        Not,
        Value(&'a str, &'a str),
    }
    let mut tokens: Vec<(usize, Token<'_>)> = matches
        .indices_of("not")
        .into_iter()
        .flatten()
        .map(|i| (i, Token::Not))
        .collect();
    for id in FILTER_FLAGS {
        let (Some(indices), Some(values)) =
            (matches.indices_of(id), matches.get_many::<String>(id))
        else {
            continue;
        };
        tokens.extend(
            indices
                .zip(values)
                .map(|(i, v)| (i, Token::Value(id, v.as_str()))),
        );
    }
    tokens.sort_by_key(|(i, _)| *i);
    let mut filter = FlowFilter::default();
    let mut negate = false;
    for (_, token) in tokens {
        match token {
            Token::Not if negate => {
                anyhow::bail!("--not --not: give one --not before the filter to negate")
            }
            Token::Not => negate = true,
            Token::Value(id, value) if negate => {
                let mut negated = FlowFilter::default();
                set_filter(&mut negated, id, value)?;
                filter.not.push(negated);
                negate = false;
            }
            Token::Value(id, value) => set_filter(&mut filter, id, value)?,
        }
    }
    if negate {
        anyhow::bail!(
            "--not must be followed by the filter flag it negates, e.g. --not --verdict DROPPED"
        );
    }
    filter.since = args
        .since
        .as_deref()
        .map(|v| time_arg("--since", v))
        .transpose()?;
    filter.until = args
        .until
        .as_deref()
        .map(|v| time_arg("--until", v))
        .transpose()?;
    filter.validate()?;
    Ok(filter)
}

async fn observe(args: ObserveArgs, filter: FlowFilter) -> anyhow::Result<()> {
    let output = args.output;
    if output == FlowOutput::Table {
        println!(
            "{:<24} {:<30} {:<30} {:<8} {:<10} SUMMARY",
            "TIME", "SOURCE", "DESTINATION", "DIR", "VERDICT"
        );
    }
    if let Some(path) = &args.flow_log {
        return observe_log(path, args.last, &filter, output);
    }
    if !args.node.is_empty() {
        let tls = observer_tls(&args)?;
        return observe_nodes(&args.node, &tls, args.last, args.follow, &filter, output).await;
    }
    let request = Request::Observe {
        last: args.last,
        follow: args.follow,
        filter: Box::new(filter),
    };
    api::call(&args.api_socket, &request, |value| {
        print_flow(output, value)
    })
    .await
}

/// Prints one line the agent sent: a flow, or a note that this client missed some.
fn print_flow(output: FlowOutput, value: serde_json::Value) -> anyhow::Result<()> {
    if let Some(n) = value.get("lost_flows") {
        eprintln!("warning: this client fell behind and missed {n} flows");
        return Ok(());
    }
    match output {
        FlowOutput::Json => println!("{value}"),
        FlowOutput::Compact | FlowOutput::Table => {
            let flow: Flow = serde_json::from_value(value).context("decoding a flow")?;
            if output == FlowOutput::Compact {
                println!("{}", crate::flows::compact(&flow));
            } else {
                println!("{}", table_row(&flow));
            }
        }
    }
    Ok(())
}

/// `--flow-log`: the filter applies here, as the agent would apply it.
fn observe_log(
    path: &std::path::Path,
    last: Option<usize>,
    filter: &FlowFilter,
    output: FlowOutput,
) -> anyhow::Result<()> {
    let mut kept = std::collections::VecDeque::new();
    let skipped = crate::flows::log::read(path, |flow| {
        if filter.matches(&flow) {
            kept.push_back(flow);
            if last.is_some_and(|n| kept.len() > n) {
                kept.pop_front();
            }
        }
    })
    .with_context(|| format!("reading the flow log {}", path.display()))?;
    if skipped > 0 {
        eprintln!(
            "warning: skipped {skipped} lines that are not flows (a log cut short by a crash)"
        );
    }
    for flow in kept {
        print_flow(output, serde_json::to_value(&flow)?)?;
    }
    Ok(())
}

/// `--node`'s client certificate: `--cert`, `--key`, `--ca-cert`, each defaulting to its file
/// in `--tls-dir` (or the default directory).
fn observer_tls(args: &ObserveArgs) -> anyhow::Result<crate::flowapi::client::ClientTls> {
    use crate::flowapi::client::{ClientFiles, ClientTls, default_dir};
    let dir = args.tls_dir.clone().unwrap_or_else(default_dir);
    let mut files = ClientFiles::in_dir(&dir);
    for (given, file) in [
        (&args.cert, &mut files.cert),
        (&args.key, &mut files.key),
        (&args.ca_cert, &mut files.ca),
    ] {
        if let Some(path) = given {
            file.clone_from(path);
        }
    }
    Ok(ClientTls::load(&files)?)
}

/// `--node`: each node's agent through its flows port; several are merged in time order (when
/// following, in arrival order after that).
async fn observe_nodes(
    nodes: &[String],
    tls: &crate::flowapi::client::ClientTls,
    last: Option<usize>,
    follow: bool,
    filter: &FlowFilter,
    output: FlowOutput,
) -> anyhow::Result<()> {
    let query = crate::flowapi::FlowQuery {
        last: Some(last.unwrap_or(if follow { 0 } else { 20 })),
        follow,
        filter: filter.clone(),
    };
    // Bounded, so that output that is not read (a full pipe) stops the reads from the agents,
    // which then skip flows for this client (it is told how many) rather than buffer them here.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<serde_json::Value>>(1024);
    for node in nodes {
        let addr = node_addr(node);
        let (tx, query, tls) = (tx.clone(), query.clone(), tls.clone());
        tokio::spawn(async move {
            let result = crate::flowapi::client::fetch_flows(&addr, &tls, &query, |v| {
                let lines = tx.clone();
                async move {
                    lines
                        .send(Ok(v))
                        .await
                        .map_err(|_| anyhow::anyhow!("output closed"))
                }
            })
            .await
            .with_context(|| format!("--node {addr}"));
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    drop(tx);
    let mut batch = Vec::new();
    while let Some(line) = rx.recv().await {
        let value = line?;
        if follow {
            print_flow(output, value)?;
        } else {
            batch.push(value);
        }
    }
    // RFC 3339 UTC times with nanoseconds sort as text.
    batch.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
    let skip = batch.len().saturating_sub(query.last.unwrap_or(usize::MAX));
    for value in batch.into_iter().skip(skip) {
        print_flow(output, value)?;
    }
    Ok(())
}

/// `host:port`, `host` (the flows port, 4244), an IPv6 address with or without `[...]:port`.
fn node_addr(node: &str) -> String {
    use crate::flowapi::DEFAULT_PORT;
    if node.parse::<SocketAddr>().is_ok() {
        node.to_owned()
    } else if let Ok(ip) = node.parse::<std::net::IpAddr>() {
        SocketAddr::new(ip, DEFAULT_PORT).to_string()
    } else if node
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        node.to_owned()
    } else {
        format!("{node}:{DEFAULT_PORT}")
    }
}

fn table_row(flow: &Flow) -> String {
    let end = |e: &crate::flows::Endpoint, ip: &std::net::IpAddr, port: Option<u16>| {
        let who = if e.pod_name.is_empty() {
            ip.to_string()
        } else {
            format!("{}/{}", e.namespace, e.pod_name)
        };
        port.filter(|p| *p != 0)
            .map_or(who.clone(), |p| format!("{who}:{p}"))
    };
    let ports = flow.ports();
    format!(
        "{:<24} {:<30} {:<30} {:<8} {:<10} {}",
        flow.time.get(..23).unwrap_or(&flow.time),
        end(&flow.source, &flow.ip.source, ports.map(|p| p.source_port)),
        end(
            &flow.destination,
            &flow.ip.destination,
            ports.map(|p| p.destination_port)
        ),
        flow.traffic_direction,
        flow.verdict,
        flow.summary
    )
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut status = serde_json::Value::Null;
    api::call(&args.api_socket, &Request::Status, |v| {
        status = v;
        Ok(())
    })
    .await?;
    if args.output == StatusOutput::Json {
        println!("{status}");
        return Ok(());
    }
    print!("{}", status_text(&status));
    Ok(())
}

fn status_text(s: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {}: {}  (policy generation {}, {} syncs, last took {:.1} ms)",
        s["node"].as_str().unwrap_or("?"),
        if s["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "NOT READY"
        },
        s["generation"],
        s["syncs"],
        s["last_sync"]["duration_ms"].as_f64().unwrap_or(0.0),
    );
    if let Some(e) = s["last_sync"]["error"].as_str() {
        let _ = writeln!(out, "last sync failed: {e}");
    }
    let endpoints = s["endpoints"].as_array().cloned().unwrap_or_default();
    let attached = endpoints.iter().filter(|e| e["attached"] == true).count();
    let _ = writeln!(out, "\nendpoints: {attached}/{} attached", endpoints.len());
    for e in &endpoints {
        let _ = writeln!(
            out,
            "  {:<32} identity {:<8} {:<16} {}",
            e["pod"].as_str().unwrap_or(""),
            e["identity"],
            e["interface"].as_str().unwrap_or(""),
            e["error"].as_str().map_or_else(
                || if e["attached"] == true {
                    "attached".to_owned()
                } else {
                    "not attached".to_owned()
                },
                ToOwned::to_owned
            ),
        );
    }
    let failed = s["policies"]["failed"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "\npolicies: {} applied, {} failed",
        s["policies"]["applied"],
        failed.len()
    );
    for f in &failed {
        let _ = writeln!(out, "  FAILED {}", f["error"].as_str().unwrap_or(""));
    }
    for e in s["manifest_errors"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  manifest error: {}", e.as_str().unwrap_or(""));
    }
    let svc = &s["services"];
    let _ = writeln!(
        out,
        "\nservices: {} ({} ClusterIP:ports, {} backends, {} without a backend, {} not translated){}",
        svc["services"],
        svc["frontends"],
        svc["backends"],
        svc["without_backends"],
        svc["not_translated"],
        if svc["translating"] == true {
            ""
        } else {
            "; not translating (no --cgroup)"
        }
    );
    for e in svc["errors"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  service error: {}", e.as_str().unwrap_or(""));
    }
    if let Some(e) = svc["sync_error"].as_str() {
        let _ = writeln!(out, "  {e}");
    }
    let routes = svc["routes"].as_array().cloned().unwrap_or_default();
    if !routes.is_empty() {
        let _ = writeln!(out, "\nHTTP routes: {}", routes.len());
    }
    for r in &routes {
        let unhappy: Vec<&serde_json::Value> = r["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| (c["type"] == "PartiallyInvalid") == (c["status"] == "True"))
            .collect();
        for c in unhappy {
            let _ = writeln!(
                out,
                "  {}{}: {} {} ({}): {}",
                r["file"]
                    .as_str()
                    .map(|f| format!("{f}: "))
                    .unwrap_or_default(),
                r["object"].as_str().unwrap_or(""),
                c["type"].as_str().unwrap_or(""),
                c["status"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or(""),
            );
        }
    }
    let _ = writeln!(out, "\nmaps:");
    for m in s["maps"].as_array().into_iter().flatten() {
        let entries = m["entries"].as_u64().unwrap_or(0);
        let capacity = m["capacity"].as_u64().unwrap_or(1).max(1);
        #[expect(clippy::cast_precision_loss, reason = "a percentage for people")]
        let pct = entries as f64 * 100.0 / capacity as f64;
        let _ = writeln!(
            out,
            "  {:<14} {entries:>8} / {capacity:<8} ({pct:.1}%){}",
            m["name"].as_str().unwrap_or(""),
            if m["nearly_full"].as_bool() == Some(true) {
                "  NEARLY FULL: raise its --map-*-entries"
            } else {
                ""
            }
        );
    }
    if let Some(ct) = s["map_sizes"]["conntrack"].as_u64() {
        let gc = &s["conntrack_gc"];
        match gc["entries"].as_u64() {
            Some(entries) => {
                let _ = writeln!(
                    out,
                    "  {:<14} {entries:>8} / {ct:<8} (at the last sweep: {} read, {} expired removed in {} µs; {} sweeps{})",
                    "conntrack",
                    gc["last"]["scanned"],
                    gc["last"]["removed"],
                    gc["last"]["duration"],
                    gc["runs"],
                    gc["error"]
                        .as_str()
                        .map(|e| format!("; last sweep failed: {e}"))
                        .unwrap_or_default()
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  {:<14} {:>8} / {ct:<8} (counted by the first sweep)",
                    "conntrack", "-"
                );
            }
        }
    }
    let d = &s["datapath"];
    let _ = writeln!(
        out,
        "\ndatapath: {} packets, {} passed, {} new flows, drops {}",
        d["packets"], d["passed"], d["new_flows"], d["drops"]
    );
    let f = &s["flows"];
    let _ = writeln!(
        out,
        "flows: {} stored, {} total; lost: kernel ring full {}, overwritten {}, slow followers {}",
        f["stored"],
        f["total"],
        f["lost"]["kernel_ring_full"],
        f["lost"]["store_overwritten"],
        f["lost"]["follower_lagged"]
    );
    let _ = writeln!(
        out,
        "       flow log behind {}, flow log write failed {}",
        f["lost"]["flow_log_dropped"], f["lost"]["flow_log_write_failed"]
    );
    if let Some(log) = s["flow_log"].as_object() {
        let _ = writeln!(
            out,
            "flow log: {} ({} written){}",
            log.get("dir").and_then(|d| d.as_str()).unwrap_or(""),
            log.get("written").unwrap_or(&serde_json::Value::Null),
            log.get("error")
                .and_then(|e| e.as_str())
                .map(|e| format!("; ERROR {e}"))
                .unwrap_or_default()
        );
    }
    out
}

fn crd(write: Option<PathBuf>) -> anyhow::Result<()> {
    match write {
        Some(dir) => {
            crate::policy::crd::write_crds(&dir)
                .with_context(|| format!("writing CRDs to {}", dir.display()))?;
            println!("wrote CRDs to {}", dir.display());
        }
        None => print!("{}", crate::policy::crd::crds_yaml()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(args: &[&str]) -> anyhow::Result<FlowFilter> {
        let matches = Cli::command()
            .try_get_matches_from(["nodeward", "observe"].iter().chain(args).copied())?;
        let cli = Cli::from_arg_matches(&matches)?;
        let Command::Observe(observe) = cli.command else {
            panic!("not observe");
        };
        filter_of(
            &observe,
            matches.subcommand_matches("observe").expect("observe"),
        )
    }

    #[test]
    fn not_negates_exactly_the_next_filter_flag() {
        let f = filter(&[
            "--not",
            "--verdict",
            "DROPPED",
            "--port",
            "80",
            "--not",
            "--to-label=app=db",
        ])
        .unwrap();
        assert_eq!(f.verdict, None);
        assert_eq!(f.port, Some(80));
        assert_eq!(f.not.len(), 2);
        assert_eq!(f.not[0].verdict.as_deref(), Some("DROPPED"));
        assert_eq!(f.not[1].to_label.as_deref(), Some("k8s:app=db"));
        // A flag may be given once positively and again negated.
        let f = filter(&["--namespace", "a", "--not", "--namespace", "b"]).unwrap();
        assert_eq!(f.namespace.as_deref(), Some("a"));
        assert_eq!(f.not[0].namespace.as_deref(), Some("b"));
    }

    #[test]
    fn filter_mistakes_are_errors() {
        let err = |args: &[&str]| filter(args).unwrap_err().to_string();
        assert!(err(&["--not"]).contains("--not must be followed"));
        assert!(err(&["--verdict", "DROPPED", "--verdict", "FORWARDED"]).contains("given twice"));
        assert!(err(&["--not", "--verdict", "nope"]).contains("FORWARDED, DROPPED"));
        assert!(err(&["--port", "http"]).contains("port number"));
    }

    #[test]
    fn certs_are_listed_one_line_each() {
        let reply = serde_json::json!({
            "trust_domain": "cluster.local",
            "issuer": "O=cluster.local, CN=nodeward root CA 0a0b0c0d",
            "ca": "generated in /var/lib/nodeward/ca",
            "trust_roots": 1,
            "certificates": [{
                "identity": "spiffe://cluster.local/ns/shop/sa/api",
                "issuer": "O=cluster.local, CN=nodeward root CA 0a0b0c0d",
                "serial": "7F01",
                "not_before": "2026-01-01T00:00:00Z",
                "not_after": "2026-01-02T00:00:00Z",
                "renew_at": "2026-01-01T12:00:00Z",
                "renews_in_seconds": 3600,
                "expires_in_seconds": 7200,
                "agent": false,
                "via": "local"
            }, {
                "identity": "spiffe://cluster.local/ns/nodeward-system/sa/nodeward",
                "issuer": "O=cluster.local, CN=nodeward root CA 0a0b0c0d",
                "serial": "7F02",
                "not_before": "2026-01-01T00:00:00Z",
                "not_after": "2026-01-02T00:00:00Z",
                "renew_at": "2026-01-01T12:00:00Z",
                "renews_in_seconds": 3600,
                "expires_in_seconds": 7200,
                "agent": true,
                "node": "node-1",
                "via": "issuer at 10.0.0.9:15012, replica nodeward-issuer-7d9f"
            }]
        });
        let text = certs_text(&reply).unwrap();
        let agent = text
            .lines()
            .find(|l| l.contains("7F02"))
            .unwrap_or_else(|| panic!("no line for the agent in:\n{text}"));
        assert!(
            agent.contains("(agent of node node-1)")
                && agent.contains("issuer at 10.0.0.9:15012, replica nodeward-issuer-7d9f"),
            "{agent}"
        );
        assert!(text.starts_with("trust domain cluster.local"), "{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("spiffe://cluster.local/ns/shop/sa/api"))
            .unwrap_or_else(|| panic!("no line for the workload in:\n{text}"));
        assert!(line.contains("1h") && line.contains("7F01"), "{line}");
    }

    #[test]
    fn services_are_listed_with_their_backends_and_what_is_not_translated() {
        let inv_yaml = "
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{name: pg, port: 5432}], sessionAffinity: ClientIP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432}]
endpoints:
- {addresses: [10.244.1.10], nodeName: n1}
- {addresses: [10.244.2.10], conditions: {ready: false}}
---
apiVersion: v1
kind: Service
metadata: {name: h, namespace: shop}
spec: {clusterIP: None}
";
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.yaml"), inv_yaml).unwrap();
        let inv = crate::source::manifests::ManifestSource::new(dir.path())
            .load()
            .inventory;
        let (table, _) = crate::services::build(&inv, "n1");
        let text = services_text(&serde_json::to_value(&table).unwrap());
        assert!(
            text.contains("10.96.0.20:5432/TCP") && text.contains("shop/db (pg)"),
            "{text}"
        );
        assert!(
            text.contains("1 in use of 2, ClientIP affinity 10800s"),
            "{text}"
        );
        assert!(
            text.contains("* 10.244.1.10:5432 ready,serving node=n1"),
            "{text}"
        );
        assert!(text.contains("  10.244.2.10:5432 not ready"), "{text}");
        assert!(text.contains("not translated: shop/h: headless"), "{text}");
    }

    #[test]
    fn node_addresses_get_the_flows_port() {
        assert_eq!(node_addr("10.0.0.1"), "10.0.0.1:4244");
        assert_eq!(node_addr("10.0.0.1:1234"), "10.0.0.1:1234");
        assert_eq!(node_addr("node-2"), "node-2:4244");
        assert_eq!(node_addr("fd00::1"), "[fd00::1]:4244");
    }
}
