//! Devices, device contexts, ports and GID tables.

use std::ffi::CStr;
use std::fmt::Write as _;
use std::io;
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{ibv_context, ibv_device, ibv_device_attr, ibv_gid, ibv_gid_entry, ibv_port_attr};

use super::error::{Result, VerbsError};
use super::types::{Gid, GidIndex, GidType, LinkLayer, Mtu, PortState};

unsafe extern "C" {
    // Exported by libibverbs since IBVERBS_1.11 (rdma-core 32) but not bound by rdma-sys, whose
    // allowlist skips names with a leading underscore; `ibv_query_gid_ex` in verbs.h is an inline
    // wrapper around it. Returns 0 or an errno value.
    fn _ibv_query_gid_ex(
        context: *mut ibv_context,
        port_num: u32,
        gid_index: u32,
        entry: *mut ibv_gid_entry,
        flags: u32,
        entry_size: usize,
    ) -> libc::c_int;
}

/// The list from `ibv_get_device_list(3)`, freed with `ibv_free_device_list(3)` when the last
/// [`Device`] or [`Context`] taken from it is gone.
struct DeviceListInner {
    list: NonNull<*mut ibv_device>,
    len: usize,
}

// SAFETY: the list is an immutable array of device pointers once returned; libibverbs keeps the
// devices alive until `ibv_free_device_list`, which runs only in `Drop` (one thread, last owner).
unsafe impl Send for DeviceListInner {}
// SAFETY: nothing mutates the list after creation; the device handles are only passed to
// thread-safe verbs (`ibv_open_device`, `ibv_get_device_name`, `ibv_get_device_guid`).
unsafe impl Sync for DeviceListInner {}

impl Drop for DeviceListInner {
    fn drop(&mut self) {
        // SAFETY: `list` came from `ibv_get_device_list` and is freed exactly once, here.
        unsafe { rdma_sys::ibv_free_device_list(self.list.as_ptr()) };
    }
}

/// An RDMA device found by `ibv_get_device_list(3)`.
#[derive(Clone)]
pub struct Device {
    list: Arc<DeviceListInner>,
    index: usize,
}

impl Device {
    fn raw(&self) -> *mut ibv_device {
        // SAFETY: `index < len` by construction and the list lives as long as `self.list`.
        unsafe { *self.list.list.as_ptr().add(self.index) }
    }

    /// The kernel name of the device (`ibv_get_device_name(3)`), e.g. `rxe0`, `mlx5_0`.
    pub fn name(&self) -> String {
        // SAFETY: the device pointer is valid while the list lives; the returned string is owned
        // by the device and NUL-terminated.
        let p = unsafe { rdma_sys::ibv_get_device_name(self.raw()) };
        if p.is_null() {
            return String::from("?");
        }
        // SAFETY: non-null, NUL-terminated, valid while the device is (we copy it out now).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// The node GUID (`ibv_get_device_guid(3)`), in host order.
    pub fn guid(&self) -> u64 {
        // SAFETY: valid device pointer (see `raw`).
        u64::from_be(unsafe { rdma_sys::ibv_get_device_guid(self.raw()) })
    }

    /// Open the device (`ibv_open_device(3)`).
    ///
    /// # Errors
    /// [`VerbsError::OpenDevice`] with the OS error.
    pub fn open(&self) -> Result<Context> {
        // SAFETY: valid device pointer (see `raw`); a null return is handled below.
        let ctx = unsafe { rdma_sys::ibv_open_device(self.raw()) };
        let ctx = NonNull::new(ctx).ok_or_else(|| VerbsError::OpenDevice {
            device: self.name(),
            source: io::Error::last_os_error(),
        })?;
        Ok(Context {
            inner: Arc::new(ContextInner {
                ctx,
                name: self.name(),
                _device: self.clone(),
            }),
        })
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name())
            .finish()
    }
}

/// List the RDMA devices of this host (`ibv_get_device_list(3)`).
///
/// # Errors
/// [`VerbsError::GetDeviceList`] when libibverbs cannot list devices (`ENOSYS`: the kernel has no
/// RDMA support). An empty list is returned as `Ok(vec![])`.
pub fn devices() -> Result<Vec<Device>> {
    let mut n: libc::c_int = 0;
    // SAFETY: `n` is a valid out-pointer; the returned list is owned by `DeviceListInner`.
    let list = unsafe { rdma_sys::ibv_get_device_list(&mut n) };
    let list =
        NonNull::new(list).ok_or_else(|| VerbsError::GetDeviceList(io::Error::last_os_error()))?;
    let inner = Arc::new(DeviceListInner {
        list,
        len: usize::try_from(n).unwrap_or(0),
    });
    Ok((0..inner.len)
        .map(|index| Device {
            list: inner.clone(),
            index,
        })
        .collect())
}

