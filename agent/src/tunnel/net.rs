//! The sockets and routes the tunnel needs from the kernel: transparent listeners and
//! connections (`IP_TRANSPARENT`), the agent's packet mark, and the policy route that delivers
//! marked packets locally (see `agent_common::mesh`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use agent_common::mesh::{MARK_HBONE, MARK_MASK, MARK_TO_PROXY, ROUTE_TABLE, RULE_PRIORITY};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::net::TcpListener;

use tokio::net::{TcpSocket, TcpStream};

/// Sets `IP_TRANSPARENT` or `IPV6_TRANSPARENT` (needs `CAP_NET_ADMIN`): a listener accepts
/// connections to any address the policy route delivers to it, and a socket may bind to an
/// address that is not the node's (the original source of a tunnelled connection).
fn set_transparent(socket: &Socket, v6: bool) -> io::Result<()> {
    if v6 {
        socket.set_ip_transparent_v6(true)
    } else {
        socket.set_ip_transparent_v4(true)
    }
}

fn tcp_socket(addr: &SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    Ok(socket)
}

/// A transparent listener at `addr` (the outbound listener, on loopback); non-blocking, for
/// the tunnel's runtime to adopt.
///
/// # Errors
/// Socket, option, bind or listen failure.
pub fn transparent_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = tcp_socket(&addr)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    set_transparent(&socket, addr.is_ipv6())?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A listener at `addr` for the HBONE server (`[::]` is dual stack; on a node without IPv6 it
/// falls back to `0.0.0.0`), transparent, so it also takes what [`HboneRoutes`] delivers.
///
/// # Errors
/// Socket, bind or listen failure.
pub fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    match bind_listener(addr) {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tracing::warn!(error = %e, fallback = %v4, "cannot listen on {addr}");
            bind_listener(v4)
        }
        other => other,
    }
}

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = tcp_socket(&addr)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    // Connections to local pods' addresses (`HboneRoutes`) are accepted with the pod's address
    // as their local one: answering from it needs the transparent flag (one flag for both
    // families of a dual-stack socket).
    if let Err(e) = set_transparent(&socket, addr.is_ipv6()) {
        tracing::warn!(error = %e, "the HBONE listener is not transparent: peers dialling pod addresses cannot reach it");
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Connects to `dst` from `src` (any port), which need not be one of the node's addresses,
/// with the agent's mark so the datapath knows it as a tunnel delivery.
///
/// # Errors
/// Socket or option failure, the connect failing or taking longer than `timeout`.
pub async fn transparent_connect(
    src: IpAddr,
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = tcp_socket(&dst)?;
    set_transparent(&socket, dst.is_ipv6())?;
    socket.set_mark(mark)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&SocketAddr::new(src, 0).into())?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
    }
}

