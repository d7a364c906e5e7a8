//! The kernel side from user space: loading and attaching the programs (`loader`), typed access
//! to the pinned maps (`maps`), and turning a [`CompiledState`](crate::policy::CompiledState)
//! into map updates as a diff (`sync`); the underlay devices of eBPF host routing (`underlay`).

pub mod cgroup;
pub mod loader;
pub mod maps;
pub mod migrate;
pub mod service_maps;
pub mod sizes;
pub mod sync;
pub mod underlay;

use agent_common::{EndpointInfo, IpcacheValue, PolicyKey, PolicyValue};
use ipnet::IpNet;
use std::collections::BTreeMap;

/// A policy map entry as the trie stores it: key data plus prefix length in bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntryKey {
    pub key: PolicyKey,
    pub prefix_len: u32,
}

/// The map operations the sync needs. The real implementation is [`maps::PinnedMaps`]; tests use
/// an in-memory fake that also checks the ordering invariants.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Current contents, read at start-up to adopt pinned state.
    fn read_endpoints(&self) -> Result<BTreeMap<u32, EndpointInfo>, Self::Error>;
    fn read_policy(&self) -> Result<BTreeMap<PolicyEntryKey, PolicyValue>, Self::Error>;
    fn read_ipcache(&self) -> Result<BTreeMap<IpNet, IpcacheValue>, Self::Error>;
    fn read_policy_cidrs(&self) -> Result<BTreeMap<IpNet, u32>, Self::Error>;
    fn read_generation(&self) -> Result<u32, Self::Error>;

    fn put_endpoint(&mut self, ifindex: u32, info: &EndpointInfo) -> Result<(), Self::Error>;
    fn delete_endpoint(&mut self, ifindex: u32) -> Result<(), Self::Error>;
    fn put_policy(&mut self, key: PolicyEntryKey, value: PolicyValue) -> Result<(), Self::Error>;
    fn delete_policy(&mut self, key: PolicyEntryKey) -> Result<(), Self::Error>;
    fn put_ipcache(&mut self, prefix: IpNet, value: IpcacheValue) -> Result<(), Self::Error>;
    fn delete_ipcache(&mut self, prefix: IpNet) -> Result<(), Self::Error>;
    fn put_policy_cidr(&mut self, prefix: IpNet, identity: u32) -> Result<(), Self::Error>;
    fn delete_policy_cidr(&mut self, prefix: IpNet) -> Result<(), Self::Error>;
    /// Makes every conntrack entry re-evaluate policy on its next packet.
    fn set_generation(&mut self, generation: u32) -> Result<(), Self::Error>;
    /// How many entries each map holds (the kernel's `max_entries`).
    fn capacities(&self) -> sizes::MapSizes {
        sizes::MapSizes::COMPILED
    }
}

/// IPv4 as IPv4-mapped IPv6 bytes, the one address form the maps use.
#[must_use]
pub fn addr_bytes(addr: std::net::IpAddr) -> [u8; 16] {
    match addr {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// Prefix length in the 128-bit form (`/n` of IPv4 is `/96+n`).
#[must_use]
pub fn prefix_bits(net: &IpNet) -> u32 {
    match net {
        IpNet::V4(n) => 96 + u32::from(n.prefix_len()),
        IpNet::V6(n) => u32::from(n.prefix_len()),
    }
}

/// The inverse of [`addr_bytes`] and [`prefix_bits`].
#[must_use]
pub fn net_from_bytes(bytes: [u8; 16], bits: u32) -> Option<IpNet> {
    let v6 = std::net::Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) if bits >= 96 => ipnet::Ipv4Net::new(v4, u8::try_from(bits - 96).ok()?)
            .ok()
            .map(IpNet::V4),
        _ => ipnet::Ipv6Net::new(v6, u8::try_from(bits).ok()?)
            .ok()
            .map(IpNet::V6),
    }
}
