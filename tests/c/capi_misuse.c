/*
 * The C API misused from C: every call below must be answered with the expected error code
 * (no crash, no undefined behaviour). Prints "N passed, M failed" and exits non-zero on a failure.
 * Built and run by ci/stages/30-capi against the installed header and library.
 */
#include <rsmsg.h>

#include <stdio.h>
#include <string.h>

static int passed, failed;

#define EXPECT(call, want)                                                                    \
    do {                                                                                      \
        int rc_ = (call);                                                                     \
        if (rc_ == (want)) {                                                                  \
            passed++;                                                                         \
        } else {                                                                              \
            failed++;                                                                         \
            fprintf(stderr, "FAIL %s:%d: %s gave %d (%s), want %s\n", __FILE__, __LINE__, #call, rc_, \
                    rsmsg_last_error(), #want);                                               \
        }                                                                                     \
    } while (0)

int main(void) {
    rsmsg_config cfg, bad_cfg = {0};
    rsmsg_listener l;
    rsmsg_conn c = {0};
    rsmsg_view v = {0};
    char buf[8];
    size_t n;
    uint32_t r;

    EXPECT(rsmsg_config_new(NULL), RSMSG_ERR_NULL);
    EXPECT(rsmsg_config_new(&cfg), RSMSG_OK);
    EXPECT(rsmsg_config_set_transport(cfg, NULL), RSMSG_ERR_NULL);
    EXPECT(rsmsg_config_set_transport(cfg, "carrier-pigeon"), RSMSG_ERR_CONFIG);
    EXPECT(rsmsg_config_set_groups(cfg, "1:2:3"), RSMSG_ERR_CONFIG);
    EXPECT(rsmsg_config_set_transport(cfg, "shm"), RSMSG_OK);
    EXPECT(rsmsg_config_set_poll(bad_cfg, "busy"), RSMSG_ERR_BAD_HANDLE);
    EXPECT(rsmsg_listen(cfg, "bad/name", &l), RSMSG_ERR_CONFIG);
    EXPECT(rsmsg_listen(cfg, "capi-misuse-c", NULL), RSMSG_ERR_NULL);
    EXPECT(rsmsg_send(c, "x", 1), RSMSG_ERR_BAD_HANDLE);
    EXPECT(rsmsg_send((rsmsg_conn){cfg.id}, "x", 1), RSMSG_ERR_WRONG_KIND);
    EXPECT(rsmsg_mesh_barrier((rsmsg_mesh){cfg.id}), RSMSG_ERR_WRONG_KIND);
    EXPECT(rsmsg_mesh_set_barrier_backlog((rsmsg_mesh){cfg.id}, 1), RSMSG_ERR_WRONG_KIND);
    EXPECT(rsmsg_mesh_set_barrier_backlog((rsmsg_mesh){0}, 1), RSMSG_ERR_BAD_HANDLE);
    EXPECT(rsmsg_recv((rsmsg_conn){cfg.id}, buf, sizeof buf, NULL), RSMSG_ERR_NULL);
    EXPECT(rsmsg_recv((rsmsg_conn){cfg.id}, NULL, 8, &n), RSMSG_ERR_NULL);
    EXPECT(rsmsg_recv_timeout((rsmsg_conn){cfg.id}, buf, sizeof buf, &n, 0), RSMSG_ERR_INVALID_ARG);
    EXPECT(rsmsg_recv_view((rsmsg_conn){cfg.id}, -7, &v), RSMSG_ERR_INVALID_ARG);
    EXPECT(rsmsg_view_release((rsmsg_conn){cfg.id}, &v), RSMSG_ERR_BAD_HANDLE);
    EXPECT(rsmsg_view_release((rsmsg_conn){cfg.id}, NULL), RSMSG_ERR_NULL);
    EXPECT(rsmsg_mesh_send((rsmsg_mesh){0}, 1, "x", 0), RSMSG_ERR_INVALID_ARG);
    EXPECT(rsmsg_launch_info(&r, NULL), RSMSG_ERR_NULL);
    EXPECT(rsmsg_mesh_init_ranks(cfg, 4, 4, &(rsmsg_mesh){0}), RSMSG_ERR_LAUNCH);

    /* Double free and use after free (connections: tests/capi_misuse.rs). */
    EXPECT(rsmsg_listen(cfg, "capi-misuse-c", &l), RSMSG_OK);
    EXPECT(rsmsg_listener_free(l), RSMSG_OK);
    EXPECT(rsmsg_listener_free(l), RSMSG_ERR_BAD_HANDLE);
    EXPECT(rsmsg_accept(l, &c), RSMSG_ERR_BAD_HANDLE);
    EXPECT(rsmsg_config_free(cfg), RSMSG_OK);
    EXPECT(rsmsg_config_free(cfg), RSMSG_ERR_BAD_HANDLE);
    EXPECT(rsmsg_connect(cfg, "capi-misuse-c", &c), RSMSG_ERR_BAD_HANDLE);
    if (strlen(rsmsg_last_error()) == 0) {
        failed++;
        fprintf(stderr, "FAIL: rsmsg_last_error is empty after a failure\n");
    } else {
        passed++;
    }
    if (strcmp(rsmsg_strerror(RSMSG_ERR_WOULD_BLOCK), rsmsg_strerror(12345)) == 0) {
        failed++;
        fprintf(stderr, "FAIL: rsmsg_strerror does not name RSMSG_ERR_WOULD_BLOCK\n");
    } else {
        passed++;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