/// Makes the next close of `stream` send a reset rather than a FIN: the pod learns at once that
/// its connection failed, instead of seeing a clean end of an empty stream.
pub fn reset_on_close(stream: &TcpStream) {
    // A failure leaves an ordinary close, which ends the connection too.
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[derive(Debug, thiserror::Error)]
#[error("setting up the tunnel's policy route (`{args}`): {reason}")]
pub struct RouteError {
    args: String,
    reason: String,
}

/// Installs, idempotently, the policy route in the agent's network namespace: packets with
/// `MARK_TO_PROXY` are delivered locally (to the agent's sockets), for IPv4 and, where the node
/// has it, IPv6.
///
/// # Errors
/// `ip` cannot be run or refuses an IPv4 command.
pub fn ensure_policy_route() -> Result<(), RouteError> {
    family_route("-4", "0.0.0.0/0")?;
    if let Err(e) = family_route("-6", "::/0") {
        tracing::warn!(error = %e, "no IPv6 policy route; tunnelling IPv4 only");
    }
    Ok(())
}

fn family_route(family: &str, default: &str) -> Result<(), RouteError> {
    let fwmark = format!("{MARK_TO_PROXY:#x}/{MARK_MASK:#x}");
    let table = ROUTE_TABLE.to_string();
    let priority = RULE_PRIORITY.to_string();
    ip(
        &[
            family, "rule", "add", "fwmark", &fwmark, "lookup", &table, "priority", &priority,
        ],
        true,
    )?;
    ip(
        &[
            family, "route", "replace", "local", default, "dev", "lo", "table", &table,
        ],
        false,
    )
}

fn ip(args: &[&str], exists_ok: bool) -> Result<(), RouteError> {
    let err = |reason: String| RouteError {
        args: format!("ip {}", args.join(" ")),
        reason,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if exists_ok && stderr.contains("File exists") {
        return Ok(());
    }
    Err(err(stderr.trim().to_owned()))
}

/// Runs `nft -f -` with `script` on its standard input.
fn nft(script: &str) -> Result<(), RouteError> {
    use std::io::Write as _;
    let err = |reason: String| RouteError {
        args: format!("nft -f - <<< {:?}", script.trim()),
        reason,
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// The nftables table of the HBONE mark (`inet`, so IPv4 and IPv6 alike).
pub const HBONE_NFT_TABLE: &str = "nodeward_hbone";

/// The `nodeward_hbone` table, replacing any earlier one in one transaction: TCP to `port`, in
/// its connection's first direction by netfilter's conntrack and not already marked by the
/// datapath, gets [`MARK_HBONE`].
fn hbone_nft_script(port: u16) -> String {
    format!(
        "table inet {HBONE_NFT_TABLE} {{}}\n\
         delete table inet {HBONE_NFT_TABLE}\n\
         table inet {HBONE_NFT_TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority mangle; policy accept;\n\
         \t\tmeta l4proto tcp th dport {port} meta mark and {MARK_MASK:#010x} == 0 \
         ct direction original meta mark set meta mark or {MARK_HBONE:#010x}\n\
         \t}}\n\
         }}\n"
    )
}

/// The routing table of local pods' HBONE addresses, and the priority of its rule (after the
/// mark's, [`RULE_PRIORITY`]).
pub const HBONE_ROUTE_TABLE: u32 = ROUTE_TABLE + 1;
pub const HBONE_RULE_PRIORITY: u32 = RULE_PRIORITY + 1;

/// Delivery of `podIP:15008` to the agent, for every local pod, as ambient's ztunnel takes
/// them. The `nodeward_hbone` nftables chain marks TCP to port 15008 in its connection's first
/// direction (by netfilter's conntrack) with [`MARK_HBONE`]; `ip rule add fwmark
/// MARK_HBONE/MARK_MASK lookup HBONE_ROUTE_TABLE` sends marked packets to a table with
/// `local <pod address> dev lo` for each local pod. A connection to port 15008 of a local pod
/// (from a peer agent) is then delivered locally, to the transparent HBONE listener, and never
/// reaches the pod; anything else finds no route in the table and goes on to the main one (so a
/// pod's port 15008 elsewhere is untouched).
///
/// Why a mark and not `ipproto tcp dport 15008` in the rule: a local pod's own connection from
/// source port 15008 (a client whose ephemeral range includes it) would be broken twice. Its
/// SYN is dropped by the source check of the forward route (`fib_validate_source` looks the
/// source up with the ports swapped, so the pod's address with "destination port" 15008 found
/// the `local` route: drop reason `IP_LOCAL_SOURCE`), and its peer's replies, to port 15008 of
/// the pod, would be taken by the agent. Replies are conntrack's reply direction, and the
/// source check carries no mark (unless `src_valid_mark`), so neither meets the table.
#[derive(Debug, Default)]
pub struct HboneRoutes {
    rule: bool,
    cleared: bool,
    installed: std::collections::BTreeSet<IpAddr>,
    /// See [`HboneRoutes::in_step`].
    in_step: bool,
}

impl HboneRoutes {
    /// Whether the rule is in place.
    #[must_use]
    pub fn active(&self) -> bool {
        self.rule
    }

    /// Installs the nftables chain and the rule, for IPv4 and, where the node has it, IPv6,
    /// replacing what an earlier agent left (the rules of an older agent matched the port).
    ///
    /// # Errors
    /// `nft` or `ip` cannot be run, or refuses the chain or the IPv4 rule.
    pub fn ensure_rule(&mut self, port: u16) -> Result<(), RouteError> {
        if self.rule {
            return Ok(());
        }
        delete_hbone_rules();
        nft(&hbone_nft_script(port))?;
        let fwmark = format!("{MARK_HBONE:#x}/{MARK_MASK:#x}");
        let table = HBONE_ROUTE_TABLE.to_string();
        let priority = HBONE_RULE_PRIORITY.to_string();
        let rule = |family: &'static str| {
            ip(
                &[
                    family, "rule", "add", "fwmark", &fwmark, "lookup", &table, "priority",
                    &priority,
                ],
                true,
            )
        };
        rule("-4")?;
        if let Err(e) = rule("-6") {
            tracing::warn!(error = %e, "no IPv6 HBONE rule; pods are dialled at IPv4 addresses only");
        }
        self.rule = true;
        Ok(())
    }

    /// Removes the chain, rules and routes a previous agent in `--hbone-dial pod` left (this
    /// one runs `node`), once; what is not there is not an error.
    pub fn clear_once(&mut self) {
        if std::mem::replace(&mut self.cleared, true) {
            return;
        }
        delete_hbone_rules();
        let _ = nft(&format!("delete table inet {HBONE_NFT_TABLE}\n"));
        let table = HBONE_ROUTE_TABLE.to_string();
        for family in ["-4", "-6"] {
            let _ = ip(&[family, "route", "flush", "table", &table], false);
        }
    }

    /// Makes the table route exactly `pods` (the local pods' addresses). Returns what failed;
    /// what succeeded stays done, and a failed address is tried again next time.
    pub fn sync(&mut self, pods: &std::collections::BTreeSet<IpAddr>) -> Vec<RouteError> {
        let gone: Vec<IpAddr> = self.installed.difference(pods).copied().collect();
        let new: Vec<IpAddr> = pods.difference(&self.installed).copied().collect();
        let errors = self.apply(
            gone.into_iter()
                .map(|ip| (ip, false))
                .chain(new.into_iter().map(|ip| (ip, true))),
        );
        self.in_step = errors.is_empty();
        errors
    }

    /// Routes or unroutes only the addresses given (`true`: a local pod's), where the caller
    /// knows nothing else changed since the last [`HboneRoutes::sync`] or `update`. Returns what
    /// failed; after a failure [`HboneRoutes::in_step`] is false until the next `sync`.
    pub fn update(
        &mut self,
        addresses: impl IntoIterator<Item = (IpAddr, bool)>,
    ) -> Vec<RouteError> {
        let errors = self.apply(addresses);
        self.in_step &= errors.is_empty();
        errors
    }

    /// Whether the table is known to match the addresses of the last `sync` with the `update`s
    /// since (so an `update` of what changed is enough).
    #[must_use]
    pub fn in_step(&self) -> bool {
        self.in_step
    }

    /// The caller lost track of changes (a sync it did not follow): the next change needs a
    /// [`HboneRoutes::sync`].
    pub fn lose_step(&mut self) {
        self.in_step = false;
    }

    fn apply(&mut self, addresses: impl IntoIterator<Item = (IpAddr, bool)>) -> Vec<RouteError> {
        let table = HBONE_ROUTE_TABLE.to_string();
        let mut errors = Vec::new();
        for (pod, wanted) in addresses {
            if wanted == self.installed.contains(&pod) {
                continue;
            }
            let prefix = host_prefix(pod);
            let op = if wanted { "replace" } else { "del" };
            match ip(
                &["route", op, "local", &prefix, "dev", "lo", "table", &table],
                false,
            ) {
                Ok(()) if wanted => {
                    self.installed.insert(pod);
                }
                Err(e) if wanted || !e.reason.contains("No such process") => errors.push(e),
                _ => {
                    self.installed.remove(&pod);
                }
            }
        }
        errors
    }
}

/// Deletes the HBONE rules at their priorities, this agent's and an older one's (which had
/// two: `iif lo ... lookup main` and `ipproto tcp dport 15008 lookup HBONE_ROUTE_TABLE`).
fn delete_hbone_rules() {
    for family in ["-4", "-6"] {
        for priority in [HBONE_RULE_PRIORITY, HBONE_RULE_PRIORITY + 1] {
            let priority = priority.to_string();
            // One rule per priority is added (an existing one is kept); a few at most.
            for _ in 0..4 {
                if ip(&[family, "rule", "del", "priority", &priority], false).is_err() {
                    break;
                }
            }
        }
    }
}

fn host_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cmd args` in the calling thread's namespace, its standard output.
    fn run(cmd: &str, args: &[&str]) -> String {
        let out = Command::new(cmd).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn table_routes() -> Vec<String> {
        let table = HBONE_ROUTE_TABLE.to_string();
        let mut got: Vec<String> = run("ip", &["route", "show", "table", &table])
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .collect();
        got.sort();
        got
    }

    /// Root: in a network namespace of its own (a thread that unshares and ends with it), what
    /// an older agent left is replaced by the mark's chain and rule, routes follow `sync` and
    /// `update`, and `node` mode removes everything.
    #[test]
    fn pod_mode_marks_by_conntrack_routes_what_changed_and_node_mode_removes_it() {
        std::thread::spawn(|| {
            // SAFETY: affects only this thread, which ends with the test.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", io::Error::last_os_error());
            run("ip", &["link", "set", "lo", "up"]);
            // An older agent's rules and routes.
            let old = (HBONE_RULE_PRIORITY + 1).to_string();
            let table = HBONE_ROUTE_TABLE.to_string();
            run(
                "ip",
                &[
                    "rule", "add", "ipproto", "tcp", "dport", "15008", "lookup", &table,
                    "priority", &old,
                ],
            );
            run(
                "ip",
                &[
                    "route",
                    "add",
                    "local",
                    "10.0.0.9/32",
                    "dev",
                    "lo",
                    "table",
                    &table,
                ],
            );

            let mut hbone = HboneRoutes::default();
            hbone.ensure_rule(15008).unwrap();
            let rules = run("ip", &["rule"]);
            assert!(!rules.contains("dport"), "the port rule is left:\n{rules}");
            assert!(
                rules.contains(&format!("fwmark 0x3000000/0xf000000 lookup {table}")),
                "no mark rule:\n{rules}"
            );
            let chain = run("nft", &["list", "table", "inet", HBONE_NFT_TABLE]);
            assert!(
                chain.contains("tcp dport 15008")
                    && chain.contains("ct direction original")
                    && chain.contains("meta mark set meta mark | 0x03000000"),
                "{chain}"
            );
            // Again (an agent restarting): still one chain and one rule.
            let mut again = HboneRoutes::default();
            again.ensure_rule(15008).unwrap();
            assert_eq!(run("ip", &["rule"]).matches("fwmark 0x3000000").count(), 1);

            let ip = |s: &str| s.parse::<IpAddr>().unwrap();
            let pods = [ip("10.0.0.1"), ip("10.0.0.2")].into_iter().collect();
            assert!(hbone.sync(&pods).is_empty());
            assert!(hbone.in_step());
            // The older agent's route is not this one's to know; a full sync leaves it.
            assert_eq!(table_routes(), ["10.0.0.1", "10.0.0.2", "10.0.0.9"]);
            let errors = hbone.update([
                (ip("10.0.0.2"), false),
                (ip("10.0.0.3"), true),
                (ip("10.0.0.1"), true),
                (ip("fd00::3"), true),
            ]);
            assert!(errors.is_empty(), "{errors:?}");
            assert!(hbone.in_step());
            assert_eq!(table_routes(), ["10.0.0.1", "10.0.0.3", "10.0.0.9"]);
            assert!(
                run("ip", &["-6", "route", "show", "table", &table]).contains("fd00::3"),
                "no IPv6 route"
            );

            let mut node_mode = HboneRoutes::default();
            node_mode.clear_once();
            assert!(!run("ip", &["rule"]).contains(&table));
            assert!(table_routes().is_empty());
            assert!(run("nft", &["list", "tables"]).is_empty());
        })
        .join()
        .unwrap();
    }
}
