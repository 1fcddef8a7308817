/*
 * passthrough_probe: the smallest FUSE file system that can answer the questions
 * tests/bench/passthrough.py asks of FUSE passthrough on this kernel (issue 16, item 3).
 *
 *     passthrough_probe [--no-passthrough] [--keep-cache] [--size BYTES]
 *                       BACKING MOUNTPOINT [-o OPTIONS]
 *
 * The root directory holds two files:
 *   data    its bytes come from BACKING; st_size is --size (default: BACKING's size), so
 *           that a "file" can be presented over a backing file that is bigger than it, the
 *           way a rez-lazyfs cache file (blocks with MAC trailers) is bigger than the file
 *           it holds. Each open registers BACKING with the kernel
 *           (FUSE_DEV_IOC_BACKING_OPEN through fuse_passthrough_open) and replies with
 *           its backing id, unless --no-passthrough; --keep-cache sets FOPEN_KEEP_CACHE
 *           on that reply, to see what the kernel does with the combination.
 *   status  "key=value" lines the harness reads back: whether the kernel granted the
 *           passthrough capability, how many opens registered a backing file, the errno
 *           of the last refused registration, how many READ requests reached the daemon
 *           (zero when the kernel really passes reads through). Served with direct_io so
 *           that every read of it asks the daemon afresh.
 * Built by the harness against the libfuse >= 3.17 it builds; it is not part of rez-lazyfs.
 */
#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 17)
#define _GNU_SOURCE

#include <fuse_lowlevel.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { INO_ROOT = FUSE_ROOT_ID, INO_DATA, INO_STATUS };

static struct {
    const char *backing;
    long long size;
    int want_passthrough;
    int keep_cache;
    /* what the harness reads back from "status" */
    int granted;
    int backing_opens;
    int backing_refusals;
    int last_refusal_errno;
    long long read_requests;
    long long read_bytes;
} probe;

static void fill_attr(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_uid = getuid();
    st->st_gid = getgid();
    if (ino == INO_ROOT) {
        st->st_mode = S_IFDIR | 0555;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0444;
        st->st_nlink = 1;
        st->st_size = ino == INO_DATA ? probe.size : 4096;
    }
}

static void probe_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    if (probe.want_passthrough)
        probe.granted = fuse_set_feature_flag(conn, FUSE_CAP_PASSTHROUGH);
}

static void probe_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e;
    memset(&e, 0, sizeof(e));
    if (parent != INO_ROOT) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (strcmp(name, "data") == 0)
        e.ino = INO_DATA;
    else if (strcmp(name, "status") == 0)
        e.ino = INO_STATUS;
    else {
        fuse_reply_err(req, ENOENT);
        return;
    }
    /* status changes under the kernel's feet: no attribute caching for it */
    e.attr_timeout = e.entry_timeout = e.ino == INO_DATA ? 60.0 : 0.0;
    fill_attr(e.ino, &e.attr);
    fuse_reply_entry(req, &e);
}

static void probe_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    if (ino != INO_ROOT && ino != INO_DATA && ino != INO_STATUS) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill_attr(ino, &st);
    fuse_reply_attr(req, &st, ino == INO_DATA ? 60.0 : 0.0);
}

static void probe_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if ((fi->flags & O_ACCMODE) != O_RDONLY) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if (ino == INO_STATUS) {
        fi->direct_io = 1;
        fi->fh = (uint64_t)-1;
        fuse_reply_open(req, fi);
        return;
    }
    if (ino != INO_DATA) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    int fd = open(probe.backing, O_RDONLY);
    if (fd < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    fi->fh = (uint64_t)fd;
    fi->keep_cache = probe.keep_cache;
    if (probe.want_passthrough && probe.granted) {
        /* One registration per open is the simplest correct use: the kernel allows one
         * backing file per inode while it is open, and every open here names the same one. */
        errno = 0;
        int id = fuse_passthrough_open(req, fd);
        if (id > 0) {
            probe.backing_opens++;
            fi->backing_id = id;
        } else {
            probe.backing_refusals++;
            probe.last_refusal_errno = errno;
        }
    }
    fuse_reply_open(req, fi);
}

