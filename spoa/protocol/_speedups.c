/*
 * Hot paths of spoa/protocol in C: the NOTIFY payload decoder (payloads.py), the answer
 * memo's scanner (memo.py) and the set-var encoder of an answer (actions.py).
 *
 * Each runs once per request. Same input, same output, same exceptions and messages as
 * the Python version, which stays the reference: tests/protocol/test_speedups.py and
 * test_memo.py check the two against each other on generated and mutated input. Nothing
 * here keeps state between calls except the classes handed over by bind().
 *
 * Every read of buf is preceded by a bounds check against `end` (which the caller
 * keeps within the buffer, and which is clamped to it here as well).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *message_type;   /* payloads.Message */
static PyObject *invalid_frame;  /* errors.InvalidFrame */
static PyObject *resource_limit; /* errors.ResourceLimit */
static PyObject *ipv4_type;      /* ipaddress.IPv4Address */
static PyObject *ipv6_type;      /* ipaddress.IPv6Address */

#define MAX_VARINT_BYTES 10

static void
fail(PyObject *kind, const char *message)
{
    PyObject *error = PyObject_CallFunction(kind, "s", message);
    if (error != NULL) {
        PyErr_SetObject(kind, error);
        Py_DECREF(error);
    }
}

/* decode_varint: the value (mod 2**64) and the position after it; -1 on error. */
static Py_ssize_t
read_varint(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, uint64_t *out)
{
    if (pos >= end) {
        fail(invalid_frame, "truncated varint");
        return -1;
    }
    uint64_t value = buf[pos++];
    if (value < 240) {
        *out = value;
        return pos;
    }
    unsigned shift = 4;
    Py_ssize_t limit = pos + MAX_VARINT_BYTES - 1;
    if (limit > end)
        limit = end;
    while (pos < limit) {
        uint64_t byte = buf[pos++];
        value += byte << shift; /* wraps mod 2**64, as Python's final mask does */
        if (byte < 128) {
            *out = value;
            return pos;
        }
        shift += 7;
    }
    fail(invalid_frame, limit < end ? "varint longer than 10 bytes" : "truncated varint");
    return -1;
}

/* _prefixed_span: where a length-prefixed string lies; -1 on error. */
static Py_ssize_t
read_span(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t *start)
{
    uint64_t length;
    if (pos < end && buf[pos] < 240) {
        length = buf[pos++];
    }
    else {
        pos = read_varint(buf, pos, end, &length);
        if (pos < 0)
            return -1;
    }
    if (length > (uint64_t)(end - pos)) {
        fail(invalid_frame, "string longer than its frame");
        return -1;
    }
    *start = pos;
    return pos + (Py_ssize_t)length;
}

static PyObject *
text(const unsigned char *buf, Py_ssize_t start, Py_ssize_t stop)
{
    return PyUnicode_DecodeUTF8((const char *)buf + start, stop - start, "surrogateescape");
}

static PyObject *
read_string(const unsigned char *buf, Py_ssize_t *pos, Py_ssize_t end)
{
    Py_ssize_t start;
    Py_ssize_t stop = read_span(buf, *pos, end, &start);
    if (stop < 0)
        return NULL;
    *pos = stop;
    return text(buf, start, stop);
}

static PyObject *
address(PyObject *type, const unsigned char *buf, Py_ssize_t *pos, Py_ssize_t end,
        Py_ssize_t size, const char *truncated)
{
    if (end - *pos < size) {
        fail(invalid_frame, truncated);
        return NULL;
    }
    PyObject *packed = PyBytes_FromStringAndSize((const char *)buf + *pos, size);
    if (packed == NULL)
        return NULL;
    *pos += size;
    PyObject *result = PyObject_CallOneArg(type, packed);
    Py_DECREF(packed);
    return result;
}

/* INT32 (kind 2) and UINT32 (kind 3) varints hold 32 bits; an INT32 may also come as a
   negative sign-extended to 64, as HAProxy encodes it. Anything else is malformed, as its
   low bits would be another number (types.py). Other kinds always fit. */
static inline int
fits_32_bits(unsigned kind, uint64_t number)
{
    if (number <= 0xFFFFFFFFu || kind > 3)
        return 1;
    return kind == 2 && number >= 0xFFFFFFFF80000000u;
}

