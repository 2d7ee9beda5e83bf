/* The per-image loops of pass-through sharding, in C: shards.native.loops (optional; without a C
 * compiler at install time the same work is done by the Python code in plan.py and writer.py).
 *
 * scan_ends(locations, max_pixels, (jpg_code, png_code, webp_code), ok, key, ext, width, height,
 *           nbytes, file_size, mtime) -> settled
 *     The pass-through scan of plan._scan_one for the local records among `locations`: whole
 *     files (url, -1, -1) and tar members (tar url, offset, length), writing into the columns of a
 *     plan.ScanResults: for each JPEG, PNG or WebP whose header and end (the JPEG or PNG end
 *     marker; the WebP's RIFF size) settle it as a usable image, ok = 1, the content key
 *     (hashlib.sha256 of the size as 8 little-endian bytes, the first 1 KB and the last 1 KB from
 *     byte 1024 on), the extension code, width, height and size, and the file's size and mtime
 *     (float seconds, as os.stat gives them; a tar member: its length and -1.0). Consecutive members
 *     of one tar share one open. Every other record is left with ok = 0 for the Python
 *     scan to decide, with its reason: not local, not opened, another format, no end marker in the
 *     last 1 KB, a header that does not parse, too many pixels. Returns how many it settled.
 *
 * read_into(locations, starts, sizes, buffer, begin) -> index
 *     For i = begin, begin + 1, ...: reads the local record locations[i] (a whole file or a tar
 *     member) into buffer[starts[i]:starts[i] + sizes[i]], checking it has exactly sizes[i] bytes.
 *     Returns the first i it could not do that for (not local, not opened, another size), or len(locations):
 *     the caller reads that one in Python, which says what went wrong.
 *
 * Both do their file reads and checks with the GIL released, so threads of one process can scan
 * or read side by side (plan.scan_all does, with one worker and a core to spare).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define KEY_ENDS 1024         /* plan._KEY_ENDS */
#define FIRST_READ 4096       /* most JPEG headers end within it */
#define HEAD_LIMIT (1 << 20)  /* read no further for a frame header: let Python decide */

#define MATERIAL (8 + 2 * KEY_ENDS)  /* what the content key hashes: size, first and last 1 KB */
#define BATCH 64                      /* records scanned between two holds of the GIL */

static PyObject *sha256;      /* hashlib.sha256 */

/* A local record: a whole file (offset -1) or `length` bytes at `offset` in a tar. */
typedef struct {
    PyObject *url;  /* a reference held while the GIL is released */
    const char *path;
    long long offset, length;
} Record;

/* The record at a location (url, offset, length); 0 if it is not local (s3://, a name with a NUL
 * or not encodable). */
static int local_record(PyObject *location, Record *r)
{
    if (!PyTuple_Check(location) || PyTuple_GET_SIZE(location) != 3)
        return 0;
    PyObject *url = PyTuple_GET_ITEM(location, 0);
    if (!PyUnicode_Check(url) || !PyLong_Check(PyTuple_GET_ITEM(location, 1)) || !PyLong_Check(PyTuple_GET_ITEM(location, 2)))
        return 0;
    r->offset = PyLong_AsLongLong(PyTuple_GET_ITEM(location, 1));
    r->length = PyLong_AsLongLong(PyTuple_GET_ITEM(location, 2));
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (r->offset < -1 || (r->offset >= 0 && r->length < 0))
        return 0;
    Py_ssize_t n;
    const char *path = PyUnicode_AsUTF8AndSize(url, &n);
    if (path == NULL) {
        PyErr_Clear();
        return 0;
    }
    if ((Py_ssize_t)strlen(path) != n || strncmp(path, "s3://", 5) == 0)
        return 0;
    r->path = strncmp(path, "file://", 7) == 0 ? path + 7 : path;
    r->url = url;
    Py_INCREF(url);
    return 1;
}

static void release_records(Record *records, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(records[i].url);
    PyMem_Free(records);
}

/* The open file of the last record, kept for the next one when it is in the same tar. */
typedef struct {
    const char *path;
    int fd;
} Opened;

