/*
 * alltoall: every rank of a job sends a message to every other rank, round after round, and
 * checks every byte of every message it receives (who sent it, for whom, which round, and a
 * pattern over the payload). Start it with a launcher:
 *
 *   mpirun -np 4 ./alltoall [ROUNDS]
 *   srun -n 4 ./alltoall [ROUNDS]
 *   PMI_RANK=i PMI_SIZE=n ./alltoall [ROUNDS]   (n times, i = 0..n-1)
 *
 * Build: cc alltoall.c $(pkg-config --cflags --libs rsmsg) -o alltoall
 */
#include <rsmsg.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t me = 0;

#define CHECK(call)                                                                           \
    do {                                                                                      \
        int rc_ = (call);                                                                     \
        if (rc_ != RSMSG_OK) {                                                                \
            fprintf(stderr, "alltoall rank %u: %s failed: %s (%s)\n", me, #call,              \
                    rsmsg_strerror(rc_), rsmsg_last_error());                                 \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

struct head {
    uint32_t src, dst, round, len;
};

static unsigned char pattern(uint32_t src, uint32_t dst, uint32_t round, size_t i) {
    return (unsigned char)(src * 131 + dst * 17 + round * 7 + i);
}

/* The message rank src sends to rank dst in round r: a header, then a pattern. */
static size_t fill(unsigned char *buf, size_t max, uint32_t src, uint32_t dst, uint32_t r) {
    static const size_t sizes[] = {16, 100, 1000, 4096, 20000, 60000};
    size_t len = sizes[r % (sizeof sizes / sizeof sizes[0])];
    if (len > max)
        len = max;
    struct head h = {src, dst, r, (uint32_t)len};
    memcpy(buf, &h, sizeof h);
    for (size_t i = sizeof h; i < len; i++)
        buf[i] = pattern(src, dst, r, i);
    return len;
}

static int check(const unsigned char *buf, size_t len, uint32_t src, uint32_t dst, uint32_t r) {
    struct head h;
    if (len < sizeof h)
        return 0;
    memcpy(&h, buf, sizeof h);
    if (h.src != src || h.dst != dst || h.round != r || h.len != len)
        return 0;
    for (size_t i = sizeof h; i < len; i++)
        if (buf[i] != pattern(src, dst, r, i))
            return 0;
    return 1;
}

int main(int argc, char **argv) {
    uint32_t rounds = argc > 1 ? (uint32_t)strtoul(argv[1], NULL, 10) : 20;
    rsmsg_config cfg;
    rsmsg_mesh mesh;
    uint32_t size;
    CHECK(rsmsg_config_from_env(&cfg));
    CHECK(rsmsg_mesh_init(cfg, &mesh));
    CHECK(rsmsg_mesh_rank(mesh, &me));
    CHECK(rsmsg_mesh_size(mesh, &size));

    size_t max = SIZE_MAX;
    for (uint32_t p = 0; p < size; p++) {
        size_t m;
        if (p == me)
            continue;
        CHECK(rsmsg_mesh_max_message(mesh, p, &m));
        if (m < max)
            max = m;
    }
    unsigned char *buf = malloc(max == SIZE_MAX ? 64 : max);
    if (!buf)
        return 1;
    unsigned long checked = 0;
    for (uint32_t r = 0; r < rounds; r++) {
        for (uint32_t k = 1; k < size; k++) { /* send to me+1, me+2, ...: spreads the load */
            uint32_t dst = (me + k) % size;
            size_t len = fill(buf, max, me, dst, r);
            CHECK(rsmsg_mesh_send(mesh, dst, buf, len));
        }
        for (uint32_t k = 1; k < size; k++) {
            uint32_t src = (me + size - k) % size;
            int ok;
            if (r % 2 == 0) { /* even rounds: copy into our buffer */
                size_t len = 0;
                CHECK(rsmsg_mesh_recv(mesh, src, buf, max, &len, RSMSG_WAIT_FOREVER));
                ok = check(buf, len, src, me, r);
            } else { /* odd rounds: read in place, then release */
                rsmsg_view v;
                CHECK(rsmsg_mesh_recv_view(mesh, src, RSMSG_WAIT_FOREVER, &v));
                ok = check(v.data, v.len, src, me, r);
                CHECK(rsmsg_mesh_view_release(mesh, &v));
            }
            if (!ok) {
                fprintf(stderr, "alltoall rank %u: round %u: message from rank %u is wrong\n", me, r, src);
                return 1;
            }
            checked++;
        }
        if (r % 4 == 3)
            CHECK(rsmsg_mesh_barrier(mesh));
    }
    CHECK(rsmsg_mesh_barrier(mesh));
    printf("alltoall rank %u of %u: %lu messages checked\n", me, size, checked);
    free(buf);
    CHECK(rsmsg_mesh_free(mesh));
    CHECK(rsmsg_config_free(cfg));
    return 0;
}