/* decode_value: one typed value. */
static PyObject *
read_value(const unsigned char *buf, Py_ssize_t *pos, Py_ssize_t end)
{
    if (*pos >= end) {
        fail(invalid_frame, "truncated typed data");
        return NULL;
    }
    unsigned type_byte = buf[(*pos)++];
    unsigned kind = type_byte & 0x0F;
    Py_ssize_t start, stop;
    uint64_t number;
    switch (kind) {
    case 8:
        return read_string(buf, pos, end);
    case 9:
        stop = read_span(buf, *pos, end, &start);
        if (stop < 0)
            return NULL;
        *pos = stop;
        return PyBytes_FromStringAndSize((const char *)buf + start, stop - start);
    case 0:
        Py_RETURN_NONE;
    case 1:
        return PyBool_FromLong(type_byte & 0x10);
    case 2:
    case 3:
    case 4:
    case 5:
        *pos = read_varint(buf, *pos, end, &number);
        if (*pos < 0)
            return NULL;
        if (!fits_32_bits(kind, number)) {
            fail(invalid_frame, kind == 2 ? "INT32 value out of range" : "UINT32 value out of range");
            return NULL;
        }
        if (kind == 2)  /* 32 bits, or already sign-extended to 64 */
            return PyLong_FromLongLong(number <= 0xFFFFFFFFu
                                           ? (long long)(int32_t)(uint32_t)number
                                           : (long long)(int64_t)number);
        if (kind == 3)
            return PyLong_FromUnsignedLong((unsigned long)number);
        if (kind == 4)
            return PyLong_FromLongLong((long long)(int64_t)number);
        return PyLong_FromUnsignedLongLong((unsigned long long)number);
    case 6:
        return address(ipv4_type, buf, pos, end, 4, "truncated IPv4 address");
    case 7:
        return address(ipv6_type, buf, pos, end, 16, "truncated IPv6 address");
    default: {
        char message[32];
        PyOS_snprintf(message, sizeof message, "reserved data type %u", kind);
        fail(invalid_frame, message);
        return NULL;
    }
    }
}

/* One argument: (name, value). */
static PyObject *
read_argument(const unsigned char *buf, Py_ssize_t *pos, Py_ssize_t end)
{
    PyObject *name = read_string(buf, pos, end);
    if (name == NULL)
        return NULL;
    PyObject *value = read_value(buf, pos, end);
    if (value == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        Py_DECREF(name);
        Py_DECREF(value);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, name);
    PyTuple_SET_ITEM(pair, 1, value);
    return pair;
}

static PyObject *
decode(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t max_items)
{
    PyObject *messages = PyList_New(0);
    if (messages == NULL)
        return NULL;
    while (pos < end) {
        if (PyList_GET_SIZE(messages) >= max_items) {
            fail(resource_limit, "too many messages");
            goto error;
        }
        PyObject *name = read_string(buf, &pos, end);
        if (name == NULL)
            goto error;
        if (pos >= end) {
            Py_DECREF(name);
            fail(invalid_frame, "message without an argument count");
            goto error;
        }
        Py_ssize_t nb_args = buf[pos++];
        if (nb_args > max_items) {
            Py_DECREF(name);
            fail(resource_limit, "too many message arguments");
            goto error;
        }
        PyObject *args = PyTuple_New(nb_args);
        if (args == NULL) {
            Py_DECREF(name);
            goto error;
        }
        for (Py_ssize_t i = 0; i < nb_args; i++) {
            PyObject *pair = read_argument(buf, &pos, end);
            if (pair == NULL) {
                Py_DECREF(name);
                Py_DECREF(args);
                goto error;
            }
            PyTuple_SET_ITEM(args, i, pair);
        }
        PyObject *message = PyObject_CallFunctionObjArgs(message_type, name, args, NULL);
        Py_DECREF(name);
        Py_DECREF(args);
        if (message == NULL)
            goto error;
        int appended = PyList_Append(messages, message);
        Py_DECREF(message);
        if (appended < 0)
            goto error;
    }
    PyObject *result = PyList_AsTuple(messages);
    Py_DECREF(messages);
    return result;
error:
    Py_DECREF(messages);
    return NULL;
}

