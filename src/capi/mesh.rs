//! Launch integration: rank and size from the launcher, the full mesh, barrier, messages by
//! rank.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::ptr::NonNull;

use parking_lot::Mutex;

use super::conn::{deliver, object};
use super::{
    Error, Kind, Object, RSMSG_ERR_BAD_HANDLE, RSMSG_ERR_INVALID_ARG, RSMSG_ERR_LAUNCH,
    RSMSG_ERR_WOULD_BLOCK, check_id, ffi, in_bytes, out, recv_out, register, rsmsg_config,
    rsmsg_mesh, rsmsg_view, unregister, wait_of,
};
use crate::bootstrap::LaunchInfo;
use crate::mesh::{Mesh, MeshError, MeshMessage, MeshSetup, Wait};

/// A mesh and the messages the C side holds on it (same ownership scheme as the connection
/// state: the mesh at a fixed heap address, every message dropped before it).
pub(crate) struct MeshState {
    views: HashMap<u64, MeshMessage<'static>>,
    /// Per rank, a message that did not fit the caller's buffer.
    pending: Vec<Option<MeshMessage<'static>>>,
    mesh: NonNull<Mesh>,
}

// SAFETY: the messages borrow only the mesh behind `mesh`, owned by this state; the state is
// only accessed under its `Mutex` (`Object::Mesh`), so the mesh and its messages move between
// threads together and are never used by two threads at once. `Mesh` itself is `Send`.
unsafe impl Send for MeshState {}

impl MeshState {
    fn new(mesh: Mesh) -> MeshState {
        MeshState {
            views: HashMap::new(),
            pending: (0..mesh.size()).map(|_| None).collect(),
            mesh: NonNull::from(Box::leak(Box::new(mesh))),
        }
    }

    fn mesh(&self) -> &'static Mesh {
        // SAFETY: `mesh` came from `Box::leak`, is never moved and is freed only in `Drop`,
        // after every message borrowing it is dropped.
        unsafe { self.mesh.as_ref() }
    }

    fn slot(&mut self, rank: u32) -> Result<&mut Option<MeshMessage<'static>>, Error> {
        let size = self.pending.len();
        self.pending.get_mut(rank as usize).ok_or_else(|| {
            Error::new(
                RSMSG_ERR_INVALID_ARG,
                format!("rank {rank} is not in a job of {size}"),
            )
        })
    }

    fn next(&mut self, rank: u32, wait: Wait) -> Result<MeshMessage<'static>, Error> {
        if let Some(m) = self.slot(rank)?.take() {
            return Ok(m);
        }
        self.mesh().recv(rank, wait)?.ok_or_else(|| {
            Error::new(
                RSMSG_ERR_WOULD_BLOCK,
                format!("no message from rank {rank} has arrived"),
            )
        })
    }
}

impl Drop for MeshState {
    fn drop(&mut self) {
        self.views.clear();
        self.pending.clear();
        // SAFETY: `mesh` came from `Box::leak` in `MeshState::new`; every message borrowing it
        // was dropped just above.
        drop(unsafe { Box::from_raw(self.mesh.as_ptr()) });
    }
}

/// This process's rank and the job size, from the launcher's environment: Open MPI's `mpirun`
/// (`OMPI_COMM_WORLD_RANK`/`SIZE`), a PMI launcher (`PMI_RANK`/`PMI_SIZE`) or Slurm's `srun`
/// (`SLURM_PROCID`/`SLURM_NTASKS`), tried in that order. `RSMSG_ERR_LAUNCH` when none is set
/// or the values are malformed (not UTF-8 included), inconsistent, or give a size above
/// 1048576 (2^20).
///
/// Thread safety: any thread (reads the environment).
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_launch_info(out_rank: *mut u32, out_size: *mut u32) -> c_int {
    ffi(|| {
        if out_rank == out_size && !out_rank.is_null() {
            return Err(Error::new(
                RSMSG_ERR_INVALID_ARG,
                "out_rank and out_size are the same pointer",
            ));
        }
        let r = out(out_rank, "out_rank")?;
        let s = out(out_size, "out_size")?;
        let info = LaunchInfo::from_env()
            .map_err(MeshError::from)?
            .ok_or(MeshError::NoLauncher)?;
        *r = info.rank;
        *s = info.size;
        Ok(())
    })
}

