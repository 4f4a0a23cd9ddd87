//! Who owns the local socket a flow is addressed to: sock_diag (netlink) gives the listening
//! sockets with their uid and inode; /proc maps inodes to the processes holding them.
//!
//! Both are snapshots. A snapshot taken after a packet was sent is authoritative for it; an
//! older one is refreshed on a miss (a server may have just started), so a flood of flows costs
//! one refresh per batch, not one per flow. Snapshots are also refreshed when older than
//! `max_age` (a port may have changed hands). The /proc walk has a deadline: a slow walk is
//! abandoned (and counted) rather than stalling every other decision.

use std::{
    collections::HashMap,
    fs,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use super::monotonic_ns;
use xdpfw_rules::owner::{self, Owner, ProcessInfo};

/// A socket that can receive new flows: a TCP listener or a UDP socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalSocket {
    pub proto: u8,
    pub addr: IpAddr,
    pub port: u16,
    pub uid: u32,
    pub inode: u32,
}

/// Every TCP listener and UDP socket of this network namespace.
pub fn local_sockets() -> Result<Vec<LocalSocket>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut out = Vec::new();
    for (family, proto, states) in [
        (AF_INET, IPPROTO_TCP, StateFlags::LISTEN),
        (AF_INET6, IPPROTO_TCP, StateFlags::LISTEN),
        (AF_INET, IPPROTO_UDP, StateFlags::all()),
        (AF_INET6, IPPROTO_UDP, StateFlags::all()),
    ] {
        let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut req = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: proto,
                extensions: ExtensionFlags::empty(),
                states,
                socket_id,
            })
            .into(),
        );
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        socket.send(&buf, 0).context("sock_diag request")?;
        let mut rx = vec![0u8; 64 * 1024];
        'dump: loop {
            let n = socket.recv(&mut &mut rx[..], 0).context("sock_diag reply")?;
            let mut off = 0;
            while off < n {
                let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[off..n]).context("parsing sock_diag reply")?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        let h = &r.header;
                        // A connected UDP socket takes only its peer's datagrams: not a listener.
                        if proto == IPPROTO_UDP && h.socket_id.destination_port != 0 {
                        } else {
                            out.push(LocalSocket {
                                proto,
                                addr: h.socket_id.source_address,
                                port: h.socket_id.source_port,
                                uid: h.uid,
                                inode: h.inode,
                            });
                        }
                    }
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => bail!("sock_diag: {e:?}"),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }
    Ok(out)
}

/// The socket that receives a new flow to `addr:port`: one bound to that address, else a
/// wildcard one (an IPv6 wildcard socket also takes IPv4 unless it is v6-only, which
/// sock_diag does not say; it is used only when no IPv4 socket matches).
pub fn receiving_socket(sockets: &[LocalSocket], proto: u8, addr: IpAddr, port: u16) -> Option<&LocalSocket> {
    let candidates = || sockets.iter().filter(move |s| s.proto == proto && s.port == port);
    candidates()
        .find(|s| s.addr == addr)
        .or_else(|| candidates().find(|s| s.addr.is_unspecified() && s.addr.is_ipv4() == addr.is_ipv4()))
        .or_else(|| candidates().find(|s| s.addr.is_unspecified() && s.addr.is_ipv6()))
}

/// How a lookup ended, for the counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Owner(Owner),
    /// No socket receives the flow: owner conditions cannot hold.
    NoSocket,
    /// The socket is there but no process holds it any more (it exited): only uid conditions
    /// can hold.
    ProcessGone(Owner),
    /// The /proc walk ran out of time; the flow stays pending and is retried.
    TimedOut,
}

/// Snapshots of sockets and socket-holding processes, refreshed on demand.
pub struct OwnerCache {
    sockets: Vec<LocalSocket>,
    /// CLOCK_MONOTONIC ns when taken (0: never).
    sockets_at: u64,
    holders: HashMap<u32, Vec<ProcessInfo>>,
    holders_at: u64,
    users: HashMap<u32, Option<String>>,
    /// Snapshots older than this are refreshed before use.
    pub max_age: Duration,
    /// The longest a /proc walk may take.
    pub proc_deadline: Duration,
}

impl OwnerCache {
    pub fn new(proc_deadline: Duration) -> Self {
        Self {
            sockets: Vec::new(),
            sockets_at: 0,
            holders: HashMap::new(),
            holders_at: 0,
            users: HashMap::new(),
            max_age: Duration::from_millis(500),
            proc_deadline,
        }
    }

    fn old(&self, at: u64) -> bool {
        monotonic_ns().saturating_sub(at) >= self.max_age.as_nanos() as u64
    }