/* Integer arguments as Py_ssize_t (OverflowError beyond); -1 with an exception set. */
static int
ssize_args(PyObject *const *args, Py_ssize_t count, Py_ssize_t *out)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        out[i] = PyNumber_AsSsize_t(args[i], PyExc_OverflowError);
        if (out[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static PyObject *
decode_messages(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "decode_messages(buf, pos, end, max_items)");
        return NULL;
    }
    if (message_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() was not called");
        return NULL;
    }
    Py_ssize_t sizes[3];
    if (ssize_args(args + 1, 3, sizes) < 0)
        return NULL;
    Py_ssize_t pos = sizes[0], end = sizes[1], max_items = sizes[2];
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pos < 0 || end < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "negative position");
        return NULL;
    }
    if (end > view.len)
        end = view.len; /* Python's slices stop at the buffer's end too */
    PyObject *result = decode((const unsigned char *)view.buf, pos, end, max_items);
    PyBuffer_Release(&view);
    return result;
}

/*
 * answer_frames: the replay scanner of spoa/protocol/memo.py (answer_frames_python is
 * the reference). It only reads: every frame it is unsure of stops the scan, and the
 * Python path then handles that frame and the rest. A key is the raw typed data of each
 * key argument, so only canonically encoded values match (the Python side re-encodes
 * decoded values); a non-canonical one is a miss, never a wrong hit.
 */

#define ABSENT_BYTE 0xFF
#define MAX_KEY_ARGS 8
#define MIN_FRAME_BODY 7
#define NOTIFY_TYPE 3
#define ACK_TYPE 103

/* Skip one typed value without building it; its end, or -1 when it is malformed. */
static Py_ssize_t
skip_value(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end)
{
    if (pos >= end)
        return -1;
    unsigned kind = buf[pos++] & 0x0F;
    Py_ssize_t start;
    uint64_t number;
    switch (kind) {
    case 0:
    case 1:
        return pos;
    case 2:
    case 3:
        pos = read_varint(buf, pos, end, &number);
        return pos >= 0 && !fits_32_bits(kind, number) ? -1 : pos;
    case 4:
    case 5:
        return read_varint(buf, pos, end, &number);
    case 6:
        return end - pos < 4 ? -1 : pos + 4;
    case 7:
        return end - pos < 16 ? -1 : pos + 16;
    case 8:
    case 9:
        return read_span(buf, pos, end, &start);
    default:
        return -1;
    }
}

/* Append a varint in SPOP's encoding (varint.encode_varint). */
static Py_ssize_t
write_varint(unsigned char *out, uint64_t value)
{
    Py_ssize_t n = 0;
    if (value < 240) {
        out[n++] = (unsigned char)value;
        return n;
    }
    out[n++] = (unsigned char)((value & 0xFF) | 0xF0);
    value = (value - 240) >> 4;
    while (value >= 128) {
        out[n++] = (unsigned char)((value & 0xFF) | 0x80);
        value = (value - 128) >> 7;
    }
    out[n++] = (unsigned char)value;
    return n;
}

typedef struct {
    Py_ssize_t start; /* where the typed data starts, or -1 when the argument is absent */
    Py_ssize_t stop;
} key_span;

/*
 * Check one NOTIFY payload: exactly one message named `name`, well-formed to its end.
 * Fills spans for the key arguments; 0 when it qualifies, -1 when it does not. Only
 * raises (and returns -2) on an internal failure.
 */
