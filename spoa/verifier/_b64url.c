/*
 * Unpadded base64url decoding for spoa/verifier/parsing.py, in C: the Python version
 * (b64url_decode_python) stays the reference, and tests/verifier/test_b64url.py checks
 * the two against each other on generated and mutated input. Same result, and the same
 * ValueError message for each refusal, checked in the same order:
 *   a length of 4n+1, then a last character whose dropped low bits are not zero, then
 *   any byte outside A-Z a-z 0-9 - _ (padding, whitespace, '+' and '/' included).
 * No state is kept between calls. The output is allocated at its exact size before any
 * byte is read, and every read is within the input's length.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Each byte's 6-bit value, or -1 outside the base64url alphabet. */
static signed char sextet[256];

static void
init_table(void)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for (int i = 0; i < 256; i++)
        sextet[i] = -1;
    for (int i = 0; i < 64; i++)
        sextet[(unsigned char)alphabet[i]] = (signed char)i;
}

static PyObject *
decode(PyObject *module, PyObject *arg)
{
    (void)module;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "decode() takes bytes");
        return NULL;
    }
    const unsigned char *in = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t length = PyBytes_GET_SIZE(arg);
    Py_ssize_t remainder = length % 4;
    if (remainder == 1) {
        PyErr_SetString(PyExc_ValueError, "segment has an impossible base64url length");
        return NULL;
    }
    if (remainder) {
        /* The low bits the last character carries beyond the output must be zero. A byte
         * outside the alphabet counts as 0 here and is refused below. */
        int last = sextet[in[length - 1]];
        int mask = remainder == 2 ? 0x0F : 0x03;
        if (last > 0 && (last & mask)) {
            PyErr_SetString(PyExc_ValueError, "segment is not canonical base64url");
            return NULL;
        }
    }
    Py_ssize_t quads = length / 4;
    Py_ssize_t size = quads * 3 + (remainder ? remainder - 1 : 0);
    PyObject *result = PyBytes_FromStringAndSize(NULL, size);
    if (result == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *p = in;
    for (Py_ssize_t q = 0; q < quads; q++, p += 4) {
        int a = sextet[p[0]], b = sextet[p[1]], c = sextet[p[2]], d = sextet[p[3]];
        if ((a | b | c | d) < 0)
            goto invalid;
        *out++ = (unsigned char)((a << 2) | (b >> 4));
        *out++ = (unsigned char)(((b & 0x0F) << 4) | (c >> 2));
        *out++ = (unsigned char)(((c & 0x03) << 6) | d);
    }
    if (remainder >= 2) {
        int a = sextet[p[0]], b = sextet[p[1]];
        int c = remainder == 3 ? sextet[p[2]] : 0;
        if ((a | b | c) < 0)
            goto invalid;
        *out++ = (unsigned char)((a << 2) | (b >> 4));
        if (remainder == 3)
            *out++ = (unsigned char)(((b & 0x0F) << 4) | (c >> 2));
    }
    return result;
invalid:
    Py_DECREF(result);
    PyErr_SetString(PyExc_ValueError, "segment is not base64url");
    return NULL;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_O, "Decode unpadded, canonical base64url; ValueError otherwise."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_b64url", "base64url decoding for spoa.verifier.parsing", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__b64url(void)
{
    init_table();
    return PyModule_Create(&module_def);
}