static int open_record(Opened *o, const Record *r)
{
    if (o->fd >= 0 && r->offset >= 0 && o->path && strcmp(o->path, r->path) == 0)
        return o->fd;
    if (o->fd >= 0)
        close(o->fd);
    o->path = r->path;
    o->fd = open(r->path, O_RDONLY | O_CLOEXEC);
    return o->fd;
}

static void close_record(Opened *o)
{
    if (o->fd >= 0)
        close(o->fd);
    o->fd = -1;
    o->path = NULL;
}

/* pread all of [offset, offset + n) or fail */
static int read_exactly(int fd, uint8_t *out, size_t n, off_t offset)
{
    while (n) {
        ssize_t got = pread(fd, out, n, offset);
        if (got <= 0)
            return -1;
        out += got;
        n -= (size_t)got;
        offset += got;
    }
    return 0;
}

enum { WALK_FOUND, WALK_SHORT, WALK_FAILED };

static int is_sof(uint8_t marker)
{
    return marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
}

/* imaging._jpeg_size: the marker walk to the frame header. WALK_SHORT: it needs more bytes than `n`. */
static int jpeg_size(const uint8_t *d, size_t n, long *width, long *height)
{
    size_t i = 2;
    while (i + 4 <= n) {
        if (d[i] != 0xFF)
            return WALK_FAILED;
        uint8_t marker = d[i + 1];
        if (marker == 0xFF) {
            i += 1;
            continue;
        }
        if (marker == 0xD8 || marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) {
            i += 2;
            continue;
        }
        size_t length = ((size_t)d[i + 2] << 8) | d[i + 3];
        if (is_sof(marker)) {
            if (i + 9 > n)
                return WALK_SHORT;
            *height = ((long)d[i + 5] << 8) | d[i + 6];
            *width = ((long)d[i + 7] << 8) | d[i + 8];
            return WALK_FOUND;
        }
        if (marker == 0xDA || length < 2)
            return WALK_FAILED;
        i += 2 + length;
    }
    return WALK_SHORT;
}

/* Does `end` (the last bytes of the file) end in the JPEG end marker before trailing NUL, CR, LF
 * and spaces? (imaging._quick_size; not when padding fills it: Python then reads the whole file.) */
static int jpeg_ends(const uint8_t *end, size_t n)
{
    while (n && (end[n - 1] == 0 || end[n - 1] == '\r' || end[n - 1] == '\n' || end[n - 1] == ' '))
        n--;
    return n >= 2 && end[n - 2] == 0xFF && end[n - 1] == 0xD9;
}