static int
scan_message(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t max_items,
             const char *name, Py_ssize_t name_len, const char *const *keys,
             const Py_ssize_t *key_lens, Py_ssize_t nkeys, key_span *spans)
{
    Py_ssize_t start, stop;
    for (Py_ssize_t k = 0; k < nkeys; k++)
        spans[k].start = -1;
    if (max_items < 1)
        return -1;
    stop = read_span(buf, pos, end, &start);
    if (stop < 0) {
        PyErr_Clear();
        return -1;
    }
    if (stop - start != name_len || memcmp(buf + start, name, (size_t)name_len) != 0)
        return -1;
    pos = stop;
    if (pos >= end)
        return -1;
    Py_ssize_t nb_args = buf[pos++];
    if (nb_args > max_items)
        return -1;
    for (Py_ssize_t i = 0; i < nb_args; i++) {
        stop = read_span(buf, pos, end, &start);
        if (stop < 0) {
            PyErr_Clear();
            return -1;
        }
        Py_ssize_t value_start = stop;
        Py_ssize_t value_stop = skip_value(buf, value_start, end);
        if (value_stop < 0) {
            PyErr_Clear();
            return -1;
        }
        for (Py_ssize_t k = 0; k < nkeys; k++) {
            if (stop - start != key_lens[k] ||
                memcmp(buf + start, keys[k], (size_t)key_lens[k]) != 0)
                continue;
            unsigned type_byte = buf[value_start];
            if (spans[k].start >= 0 || (type_byte != 0 && type_byte != 8 && type_byte != 9))
                return -1; /* repeated, or a type that is not keyed */
            spans[k].start = value_start;
            spans[k].stop = value_stop;
        }
        pos = value_stop;
    }
    return pos == end ? 0 : -1; /* more bytes: a second message */
}

