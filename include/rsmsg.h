/*
 * rsmsg: messaging over RDMA verbs and shared memory, C API.
 *
 * Every function returns RSMSG_OK (0) or a negative RSMSG_ERR_* code; rsmsg_strerror() names a
 * code and rsmsg_last_error() gives the calling thread's last failure in detail. Handles are
 * small structs around 64-bit ids, checked on every call: a closed, freed or made-up handle, or
 * one of another kind, is answered with an error code. See docs/c-api.md.
 */

#ifndef RSMSG_H
#define RSMSG_H

/* Generated from src/capi/ by cbindgen (build.rs): do not edit. */

#include <stddef.h>
#include <stdint.h>

// Success.
#define RSMSG_OK 0

// A pointer argument is NULL.
#define RSMSG_ERR_NULL -1

// An argument is invalid: a zero or overflowing length, a bad string, an out-of-range value.
#define RSMSG_ERR_INVALID_ARG -2

// The handle is not open: never issued, already closed or freed (stale).
#define RSMSG_ERR_BAD_HANDLE -3

// The handle is of another kind (a listener where a connection is expected, ...).
#define RSMSG_ERR_WRONG_KIND -4

// Nothing can be done without waiting: no free partitions (send), no message (receive).
#define RSMSG_ERR_WOULD_BLOCK -5

// Nothing arrived before the timeout.
#define RSMSG_ERR_TIMEOUT -6

// The message is larger than the largest one the connection carries.
#define RSMSG_ERR_TOO_LARGE -7

// The caller's buffer is too small: the message stays queued and its length is reported.
#define RSMSG_ERR_BUFFER_TOO_SMALL -8

// The connection is closed (by the peer, or by a failure earlier).
#define RSMSG_ERR_CLOSED -9

// A configuration value is invalid (environment variable or setter).
#define RSMSG_ERR_CONFIG -10

// The bootstrap manager could not be reached or refused.
#define RSMSG_ERR_BOOTSTRAP -11

// The transport failed (handshake, shared memory, verbs).
#define RSMSG_ERR_TRANSPORT -12

// The peer broke the protocol.
#define RSMSG_ERR_PROTOCOL -13

// No launcher environment (mpirun, srun, PMI) or a malformed one.
#define RSMSG_ERR_LAUNCH -14

// An internal error (a bug): the call was abandoned.
#define RSMSG_ERR_INTERNAL -15

// The receiver refused a large (rendezvous) message: longer than it accepts, or it cannot read
// it; the connection stays usable.
#define RSMSG_ERR_REFUSED -16

// Timeout value for "wait as long as it takes".
#define RSMSG_WAIT_FOREVER -1

// A configuration: transport, segment groups, poll mode, bootstrap manager.
typedef struct rsmsg_config {
  // Opaque id; 0 is never a valid handle.
  uint64_t id;
} rsmsg_config;

// A listening endpoint.
typedef struct rsmsg_listener {
  // Opaque id; 0 is never a valid handle.
  uint64_t id;
} rsmsg_listener;

// A connection to one peer.
typedef struct rsmsg_conn {
  // Opaque id; 0 is never a valid handle.
  uint64_t id;
} rsmsg_conn;

// A received message read in place (zero-copy): `data[0..len]` stays valid and unchanged until
// the view is released (or its connection or mesh closed); its partitions go back to the sender
// only then.
typedef struct rsmsg_view {
  // First byte of the message.
  const uint8_t *data;
  // Length in bytes.
  size_t len;
  // Opaque id of the view; 0 once released.
  uint64_t id;
} rsmsg_view;

// Counters of a connection.
typedef struct rsmsg_stats {
  // Messages sent (data and control).
  uint64_t sent_messages;
  // Payload bytes sent.
  uint64_t sent_bytes;
  // Sends that found no free partition (back-pressure).
  uint64_t send_stalls;
  // Messages received (data and control).
  uint64_t received_messages;
  // Payload bytes received.
  uint64_t received_bytes;
  // Messages released by this side.
  uint64_t releases;
  // Received messages not yet released (views held, pending).
  uint64_t held;
} rsmsg_stats;

// A job's full mesh: a connection to every other rank.
typedef struct rsmsg_mesh {
  // Opaque id; 0 is never a valid handle.
  uint64_t id;
} rsmsg_mesh;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The name of an error code (a static string; unknown codes get a generic text).
//
// Thread safety: any thread, any time.
const char *rsmsg_strerror(int code);