static const uint8_t PNG_SIGNATURE[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
static const uint8_t PNG_END[12] = {0, 0, 0, 0, 'I', 'E', 'N', 'D', 0xAE, 'B', '`', 0x82};

static uint32_t big_endian32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint32_t little_endian(const uint8_t *p, int bytes)
{
    uint32_t v = 0;
    for (int b = bytes - 1; b >= 0; b--)
        v = (v << 8) | p[b];
    return v;
}

/* imaging._webp_size: the first chunk's frame header (lossy, lossless) or canvas (extended). */
static int webp_size(const uint8_t *d, long *width, long *height)
{
    if (memcmp(d + 12, "VP8 ", 4) == 0 && d[23] == 0x9D && d[24] == 0x01 && d[25] == 0x2A) {
        *width = (long)(little_endian(d + 26, 2) & 0x3FFF);
        *height = (long)(little_endian(d + 28, 2) & 0x3FFF);
        return 1;
    }
    if (memcmp(d + 12, "VP8L", 4) == 0 && d[20] == 0x2F) {
        uint32_t bits = little_endian(d + 21, 4);
        *width = (long)(bits & 0x3FFF) + 1;
        *height = (long)((bits >> 14) & 0x3FFF) + 1;
        return 1;
    }
    if (memcmp(d + 12, "VP8X", 4) == 0) {
        *width = (long)little_endian(d + 24, 3) + 1;
        *height = (long)little_endian(d + 27, 3) + 1;
        return 1;
    }
    return 0;
}

typedef struct {
    Py_buffer ok, key, ext, width, height, nbytes, file_size, mtime;
} Columns;

/* Scan one record into row i of the columns (all but ok and key) and its key material into
 * `material` (MATERIAL bytes; its length to *material_len); 1 if settled, 0 if left to Python.
 * No Python calls: it runs with the GIL released. `head_buf`: HEAD_LIMIT bytes of scratch. */
static int scan_one(Opened *opened, const Record *r, Py_ssize_t i, long long max_pixels, const int *codes, Columns *c,
                    uint8_t *head_buf, uint8_t *material, size_t *material_len)
{
    uint8_t tail[KEY_ENDS];
    int fd = open_record(opened, r);
    if (fd < 0)
        return 0;
    struct stat st;
    off_t base = r->offset < 0 ? 0 : (off_t)r->offset;
    if (r->offset < 0 && (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)))
        return 0;
    long long whole = r->offset < 0 ? (long long)st.st_size : r->length;
    if (whole <= 0)
        return 0;
    size_t size = (size_t)whole, have = size < FIRST_READ ? size : FIRST_READ;
    if (read_exactly(fd, head_buf, have, base) != 0)
        return 0;
    const uint8_t *end;  /* the last bytes of the file: all of it when read whole, else its last 1 KB */
    size_t end_len;
    if (have == size) {
        end = head_buf;
        end_len = size;
    } else {
        if (read_exactly(fd, tail, KEY_ENDS, base + (off_t)(size - KEY_ENDS)) != 0)
            return 0;
        end = tail;
        end_len = KEY_ENDS;
    }
    long width = 0, height = 0;
    int code, jpg_code = codes[0], png_code = codes[1], webp_code = codes[2];
    if (have >= 2 && head_buf[0] == 0xFF && head_buf[1] == 0xD8 && jpeg_ends(end, end_len)) {
        int walk;
        while ((walk = jpeg_size(head_buf, have, &width, &height)) == WALK_SHORT && have < size && have < HEAD_LIMIT) {
            size_t more = have * 4 < HEAD_LIMIT ? have * 4 : HEAD_LIMIT;  /* a big APP segment (EXIF, ICC) */
            more = more < size ? more : size;
            if (read_exactly(fd, head_buf + have, more - have, base + (off_t)have) != 0)
                return 0;
            have = more;
        }
        if (walk != WALK_FOUND)
            return 0;
        code = jpg_code;
    } else if (have >= 24 && memcmp(head_buf, PNG_SIGNATURE, 8) == 0 && memcmp(head_buf + 12, "IHDR", 4) == 0
               && end_len >= 12 && memcmp(end + end_len - 12, PNG_END, 12) == 0) {
        width = (long)big_endian32(head_buf + 16);
        height = (long)big_endian32(head_buf + 20);
        code = png_code;
    } else if (have >= 30 && memcmp(head_buf, "RIFF", 4) == 0 && memcmp(head_buf + 8, "WEBP", 4) == 0
               && (unsigned long long)little_endian(head_buf + 4, 4) + 8 == (unsigned long long)size) {
        if (!webp_size(head_buf, &width, &height))
            return 0;
        code = webp_code;
    } else {
        return 0;
    }
    if (width <= 0 || height <= 0 || width > INT32_MAX || height > INT32_MAX
        || (unsigned long long)width * (unsigned long long)height > (unsigned long long)max_pixels)
        return 0;  /* Python gives the reason */

    /* the content key: plan._ends_key(size, head[:1024], data[max(1024, size - 1024):]) */
    size_t first = size < KEY_ENDS ? size : KEY_ENDS, last_from = size > 2 * KEY_ENDS ? size - KEY_ENDS : KEY_ENDS;
    size_t last = size > last_from ? size - last_from : 0;
    uint64_t le = (uint64_t)size;
    for (int b = 0; b < 8; b++)
        material[b] = (uint8_t)(le >> (8 * b));
    memcpy(material + 8, head_buf, first);
    memcpy(material + 8 + first, end + end_len - last, last);
    *material_len = 8 + first + last;
    ((uint8_t *)c->ext.buf)[i] = (uint8_t)code;
    ((int32_t *)c->width.buf)[i] = (int32_t)width;
    ((int32_t *)c->height.buf)[i] = (int32_t)height;
    ((int64_t *)c->nbytes.buf)[i] = (int64_t)size;
    if (c->file_size.buf)
        ((int64_t *)c->file_size.buf)[i] = (int64_t)size;
    if (c->mtime.buf)  /* as os.stat's st_mtime: seconds + nanoseconds * 1e-9, in double */
        ((double *)c->mtime.buf)[i] = r->offset >= 0 ? -1.0 : (double)st.st_mtim.tv_sec + (double)st.st_mtim.tv_nsec * 1e-9;
    return 1;
}

