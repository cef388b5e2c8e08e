//! Newtypes for the raw numbers of verbs, so that a swapped argument does not compile.

use std::fmt;
use std::net::Ipv6Addr;

use rdma_sys::{ibv_access_flags, ibv_mtu, ibv_port_state};

macro_rules! newtype_u32 {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u32);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

newtype_u32!(
    /// Remote key of a memory region: a peer needs it (with an address) to RDMA into or out of it.
    Rkey
);
newtype_u32!(
    /// Local key of a memory region, used in scatter/gather entries.
    Lkey
);

/// A queue pair number (24 bits on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QpNum(pub u32);

impl fmt::Display for QpNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#08x}", self.0)
    }
}

/// A packet sequence number: 24 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Psn(u32);

impl Psn {
    /// The largest valid PSN.
    pub const MAX: u32 = 0x00ff_ffff;

    /// A PSN from its value; `None` if it does not fit 24 bits.
    pub fn new(v: u32) -> Option<Psn> {
        (v <= Self::MAX).then_some(Psn(v))
    }

    /// A PSN from the low 24 bits of `v`.
    pub fn from_low_bits(v: u32) -> Psn {
        Psn(v & Self::MAX)
    }

    /// A random PSN (from `getrandom(2)`, falling back to the clock and the process id), so that
    /// a reconnecting QP does not accept packets of an earlier incarnation.
    pub fn random() -> Psn {
        let mut buf = [0u8; 4];
        // SAFETY: `buf` is a valid, writable 4-byte buffer for the duration of the call.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
        let v = if n == 4 {
            u32::from_ne_bytes(buf)
        } else {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            t ^ std::process::id().rotate_left(13)
        };
        Psn::from_low_bits(v)
    }

    /// The value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Psn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#08x}", self.0)
    }
}

/// An index into a port's GID table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GidIndex(pub u8);

impl fmt::Display for GidIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A work request id, echoed back in the work completion. Packs a 32-bit index and a 32-bit tag
/// (for instance a generation) so that a completion can be matched and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WrId(pub u64);

impl WrId {
    /// Pack an index (low 32 bits) and a tag (high 32 bits).
    pub const fn from_parts(index: u32, tag: u32) -> WrId {
        WrId(((tag as u64) << 32) | index as u64)
    }
    /// The low 32 bits.
    pub const fn index(self) -> u32 {
        self.0 as u32
    }
    /// The high 32 bits.
    pub const fn tag(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// A 128-bit global identifier (a port address in the GRH; on RoCE an IPv6 or IPv4-mapped address).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// Whether all bytes are zero (an empty GID table slot).
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
    /// Whether this is an IPv4-mapped address (`::ffff:a.b.c.d`), the usual RoCE v2 GID of an IPv4 netdev.
    pub fn is_ipv4_mapped(&self) -> bool {
        self.0[..10] == [0; 10] && self.0[10] == 0xff && self.0[11] == 0xff
    }
    /// Whether this is an IPv6 link-local address (`fe80::/10`).
    pub fn is_link_local(&self) -> bool {
        self.0[0] == 0xfe && (self.0[1] & 0xc0) == 0x80
    }
    /// The subnet prefix (first 8 bytes) as a big-endian number.
    pub fn subnet_prefix(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
    /// The interface id (last 8 bytes) as a big-endian number.
    pub fn interface_id(&self) -> u64 {
        u64::from_be_bytes(self.0[8..].try_into().expect("8 bytes"))
    }
}

impl fmt::Display for Gid {
    /// Shown as an IPv6 address (`fe80::...`, `::ffff:127.0.0.1`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = Ipv6Addr::from(self.0);
        match a.to_ipv4_mapped() {
            Some(v4) => write!(f, "::ffff:{v4}"),
            None => write!(f, "{a}"),
        }
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gid({self})")
    }
}

/// The type of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GidType {
    /// InfiniBand (or RoCE v1 on kernels that do not distinguish).
    Ib,
    /// RoCE v1 (Ethernet, no IP header).
    RoceV1,
    /// RoCE v2 (UDP/IP encapsulated, routable).
    RoceV2,
    /// The type could not be determined.
    Unknown,
}

impl GidType {
    /// Short name as `ibv_devinfo -v` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            GidType::Ib => "IB",
            GidType::RoceV1 => "RoCE v1",
            GidType::RoceV2 => "RoCE v2",
            GidType::Unknown => "unknown",
        }
    }
}

