/* logbroker.storage._records: the records of one RecordBatch v2 straight into Message tuples.
 *
 * The client's hot loop (decode_batch in record_batch.py, which is the reference and the fallback).
 * decode_records(buf, pos, size, topic, partition, skip, message_cls) -> list | None
 *
 * Called only for a batch whose CRC-32C the caller has checked, uncompressed, CreateTime and not a
 * control batch. It returns every record whose offsetDelta is >= skip as
 * message_cls(topic, partition, baseOffset + offsetDelta, key, value, headers,
 * baseTimestamp + timestampDelta), exactly what the Python decoder returns, or None for anything
 * it does not expect (the Python decoder then raises its precise error, or decodes what it
 * accepts). It never reads outside [pos, pos + size) and allocates nothing whose size comes from
 * an unchecked length: every length is checked against the end of its record first, and every
 * record's end against the end of the batch.
 *
 * What it reads, relative to pos (big-endian; the full header is documented in record_batch.py)::
 *
 *     offset size field
 *     0      8    baseOffset      int64
 *     8      4    batchLength     int32   must equal size - 12
 *     16     1    magic           int8    must be 2
 *     21     2    attributes      int16   compression, timestamp type and control bits must be 0
 *     27     8    baseTimestamp   int64
 *     57     4    recordCount     int32   1 .. (size - 61) / 7 (a record takes at least 7 bytes)
 *     61     ...  recordCount records, which must end exactly at pos + size
 *
 * Each record (varints zigzag-encoded, at most 10 bytes, values within int64)::
 *
 *     length varint          bytes after this varint, all of them inside the batch
 *     attributes int8        ignored
 *     timestampDelta varint
 *     offsetDelta varint
 *     keyLength varint       negative: key None
 *     key bytes
 *     valueLength varint     negative: value None
 *     value bytes
 *     headerCount varint     0 .. remaining bytes of the record / 2
 *     headers: (keyLength varint >= 0 | key, UTF-8 decoded with "replace" |
 *               valueLength varint, negative: None | value)*
 *
 * and the record must end exactly where its length says. Keys, values and header values come
 * back as bytes, headers as a tuple of (str, bytes | None) tuples (the shared empty tuple when a
 * record has none).
 *
 * Garbage collection: the messages are built with the cyclic GC paused, and a message without
 * headers is left untracked (new_message says why): without this the GC costs more than the
 * decoding.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#define HEADER_SIZE 61
#define LOG_OVERHEAD 12
#define MIN_RECORD_SIZE 7  /* length, attributes, two deltas, key and value lengths, header count */
#define MIN_HEADER_SIZE 2  /* key length, value length */
#define MAGIC 2
#define ATTR_REFUSED 0x2F  /* compression (0x07), LogAppendTime (0x08), control (0x20) */
#define MESSAGE_FIELDS 7

static int64_t
read_be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) {
        v = (v << 8) | p[i];
    }
    return (int64_t)v;
}

static int32_t
read_be32(const unsigned char *p)
{
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]);
}

static inline int64_t
unzigzag(uint64_t z)
{
    return (int64_t)(z >> 1) ^ -(int64_t)(z & 1);
}

/* The zigzag varint at *pp, which must end before `end`: 0 and *pp moved past it, or -1 (runs
 * past `end`, or longer than 10 bytes, or above 64 bits). */
static inline int
read_varint(const unsigned char **pp, const unsigned char *end, int64_t *out)
{
    const unsigned char *p = *pp;
    if (p >= end) {
        return -1;
    }
    uint64_t z = *p++;
    if (z >= 0x80) {
        z &= 0x7F;
        for (int shift = 7;; shift += 7) {
            if (p >= end) {
                return -1;
            }
            uint64_t b = *p++;
            if (shift == 63) {
                if (b > 1) {
                    return -1;
                }
                z |= b << 63;
                break;
            }
            z |= (b & 0x7F) << shift;
            if (b < 0x80) {
                break;
            }
        }
    }
    *pp = p;
    *out = unzigzag(z);
    return 0;
}

/* A length varint at *pp for a field that must fit before `end`: 0 with *len (negative: null), or
 * -1. */