static int column(PyObject *obj, Py_buffer *view, Py_ssize_t n, Py_ssize_t itemsize, const char *name, int optional)
{
    memset(view, 0, sizeof *view);
    if (optional && obj == Py_None)
        return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0)
        return -1;
    if (view->len != n * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", name, view->len, n * itemsize);
        PyBuffer_Release(view);
        memset(view, 0, sizeof *view);
        return -1;
    }
    return 0;
}

static void release(Columns *c)
{
    Py_buffer *all[] = {&c->ok, &c->key, &c->ext, &c->width, &c->height, &c->nbytes, &c->file_size, &c->mtime};
    for (size_t k = 0; k < sizeof all / sizeof *all; k++)
        if (all[k]->obj)
            PyBuffer_Release(all[k]);
}

static PyObject *scan_ends(PyObject *self, PyObject *args)
{
    PyObject *locations, *ok, *key, *ext, *width, *height, *nbytes, *file_size, *mtime;
    long long max_pixels;
    int codes[3];  /* the ext codes of jpg, png, webp */
    if (!PyArg_ParseTuple(args, "O!L(iii)OOOOOOOO:scan_ends", &PyList_Type, &locations, &max_pixels, &codes[0],
                          &codes[1], &codes[2], &ok, &key, &ext, &width, &height, &nbytes, &file_size, &mtime))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(locations), settled = 0;
    Columns c;
    memset(&c, 0, sizeof c);
    if (column(ok, &c.ok, n, 1, "ok", 0) || column(key, &c.key, n, 32, "key", 0) || column(ext, &c.ext, n, 1, "ext", 0)
        || column(width, &c.width, n, 4, "width", 0) || column(height, &c.height, n, 4, "height", 0)
        || column(nbytes, &c.nbytes, n, 8, "nbytes", 0) || column(file_size, &c.file_size, n, 8, "file_size", 1)
        || column(mtime, &c.mtime, n, 8, "mtime", 1)) {
        release(&c);
        return NULL;
    }
    Record *records = PyMem_Calloc(n ? n : 1, sizeof *records);
    uint8_t *head_buf = PyMem_RawMalloc(HEAD_LIMIT), *materials = PyMem_RawMalloc(BATCH * MATERIAL);
    size_t lengths[BATCH];
    PyObject *result = NULL;
    Opened opened = {NULL, -1};
    if (records == NULL || head_buf == NULL || materials == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!local_record(PyList_GET_ITEM(locations, i), &records[i]))
            records[i].path = NULL;
    for (Py_ssize_t lo = 0; lo < n; lo += BATCH) {
        Py_ssize_t hi = lo + BATCH < n ? lo + BATCH : n;
        /* the reads and checks of a batch with the GIL released (other threads run meanwhile), then
           the content keys of those it settled */
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = lo; i < hi; i++)
            if (!records[i].path || !scan_one(&opened, &records[i], i, max_pixels, codes, &c, head_buf,
                                              materials + (i - lo) * MATERIAL, &lengths[i - lo]))
                lengths[i - lo] = 0;
        Py_END_ALLOW_THREADS
        for (Py_ssize_t i = lo; i < hi; i++) {
            if (!lengths[i - lo])
                continue;
            PyObject *hash = PyObject_CallFunction(sha256, "y#", (const char *)(materials + (i - lo) * MATERIAL),
                                                   (Py_ssize_t)lengths[i - lo]);
            PyObject *digest = hash ? PyObject_CallMethod(hash, "digest", NULL) : NULL;
            Py_XDECREF(hash);
            if (digest == NULL || !PyBytes_Check(digest) || PyBytes_GET_SIZE(digest) != 32) {
                Py_XDECREF(digest);
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_RuntimeError, "sha256 digest is not 32 bytes");
                goto done;
            }
            memcpy((uint8_t *)c.key.buf + 32 * i, PyBytes_AS_STRING(digest), 32);
            Py_DECREF(digest);
            ((uint8_t *)c.ok.buf)[i] = 1;
            settled++;
        }
    }
    result = PyLong_FromSsize_t(settled);