static PyObject *
answer_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError,
                        "answer_frames(buf, pos, end, frame_limit, max_items, message_name, "
                        "key_names, table, now, countdown_head, inflight)");
        return NULL;
    }
    Py_ssize_t sizes[4];
    if (ssize_args(args + 1, 4, sizes) < 0)
        return NULL;
    Py_ssize_t pos = sizes[0], end = sizes[1], frame_limit = sizes[2], max_items = sizes[3];
    PyObject *name_obj = args[5], *key_names = args[6], *table = args[7];
    PyObject *countdown_obj = args[9], *inflight = args[10];
    if (!PyBytes_Check(name_obj) || !PyTuple_Check(key_names) || !PyDict_Check(table) ||
        !PyBytes_Check(countdown_obj) || !PyDict_Check(inflight)) {
        PyErr_SetString(PyExc_TypeError, "answer_frames: bad argument types");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[8]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    Py_ssize_t nkeys = PyTuple_GET_SIZE(key_names);
    if (nkeys < 1 || nkeys > MAX_KEY_ARGS) {
        PyErr_SetString(PyExc_ValueError, "answer_frames: 1 to 8 key names");
        return NULL;
    }
    const char *keys[MAX_KEY_ARGS];
    Py_ssize_t key_lens[MAX_KEY_ARGS];
    for (Py_ssize_t k = 0; k < nkeys; k++) {
        PyObject *key_name = PyTuple_GET_ITEM(key_names, k);
        if (!PyBytes_Check(key_name)) {
            PyErr_SetString(PyExc_TypeError, "answer_frames: key names are bytes");
            return NULL;
        }
        keys[k] = PyBytes_AS_STRING(key_name);
        key_lens[k] = PyBytes_GET_SIZE(key_name);
    }
    if (pos < 0 || end < 0) {
        PyErr_SetString(PyExc_ValueError, "negative position");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (end > view.len)
        end = view.len;
    const unsigned char *buf = (const unsigned char *)view.buf;
    const unsigned char *countdown_head = (const unsigned char *)PyBytes_AS_STRING(countdown_obj);
    Py_ssize_t countdown_len = PyBytes_GET_SIZE(countdown_obj);

    PyObject *tags = PyList_New(0);
    PyObject *acks = NULL; /* a bytearray, grown as frames are answered */
    PyObject *key = NULL;
    PyObject *entry = NULL;
    Py_ssize_t acks_len = 0;
    if (tags == NULL)
        goto error;
    acks = PyByteArray_FromStringAndSize(NULL, 0);
    if (acks == NULL)
        goto error;

    while (end - pos >= 4) {
        uint64_t length = ((uint64_t)buf[pos] << 24) | ((uint64_t)buf[pos + 1] << 16) |
                          ((uint64_t)buf[pos + 2] << 8) | (uint64_t)buf[pos + 3];
        if (length > (uint64_t)frame_limit || length > (uint64_t)(end - pos - 4) ||
            length < MIN_FRAME_BODY)
            break;
        Py_ssize_t start = pos + 4, stop = start + (Py_ssize_t)length;
        if (buf[start] != NOTIFY_TYPE || buf[start + 1] != 0 || buf[start + 2] != 0 ||
            buf[start + 3] != 0 || buf[start + 4] != 1)
            break;
        uint64_t stream_id, frame_id;
        Py_ssize_t body = read_varint(buf, start + 5, stop, &stream_id);
        if (body >= 0)
            body = read_varint(buf, body, stop, &frame_id);
        if (body < 0) {
            PyErr_Clear();
            break;
        }
        if (PyDict_GET_SIZE(inflight) > 0) {
            /* Ids of a NOTIFY still in flight: the connection's own path refuses them. */
            PyObject *ids = Py_BuildValue("(KK)", (unsigned long long)stream_id,
                                          (unsigned long long)frame_id);
            if (ids == NULL)
                goto error;
            int busy = PyDict_Contains(inflight, ids);
            Py_DECREF(ids);
            if (busy < 0)
                goto error;
            if (busy)
                break;
        }
        key_span spans[MAX_KEY_ARGS];
        if (scan_message(buf, body, stop, max_items, PyBytes_AS_STRING(name_obj),
                         PyBytes_GET_SIZE(name_obj), keys, key_lens, nkeys, spans) < 0)
            break;
        Py_ssize_t key_len = 0;
        for (Py_ssize_t k = 0; k < nkeys; k++)
            key_len += spans[k].start < 0 ? 1 : spans[k].stop - spans[k].start;
        key = PyBytes_FromStringAndSize(NULL, key_len);
        if (key == NULL)
            goto error;
        char *cursor = PyBytes_AS_STRING(key);
        for (Py_ssize_t k = 0; k < nkeys; k++) {
            if (spans[k].start < 0) {
                *cursor++ = (char)ABSENT_BYTE;
                continue;
            }
            Py_ssize_t size = spans[k].stop - spans[k].start;
            memcpy(cursor, buf + spans[k].start, (size_t)size);
            cursor += size;
        }
        entry = PyDict_GetItemWithError(table, key);
        Py_CLEAR(key);
        if (entry == NULL) {
            if (PyErr_Occurred())
                goto error;
            break;
        }
        Py_INCREF(entry); /* held while its parts are read, whatever the table does */
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 5) {
            PyErr_SetString(PyExc_TypeError, "answer_frames: a table value is not a MemoEntry");
            goto error;
        }
        PyObject *payload = PyTuple_GET_ITEM(entry, 0);
        PyObject *from_obj = PyTuple_GET_ITEM(entry, 1);
        PyObject *until_obj = PyTuple_GET_ITEM(entry, 2);
        PyObject *countdown_to = PyTuple_GET_ITEM(entry, 3);
        if (!PyBytes_Check(payload) || !PyFloat_Check(from_obj) || !PyFloat_Check(until_obj) ||
            (countdown_to != Py_None && !PyFloat_Check(countdown_to))) {
            PyErr_SetString(PyExc_TypeError, "answer_frames: a table value is not a MemoEntry");
            goto error;
        }
        if (!(PyFloat_AS_DOUBLE(from_obj) <= now && now < PyFloat_AS_DOUBLE(until_obj))) {
            Py_CLEAR(entry);
            break;
        }
        unsigned char tail[MAX_VARINT_BYTES + 1];
        Py_ssize_t tail_len = 0;
        if (countdown_to != Py_None) {
            double left = PyFloat_AS_DOUBLE(countdown_to) - now;
            if (!(left < 9223372036854775808.0)) { /* 2**63; NaN fails too */
                Py_CLEAR(entry);
                break;
            }
            uint64_t seconds = left > 0 ? (uint64_t)left : 0; /* int() truncates */
            tail[0] = 4; /* INT64 */
            tail_len = 1 + write_varint(tail + 1, seconds);
        }
        Py_ssize_t ids_len = body - (start + 5);
        Py_ssize_t payload_len = PyBytes_GET_SIZE(payload);
        Py_ssize_t extra = tail_len ? countdown_len + tail_len : 0;
        Py_ssize_t ack_length = 5 + ids_len + payload_len + extra;
        if (ack_length > frame_limit) {
            Py_CLEAR(entry);
            break;
        }
        if (PyByteArray_Resize(acks, acks_len + 4 + ack_length) < 0)
            goto error;
        unsigned char *out = (unsigned char *)PyByteArray_AS_STRING(acks) + acks_len;
        out[0] = (unsigned char)(ack_length >> 24);
        out[1] = (unsigned char)(ack_length >> 16);
        out[2] = (unsigned char)(ack_length >> 8);
        out[3] = (unsigned char)ack_length;
        out[4] = ACK_TYPE;
        out[5] = out[6] = out[7] = 0;
        out[8] = 1;
        memcpy(out + 9, buf + start + 5, (size_t)ids_len);
        out += 9 + ids_len;
        memcpy(out, PyBytes_AS_STRING(payload), (size_t)payload_len);
        out += payload_len;
        if (tail_len) {
            memcpy(out, countdown_head, (size_t)countdown_len);
            memcpy(out + countdown_len, tail, (size_t)tail_len);
        }
        acks_len += 4 + ack_length;
        if (PyList_Append(tags, PyTuple_GET_ITEM(entry, 4)) < 0)
            goto error;
        Py_CLEAR(entry);
        pos = stop;
    }
    PyBuffer_Release(&view);
    PyObject *acks_bytes = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(acks), acks_len);
    Py_DECREF(acks);
    if (acks_bytes == NULL) {
        Py_DECREF(tags);
        return NULL;
    }
    PyObject *result = Py_BuildValue("(nNN)", pos, acks_bytes, tags);
    return result;