// The detail of the calling thread's last failed call (NUL-terminated, empty if none). The
// string belongs to the library and stays valid until the next failing call on this thread;
// successful calls leave it unchanged.
//
// Thread safety: any thread; each thread has its own.
const char *rsmsg_last_error(void);

// Creates a configuration with the defaults (transport auto, default segment groups, busy
// polling, no manager: peers found in the local socket directory).
//
// Thread safety: any thread.
int rsmsg_config_new(struct rsmsg_config *out_cfg);

// Creates a configuration from the environment: `RSMSG_TRANSPORT` (auto, shm, verbs),
// `RSMSG_GROUPS` (`SIZE:COUNT:SPAN[:SEGMENTS],...`), `RSMSG_POLL` (busy, event,
// `adaptive[:SPINS]`), `RSMSG_MANAGER` (HOST:PORT) with `RSMSG_TOKEN`, and the verbs settings.
// The rendezvous variables (`RSMSG_RNDV_*`, read by every connection when it is made) are
// checked too. `RSMSG_ERR_CONFIG` naming the first malformed variable.
//
// Thread safety: any thread (reads the environment: do not change it concurrently).
int rsmsg_config_from_env(struct rsmsg_config *out_cfg);

// Sets the transport: "auto", "shm" or "verbs".
//
// Thread safety: any thread; calls on one configuration are serialized.
int rsmsg_config_set_transport(struct rsmsg_config cfg, const char *name);

// Sets the segment groups offered for messages sent to endpoints made with this
// configuration: `SIZE:COUNT:SPAN[:SEGMENTS],...` (as `RSMSG_GROUPS`).
//
// Thread safety: any thread; calls on one configuration are serialized.
int rsmsg_config_set_groups(struct rsmsg_config cfg, const char *spec);

// Sets the poll mode: `"busy"`, `"event"` or `"adaptive[:SPINS]"`.
//
// Thread safety: any thread; calls on one configuration are serialized.
int rsmsg_config_set_poll(struct rsmsg_config cfg, const char *mode);

// Uses the bootstrap manager at `addr` ("HOST:PORT", nothing around it) with the shared
// secret `token`. `RSMSG_ERR_INVALID_ARG` for an empty address, `RSMSG_ERR_CONFIG` for one
// that is not HOST:PORT (whitespace around it included) or a token of the wrong length.
//
// Thread safety: any thread; calls on one configuration are serialized.
int rsmsg_config_set_manager(struct rsmsg_config cfg, const char *addr, const char *token);

// Frees a configuration. Listeners, connections and meshes made with it are not affected.
// A second free answers `RSMSG_ERR_BAD_HANDLE`.
//
// Thread safety: any thread.
int rsmsg_config_free(struct rsmsg_config cfg);

// Listens under `name` (1-64 bytes of `[A-Za-z0-9._-]`): peers connect with
// `rsmsg_connect(cfg, name, ...)`. With a manager configured the name is registered there.
//
// Thread safety: any thread.
int rsmsg_listen(struct rsmsg_config cfg, const char *name, struct rsmsg_listener *out_listener);

// Waits for the next peer to connect and completes the handshake.
//
// Thread safety: any thread; several threads may wait here on one listener (each connection
// goes to one of them). `rsmsg_listener_free` on another thread makes a waiting call return
// `RSMSG_ERR_CLOSED`.
int rsmsg_accept(struct rsmsg_listener listener, struct rsmsg_conn *out_conn);

// Stops listening and frees the listener; connections it accepted stay open. Returns once
// the name is unregistered and the listener's threads have stopped (a bootstrap manager that
// does not acknowledge the unregistration is given up on after 10 s); an `rsmsg_accept`
// waiting on another thread returns `RSMSG_ERR_CLOSED`.
//
// Thread safety: any thread.
int rsmsg_listener_free(struct rsmsg_listener listener);

// Connects to the endpoint listening under `name`.
//
// Thread safety: any thread.
int rsmsg_connect(struct rsmsg_config cfg, const char *name, struct rsmsg_conn *out_conn);

// Sends `len` bytes (`len` > 0), waiting for free partitions while the receiver holds them all.
//
// Thread safety: any thread; calls on one connection are serialized.
int rsmsg_send(struct rsmsg_conn conn, const void *buf, size_t len);

// Sends `len` bytes if partitions are free now; `RSMSG_ERR_WOULD_BLOCK` (nothing sent)
// otherwise. A message above the switch point (`rsmsg_max_message`, or
// `RSMSG_RNDV_THRESHOLD` when lower) goes by rendezvous: the receiver reads it from `buf`, so
// the call returns only once it has (as `rsmsg_send` does).
//
// Thread safety: any thread; calls on one connection are serialized.
int rsmsg_try_send(struct rsmsg_conn conn, const void *buf, size_t len);

