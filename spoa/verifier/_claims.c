/*
 * A verified token's claims with their names and short string values shared, in C, for
 * spoa/verifier/cache.py: `compact_claims_python` stays the reference, and
 * tests/verifier/test_claims_speedup.py holds the two to the same result (equal dicts,
 * the same kept objects, the same table afterwards) on generated payloads.
 *
 * compact(table, table_max, str_max, payload) -> dict
 *   Room for a name and a value per member is checked once, as the reference does: a
 *   table without room is emptied first, and each shared string is kept in it
 *   (setdefault); a payload that alone needs more than `table_max` only uses what the
 *   table holds (get). Only exact str names and values are shared, values of at most
 *   `str_max` characters; anything else is kept as it is. No state is kept here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* A new reference to the kept string equal to `text`, or to `text` itself. */
static PyObject *
share(PyObject *table, int keep, PyObject *text)
{
    PyObject *kept;
    if (keep) {
        kept = PyDict_SetDefault(table, text, text); /* borrowed */
    } else {
        kept = PyDict_GetItemWithError(table, text); /* borrowed */
        if (kept == NULL && !PyErr_Occurred())
            kept = text;
    }
    Py_XINCREF(kept);
    return kept;
}

static PyObject *
compact(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "compact() takes table, table_max, str_max, payload");
        return NULL;
    }
    PyObject *table = args[0], *payload = args[3];
    if (!PyDict_CheckExact(table) || !PyDict_CheckExact(payload)) {
        PyErr_SetString(PyExc_TypeError, "compact() takes dicts for table and payload");
        return NULL;
    }
    Py_ssize_t table_max = PyLong_AsSsize_t(args[1]);
    if (table_max == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t str_max = PyLong_AsSsize_t(args[2]);
    if (str_max == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t members = PyDict_GET_SIZE(payload);
    int keep = 1;
    if (PyDict_GET_SIZE(table) + 2 * members > table_max) {
        if (2 * members > table_max)
            keep = 0;
        else
            PyDict_Clear(table);
    }

    PyObject *result = PyDict_New();
    if (result == NULL)
        return NULL;
    Py_ssize_t pos = 0;
    PyObject *name, *value;
    while (PyDict_Next(payload, &pos, &name, &value)) {
        /* Strong references: Python code can run below (hashing a name that is not an
         * exact str, a table key's own __eq__), though parsed payloads (exact str names)
         * and the table (str, tuples, frozensets) give it none; the borrowed references
         * must not depend on that. */
        Py_INCREF(name);
        Py_INCREF(value);
        PyObject *kept_name =
            PyUnicode_CheckExact(name) ? share(table, keep, name) : Py_NewRef(name);
        PyObject *kept_value = kept_name != NULL && PyUnicode_CheckExact(value)
                                       && PyUnicode_GET_LENGTH(value) <= str_max
                                   ? share(table, keep, value)
                                   : Py_NewRef(value);
        int failed = kept_name == NULL || kept_value == NULL
                     || PyDict_SetItem(result, kept_name, kept_value) < 0;
        Py_XDECREF(kept_name);
        Py_XDECREF(kept_value);
        Py_DECREF(name);
        Py_DECREF(value);
        if (failed) {
            Py_DECREF(result);
            return NULL;
        }
    }
    return result;
}

static PyMethodDef methods[] = {
    {"compact", (PyCFunction)(void (*)(void))compact, METH_FASTCALL,
     "compact(table, table_max, str_max, payload): the claims with shared strings."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_claims", "claim compaction for spoa.verifier.cache", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__claims(void)
{
    return PyModule_Create(&module_def);
}