static inline int
read_length(const unsigned char **pp, const unsigned char *end, int64_t *len)
{
    if (read_varint(pp, end, len) < 0) {
        return -1;
    }
    if (*len > (int64_t)(end - *pp)) {
        return -1;
    }
    return 0;
}

/* bytes of `len` bytes at *pp (None if len < 0), *pp moved past them; NULL on allocation failure.
 * The caller has checked len against the record end. */
static inline PyObject *
take_bytes(const unsigned char **pp, int64_t len)
{
    if (len < 0) {
        Py_RETURN_NONE;
    }
    PyObject *b = PyBytes_FromStringAndSize((const char *)*pp, (Py_ssize_t)len);
    *pp += len;
    return b;
}

/* The `count` headers at *pp, which must fit before `end`. With `out` NULL they are only checked;
 * otherwise *out gets a new tuple. Returns 1 done, 0 malformed, -1 with an exception set. */
static int
read_headers(const unsigned char **pp, const unsigned char *end, int64_t count, PyObject **out)
{
    const unsigned char *p = *pp;
    PyObject *list = NULL;
    if (count < 0 || count > (int64_t)(end - p) / MIN_HEADER_SIZE) {
        return 0;
    }
    if (out != NULL) {
        list = PyTuple_New((Py_ssize_t)count);
        if (list == NULL) {
            return -1;
        }
    }
    for (int64_t i = 0; i < count; i++) {
        int64_t kl, vl;
        if (read_length(&p, end, &kl) < 0 || kl < 0) {
            goto malformed;
        }
        const unsigned char *key = p;
        p += kl;
        if (read_length(&p, end, &vl) < 0) {
            goto malformed;
        }
        if (list == NULL) {
            if (vl > 0) {
                p += vl;
            }
            continue;
        }
        PyObject *hk = PyUnicode_DecodeUTF8((const char *)key, (Py_ssize_t)kl, "replace");
        if (hk == NULL) {
            goto error;
        }
        PyObject *hv = take_bytes(&p, vl);
        if (hv == NULL) {
            Py_DECREF(hk);
            goto error;
        }
        PyObject *pair = PyTuple_New(2);
        if (pair == NULL) {
            Py_DECREF(hk);
            Py_DECREF(hv);
            goto error;
        }
        PyTuple_SET_ITEM(pair, 0, hk);
        PyTuple_SET_ITEM(pair, 1, hv);
        PyTuple_SET_ITEM(list, (Py_ssize_t)i, pair);
    }
    *pp = p;
    if (out != NULL) {
        *out = list;
    }
    return 1;
malformed:
    Py_XDECREF(list);  /* items not yet set are NULL: tuple_dealloc skips them */
    return 0;
error:
    Py_DECREF(list);
    return -1;
}

/* message_cls(topic, partition, offset, key, value, headers, ts): a new reference, or NULL with
 * an exception set. Steals `headers`; key and value are copied from the batch (len < 0: None).
 *
 * Every item is made first, so the tuple is complete when it exists. It is allocated untracked
 * (PyObject_GC_NewVar, as tuples themselves are), and stays out of the cyclic collector when the
 * record has no headers: such a message holds only strings, ints, bytes, None and the empty tuple,
 * which cannot reach back to it (CPython's collector untracks such tuples itself, but only once it
 * has walked them). Otherwise a caller keeping the last batch while the next one is decoded pays a
 * collection walking every live message (and moving it up a generation, to be walked again):
 * ~0.06 us of 0.17 per record in the consumer. Messages with headers are tracked as usual. */
static PyObject *
new_message(PyTypeObject *tp, PyObject *topic, PyObject *partition, int64_t offset,
            const unsigned char *key, int64_t kl, const unsigned char *value, int64_t vl,
            PyObject *headers, PyObject *ts)
{
    PyObject *off = PyLong_FromLongLong(offset);
    PyObject *k = off == NULL ? NULL : take_bytes(&key, kl);
    PyObject *v = k == NULL ? NULL : take_bytes(&value, vl);
    PyObject *m = v == NULL ? NULL : (PyObject *)PyObject_GC_NewVar(PyTupleObject, tp, MESSAGE_FIELDS);
    if (m == NULL) {
        Py_XDECREF(off);
        Py_XDECREF(k);
        Py_XDECREF(v);
        Py_DECREF(headers);
        return NULL;
    }
#if PY_VERSION_HEX >= 0x030E0000
    ((PyTupleObject *)m)->ob_hash = -1;  /* 3.14's tuple hash cache: "not computed" */
#endif
    Py_INCREF(topic);
    PyTuple_SET_ITEM(m, 0, topic);
    Py_INCREF(partition);
    PyTuple_SET_ITEM(m, 1, partition);
    PyTuple_SET_ITEM(m, 2, off);
    PyTuple_SET_ITEM(m, 3, k);
    PyTuple_SET_ITEM(m, 4, v);
    PyTuple_SET_ITEM(m, 5, headers);
    Py_INCREF(ts);
    PyTuple_SET_ITEM(m, 6, ts);
    if (PyTuple_GET_SIZE(headers) != 0) {
        PyObject_GC_Track(m);
    }
    return m;
}