fn init(cfg: rsmsg_config, ranks: Option<(u32, u32)>, out_mesh: *mut rsmsg_mesh) -> c_int {
    ffi(|| {
        let o = out(out_mesh, "out_mesh")?;
        object!(m = cfg.id, Config);
        let config = m.lock().clone();
        let (rank, size) = match ranks {
            Some(rs) => rs,
            None => {
                let i = LaunchInfo::from_env()
                    .map_err(MeshError::from)?
                    .ok_or(MeshError::NoLauncher)?;
                (i.rank, i.size)
            }
        };
        let setup = MeshSetup::from_env()?;
        let mesh = Mesh::connect(&config, rank, size, &setup)?;
        o.id = register(Object::Mesh(Mutex::new(MeshState::new(mesh))));
        Ok(())
    })
}

/// Joins the job's full mesh: rank and size from the launcher (as `rsmsg_launch_info`), the
/// endpoint settings from `cfg`, the mesh settings from the environment: `RSMSG_JOB` (name
/// prefix; default the launcher's job id), `RSMSG_EMBED_MANAGER=1` (rank 0 runs the bootstrap
/// manager on the port of `RSMSG_MANAGER`, which names rank 0's host), `RSMSG_MESH_TIMEOUT`
/// (whole seconds, 1 to 31536000, default 60). Every rank must call it; it returns once this rank is connected to
/// every other one.
///
/// Thread safety: any thread.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_init(cfg: rsmsg_config, out_mesh: *mut rsmsg_mesh) -> c_int {
    init(cfg, None, out_mesh)
}

/// As `rsmsg_mesh_init`, with the rank and size given (`rank` < `size`) instead of read from a
/// launcher. `size` is at most 1048576 (2^20): `RSMSG_ERR_INVALID_ARG` above it.
///
/// Thread safety: any thread.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_init_ranks(
    cfg: rsmsg_config,
    rank: u32,
    size: u32,
    out_mesh: *mut rsmsg_mesh,
) -> c_int {
    if size > LaunchInfo::MAX_SIZE {
        return ffi(|| {
            Err(Error::new(
                RSMSG_ERR_INVALID_ARG,
                format!(
                    "size {size} is above the largest job size supported, {} ranks",
                    LaunchInfo::MAX_SIZE
                ),
            ))
        });
    }
    if rank >= size {
        return ffi(|| {
            Err(Error::new(
                RSMSG_ERR_LAUNCH,
                format!("rank {rank} is not below size {size}"),
            ))
        });
    }
    init(cfg, Some((rank, size)), out_mesh)
}

/// This process's rank in the mesh.
///
/// Thread safety: any thread; calls on one mesh are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_rank(mesh: rsmsg_mesh, out_rank: *mut u32) -> c_int {
    ffi(|| {
        let o = out(out_rank, "out_rank")?;
        object!(m = mesh.id, Mesh);
        *o = m.lock().mesh().rank();
        Ok(())
    })
}

/// The number of ranks in the mesh.
///
/// Thread safety: any thread; calls on one mesh are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_size(mesh: rsmsg_mesh, out_size: *mut u32) -> c_int {
    ffi(|| {
        let o = out(out_size, "out_size")?;
        object!(m = mesh.id, Mesh);
        *o = m.lock().mesh().size();
        Ok(())
    })
}

/// The largest message that can be sent to `rank`.
///
/// Thread safety: any thread; calls on one mesh are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_max_message(
    mesh: rsmsg_mesh,
    rank: u32,
    out_len: *mut usize,
) -> c_int {
    ffi(|| {
        let o = out(out_len, "out_len")?;
        object!(m = mesh.id, Mesh);
        *o = m.lock().mesh().max_message(rank)?;
        Ok(())
    })
}

/// Sends `len` bytes (`len` > 0) to `rank` (not this rank), waiting for free partitions under
/// back-pressure.
///
/// Thread safety: any thread; calls on one mesh are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_send(
    mesh: rsmsg_mesh,
    rank: u32,
    buf: *const c_void,
    len: usize,
) -> c_int {
    ffi(|| {
        let bytes = in_bytes(buf, len)?;
        object!(m = mesh.id, Mesh);
        Ok(m.lock().mesh().send(rank, bytes)?)
    })
}

/// As `rsmsg_mesh_send` without waiting: `RSMSG_ERR_WOULD_BLOCK` (nothing sent) under
/// back-pressure. A message above the switch point (`rsmsg_max_message`, or
/// `RSMSG_RNDV_THRESHOLD` when lower) goes by rendezvous and returns only once the receiver
/// has read it, as `rsmsg_mesh_send` does.
///
/// Thread safety: any thread; calls on one mesh are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_try_send(
    mesh: rsmsg_mesh,
    rank: u32,
    buf: *const c_void,
    len: usize,
) -> c_int {
    ffi(|| {
        let bytes = in_bytes(buf, len)?;
        object!(m = mesh.id, Mesh);
        Ok(m.lock().mesh().try_send(rank, bytes)?)
    })
}