impl fmt::Display for GidType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The link layer of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkLayer {
    /// InfiniBand: address by LID.
    InfiniBand,
    /// Ethernet (RoCE): address by GID, always with a GRH.
    Ethernet,
    /// The provider did not say (treated as InfiniBand, as rdma-core does).
    Unspecified,
}

impl LinkLayer {
    pub(crate) fn from_raw(v: u8) -> LinkLayer {
        match v {
            1 => LinkLayer::InfiniBand,
            2 => LinkLayer::Ethernet,
            _ => LinkLayer::Unspecified,
        }
    }
    pub(crate) fn to_raw(self) -> u8 {
        match self {
            LinkLayer::Unspecified => 0,
            LinkLayer::InfiniBand => 1,
            LinkLayer::Ethernet => 2,
        }
    }
    /// Name as `ibv_devinfo` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkLayer::InfiniBand => "InfiniBand",
            LinkLayer::Ethernet => "Ethernet",
            LinkLayer::Unspecified => "Unspecified",
        }
    }
    /// Whether connections on this link layer are addressed by GID (RoCE) rather than LID.
    pub fn is_ethernet(self) -> bool {
        self == LinkLayer::Ethernet
    }
}

impl fmt::Display for LinkLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A path MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mtu {
    /// 256 bytes.
    Mtu256,
    /// 512 bytes.
    Mtu512,
    /// 1024 bytes.
    Mtu1024,
    /// 2048 bytes.
    Mtu2048,
    /// 4096 bytes.
    Mtu4096,
}

impl Mtu {
    /// From the `enum ibv_mtu` value (1..=5).
    pub fn from_raw(v: u32) -> Option<Mtu> {
        Some(match v {
            ibv_mtu::IBV_MTU_256 => Mtu::Mtu256,
            ibv_mtu::IBV_MTU_512 => Mtu::Mtu512,
            ibv_mtu::IBV_MTU_1024 => Mtu::Mtu1024,
            ibv_mtu::IBV_MTU_2048 => Mtu::Mtu2048,
            ibv_mtu::IBV_MTU_4096 => Mtu::Mtu4096,
            _ => return None,
        })
    }
    /// The `enum ibv_mtu` value.
    pub fn to_raw(self) -> u32 {
        match self {
            Mtu::Mtu256 => ibv_mtu::IBV_MTU_256,
            Mtu::Mtu512 => ibv_mtu::IBV_MTU_512,
            Mtu::Mtu1024 => ibv_mtu::IBV_MTU_1024,
            Mtu::Mtu2048 => ibv_mtu::IBV_MTU_2048,
            Mtu::Mtu4096 => ibv_mtu::IBV_MTU_4096,
        }
    }
    /// Bytes.
    pub fn bytes(self) -> u32 {
        128 << self.to_raw()
    }
}

impl fmt::Display for Mtu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.bytes().fmt(f)
    }
}

/// The logical state of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PortState {
    /// `PORT_DOWN`.
    Down,
    /// `PORT_INIT`.
    Init,
    /// `PORT_ARMED`.
    Armed,
    /// `PORT_ACTIVE`: usable.
    Active,
    /// `PORT_ACTIVE_DEFER`.
    ActiveDefer,
    /// `PORT_NOP` or a value this library does not know.
    Other(u32),
}

impl PortState {
    pub(crate) fn from_raw(v: u32) -> PortState {
        match v {
            ibv_port_state::IBV_PORT_DOWN => PortState::Down,
            ibv_port_state::IBV_PORT_INIT => PortState::Init,
            ibv_port_state::IBV_PORT_ARMED => PortState::Armed,
            ibv_port_state::IBV_PORT_ACTIVE => PortState::Active,
            ibv_port_state::IBV_PORT_ACTIVE_DEFER => PortState::ActiveDefer,
            o => PortState::Other(o),
        }
    }
}

impl fmt::Display for PortState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortState::Down => f.write_str("PORT_DOWN"),
            PortState::Init => f.write_str("PORT_INIT"),
            PortState::Armed => f.write_str("PORT_ARMED"),
            PortState::Active => f.write_str("PORT_ACTIVE"),
            PortState::ActiveDefer => f.write_str("PORT_ACTIVE_DEFER"),
            PortState::Other(v) => write!(f, "PORT_STATE_{v}"),
        }
    }
}