/* The records of the batch at `batch` (`size` bytes, inside the caller's buffer) into *result.
 * Returns 1 done, 0 refused (malformed or unexpected), -1 with an exception set. */
static int
decode(const unsigned char *batch, Py_ssize_t size, PyObject *topic, PyObject *partition,
       int64_t skip, PyTypeObject *tp, PyObject **result)
{
    const unsigned char *end = batch + size;
    const unsigned char *p = batch + HEADER_SIZE;
    PyObject *out = NULL;
    PyObject *ts_obj = NULL;  /* the timestamp of the last record returned, reused while td repeats */
    int64_t ts_td = 0;
    Py_ssize_t n = 0;
    int status = 0;

    if ((int64_t)read_be32(batch + 8) != (int64_t)size - LOG_OVERHEAD || batch[16] != MAGIC
        || batch[22] & ATTR_REFUSED) {
        return 0;
    }
    const int64_t base_offset = read_be64(batch);
    const int64_t base_ts = read_be64(batch + 27);
    const int32_t count = read_be32(batch + 57);
    if (count <= 0 || count > (size - HEADER_SIZE) / MIN_RECORD_SIZE) {
        return 0;
    }
    out = PyList_New(count);
    if (out == NULL) {
        return -1;
    }
    for (int32_t i = 0; i < count; i++) {
        int64_t len, td, od, kl, vl, hc, offset, ts;
        const unsigned char *rec_end, *key, *value;
        PyObject *headers = NULL, *m;
        if (read_length(&p, end, &len) < 0 || len < MIN_RECORD_SIZE - 1) {
            goto done;
        }
        rec_end = p + len;
        p++;  /* attributes */
        if (read_varint(&p, rec_end, &td) < 0 || read_varint(&p, rec_end, &od) < 0
            || read_length(&p, rec_end, &kl) < 0) {
            goto done;
        }
        key = p;
        if (kl > 0) {
            p += kl;
        }
        if (read_length(&p, rec_end, &vl) < 0) {
            goto done;
        }
        value = p;
        if (vl > 0) {
            p += vl;
        }
        if (read_varint(&p, rec_end, &hc) < 0) {
            goto done;
        }
        if (od < skip) {  /* checked, not returned */
            if (hc != 0 && read_headers(&p, rec_end, hc, NULL) <= 0) {
                goto done;
            }
            if (p != rec_end) {
                goto done;
            }
            continue;
        }
        if (__builtin_add_overflow(base_offset, od, &offset) || __builtin_add_overflow(base_ts, td, &ts)) {
            goto done;
        }
        if (hc == 0) {
            headers = PyTuple_New(0);  /* the shared empty tuple */
            if (headers == NULL) {
                status = -1;
                goto done;
            }
        }
        else {
            status = read_headers(&p, rec_end, hc, &headers);
            if (status <= 0) {
                goto done;
            }
            status = 0;
        }
        if (p != rec_end) {
            Py_DECREF(headers);
            goto done;
        }
        if (ts_obj == NULL || td != ts_td) {
            Py_XDECREF(ts_obj);
            ts_obj = PyLong_FromLongLong(ts);
            if (ts_obj == NULL) {
                Py_DECREF(headers);
                status = -1;
                goto done;
            }
            ts_td = td;
        }
        m = new_message(tp, topic, partition, offset, key, kl, value, vl, headers, ts_obj);
        if (m == NULL) {
            status = -1;
            goto done;
        }
        PyList_SET_ITEM(out, n, m);
        n++;
    }
    if (p == end) {  /* else bytes after the last record: refused */
        status = 1;
    }
done:
    Py_XDECREF(ts_obj);
    if (status == 1) {
        if (n < count) {
            Py_SET_SIZE(out, n);  /* the slots past n were never set: NULL */
        }
        *result = out;
    }
    else {
        Py_DECREF(out);  /* list_dealloc skips the NULL slots not yet filled */
    }
    return status;
}