/// Find a device by name, or the first device when `name` is `None`.
///
/// # Errors
/// [`VerbsError::GetDeviceList`], [`VerbsError::NoDevice`] or [`VerbsError::DeviceNotFound`].
pub fn find_device(name: Option<&str>) -> Result<Device> {
    let devs = devices()?;
    match name {
        None => devs.into_iter().next().ok_or(VerbsError::NoDevice),
        Some(want) => {
            let names: Vec<String> = devs.iter().map(Device::name).collect();
            match names.iter().position(|n| n == want) {
                Some(i) => Ok(devs[i].clone()),
                None if devs.is_empty() => Err(VerbsError::NoDevice),
                None => Err(VerbsError::DeviceNotFound {
                    name: want.to_owned(),
                    available: names.join(","),
                }),
            }
        }
    }
}

pub(crate) struct ContextInner {
    pub(crate) ctx: NonNull<ibv_context>,
    pub(crate) name: String,
    _device: Device,
}

// SAFETY: an `ibv_context` may be used from any thread: libibverbs and its providers serialise
// access to shared context state internally (rdma-core documents all verbs as thread-safe).
unsafe impl Send for ContextInner {}
// SAFETY: see `Send`; `&ContextInner` only reaches thread-safe verbs.
unsafe impl Sync for ContextInner {}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: every child (PD, CQ, channel) holds an `Arc<ContextInner>`, so none is left when
        // this runs; the context is closed exactly once.
        let rc = unsafe { rdma_sys::ibv_close_device(self.ctx.as_ptr()) };
        if rc != 0 {
            tracing::warn!(device = %self.name, rc, "ibv_close_device failed");
        }
    }
}

/// An open device (`struct ibv_context`). Cheap to clone; closed when the last clone and the last
/// child resource are dropped.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<ContextInner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.inner.name)
            .finish()
    }
}

/// Attributes of a device (`ibv_query_device(3)`), the subset this library uses or shows.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceAttr {
    /// Firmware version string.
    pub fw_ver: String,
    /// Node GUID (host order).
    pub node_guid: u64,
    /// System image GUID (host order).
    pub sys_image_guid: u64,
    /// Vendor id.
    pub vendor_id: u32,
    /// Vendor part id.
    pub vendor_part_id: u32,
    /// Largest registrable region.
    pub max_mr_size: u64,
    /// Most QPs.
    pub max_qp: u32,
    /// Most outstanding work requests per queue.
    pub max_qp_wr: u32,
    /// Most scatter/gather entries per send or receive WR.
    pub max_sge: u32,
    /// Most scatter/gather entries per RDMA READ.
    pub max_sge_rd: u32,
    /// Most CQs.
    pub max_cq: u32,
    /// Most entries per CQ.
    pub max_cqe: u32,
    /// Most memory regions.
    pub max_mr: u32,
    /// Most outstanding RDMA READs a QP may be the target of.
    pub max_qp_rd_atom: u32,
    /// Most outstanding RDMA READs a QP may initiate.
    pub max_qp_init_rd_atom: u32,
    /// Number of physical ports.
    pub phys_port_cnt: u8,
}

/// Attributes of a port (`ibv_query_port(3)`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PortAttr {
    /// Logical state.
    pub state: PortState,
    /// Largest MTU the port supports.
    pub max_mtu: Option<Mtu>,
    /// MTU currently active.
    pub active_mtu: Option<Mtu>,
    /// Length of the GID table.
    pub gid_tbl_len: u32,
    /// Local identifier (InfiniBand).
    pub lid: u16,
    /// LID of the subnet manager (InfiniBand).
    pub sm_lid: u16,
    /// Link layer.
    pub link_layer: LinkLayer,
    /// Largest message.
    pub max_msg_sz: u32,
    /// Encoded active width (`ibv_query_port(3)`).
    pub active_width: u8,
    /// Encoded active speed (`ibv_query_port(3)`).
    pub active_speed: u8,
}

/// One valid GID table entry with its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidEntry {
    /// Index in the port's table.
    pub index: GidIndex,
    /// The GID.
    pub gid: Gid,
    /// Its type.
    pub gid_type: GidType,
}

/// How to pick the source GID of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GidSelector {
    /// On Ethernet: a RoCE v2 IPv4-mapped GID, else another RoCE v2 GID (global before
    /// link-local), else RoCE v1; on InfiniBand: index 0.
    #[default]
    Auto,
    /// This index (must be a valid, non-empty entry).
    Index(GidIndex),
}

fn cstr_field(bytes: &[libc::c_char]) -> String {
    let end = bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len());
    let v: Vec<u8> = bytes[..end].iter().map(|&c| c as u8).collect();
    String::from_utf8_lossy(&v).into_owned()
}