/// Receives the next message from `rank` into `buf` (`cap` bytes; NULL only with `cap` 0);
/// `*out_len` gets its length. `timeout_ms`: -1 waits as long as it takes, 0 does not wait
/// (`RSMSG_ERR_WOULD_BLOCK`), > 0 waits that long (`RSMSG_ERR_TIMEOUT`). A message longer
/// than `cap` is answered with `RSMSG_ERR_BUFFER_TOO_SMALL` and stays queued.
///
/// Thread safety: any thread; calls on one mesh are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_recv(
    mesh: rsmsg_mesh,
    rank: u32,
    buf: *mut c_void,
    cap: usize,
    out_len: *mut usize,
    timeout_ms: i64,
) -> c_int {
    ffi(|| {
        let (buf, len) = recv_out(buf, cap, out_len)?;
        let wait = wait_of(timeout_ms)?;
        object!(m = mesh.id, Mesh);
        let mut st = m.lock();
        let msg = st.next(rank, wait)?;
        deliver(msg, buf, len, st.slot(rank)?)
    })
}

/// Receives the next message from `rank` in place (zero-copy) into `*out_view` (timeouts as
/// `rsmsg_mesh_recv`). Release it with `rsmsg_mesh_view_release`; freeing the mesh releases
/// every view.
///
/// Thread safety: any thread; calls on one mesh are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_recv_view(
    mesh: rsmsg_mesh,
    rank: u32,
    timeout_ms: i64,
    out_view: *mut rsmsg_view,
) -> c_int {
    ffi(|| {
        let v = out(out_view, "out_view")?;
        let wait = wait_of(timeout_ms)?;
        object!(m = mesh.id, Mesh);
        let mut st = m.lock();
        let msg = st.next(rank, wait)?;
        *v = super::publish_view(&mut st.views, msg);
        Ok(())
    })
}

/// Releases a view taken from this mesh and clears `*view`; releasing twice, or on another
/// mesh, answers `RSMSG_ERR_BAD_HANDLE`.
///
/// Thread safety: any thread; calls on one mesh are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_view_release(mesh: rsmsg_mesh, view: *mut rsmsg_view) -> c_int {
    ffi(|| {
        let v = out(view, "view")?;
        check_id(v.id, Kind::View)?;
        object!(m = mesh.id, Mesh);
        let mut st = m.lock();
        let msg = st.views.remove(&v.id).ok_or_else(|| {
            Error::new(
                RSMSG_ERR_BAD_HANDLE,
                format!(
                    "view {:#x} was already released or is not from this mesh",
                    v.id
                ),
            )
        })?;
        drop(msg);
        *v = rsmsg_view {
            data: std::ptr::null(),
            len: 0,
            id: 0,
        };
        Ok(())
    })
}

/// Waits until every rank has called `rsmsg_mesh_barrier` (as many times as this one).
/// `RSMSG_ERR_WOULD_BLOCK`: the data messages copied aside while it waited passed their bound
/// (`rsmsg_mesh_set_barrier_backlog`, 64 MiB by default); receive them, then call again, which
/// resumes this barrier.
///
/// Thread safety: any thread; calls on one mesh are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_barrier(mesh: rsmsg_mesh) -> c_int {
    ffi(|| {
        object!(m = mesh.id, Mesh);
        Ok(m.lock().mesh().barrier()?)
    })
}

/// Bounds the bytes of data messages `rsmsg_mesh_barrier` copies aside while it waits, all
/// peers together (default 64 MiB; the bound may be passed by one message).
///
/// Thread safety: any thread; calls on one mesh are serialized.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_set_barrier_backlog(mesh: rsmsg_mesh, bytes: usize) -> c_int {
    ffi(|| {
        object!(m = mesh.id, Mesh);
        m.lock().mesh().set_barrier_backlog(bytes);
        Ok(())
    })
}

/// Closes every connection of the mesh, releases its views and frees the handle (rank 0's
/// embedded manager stops: call `rsmsg_mesh_barrier` first so that no rank is still setting
/// up).
///
/// Thread safety: any thread; waits for a call in progress on the same mesh.
#[unsafe(no_mangle)]
pub extern "C" fn rsmsg_mesh_free(mesh: rsmsg_mesh) -> c_int {
    ffi(|| {
        let obj = unregister(mesh.id, Kind::Mesh)?;
        if let Object::Mesh(m) = &*obj {
            let mut st = m.lock();
            st.views.clear();
            st.pending.iter_mut().for_each(|p| *p = None);
            st.mesh().close();
        }
        Ok(())
    })
}