error:
    PyBuffer_Release(&view);
    Py_XDECREF(key);
    Py_XDECREF(entry);
    Py_XDECREF(acks);
    Py_XDECREF(tags);
    return NULL;
}

/*
 * actions.encode_set_vars for the values an answer holds: str, int, bool and None, under
 * valid variable names. Anything else (another type or a subclass, an invalid name or
 * scope, a string that is not plain UTF-8, an int outside 64 bits, an item that is not a
 * pair) returns None, not an error: the Python version then encodes it or raises its own
 * error, so the two never differ. encode_set_vars_python is the reference.
 */
#define MAX_SCOPE 4
#define MAX_VAR_NAME 63
#define SET_VAR_ACTION 1
#define SET_VAR_ARGS 3

static int
is_var_name(const char *name, Py_ssize_t len)
{
    if (len < 1 || len > MAX_VAR_NAME)
        return 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        char c = name[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_'))
            return 0;
    }
    return 1;
}

typedef struct {
    const char *name;
    Py_ssize_t name_len;
    unsigned char type_byte;
    const char *text; /* STRING: the UTF-8 bytes */
    uint64_t number;  /* STRING: the length; INT64/UINT64: the varint */
} set_var;

static Py_ssize_t
varint_size(uint64_t value)
{
    unsigned char scratch[MAX_VARINT_BYTES];
    return write_varint(scratch, value);
}

/* 1 when `item` is a pair this encoder takes (filled in), 0 when Python must, -1 on error. */
static int
read_set_var(PyObject *item, set_var *out)
{
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2)
        return 0;
    PyObject *name = PyTuple_GET_ITEM(item, 0);
    PyObject *value = PyTuple_GET_ITEM(item, 1);
    if (!PyUnicode_CheckExact(name) || !PyUnicode_IS_ASCII(name))
        return 0;
    out->name = (const char *)PyUnicode_DATA(name);
    out->name_len = PyUnicode_GET_LENGTH(name);
    if (!is_var_name(out->name, out->name_len))
        return 0;
    if (value == Py_None) {
        out->type_byte = 0x00;
    }
    else if (value == Py_True) {
        out->type_byte = 0x11;
    }
    else if (value == Py_False) {
        out->type_byte = 0x01;
    }
    else if (PyUnicode_CheckExact(value)) {
        Py_ssize_t size;
        out->text = PyUnicode_AsUTF8AndSize(value, &size);
        if (out->text == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
                return -1;
            PyErr_Clear(); /* surrogates: Python's own rule applies */
            return 0;
        }
        out->type_byte = 0x08;
        out->number = (uint64_t)size;
    }
    else if (PyLong_CheckExact(value)) {
        int overflow;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (number == -1 && PyErr_Occurred())
            return -1;
        if (overflow == 0) {
            out->type_byte = 0x04; /* negative: the two's complement, as Python adds 2**64 */
            out->number = (uint64_t)number;
        }
        else if (overflow > 0) {
            unsigned long long big = PyLong_AsUnsignedLongLong(value);
            if (big == (unsigned long long)-1 && PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                    return -1;
                PyErr_Clear();
                return 0;
            }
            out->type_byte = 0x05;
            out->number = (uint64_t)big;
        }
        else {
            return 0;
        }
    }
    else {
        return 0;
    }
    return 1;
}

