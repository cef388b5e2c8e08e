/*
 * pingpong: two processes, one listening, one connecting; the client sends messages of growing
 * sizes with a known pattern, the server echoes each one back from a zero-copy view, and the
 * client checks every byte of every echo.
 *
 *   ./pingpong serve NAME [ROUNDS]     (start first, or at the same time)
 *   ./pingpong connect NAME [ROUNDS]
 *
 * Settings come from the environment (RSMSG_TRANSPORT, RSMSG_MANAGER, RSMSG_TOKEN, ...).
 * Build: cc pingpong.c $(pkg-config --cflags --libs rsmsg) -o pingpong
 */
#include <rsmsg.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(call)                                                                           \
    do {                                                                                      \
        int rc_ = (call);                                                                     \
        if (rc_ != RSMSG_OK) {                                                                \
            fprintf(stderr, "pingpong: %s failed: %s (%s)\n", #call, rsmsg_strerror(rc_),      \
                    rsmsg_last_error());                                                      \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

static unsigned char pattern(size_t round, size_t i) { return (unsigned char)(round * 31 + i * 7 + 1); }

static void pause_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "serve") != 0 && strcmp(argv[1], "connect") != 0)) {
        fprintf(stderr, "usage: %s serve|connect NAME [ROUNDS]\n", argv[0]);
        return 2;
    }
    const char *name = argv[2];
    size_t rounds = argc > 3 ? (size_t)strtoul(argv[3], NULL, 10) : 100;
    rsmsg_config cfg;
    CHECK(rsmsg_config_from_env(&cfg));
    rsmsg_conn conn;
    size_t max;

    if (strcmp(argv[1], "serve") == 0) {
        rsmsg_listener l;
        CHECK(rsmsg_listen(cfg, name, &l));
        printf("pingpong: listening as %s\n", name);
        fflush(stdout);
        CHECK(rsmsg_accept(l, &conn));
        for (size_t r = 0; r < rounds; r++) {
            rsmsg_view v;
            CHECK(rsmsg_recv_view(conn, RSMSG_WAIT_FOREVER, &v));
            CHECK(rsmsg_send(conn, v.data, v.len)); /* echo straight from the target segment */
            CHECK(rsmsg_view_release(conn, &v));
        }
        CHECK(rsmsg_listener_free(l));
        /* Wait until the client has closed, so that no echo is lost. */
        char b[1];
        size_t n;
        int rc = rsmsg_recv_timeout(conn, b, sizeof b, &n, 10000);
        if (rc != RSMSG_ERR_CLOSED) {
            fprintf(stderr, "pingpong: expected the client to close, got %s\n", rsmsg_strerror(rc));
            return 1;
        }
        printf("pingpong: served %zu round trips\n", rounds);
    } else {
        int rc = RSMSG_ERR_TRANSPORT;
        for (int tries = 0; tries < 200; tries++) { /* the server may not listen yet */
            rc = rsmsg_connect(cfg, name, &conn);
            if (rc == RSMSG_OK)
                break;
            pause_ms(50);
        }
        CHECK(rc);
        CHECK(rsmsg_max_message(conn, &max));
        unsigned char *out = malloc(max), *in = malloc(max);
        if (!out || !in)
            return 1;
        size_t checked = 0, len = 1;
        for (size_t r = 0; r < rounds; r++) {
            len = len * 2 > max ? 1 : len * 2;
            for (size_t i = 0; i < len; i++)
                out[i] = pattern(r, i);
            CHECK(rsmsg_send(conn, out, len));
            size_t got = 0;
            CHECK(rsmsg_recv(conn, in, max, &got));
            if (got != len || memcmp(in, out, len) != 0) {
                fprintf(stderr, "pingpong: round %zu: echo of %zu bytes differs (got %zu)\n", r, len, got);
                return 1;
            }
            checked += got;
        }
        rsmsg_stats st;
        CHECK(rsmsg_stats_get(conn, &st));
        printf("pingpong: %zu round trips checked (%zu bytes), %llu messages sent\n", rounds, checked,
               (unsigned long long)st.sent_messages);
        free(out);
        free(in);
    }
    CHECK(rsmsg_close(conn));
    CHECK(rsmsg_config_free(cfg));
    return 0;
}