/* A tuple subclass with the tuple's layout: nothing but the items (NamedTuple, __slots__ = ()). */
static int
message_type_ok(PyObject *cls)
{
    if (!PyType_Check(cls)) {
        return 0;
    }
    PyTypeObject *tp = (PyTypeObject *)cls;
    if (!PyType_IsSubtype(tp, &PyTuple_Type) || tp->tp_basicsize != PyTuple_Type.tp_basicsize
        || tp->tp_itemsize != PyTuple_Type.tp_itemsize || tp->tp_dictoffset != 0
        || tp->tp_weaklistoffset != 0) {
        return 0;
    }
#ifdef Py_TPFLAGS_MANAGED_DICT
    if (tp->tp_flags & Py_TPFLAGS_MANAGED_DICT) {
        return 0;
    }
#endif
#ifdef Py_TPFLAGS_MANAGED_WEAKREF
    if (tp->tp_flags & Py_TPFLAGS_MANAGED_WEAKREF) {
        return 0;
    }
#endif
    return 1;
}

static PyObject *
decode_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError,
                     "decode_records(buf, pos, size, topic, partition, skip, message_cls) takes 7 "
                     "arguments, %zd given", nargs);
        return NULL;
    }
    PyObject *cls = args[6];
    if (!message_type_ok(cls)) {
        PyErr_SetString(PyExc_TypeError, "message_cls must be a tuple subclass without extra slots");
        return NULL;
    }
    if (!PyUnicode_CheckExact(args[3]) || !PyLong_CheckExact(args[4])) {
        /* an untracked message must hold nothing that could refer back to it */
        PyErr_SetString(PyExc_TypeError, "topic must be a str and partition an int");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[2]);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int overflow = 0;
    long long skip = PyLong_AsLongLongAndOverflow(args[5], &overflow);
    if (skip == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow > 0) {
        Py_RETURN_NONE;  /* no int64 offset delta reaches it: the Python decoder decides */
    }
    if (overflow < 0) {
        skip = INT64_MIN;  /* every offset delta is at or above it */
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    int status = 0;
    if (pos >= 0 && size >= HEADER_SIZE && size <= view.len - pos) {
        /* No cyclic collection while the messages are built: every Message and headers tuple is
         * a GC allocation, and the collections their allocations would trigger (each
         * traversing the young messages, and whole-heap ones as they pile up) cost more than the
         * decoding itself (0.3-0.5 us of 0.4-0.7 per record). The decode creates no cycles and
         * allocates at most `count` messages; the next allocation after it collects as usual. */
        int gc_was_enabled = PyGC_Disable();
        status = decode((const unsigned char *)view.buf + pos, size, args[3], args[4], skip,
                        (PyTypeObject *)cls, &result);
        if (gc_was_enabled) {
            PyGC_Enable();
        }
    }
    PyBuffer_Release(&view);
    if (status < 0) {
        return NULL;
    }
    if (status == 0) {
        Py_RETURN_NONE;
    }
    return result;
}

static PyMethodDef records_methods[] = {
    {"decode_records", (PyCFunction)(void (*)(void))decode_records, METH_FASTCALL,
     "decode_records(buf, pos, size, topic, partition, skip, message_cls) -> list | None\n\n"
     "The records of the CRC-checked, uncompressed, CreateTime batch at buf[pos:pos + size] whose\n"
     "offset delta is >= skip, as message_cls(topic, partition, offset, key, value, headers,\n"
     "timestamp); None for anything malformed (the Python decoder then reports it)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef records_module = {
    PyModuleDef_HEAD_INIT,
    "logbroker.storage._records",
    "RecordBatch v2 records decoded in C (see record_batch.py for the reference decoder).",
    0,
    records_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__records(void)
{
    return PyModuleDef_Init(&records_module);
}
