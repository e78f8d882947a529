/*
 * The NOTIFY payload decoder of spoa/protocol/payloads.py, in C.
 *
 * It runs once per request, and in Python it was the agent's largest single cost.
 * Same input, same output, same exceptions and messages as the Python version, which
 * stays the reference: tests/protocol/test_speedups.py checks the two against each other
 * on generated and mutated frames. Nothing here keeps state between calls except the
 * classes handed over by bind().
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
        if (kind == 2)
            return PyLong_FromLong((long)(int32_t)(uint32_t)(number & 0xFFFFFFFFu));
        if (kind == 3)
            return PyLong_FromUnsignedLong((unsigned long)(number & 0xFFFFFFFFu));
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
    Py_ssize_t pos = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t end = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t max_items = PyNumber_AsSsize_t(args[3], PyExc_OverflowError);
    if (max_items == -1 && PyErr_Occurred())
        return NULL;
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
    {"bind", bind, METH_VARARGS,
     "Hand over Message, InvalidFrame, ResourceLimit, IPv4Address and IPv6Address."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_speedups",
    .m_doc = "The NOTIFY decoder of spoa.protocol, in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