impl Context {
    /// Open a device by name, or the first device (`ibv_get_device_list(3)`, `ibv_open_device(3)`).
    ///
    /// # Errors
    /// See [`find_device`] and [`Device::open`].
    pub fn open(name: Option<&str>) -> Result<Context> {
        find_device(name)?.open()
    }

    /// The device name.
    pub fn device_name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn raw(&self) -> *mut ibv_context {
        self.inner.ctx.as_ptr()
    }

    /// Query the device attributes (`ibv_query_device(3)`).
    ///
    /// # Errors
    /// [`VerbsError::QueryDevice`].
    pub fn query_device(&self) -> Result<DeviceAttr> {
        let mut a = MaybeUninit::<ibv_device_attr>::zeroed();
        // SAFETY: valid open context; `a` is a writable `ibv_device_attr`.
        let rc = unsafe { rdma_sys::ibv_query_device(self.raw(), a.as_mut_ptr()) };
        if rc != 0 {
            return Err(VerbsError::QueryDevice {
                device: self.inner.name.clone(),
                source: VerbsError::rc(rc),
            });
        }
        // SAFETY: zero-initialised plain-old-data, filled by the successful query.
        let a = unsafe { a.assume_init() };
        let u = |v: libc::c_int| u32::try_from(v).unwrap_or(0);
        Ok(DeviceAttr {
            fw_ver: cstr_field(&a.fw_ver),
            node_guid: u64::from_be(a.node_guid),
            sys_image_guid: u64::from_be(a.sys_image_guid),
            vendor_id: a.vendor_id,
            vendor_part_id: a.vendor_part_id,
            max_mr_size: a.max_mr_size,
            max_qp: u(a.max_qp),
            max_qp_wr: u(a.max_qp_wr),
            max_sge: u(a.max_sge),
            max_sge_rd: u(a.max_sge_rd),
            max_cq: u(a.max_cq),
            max_cqe: u(a.max_cqe),
            max_mr: u(a.max_mr),
            max_qp_rd_atom: u(a.max_qp_rd_atom),
            max_qp_init_rd_atom: u(a.max_qp_init_rd_atom),
            phys_port_cnt: a.phys_port_cnt,
        })
    }

    /// Query a port (`ibv_query_port(3)`); ports are numbered from 1.
    ///
    /// # Errors
    /// [`VerbsError::QueryPort`].
    pub fn query_port(&self, port: u8) -> Result<PortAttr> {
        let mut a = MaybeUninit::<ibv_port_attr>::zeroed();
        // SAFETY: valid open context; `a` is a zeroed, writable `ibv_port_attr` of the size the
        // inline `ibv_query_port` of verbs.h passes (rdma-sys's `___ibv_query_port` mirrors it).
        let rc = unsafe { rdma_sys::___ibv_query_port(self.raw(), port, a.as_mut_ptr()) };
        if rc != 0 {
            return Err(VerbsError::QueryPort {
                device: self.inner.name.clone(),
                port,
                source: VerbsError::rc(rc),
            });
        }
        // SAFETY: zero-initialised plain-old-data, filled by the successful query.
        let a = unsafe { a.assume_init() };
        Ok(PortAttr {
            state: PortState::from_raw(a.state),
            max_mtu: Mtu::from_raw(a.max_mtu),
            active_mtu: Mtu::from_raw(a.active_mtu),
            gid_tbl_len: u32::try_from(a.gid_tbl_len).unwrap_or(0),
            lid: a.lid,
            sm_lid: a.sm_lid,
            link_layer: LinkLayer::from_raw(a.link_layer),
            max_msg_sz: a.max_msg_sz,
            active_width: a.active_width,
            active_speed: a.active_speed,
        })
    }

    /// Read one GID table entry (`ibv_query_gid(3)`).
    ///
    /// # Errors
    /// [`VerbsError::QueryGid`].
    pub fn query_gid(&self, port: u8, index: GidIndex) -> Result<Gid> {
        let mut g = MaybeUninit::<ibv_gid>::zeroed();
        // SAFETY: valid open context; `g` is a writable 16-byte `ibv_gid`.
        let rc =
            unsafe { rdma_sys::ibv_query_gid(self.raw(), port, index.0.into(), g.as_mut_ptr()) };
        if rc != 0 {
            return Err(VerbsError::QueryGid {
                device: self.inner.name.clone(),
                port,
                index: index.0.into(),
                source: VerbsError::rc(rc),
            });
        }
        // SAFETY: every bit pattern is a valid `[u8; 16]`; the union was zeroed then filled.
        Ok(Gid(unsafe { g.assume_init().raw }))
    }