done:
    close_record(&opened);
    if (records)
        release_records(records, n);
    PyMem_RawFree(head_buf);
    PyMem_RawFree(materials);
    release(&c);
    return result;
}

static PyObject *read_into(PyObject *self, PyObject *args)
{
    PyObject *locations, *starts, *sizes;
    Py_buffer out;
    Py_ssize_t begin;
    if (!PyArg_ParseTuple(args, "O!O!O!w*n:read_into", &PyList_Type, &locations, &PyList_Type, &starts,
                          &PyList_Type, &sizes, &out, &begin))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(locations), stop = begin < 0 ? 0 : begin;
    begin = stop;
    Record *records = PyMem_Calloc(n ? n : 1, sizeof *records);
    Py_ssize_t *where = PyMem_Calloc(2 * (n ? n : 1), sizeof *where);  /* start, size per record */
    PyObject *result = NULL;
    if (records == NULL || where == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (PyList_GET_SIZE(starts) != n || PyList_GET_SIZE(sizes) != n) {
        PyErr_SetString(PyExc_ValueError, "read_into: locations, starts and sizes differ in length");
        goto done;
    }
    /* the records up to the first one left to Python, checked with the GIL held */
    for (; stop < n; stop++) {
        Py_ssize_t start = PyLong_AsSsize_t(PyList_GET_ITEM(starts, stop));
        Py_ssize_t size = PyLong_AsSsize_t(PyList_GET_ITEM(sizes, stop));
        if (PyErr_Occurred())
            goto done;
        if (start < 0 || size < 0 || start > out.len || size > out.len - start) {
            PyErr_Format(PyExc_ValueError, "read_into: record %zd (%zd bytes at %zd) is outside the buffer", stop, size,
                         start);
            goto done;
        }
        if (!local_record(PyList_GET_ITEM(locations, stop), &records[stop]))
            break;
        where[2 * stop] = start;
        where[2 * stop + 1] = size;
        if (records[stop].offset >= 0 && records[stop].length != size) {
            stop++;  /* read by Python, which reports it */
            break;
        }
    }
    Py_ssize_t i = begin;
    Py_BEGIN_ALLOW_THREADS
    uint8_t spare;
    Opened opened = {NULL, -1};
    for (; i < stop; i++) {
        const Record *record = &records[i];
        Py_ssize_t start = where[2 * i], size = where[2 * i + 1];
        if (record->offset >= 0 && record->length != size)
            break;
        int fd = open_record(&opened, record);
        if (fd < 0)
            break;
        ssize_t got;
        if (record->offset >= 0) {
            got = pread(fd, (uint8_t *)out.buf + start, (size_t)size, (off_t)record->offset);
        } else {  /* one byte more than expected: a file that grew reads long */
            struct iovec iov[2] = {{(uint8_t *)out.buf + start, (size_t)size}, {&spare, 1}};
            got = readv(fd, iov, 2);
        }
        if (got != size)
            break;
    }
    close_record(&opened);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(i);
done:
    if (records)
        release_records(records, n);
    PyMem_Free(where);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"scan_ends", scan_ends, METH_VARARGS, "The pass-through scan of local JPEG, PNG and WebP records (see the module source)."},
    {"read_into", read_into, METH_VARARGS, "Read local files and tar members into a buffer (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "shards._native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *hashlib = PyImport_ImportModule("hashlib");
    if (hashlib == NULL)
        return NULL;
    sha256 = PyObject_GetAttrString(hashlib, "sha256");
    Py_DECREF(hashlib);
    if (sha256 == NULL)
        return NULL;
    return PyModule_Create(&module);
}