// Waits for the next message and copies it into `buf` (`cap` bytes; `buf` may be NULL only
// when `cap` is 0); `*out_len` gets its length. A message longer than `cap` is answered with
// `RSMSG_ERR_BUFFER_TOO_SMALL`, its length in `*out_len`, and stays queued for the next
// receive.
//
// Thread safety: any thread; calls on one connection are serialized.
int rsmsg_recv(struct rsmsg_conn conn, void *buf, size_t cap, size_t *out_len);

// As `rsmsg_recv`, without waiting: `RSMSG_ERR_WOULD_BLOCK` when no message has arrived.
//
// Thread safety: any thread; calls on one connection are serialized.
int rsmsg_try_recv(struct rsmsg_conn conn, void *buf, size_t cap, size_t *out_len);

// As `rsmsg_recv`, waiting at most `timeout_ms` milliseconds (> 0): `RSMSG_ERR_TIMEOUT` when
// nothing came.
//
// Thread safety: any thread; calls on one connection are serialized.
int rsmsg_recv_timeout(struct rsmsg_conn conn,
                       void *buf,
                       size_t cap,
                       size_t *out_len,
                       uint32_t timeout_ms);

// Receives the next message in place (zero-copy) into `*out_view`: `timeout_ms` -1 waits as
// long as it takes, 0 does not wait (`RSMSG_ERR_WOULD_BLOCK`), > 0 waits that long
// (`RSMSG_ERR_TIMEOUT`). Release the view with `rsmsg_view_release`; until then its bytes
// stay valid and its partitions stay with this receiver (hold few views at once: the sender
// waits for them). Closing the connection releases every view (their pointers then dangle).
//
// Thread safety: any thread; calls on one connection are serialized.
int rsmsg_recv_view(struct rsmsg_conn conn, int64_t timeout_ms, struct rsmsg_view *out_view);

// Releases a view taken from this connection and clears `*view` (data NULL, len 0, id 0).
// Releasing twice, or on another connection, answers `RSMSG_ERR_BAD_HANDLE`.
//
// Thread safety: any thread; calls on one connection are serialized.
int rsmsg_view_release(struct rsmsg_conn conn, struct rsmsg_view *view);

// The largest message the connection sends eagerly (copied into the peer's partitions in one
// write), in bytes. Larger messages go by rendezvous: the receiver reads them from the sender's
// buffer, and a blocking send returns once it has.
//
// Thread safety: any thread; calls on one connection are serialized.
int rsmsg_max_message(struct rsmsg_conn conn, size_t *out_len);

// Fills `*out_stats` with the connection's counters.
//
// Thread safety: any thread; calls on one connection are serialized.
int rsmsg_stats_get(struct rsmsg_conn conn, struct rsmsg_stats *out_stats);

// Closes the connection (the peer's receives then answer `RSMSG_ERR_CLOSED`), releases its
// views and frees the handle: later calls with it answer `RSMSG_ERR_BAD_HANDLE`.
//
// Thread safety: any thread; waits for a call in progress on the same connection.
int rsmsg_close(struct rsmsg_conn conn);

// This process's rank and the job size, from the launcher's environment: Open MPI's `mpirun`
// (`OMPI_COMM_WORLD_RANK`/`SIZE`), a PMI launcher (`PMI_RANK`/`PMI_SIZE`) or Slurm's `srun`
// (`SLURM_PROCID`/`SLURM_NTASKS`), tried in that order. `RSMSG_ERR_LAUNCH` when none is set
// or the values are malformed (not UTF-8 included), inconsistent, or give a size above
// 1048576 (2^20).
//
// Thread safety: any thread (reads the environment).
int rsmsg_launch_info(uint32_t *out_rank, uint32_t *out_size);

// Joins the job's full mesh: rank and size from the launcher (as `rsmsg_launch_info`), the
// endpoint settings from `cfg`, the mesh settings from the environment: `RSMSG_JOB` (name
// prefix; default the launcher's job id), `RSMSG_EMBED_MANAGER=1` (rank 0 runs the bootstrap
// manager on the port of `RSMSG_MANAGER`, which names rank 0's host), `RSMSG_MESH_TIMEOUT`
// (whole seconds, 1 to 31536000, default 60). Every rank must call it; it returns once this rank is connected to
// every other one.
//
// Thread safety: any thread.
int rsmsg_mesh_init(struct rsmsg_config cfg,
                    struct rsmsg_mesh *out_mesh);