    /// The type of a GID entry: `ibv_query_gid_ex(3)`, else sysfs
    /// (`/sys/class/infiniband/<dev>/ports/<port>/gid_attrs/types/<index>`), else IB on an
    /// InfiniBand port.
    pub fn gid_type(&self, port: u8, index: GidIndex, link_layer: LinkLayer) -> GidType {
        let mut e = MaybeUninit::<ibv_gid_entry>::zeroed();
        // SAFETY: valid open context; `e` is a writable `ibv_gid_entry` whose size is passed.
        let rc = unsafe {
            _ibv_query_gid_ex(
                self.raw(),
                port.into(),
                index.0.into(),
                e.as_mut_ptr(),
                0,
                std::mem::size_of::<ibv_gid_entry>(),
            )
        };
        if rc == 0 {
            // SAFETY: filled by the successful query; plain-old-data.
            let e = unsafe { e.assume_init() };
            return match e.gid_type {
                rdma_sys::IBV_GID_TYPE_IB => GidType::Ib,
                rdma_sys::IBV_GID_TYPE_ROCE_V1 => GidType::RoceV1,
                rdma_sys::IBV_GID_TYPE_ROCE_V2 => GidType::RoceV2,
                _ => GidType::Unknown,
            };
        }
        let path = format!(
            "/sys/class/infiniband/{}/ports/{}/gid_attrs/types/{}",
            self.inner.name, port, index.0
        );
        match std::fs::read_to_string(path).map(|s| s.trim().to_ascii_lowercase()) {
            Ok(s) if s.contains("v2") => GidType::RoceV2,
            Ok(s) if s.contains("roce") => GidType::RoceV1,
            Ok(s) if s.contains("ib") => GidType::Ib,
            _ if !link_layer.is_ethernet() => GidType::Ib,
            _ => GidType::Unknown,
        }
    }

    /// The valid (non-zero) entries of a port's GID table, with their types.
    ///
    /// # Errors
    /// [`VerbsError::QueryPort`]; entries that cannot be read are skipped.
    pub fn gid_table(&self, port: u8) -> Result<Vec<GidEntry>> {
        let pa = self.query_port(port)?;
        let n = pa.gid_tbl_len.min(256);
        let mut out = Vec::new();
        for i in 0..n {
            let index = GidIndex(i as u8);
            let Ok(gid) = self.query_gid(port, index) else {
                continue;
            };
            if gid.is_zero() {
                continue;
            }
            out.push(GidEntry {
                index,
                gid,
                gid_type: self.gid_type(port, index, pa.link_layer),
            });
        }
        Ok(out)
    }

    /// Pick the source GID for connections on `port`.
    ///
    /// # Errors
    /// [`VerbsError::NoUsableGid`] when the table has no suitable entry or the configured one is
    /// empty; query errors.
    pub fn select_gid(&self, port: u8, sel: GidSelector) -> Result<GidEntry> {
        let pa = self.query_port(port)?;
        let table = self.gid_table(port)?;
        let no = |reason: String| VerbsError::NoUsableGid {
            device: self.inner.name.clone(),
            port,
            reason,
        };
        if let GidSelector::Index(i) = sel {
            return table
                .iter()
                .find(|e| e.index == i)
                .copied()
                .ok_or_else(|| no(format!("GID index {i} is empty or out of range")));
        }
        if !pa.link_layer.is_ethernet() {
            return table
                .iter()
                .find(|e| e.index == GidIndex(0))
                .copied()
                .ok_or_else(|| no("GID index 0 is empty".into()));
        }
        let rank = |e: &GidEntry| match (e.gid_type, e.gid.is_ipv4_mapped(), e.gid.is_link_local())
        {
            (GidType::RoceV2, true, _) => 0,
            (GidType::RoceV2, false, false) => 1,
            (GidType::RoceV2, false, true) => 2,
            (GidType::RoceV1, _, _) => 3,
            _ => 4,
        };
        table
            .iter()
            .filter(|e| rank(e) < 4)
            .min_by_key(|e| (rank(e), e.index))
            .copied()
            .ok_or_else(|| {
                let mut s = String::from("no RoCE GID in table [");
                for e in &table {
                    let _ = write!(s, " {}:{}({})", e.index, e.gid, e.gid_type);
                }
                s.push_str(" ]");
                no(s)
            })
    }

    /// The port's attributes if it is `ACTIVE`.
    ///
    /// # Errors
    /// [`VerbsError::PortNotActive`], [`VerbsError::QueryPort`].
    pub fn active_port(&self, port: u8) -> Result<PortAttr> {
        let pa = self.query_port(port)?;
        if pa.state != PortState::Active {
            return Err(VerbsError::PortNotActive {
                device: self.inner.name.clone(),
                port,
                state: pa.state.to_string(),
            });
        }
        Ok(pa)
    }
}