/// Access rights of a memory region (`ibv_reg_mr(3)`), chosen explicitly per use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AccessFlags(u32);

impl AccessFlags {
    /// The device may write locally (receive buffers, RDMA READ destinations). No remote access.
    pub const LOCAL_WRITE: AccessFlags = AccessFlags(ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
    /// Peers may RDMA WRITE into the region (requires `LOCAL_WRITE`, which [`AccessFlags::remote_write`] adds).
    pub const REMOTE_WRITE: AccessFlags = AccessFlags(ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0);
    /// Peers may RDMA READ from the region.
    pub const REMOTE_READ: AccessFlags = AccessFlags(ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);
    /// Memory windows may be bound over the region (the region itself grants no remote access).
    pub const MW_BIND: AccessFlags = AccessFlags(ibv_access_flags::IBV_ACCESS_MW_BIND.0);

    /// Local use only: source images, receive and RDMA READ destination buffers.
    pub const fn local_only() -> AccessFlags {
        Self::LOCAL_WRITE
    }
    /// Target segments and mailboxes: peers RDMA WRITE (with or without immediate) into them.
    pub const fn remote_write() -> AccessFlags {
        AccessFlags(Self::LOCAL_WRITE.0 | Self::REMOTE_WRITE.0)
    }
    /// Rendezvous sources: peers RDMA READ out of them; not writable by anyone but the owner.
    pub const fn remote_read() -> AccessFlags {
        Self::REMOTE_READ
    }
    /// The raw `ibv_access_flags` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: AccessFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for AccessFlags {
    type Output = AccessFlags;
    fn bitor(self, rhs: AccessFlags) -> AccessFlags {
        AccessFlags(self.0 | rhs.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_display_and_classes() {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&[127, 0, 0, 1]);
        let g = Gid(g);
        assert!(g.is_ipv4_mapped());
        assert!(!g.is_link_local());
        assert_eq!(g.to_string(), "::ffff:127.0.0.1");
        let mut l = [0u8; 16];
        l[0] = 0xfe;
        l[1] = 0x80;
        l[15] = 1;
        let l = Gid(l);
        assert!(l.is_link_local());
        assert!(!l.is_ipv4_mapped());
        assert_eq!(l.to_string(), "fe80::1");
        assert_eq!(l.subnet_prefix(), 0xfe80_0000_0000_0000);
        assert_eq!(l.interface_id(), 1);
        assert!(Gid::default().is_zero());
    }

    #[test]
    fn psn_is_24_bits() {
        assert_eq!(Psn::new(0x0100_0000), None);
        assert_eq!(Psn::new(Psn::MAX).map(Psn::get), Some(Psn::MAX));
        assert_eq!(Psn::from_low_bits(0xffff_ffff).get(), Psn::MAX);
        for _ in 0..16 {
            assert!(Psn::random().get() <= Psn::MAX);
        }
    }

    #[test]
    fn mtu_roundtrip() {
        for raw in 1..=5 {
            let m = Mtu::from_raw(raw).unwrap();
            assert_eq!(m.to_raw(), raw);
        }
        assert_eq!(Mtu::Mtu256.bytes(), 256);
        assert_eq!(Mtu::Mtu4096.bytes(), 4096);
        assert_eq!(Mtu::from_raw(0), None);
        assert_eq!(Mtu::from_raw(6), None);
    }

    #[test]
    fn wr_id_parts() {
        let w = WrId::from_parts(0xdead_beef, 7);
        assert_eq!(w.index(), 0xdead_beef);
        assert_eq!(w.tag(), 7);
    }

    #[test]
    fn access_presets() {
        assert!(AccessFlags::remote_write().contains(AccessFlags::LOCAL_WRITE));
        assert!(AccessFlags::remote_write().contains(AccessFlags::REMOTE_WRITE));
        assert!(!AccessFlags::remote_write().contains(AccessFlags::REMOTE_READ));
        assert!(!AccessFlags::local_only().contains(AccessFlags::REMOTE_WRITE));
        assert!(!AccessFlags::remote_read().contains(AccessFlags::REMOTE_WRITE));
        assert_eq!(
            (AccessFlags::REMOTE_READ | AccessFlags::LOCAL_WRITE).bits(),
            5
        );
    }
}