// As `rsmsg_mesh_init`, with the rank and size given (`rank` < `size`) instead of read from a
// launcher. `size` is at most 1048576 (2^20): `RSMSG_ERR_INVALID_ARG` above it.
//
// Thread safety: any thread.
int rsmsg_mesh_init_ranks(struct rsmsg_config cfg,
                          uint32_t rank,
                          uint32_t size,
                          struct rsmsg_mesh *out_mesh);

// This process's rank in the mesh.
//
// Thread safety: any thread; calls on one mesh are serialized.
int rsmsg_mesh_rank(struct rsmsg_mesh mesh, uint32_t *out_rank);

// The number of ranks in the mesh.
//
// Thread safety: any thread; calls on one mesh are serialized.
int rsmsg_mesh_size(struct rsmsg_mesh mesh, uint32_t *out_size);

// The largest message that can be sent to `rank`.
//
// Thread safety: any thread; calls on one mesh are serialized.
int rsmsg_mesh_max_message(struct rsmsg_mesh mesh, uint32_t rank, size_t *out_len);

// Sends `len` bytes (`len` > 0) to `rank` (not this rank), waiting for free partitions under
// back-pressure.
//
// Thread safety: any thread; calls on one mesh are serialized.
int rsmsg_mesh_send(struct rsmsg_mesh mesh, uint32_t rank, const void *buf, size_t len);

// As `rsmsg_mesh_send` without waiting: `RSMSG_ERR_WOULD_BLOCK` (nothing sent) under
// back-pressure. A message above the switch point (`rsmsg_max_message`, or
// `RSMSG_RNDV_THRESHOLD` when lower) goes by rendezvous and returns only once the receiver
// has read it, as `rsmsg_mesh_send` does.
//
// Thread safety: any thread; calls on one mesh are serialized.
int rsmsg_mesh_try_send(struct rsmsg_mesh mesh, uint32_t rank, const void *buf, size_t len);

// Receives the next message from `rank` into `buf` (`cap` bytes; NULL only with `cap` 0);
// `*out_len` gets its length. `timeout_ms`: -1 waits as long as it takes, 0 does not wait
// (`RSMSG_ERR_WOULD_BLOCK`), > 0 waits that long (`RSMSG_ERR_TIMEOUT`). A message longer
// than `cap` is answered with `RSMSG_ERR_BUFFER_TOO_SMALL` and stays queued.
//
// Thread safety: any thread; calls on one mesh are serialized.
int rsmsg_mesh_recv(struct rsmsg_mesh mesh,
                    uint32_t rank,
                    void *buf,
                    size_t cap,
                    size_t *out_len,
                    int64_t timeout_ms);

// Receives the next message from `rank` in place (zero-copy) into `*out_view` (timeouts as
// `rsmsg_mesh_recv`). Release it with `rsmsg_mesh_view_release`; freeing the mesh releases
// every view.
//
// Thread safety: any thread; calls on one mesh are serialized.
int rsmsg_mesh_recv_view(struct rsmsg_mesh mesh,
                         uint32_t rank,
                         int64_t timeout_ms,
                         struct rsmsg_view *out_view);

// Releases a view taken from this mesh and clears `*view`; releasing twice, or on another
// mesh, answers `RSMSG_ERR_BAD_HANDLE`.
//
// Thread safety: any thread; calls on one mesh are serialized.
int rsmsg_mesh_view_release(struct rsmsg_mesh mesh, struct rsmsg_view *view);

// Waits until every rank has called `rsmsg_mesh_barrier` (as many times as this one).
// `RSMSG_ERR_WOULD_BLOCK`: the data messages copied aside while it waited passed their bound
// (`rsmsg_mesh_set_barrier_backlog`, 64 MiB by default); receive them, then call again, which
// resumes this barrier.
//
// Thread safety: any thread; calls on one mesh are serialized.
int rsmsg_mesh_barrier(struct rsmsg_mesh mesh);

// Bounds the bytes of data messages `rsmsg_mesh_barrier` copies aside while it waits, all
// peers together (default 64 MiB; the bound may be passed by one message).
//
// Thread safety: any thread; calls on one mesh are serialized.
int rsmsg_mesh_set_barrier_backlog(struct rsmsg_mesh mesh, size_t bytes);

// Closes every connection of the mesh, releases its views and frees the handle (rank 0's
// embedded manager stops: call `rsmsg_mesh_barrier` first so that no rank is still setting
// up).
//
// Thread safety: any thread; waits for a call in progress on the same mesh.
int rsmsg_mesh_free(struct rsmsg_mesh mesh);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* RSMSG_H */