static void probe_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    if (ino == INO_STATUS) {
        char text[4096];
        int n = snprintf(text, sizeof(text),
                         "granted=%d\nbacking_opens=%d\nbacking_refusals=%d\n"
                         "last_refusal_errno=%d\nread_requests=%lld\nread_bytes=%lld\n",
                         probe.granted, probe.backing_opens, probe.backing_refusals,
                         probe.last_refusal_errno, probe.read_requests,
                         probe.read_bytes);
        if (off >= n) {
            fuse_reply_buf(req, NULL, 0);
            return;
        }
        size_t left = (size_t)(n - off);
        fuse_reply_buf(req, text + off, size < left ? size : left);
        return;
    }
    /* Only reached when the kernel did not pass the read through. Clamp to the
     * presented size, as a real file system would. */
    probe.read_requests++;
    if (off >= probe.size) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    if ((long long)(off + size) > probe.size)
        size = (size_t)(probe.size - off);
    char *buf = malloc(size ? size : 1);
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    ssize_t got = pread((int)fi->fh, buf, size, off);
    if (got < 0)
        fuse_reply_err(req, errno);
    else {
        probe.read_bytes += got;
        fuse_reply_buf(req, buf, (size_t)got);
    }
    free(buf);
}

static void probe_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (ino == INO_DATA) {
        if (fi->backing_id > 0)
            fuse_passthrough_close(req, fi->backing_id);
        close((int)fi->fh);
    }
    fuse_reply_err(req, 0);
}

static const struct fuse_lowlevel_ops probe_ops = {
    .init = probe_init,
    .lookup = probe_lookup,
    .getattr = probe_getattr,
    .open = probe_open,
    .read = probe_read,
    .release = probe_release,
};

int main(int argc, char *argv[])
{
    struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
    const char *positional[2] = {NULL, NULL};
    int npositional = 0;
    int ret = 1;

    probe.want_passthrough = 1;
    probe.size = -1;
    fuse_opt_add_arg(&args, argv[0]);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--no-passthrough") == 0)
            probe.want_passthrough = 0;
        else if (strcmp(argv[i], "--keep-cache") == 0)
            probe.keep_cache = 1;
        else if (strcmp(argv[i], "--size") == 0 && i + 1 < argc)
            probe.size = atoll(argv[++i]);
        else if (strcmp(argv[i], "-o") == 0 && i + 1 < argc) {
            fuse_opt_add_arg(&args, "-o");
            fuse_opt_add_arg(&args, argv[++i]);
        } else if (npositional < 2)
            positional[npositional++] = argv[i];
        else {
            fprintf(stderr, "passthrough_probe: unexpected argument %s\n", argv[i]);
            return 2;
        }
    }
    if (npositional != 2) {
        fprintf(stderr, "usage: passthrough_probe [--no-passthrough] [--keep-cache] "
                        "[--size BYTES] BACKING MOUNTPOINT [-o OPTIONS]\n");
        return 2;
    }
    probe.backing = positional[0];
    struct stat st;
    if (stat(probe.backing, &st) != 0) {
        perror(probe.backing);
        return 1;
    }
    if (probe.size < 0)
        probe.size = st.st_size;

    struct fuse_session *se = fuse_session_new(&args, &probe_ops, sizeof(probe_ops), NULL);
    if (!se)
        goto out_args;
    if (fuse_set_signal_handlers(se) != 0)
        goto out_session;
    if (fuse_session_mount(se, positional[1]) != 0)
        goto out_signals;
    /* the loop returns the number of the signal that ended it: a clean stop */
    int stopped_by = fuse_session_loop(se);
    ret = stopped_by != 0 && stopped_by != SIGTERM && stopped_by != SIGINT &&
          stopped_by != SIGHUP;
    fuse_session_unmount(se);
out_signals:
    fuse_remove_signal_handlers(se);
out_session:
    fuse_session_destroy(se);
out_args:
    fuse_opt_free_args(&args);
    return ret;
}