static PyObject *
encode_set_vars(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyLong_CheckExact(args[0]) ||
        !(PyList_CheckExact(args[1]) || PyTuple_CheckExact(args[1]))) {
        PyErr_SetString(PyExc_TypeError, "encode_set_vars(scope: int, variables: list | tuple)");
        return NULL;
    }
    long scope = PyLong_AsLong(args[0]);
    if (scope == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (scope < 0 || scope > MAX_SCOPE)
        Py_RETURN_NONE;
    PyObject *variables = args[1];
    Py_ssize_t count = PySequence_Fast_GET_SIZE(variables);
    PyObject **items = PySequence_Fast_ITEMS(variables);
    set_var stack_vars[16];
    set_var *vars = stack_vars;
    if (count > 16) {
        vars = PyMem_New(set_var, count);
        if (vars == NULL)
            return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    Py_ssize_t size = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        int taken = read_set_var(items[i], &vars[i]);
        if (taken <= 0) {
            if (taken == 0)
                result = Py_NewRef(Py_None);
            goto done;
        }
        size += 3 + varint_size((uint64_t)vars[i].name_len) + vars[i].name_len + 1;
        if (vars[i].type_byte == 0x08)
            size += varint_size(vars[i].number) + (Py_ssize_t)vars[i].number;
        else if (vars[i].type_byte == 0x04 || vars[i].type_byte == 0x05)
            size += varint_size(vars[i].number);
    }
    result = PyBytes_FromStringAndSize(NULL, size);
    if (result == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    for (Py_ssize_t i = 0; i < count; i++) {
        set_var *var = &vars[i];
        *out++ = SET_VAR_ACTION;
        *out++ = SET_VAR_ARGS;
        *out++ = (unsigned char)scope;
        out += write_varint(out, (uint64_t)var->name_len);
        memcpy(out, var->name, (size_t)var->name_len);
        out += var->name_len;
        *out++ = var->type_byte;
        if (var->type_byte == 0x08) {
            out += write_varint(out, var->number);
            memcpy(out, var->text, (size_t)var->number);
            out += var->number;
        }
        else if (var->type_byte == 0x04 || var->type_byte == 0x05) {
            out += write_varint(out, var->number);
        }
    }
    assert(out == (unsigned char *)PyBytes_AS_STRING(result) + size);
done:
    if (vars != stack_vars)
        PyMem_Free(vars);
    return result;
}

static PyObject *
bind(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *message, *invalid, *limit, *ipv4, *ipv6;
    if (!PyArg_ParseTuple(args, "OOOOO", &message, &invalid, &limit, &ipv4, &ipv6))
        return NULL;
    Py_XSETREF(message_type, Py_NewRef(message));
    Py_XSETREF(invalid_frame, Py_NewRef(invalid));
    Py_XSETREF(resource_limit, Py_NewRef(limit));
    Py_XSETREF(ipv4_type, Py_NewRef(ipv4));
    Py_XSETREF(ipv6_type, Py_NewRef(ipv6));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_messages", (PyCFunction)(void (*)(void))decode_messages, METH_FASTCALL,
     "Decode the LIST-OF-MESSAGES payload of a NOTIFY (see payloads.decode_messages)."},
    {"answer_frames", (PyCFunction)(void (*)(void))answer_frames, METH_FASTCALL,
     "Replay remembered answers for the NOTIFYs at the start of buf (see memo.py)."},
    {"encode_set_vars", (PyCFunction)(void (*)(void))encode_set_vars, METH_FASTCALL,
     "Encode set-var actions of common values, or None (see actions.encode_set_vars)."},
    {"bind", bind, METH_VARARGS,
     "Hand over Message, InvalidFrame, ResourceLimit, IPv4Address and IPv6Address."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_speedups",
    .m_doc = "The hot paths of spoa.protocol, in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