    /// The owner of the socket receiving `proto` to `addr:port`, for a packet sent at `sent_ns`
    /// (CLOCK_MONOTONIC).
    pub fn lookup(&mut self, proto: u8, addr: IpAddr, port: u16, sent_ns: u64) -> Result<Lookup> {
        if self.old(self.sockets_at) {
            self.refresh_sockets()?;
        }
        let mut socket = receiving_socket(&self.sockets, proto, addr, port).cloned();
        if socket.is_none() && self.sockets_at <= sent_ns {
            self.refresh_sockets()?;
            socket = receiving_socket(&self.sockets, proto, addr, port).cloned();
        }
        let Some(socket) = socket else { return Ok(Lookup::NoSocket) };
        if self.old(self.holders_at) || (!self.holders.contains_key(&socket.inode) && self.holders_at <= sent_ns) {
            let taken = monotonic_ns();
            match scan_holders(Instant::now() + self.proc_deadline) {
                Some(h) => {
                    self.holders = h;
                    self.holders_at = taken;
                }
                None => return Ok(Lookup::TimedOut),
            }
        }
        let user = self
            .users
            .entry(socket.uid)
            .or_insert_with(|| nix::unistd::User::from_uid(socket.uid.into()).ok().flatten().map(|u| u.name))
            .clone();
        let processes = self.holders.get(&socket.inode).cloned().unwrap_or_default();
        let owner = Owner { uid: socket.uid, user, processes };
        Ok(if owner.processes.is_empty() { Lookup::ProcessGone(owner) } else { Lookup::Owner(owner) })
    }

    fn refresh_sockets(&mut self) -> Result<()> {
        let taken = monotonic_ns();
        self.sockets = local_sockets()?;
        self.sockets_at = taken;
        Ok(())
    }
}

/// Socket inode → the processes holding it, from every /proc/PID/fd; `None` past `deadline`.
fn scan_holders(deadline: Instant) -> Option<HashMap<u32, Vec<ProcessInfo>>> {
    let mut out: HashMap<u32, Vec<ProcessInfo>> = HashMap::new();
    let Ok(procs) = fs::read_dir("/proc") else { return Some(out) };
    for entry in procs.flatten() {
        if Instant::now() >= deadline {
            return None;
        }
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // Processes exit while we walk: every read may fail, and then the process is skipped.
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else { continue };
        let mut info: Option<ProcessInfo> = None;
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else { continue };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            let p = info.get_or_insert_with(|| process_info(pid)).clone();
            let holders = out.entry(inode).or_default();
            if !holders.iter().any(|h| h.pid == pid) {
                holders.push(p);
            }
        }
    }
    Some(out)
}

pub fn process_info(pid: u32) -> ProcessInfo {
    let dir = format!("/proc/{pid}");
    let name = fs::read_to_string(format!("{dir}/comm")).map(|s| s.trim_end().to_string()).unwrap_or_default();
    // The path is for people (a mount namespace makes it say anything); the device and inode of
    // the file the process runs (stat follows /proc/PID/exe to it, even when unlinked) are what
    // `exe` conditions compare.
    let exe = fs::read_link(format!("{dir}/exe")).ok().map(|p| p.to_string_lossy().into_owned());
    let exe_id = owner::file_id(Path::new(&format!("{dir}/exe")));
    // cgroup v2: the line "0::/path".
    let cgroup = fs::read_to_string(format!("{dir}/cgroup"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)));
    let unit = cgroup.as_deref().and_then(|c| {
        let system = c.starts_with(&format!("{}/", owner::SYSTEM_SLICE));
        owner::unit_of(c, !system).map(str::to_string)
    });
    ProcessInfo { pid, name, exe, exe_id, cgroup, unit }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_owner_of_a_real_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut cache = OwnerCache::new(Duration::from_secs(5));
        let me = std::process::id();
        match cache.lookup(IPPROTO_TCP, "127.0.0.1".parse().unwrap(), port, monotonic_ns()).unwrap() {
            Lookup::Owner(o) => {
                assert_eq!(o.uid, nix::unistd::getuid().as_raw());
                assert!(o.processes.iter().any(|p| p.pid == me), "{o:?}");
            }
            other => panic!("expected this process to own port {port}: {other:?}"),
        }
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let uport = udp.local_addr().unwrap().port();
        // Bound after the first snapshot: a packet sent later makes the lookup refresh it.
        assert!(matches!(cache.lookup(IPPROTO_UDP, "127.0.0.1".parse().unwrap(), uport, monotonic_ns()).unwrap(), Lookup::Owner(_)));
        drop(listener);
        // A snapshot newer than the packet is trusted; one older than max_age is not.
        assert!(matches!(cache.lookup(IPPROTO_TCP, "127.0.0.1".parse().unwrap(), port, 0).unwrap(), Lookup::Owner(_)));
        cache.max_age = Duration::ZERO;
        assert_eq!(cache.lookup(IPPROTO_TCP, "127.0.0.1".parse().unwrap(), port, 0).unwrap(), Lookup::NoSocket);
    }

    #[test]
    fn a_slow_walk_times_out() {
        assert!(scan_holders(Instant::now()).is_none());
    }
}
